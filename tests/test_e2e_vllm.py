"""vLLM 0.26 end to end with our backend (attention_backend="CUSTOM"), each verdict of benchmarks/e2e.py
as its own test: SmolLM2 with CUDA graphs, eager and with n-gram speculation, judged against TRITON_ATTN
with FLASH_ATTN's disagreement as the floor; a Llama-3-8B-shaped random model; `vllm serve` over HTTP.

The engines run once per session (about 15 minutes on an H100, see benchmarks/e2e.py), or not at all when
PAGEDINFER_E2E_STATE names a state folder that `python benchmarks/e2e.py --engine vllm --state DIR` filled.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install 'pagedinfer[vllm]')", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("benchmarks_e2e", Path(__file__).parents[1] / "benchmarks" / "e2e.py")
e2e = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(e2e)

ENGINE = "vllm"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    state = os.environ.get("PAGEDINFER_E2E_STATE")
    if state is None:
        state = tmp_path_factory.mktemp(f"e2e-{ENGINE}")
        e2e.run_plan(ENGINE, Path(state), throughput=False)
    return e2e.evaluate(ENGINE, Path(state))


@pytest.mark.parametrize("name", e2e.verdict_names(ENGINE))
def test_verdict(verdicts, name):
    passed, detail = verdicts[name]
    if passed is None:
        pytest.skip(detail)
    assert passed, detail
