"""Scheduling shared by the attention ops: split-KV work lists (on the host, or on the device for CUDA-graph
steps of uniform batches), pinned staging, fixed buffers.

A work item (12 int32, the layout of `Item` in kernels/attention.cuh) is one key range of one work unit:
  unit, row_start (offset of its page ids), begin, end, slot, first_slot, chunks, (row block),
  (the request's qo_start, qo_len, kv_len, mask offset)
`slot` is where a chunk of a split unit leaves its partial (output, LSE); -1 when the item is the whole
range and writes the output itself. The caller maps units to (request, row block) and fills in the
request's numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ITEM_INTS = 12  # kernels/attention.cuh Item
PLAN_THREADS = 1024  # kernels/plan.cu
SPECIALIZATIONS = [("plan.cu", "plan_uniform")]


@dataclass(frozen=True)
class WorkList:
    items: np.ndarray   # [n, ITEM_INTS] int32
    num_slots: int      # partial results the split requests need

    @property
    def num_items(self) -> int:
        return self.items.shape[0]


def max_items(batch: int, kv_heads: int, target_ctas: int) -> int:
    """Upper bound of `split_kv` items for any lengths: the fixed grid of CUDA-graph mode."""
    return max(batch, target_ctas // kv_heads)


def positions_within(counts: np.ndarray) -> np.ndarray:
    """Each element's place inside its segment, for segments of `counts` elements back to back:
    0 .. counts[0] - 1, 0 .. counts[1] - 1, ..."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def split_kv(row_starts: np.ndarray, begins: np.ndarray, ends: np.ndarray, *, kv_heads: int, tile: int,
             target_ctas: int, min_chunk: int | None = None) -> WorkList:
    """Cuts requests into tile-aligned chunks when the batch alone cannot fill the GPU.

    With batch * kv_heads >= target_ctas every request is one item. Otherwise the chunk is the shortest
    whole number of tiles for which all items (times kv_heads CTAs each) still fit in one wave of
    `target_ctas`: a second, partial wave would double the time; and no shorter than `min_chunk` tokens.
    Each request's chunks are then made equal (rounded up to whole tiles), so no CTA waits on a longer
    sibling.
    """
    lens = (ends - begins).astype(np.int64)
    batch = lens.shape[0]
    budget = target_ctas // kv_heads
    if batch >= budget:
        chunks = np.ones(batch, dtype=np.int64)
    else:
        lo = max(1, -(-(min_chunk or tile) // tile))       # chunk length in tiles
        hi = max(lo, -(-int(lens.max()) // tile))
        # No shorter chunk fits: the chunks of any length c number at least sum(lens) / (c * tile). That
        # bound usually fits already, which spares the search its numpy calls (plan() runs every step).
        lo = min(hi, max(lo, -(-int(lens.sum()) // (tile * budget))))
        if int((-(-lens // (lo * tile))).sum()) <= budget:
            hi = lo
        while lo < hi:
            mid = (lo + hi) // 2
            if int((-(-lens // (mid * tile))).sum()) <= budget:
                hi = mid
            else:
                lo = mid + 1
        chunks = np.maximum(1, -(-lens // (lo * tile)))
    size = -(-(-(-lens // chunks)) // tile) * tile          # per request, whole tiles
    chunks = np.maximum(1, -(-lens // size))                 # rounding up may need fewer chunks
    n = int(chunks.sum())
    req = np.repeat(np.arange(batch), chunks)
    index = positions_within(chunks)
    split = chunks > 1
    first_slot = np.where(split, np.cumsum(np.where(split, chunks, 0)) - chunks, -1)
    items = np.zeros((n, ITEM_INTS), dtype=np.int32)
    items[:, 0] = req
    items[:, 1] = row_starts[req]
    items[:, 2] = begins[req] + index * size[req]
    items[:, 3] = np.minimum(items[:, 2] + size[req], ends[req])
    items[:, 4] = np.where(split[req], first_slot[req] + index, -1)
    items[:, 5] = first_slot[req]
    items[:, 6] = chunks[req]
    return WorkList(items, int(chunks[split].sum()))


def longest_first_by_request(items: np.ndarray, tile: int) -> np.ndarray:
    """The order in which prefill's work items are taken: by length class (whole tiles, powers of two), longest
    first, so that the short ones fill the tail of the wave; inside a class the items of one request together,
    longest first, so that the CTAs running at once share their request's K/V in L2. (Longest first alone
    interleaves all requests: at 16 x 1024 the K/V came from DRAM several times, at an L2 hit rate of 26%.)"""
    lengths = (items[:, 3] - items[:, 2]).astype(np.int64)
    size_class = np.floor(np.log2(np.maximum(1, -(-lengths // tile)))).astype(np.int64)
    return items[np.lexsort((-lengths, items[:, 0], -size_class))]


def plan_on_device(device, seq_lens: torch.Tensor, block_table: torch.Tensor, *, qo_len: int, group: int, rows: int,
                   page_size: int, tile: int, min_chunk: int, budget: int, window_left: int, causal: bool,
                   work: torch.Tensor, page_ids: torch.Tensor) -> None:
    """kernels/plan.cu: split_kv's items (each with its request's numbers) for a batch of `qo_len` query
    tokens per request, and the used page ids, from the lengths on the device. `budget`:
    work items that fit one wave (target CTAs / kv heads). int32 lengths and block table."""
    from .kernels import get_kernel
    kernel = get_kernel("plan.cu", "plan_uniform", device_index=device.index)
    kernel.launch((1,), (PLAN_THREADS,), (
        seq_lens, block_table, np.int64(block_table.stride(0)), np.int32(block_table.shape[0]), np.int32(qo_len),
        np.int32(group), np.int32(rows), np.int32(page_size), np.int32(tile), np.int32(min_chunk),
        np.int32(budget), np.int32(window_left), np.int32(causal), work, page_ids))


class HostStaging:
    """Pinned host buffers for plan()'s host->device copy, used in turn. A buffer is written again only
    after the copy that read it has run, so back-to-back plans never block on the GPU nor race it."""

    def __init__(self, count: int = 4):
        self._buffers: list = [None] * count
        self._events: list = [None] * count
        self._next = 0

    def take(self, numel: int) -> torch.Tensor:
        i = self._next
        if self._events[i] is not None:
            self._events[i].synchronize()
        if self._buffers[i] is None or self._buffers[i].numel() < numel:
            self._buffers[i] = torch.empty(max(numel, 1024), dtype=torch.int32, pin_memory=True)
        return self._buffers[i][:numel]

    def sent(self) -> None:
        """Marks the buffer from the last take() as handed to a copy on the current stream."""
        event = self._events[self._next] = torch.cuda.Event()
        event.record()
        self._next = (self._next + 1) % len(self._buffers)


def carve_buffers(specs: list[tuple[str, int, torch.dtype]], device, workspace: torch.Tensor | None = None) -> dict:
    """Device buffers by name: views into the caller's `workspace` (a uint8 tensor they own and keep, as
    CUDA graphs need fixed addresses) when given, else fresh allocations. Each starts 256-byte aligned."""
    sizes = [(-(-numel * torch.tensor([], dtype=dtype).element_size() // 256)) * 256 for _, numel, dtype in specs]
    if workspace is None:
        return {name: torch.empty(numel, dtype=dtype, device=device) for name, numel, dtype in specs}
    if workspace.dtype != torch.uint8 or workspace.device != torch.device(device) or workspace.dim() != 1 \
            or not workspace.is_contiguous() or workspace.data_ptr() % 256:
        raise ValueError(f"workspace: expected a contiguous 1-D uint8 tensor on {device}, 256-byte aligned, "
                         f"got {workspace.dtype} {tuple(workspace.shape)} on {workspace.device}")
    if workspace.numel() < sum(sizes):
        raise ValueError(f"workspace: expected at least {sum(sizes)} bytes for this plan, got {workspace.numel()}")
    out, at = {}, 0
    for (name, numel, dtype), size in zip(specs, sizes):
        out[name] = workspace[at:at + size].view(dtype)[:numel]
        at += size
    return out
