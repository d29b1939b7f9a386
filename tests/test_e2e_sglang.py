"""SGLang 0.5.16 end to end with our backend (attention_backend="pagedinfer"): SmolLM2 with CUDA graphs, eager
and with n-gram speculation, judged against triton with flashinfer's disagreement as the floor (eager runs
against their eager runs); a Llama-3-8B-shaped random model; `sglang.launch_server` over HTTP. About 14
minutes on an H100 (see benchmarks/e2e.py); tests/e2e_verdicts.py says how to reuse a finished run."""
import importlib.util

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed (pip install 'pagedinfer[sglang]')", allow_module_level=True)

from e2e_verdicts import verdict_tests  # noqa: E402

pytestmark = pytest.mark.e2e
verdicts, test_verdict = verdict_tests("sglang")
