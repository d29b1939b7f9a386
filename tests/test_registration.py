"""The engine entry points are declared, resolve to our functions, and are safe to call repeatedly."""
import importlib.metadata

import pytest

from pagedinfer import registration


@pytest.mark.parametrize("group,func", [("vllm.general_plugins", "register_vllm"),
                                        ("sglang.srt.plugins", "register_sglang")])
def test_entry_point_is_declared_and_idempotent(group, func):
    (ep,) = [e for e in importlib.metadata.entry_points(group=group) if e.name == "pagedinfer"]
    assert ep.value == f"pagedinfer.registration:{func}"
    loaded = ep.load()
    assert loaded is getattr(registration, func)
    loaded()
    loaded()


def test_vllm_loader_calls_our_entry_point(monkeypatch):
    """Inside vLLM's environment (nox session `vllm`): load_general_plugins() finds and calls us."""
    plugins = pytest.importorskip("vllm.plugins")
    calls = []
    monkeypatch.setattr(registration, "register_vllm", lambda: calls.append("vllm"))
    monkeypatch.setattr(plugins, "plugins_loaded", False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    plugins.load_general_plugins()
    assert calls == ["vllm"]


def test_sglang_loader_calls_our_entry_point(monkeypatch):
    """Inside SGLang's environment (nox session `sglang`): load_plugins() finds and calls us."""
    plugins = pytest.importorskip("sglang.srt.plugins")
    calls = []
    monkeypatch.setattr(registration, "register_sglang", lambda: calls.append("sglang"))
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    plugins.load_plugins()
    assert calls == ["sglang"]
