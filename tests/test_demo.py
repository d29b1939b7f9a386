"""`pagedinfer demo` without what it needs: a clear message naming the missing piece and the install command,
exit code 2, no engine started."""
import argparse
import subprocess

import pytest

from pagedinfer import demo


def _args(*argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(autouse=True)
def no_engine_start(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the demo started an engine although requirements are missing")
    monkeypatch.setattr(subprocess, "run", refuse)


@pytest.mark.parametrize("engine, name", [("vllm", "vLLM"), ("sglang", "SGLang")])
def test_engine_missing(monkeypatch, capsys, engine, name):
    monkeypatch.setattr(demo, "_installed", lambda module: module != engine)
    monkeypatch.setattr(demo, "_gpu", lambda: True)
    assert demo.run(_args("--engine", engine)) == 2
    err = capsys.readouterr().err
    assert f"{name} is not installed" in err and "GPU is visible" not in err
    assert f'pip install "pagedinfer[{engine},cu13,demo]"' in err


def test_gpu_missing(monkeypatch, capsys):
    monkeypatch.setattr(demo, "_installed", lambda module: True)
    monkeypatch.setattr(demo, "_gpu", lambda: False)
    assert demo.run(_args()) == 2
    err = capsys.readouterr().err
    assert "no NVIDIA GPU is visible to torch" in err and "not installed" not in err
    assert 'pip install "pagedinfer[vllm,cu13,demo]"' in err


def test_default_engine_is_vllm():
    assert _args().engine == "vllm" and _args().model is None
