"""The examples: every one compiles anywhere; the direct-API one runs on a GPU and agrees with the reference."""
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_example_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "example.pyc"), doraise=True)


@pytest.mark.gpu
def test_direct_api_runs():
    result = subprocess.run([sys.executable, str(EXAMPLES / "direct_api.py")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "decode: max |out - reference|" in result.stdout and "prefill: max |out - reference|" in result.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("engine,command", [("vllm", [sys.executable, "vllm_offline.py"]),
                                            ("vllm", ["bash", "vllm_serve.sh"]),
                                            ("sglang", ["bash", "sglang_serve.sh"])], ids=lambda x: str(x))
def test_engine_example_answers(engine, command):
    """Each engine example starts its engine with our backend and answers the France question."""
    pytest.importorskip(engine)
    result = subprocess.run(command, cwd=EXAMPLES, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Paris" in result.stdout, result.stdout[-2000:]
