"""vLLM 0.26 end to end with our backend (attention_backend="CUSTOM"): SmolLM2 with CUDA graphs, eager and
with n-gram speculation, judged against TRITON_ATTN with FLASH_ATTN's disagreement as the floor (eager runs
against their eager runs); a Llama-3-8B-shaped random model; `vllm serve` over HTTP. About 17 minutes on an
H100 (see benchmarks/e2e.py); tests/e2e_verdicts.py says how to reuse a finished run."""
import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install 'pagedinfer[vllm]')", allow_module_level=True)

from e2e_verdicts import verdict_tests  # noqa: E402

pytestmark = pytest.mark.e2e
verdicts, test_verdict = verdict_tests("vllm")
