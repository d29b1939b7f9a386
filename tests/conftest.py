"""GPU and E2E tests skip cleanly on a machine without an NVIDIA GPU (CI), with the reason shown."""
import pytest
import torch


def _gpu_missing() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "cupy is not installed (pip install pagedinfer[cu13] or [cu12])"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords or "e2e" in item.keywords:
            item.add_marker(skip)
