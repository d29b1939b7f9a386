"""Argument checks shared by every public entry.

Each failure is a ValueError that names the argument, what is accepted and what was given, so a
wrong call stops in Python instead of faulting (or silently misreading memory) on the GPU.
"""
from __future__ import annotations

import os

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 80, 96, 128, 256)
MAX_GROUP = 16
PAGE_SIZES = tuple(2**i for i in range(9))  # 1 .. 256
INDEX_DTYPES = (torch.int32,)


def debug_enabled() -> bool:
    """PAGEDINFER_DEBUG=1 turns on checks that need a device->host sync (page ids on the GPU)."""
    return os.environ.get("PAGEDINFER_DEBUG", "0") not in ("", "0")


def fail(name: str, accepted: str, got) -> None:
    raise ValueError(f"{name}: expected {accepted}, got {got}")


def _dtype_names(dtypes) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        fail(name, "a torch.Tensor", type(t).__name__)
    if ndim is not None and t.dim() != ndim:
        fail(name, f"a {ndim}-D tensor", f"shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(name, f"dtype {_dtype_names(dtypes)}", str(t.dtype).replace("torch.", ""))
    if device is not None and t.device != torch.device(device):
        fail(name, f"a tensor on {device}", f"a tensor on {t.device}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` may hold None for a free dimension."""
    ok = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        fail(name, f"shape {want}", f"{list(t.shape)}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        fail(name, "one of " + ", ".join(str(c) for c in choices), value)


def check_head_dim(name: str, head_dim: int) -> None:
    check_choice(name, head_dim, HEAD_DIMS)


def check_group(q_heads: int, kv_heads: int) -> int:
    """Returns the GQA group size (query heads per KV head)."""
    if kv_heads < 1 or q_heads % kv_heads:
        fail("num_qo_heads", f"a multiple of num_kv_heads={kv_heads}", q_heads)
    group = q_heads // kv_heads
    if group > MAX_GROUP:
        fail("num_qo_heads / num_kv_heads", f"a GQA group size from 1 to {MAX_GROUP}", group)
    return group


def check_page_size(page_size: int) -> None:
    check_choice("page_size", page_size, PAGE_SIZES)


def check_sm_scale(sm_scale: float | None, head_dim: int) -> float:
    if sm_scale is None:
        return head_dim ** -0.5
    if not (float(sm_scale) > 0):
        fail("sm_scale", "a positive number", sm_scale)
    return float(sm_scale)


def check_soft_cap(logits_soft_cap: float | None) -> float:
    cap = 0.0 if logits_soft_cap is None else float(logits_soft_cap)
    if cap < 0:
        fail("logits_soft_cap", "0 (off) or a positive number", logits_soft_cap)
    return cap


def check_window(window_left: int | None) -> int:
    w = -1 if window_left is None else int(window_left)
    if w < -1:
        fail("window_left", "-1 (off) or a number of keys >= 0", window_left)
    return w
