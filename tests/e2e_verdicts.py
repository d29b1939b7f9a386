"""The E2E tests of both engines: each verdict of benchmarks/e2e.py as its own test. The engine runs once
per test module, or not at all when PAGEDINFER_E2E_STATE names a state folder that
`python benchmarks/e2e.py --engine ENGINE --state DIR` filled."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("benchmarks_e2e", Path(__file__).parents[1] / "benchmarks" / "e2e.py")
e2e = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(e2e)


def verdict_tests(engine: str):
    """(fixture, test) for a test module: `verdicts, test_verdict = verdict_tests("vllm")`."""

    @pytest.fixture(scope="module")
    def verdicts(tmp_path_factory):
        state = os.environ.get("PAGEDINFER_E2E_STATE")
        if state is None:
            state = tmp_path_factory.mktemp(f"e2e-{engine}")
            e2e.run_plan(engine, Path(state), throughput=False)
        return e2e.evaluate(engine, Path(state))

    @pytest.mark.parametrize("name", e2e.verdict_names(engine))
    def test_verdict(verdicts, name):
        passed, detail = verdicts[name]
        if passed is None:
            pytest.skip(detail)
        assert passed, detail

    return verdicts, test_verdict
