"""Bit-packed boolean attention masks, one segment per request.

Format (the one convention every op and kernel uses):
- Each request's mask is a 2-D bool tensor, flattened row-major; element e of the flattened mask is
  bit (e % 8) of byte (e // 8) of the request's segment (LITTLE bit order: bit 0 is the lowest bit).
- Every segment starts on a byte boundary; `indptr[b]` is the byte offset of request b's segment, and
  the last byte of a segment is zero-padded.
- Prefill custom masks are `[qo_len, kv_len]` per request: bit (i * kv_len + j) set when query i may
  attend key j.
- Verify tree masks are `[qo_len, qo_len]` per request: bit (j * qo_len + i) set when draft j may attend
  draft i (row = the attending draft, column = the attended draft).
"""
from __future__ import annotations

import numpy as np
import torch

from .validate import check_tensor, fail

# Bit e of a byte has weight 1 << e; kept as a tuple so it is built on the right device when used.
_BIT_WEIGHTS = tuple(1 << e for e in range(8))


def _bit_weights(device) -> torch.Tensor:
    return torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=device)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Packs a 1-D bool tensor into ceil(n / 8) bytes, little bit order, last byte zero-padded."""
    n = bits.numel()
    nbytes = (n + 7) // 8
    padded = torch.zeros(nbytes * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.to(torch.uint8)
    # Weighted sum of each group of 8 bits; at most 255, so the uint8 cast is exact.
    return (padded.view(nbytes, 8) * _bit_weights(bits.device)).sum(dim=1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """The n bits that start at byte `start` of `packed`, as a 1-D bool tensor."""
    nbytes = (n + 7) // 8
    chunk = packed[start:start + nbytes]
    return ((chunk[:, None] & _bit_weights(packed.device)) != 0).reshape(-1)[:n]


def pack_masks(masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs one 2-D bool mask per request.

    Returns `(packed, indptr)`: `packed` a 1-D uint8 tensor holding the byte-aligned segments back to
    back, `indptr` int32 `[B + 1]` with `indptr[b]` the byte offset of request b. Both live on the
    masks' device.
    """
    if not isinstance(masks, (list, tuple)) or len(masks) == 0:
        fail("masks", "a non-empty list of 2-D bool tensors", f"{type(masks).__name__} {masks!r:.40}")
    device = masks[0].device if isinstance(masks[0], torch.Tensor) else None
    segments = []
    for b, m in enumerate(masks):
        check_tensor(f"masks[{b}]", m, ndim=2, dtypes=(torch.bool,), device=device)
        segments.append(_pack_bits(m.reshape(-1)))
    sizes = torch.tensor([0] + [s.numel() for s in segments], dtype=torch.int64)
    indptr = sizes.cumsum(0).to(torch.int32).to(device)
    return torch.cat(segments), indptr


def unpack_mask(packed: torch.Tensor, indptr: torch.Tensor, b: int, rows: int, cols: int) -> torch.Tensor:
    """Request b's `[rows, cols]` bool mask from `pack_masks` output."""
    return _unpack_request(packed, indptr, b, rows, cols, "packed", "indptr")


def _unpack_request(packed, indptr, b: int, rows: int, cols: int, name: str, indptr_name: str):
    """unpack_mask with the caller's argument names in its errors (ops call it with theirs)."""
    check_tensor(name, packed, ndim=1, dtypes=(torch.uint8,))
    check_tensor(indptr_name, indptr, ndim=1)
    if not 0 <= b < indptr.shape[0] - 1:
        fail("b", f"a request index in [0, {indptr.shape[0] - 2}]", b)
    if rows < 0 or cols < 0:
        fail("rows, cols", "sizes >= 0", (rows, cols))
    start, end = int(indptr[b]), int(indptr[b + 1])
    nbytes = (rows * cols + 7) // 8
    if end - start < nbytes or start + nbytes > packed.numel():
        fail(name, f"{nbytes} bytes for request {b}'s [{rows}, {cols}] mask at byte {start}",
             f"a segment of {end - start} bytes in a buffer of {packed.numel()}")
    return _unpack_bits(packed, start, rows * cols).view(rows, cols)


# Bits unpacked at a time by visible_spans: 32 MB of int32 indices per pass at most.
_SPAN_BITS = 1 << 23


def visible_spans(packed: torch.Tensor, offsets: np.ndarray, qo_lens: np.ndarray,
                  kv_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every query token of `[qo_len, kv_len]` prefill masks (requests back to back): the first key its
    row sets, one past the last, and one past the run of set keys from the first ((kv_len, 0, kv_len) for a
    row that sees nothing). Request b's segment starts at byte offsets[b] of `packed`. Works where `packed`
    lives; the result comes to the host (a sync for a mask on the GPU)."""
    firsts, ends, runs = [], [], []
    for start, q, n in zip(offsets.tolist(), qo_lens.tolist(), kv_lens.tolist()):
        keys = torch.arange(n, dtype=torch.int32, device=packed.device)
        rows = max(1, _SPAN_BITS // n)
        for r0 in range(0, q, rows):
            r1 = min(q, r0 + rows)
            bit0 = r0 * n  # row r0 starts mid-byte when n is not a multiple of 8
            bits = _unpack_bits(packed, start + bit0 // 8, (r1 - r0) * n + bit0 % 8)[bit0 % 8:].view(r1 - r0, n)
            first = torch.where(bits, keys, n).amin(dim=1)
            firsts.append(first)
            ends.append(torch.where(bits, keys + 1, 0).amax(dim=1))
            runs.append(torch.where(~bits & (keys >= first[:, None]), keys, n).amin(dim=1))
    return tuple(torch.cat(x).cpu().numpy() for x in (firsts, ends, runs))
