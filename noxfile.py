"""The test command: `nox` creates the environments and runs every test.

Session `tests`: CPU tests, the NVRTC compile check for sm_80 and sm_90a, and the GPU tests (skipped
without a GPU). Set PAGEDINFER_TORCH to pin the torch requirement (e.g. a CPU build) if you like.
Sessions `vllm` and `sglang`: each engine's own environment (vLLM 0.26.0 and SGLang 0.5.16 pin torch 2.11.0
and cannot share one), where that engine's tests run.
"""
import os

import nox

nox.options.sessions = ["tests", "vllm", "sglang"]
nox.options.error_on_missing_interpreters = True


@nox.session
def tests(session):
    session.install(os.environ.get("PAGEDINFER_TORCH", "torch"))
    session.install("-e", ".[test,cu13,demo]")
    session.run("pytest", "-ra", *session.posargs)


def _engine_session(session, requirement: str, engine: str) -> None:
    session.install(requirement, "pytest")
    session.install("--no-deps", "-e", ".")  # the engine brings torch and numpy
    session.run("pytest", "-ra", "tests/test_registration.py", f"tests/test_adapter_{engine}.py", *session.posargs)


@nox.session
def vllm(session):
    _engine_session(session, "vllm==0.26.0", "vllm")


@nox.session
def sglang(session):
    _engine_session(session, "sglang==0.5.16", "sglang")
