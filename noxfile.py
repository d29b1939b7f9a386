"""The test command: `nox` creates the environments and runs every test.

Session `tests`: CPU tests, the NVRTC compile check for sm_80 and sm_90a, and the GPU tests (skipped
without a GPU). Set PAGEDINFER_TORCH to pin the torch requirement (e.g. a CPU build) if you like.
Session `vllm`: vLLM 0.26.0's own environment (it pins torch 2.11.0), where the engine tests run.
"""
import os

import nox

nox.options.sessions = ["tests", "vllm"]
nox.options.error_on_missing_interpreters = True


@nox.session
def tests(session):
    session.install(os.environ.get("PAGEDINFER_TORCH", "torch"))
    session.install("-e", ".[test,cu13]")
    session.run("pytest", "-ra", *session.posargs)


@nox.session
def vllm(session):
    session.install("vllm==0.26.0", "pytest")
    session.install("--no-deps", "-e", ".")
    session.run("pytest", "-ra", "tests/test_registration.py", *session.posargs)
