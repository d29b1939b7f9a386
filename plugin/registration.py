"""Entry points the engines call in every process (vLLM: `vllm.general_plugins`, SGLang:
`sglang.srt.plugins`). They must be idempotent, import no CUDA, and never fail: an engine that cannot load
a plugin logs it and carries on without our backend."""
from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger("pagedinfer")


def _register_adapter(engine: str) -> None:
    # The adapter module owns its engine's registration and imports the engine: without it, nothing to do.
    if importlib.util.find_spec(engine) is None:
        log.debug("pagedinfer: %s is not installed; nothing to register", engine)
        return
    importlib.import_module(f"pagedinfer.adapters.{engine}").register()


def register_vllm() -> None:
    _register_adapter("vllm")


def register_sglang() -> None:
    _register_adapter("sglang")
