"""Entry points the engines call in every process (vLLM: `vllm.general_plugins`, SGLang:
`sglang.srt.plugins`). They must be idempotent, import no CUDA, and never fail: an engine that cannot load
a plugin logs it and carries on without our backend."""
from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger("pagedinfer")


def _register_adapter(module: str) -> None:
    # The adapter module owns its engine's registration; an engine without its adapter yet has nothing to do.
    if importlib.util.find_spec(module) is None:
        log.debug("pagedinfer: %s is not part of this version; nothing to register", module)
        return
    importlib.import_module(module).register()


def register_vllm() -> None:
    _register_adapter("pagedinfer.adapters.vllm")


def register_sglang() -> None:
    _register_adapter("pagedinfer.adapters.sglang")
