"""Batch decode: one query token per request against a paged KV cache, grouped-query attention.
(`pagedinfer.verify` runs the same kernel with up to 16 draft tokens per request.)

    wrapper = DecodeWrapper()                     # once
    wrapper.plan(table, num_qo_heads=32, num_kv_heads=8, head_dim=128)   # once per step, host side
    out = wrapper.run(q, kv_cache)                # per layer: one launch, no host decision

`plan` turns the page table into a work list (requests split into chunks when the batch cannot fill the
GPU) and sends it, with the page ids when they come from the host, to the device in one copy. `run` makes
no host decision and allocates nothing but the outputs it is not given, so it can be captured in a CUDA
graph. With `use_cuda_graph=True` every device buffer has a fixed address and the grid a fixed size, so a
graph captured once stays correct after any later `plan` that fits the capacities. In that mode a uniform
batch over a block table on the GPU (what engines capture) is planned by a kernel from the lengths on the
device: no host work list, no copy, no device->host read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import plan as planning
from .launch_args import CacheArgs, check_rows
from .paged import BlockTable, PageTable, as_paged_kv_cache
from .validate import (HALF_DTYPES, check_group, check_head_dim, check_shape, check_sm_scale, check_soft_cap,
                       check_tensor, check_window, fail)

LOG2E = 1.4426950408889634
_DTYPE_TAGS = {torch.bfloat16: "bf16", torch.float16: "fp16"}
# Mirrors kernels/decode.cu: 4 warps, 64-token tiles.
_THREADS = 128
_TILE = 64
_SMEM_PER_CTA = 110 * 1024  # two CTAs per multiprocessor where the head dim allows
_MIN_CHUNK = 2 * _TILE       # a split chunk streams at least two tiles: its fixed costs stay a small share
# Split work units of at least this many query rows merge their chunks in a second launch, every chunk's CTA
# taking a share of the rows (kernels/decode.cu merge_split); smaller ones in the last chunk's CTA.
# PAGEDINFER_MERGE_APART=0 keeps every merge in the last CTA.
_MERGE_APART_ROWS = 32


NO_MASK, CAUSAL, TREE, CUSTOM = 0, 1, 2, 3  # kernels/decode.cu: Mask


def _stages(head_dim: int, rows: int = 1) -> tuple[int, int]:
    """Pipeline depth and dynamic shared memory for requests of up to `rows` query rows (tokens x group): as
    many 64-token K+V stages (2-4) as fit the budget. Rows of whole 128-byte lines are stored as they are
    (swizzled), others padded by 8 elements (kernels/decode.cu). Four at head dim 128 where a request fills four
    row tiles (verification of 9-16 drafts at group 4), which leaves one CTA per SM (verify 16 x 16 x 8192
    causal 215.3 -> 200.0 us on an H100, benchmarks/results/sweep_plan-decode-verify.json; tree 201.9 us,
    benchmarks/results/verify.json)."""
    pitch = head_dim if head_dim % 64 == 0 else head_dim + 8
    stage_bytes = 2 * _TILE * pitch * 2
    stages = 4 if head_dim == 128 and 32 < rows <= 64 else max(2, min(4, _SMEM_PER_CTA // stage_bytes))
    return stages, stages * stage_bytes


def _ctas_per_sm(head_dim: int, rows: int) -> int:
    """The most CTAs of a kernel for `rows` query rows per request that may share a multiprocessor (0: as many
    as fit). Where there is little work per byte read, fewer streams, each as deep, read the paged cache faster
    on an H100 (`sweep_plan.py --ctas-per-sm`, benchmarks/results/sweep_plan-decode-verify.json): one for
    decode at head dim 128 (1 x 2048 graph 8.1 -> 7.3 us, 64 x 8192 705.6 -> 702.0, 128 x 16384 2806 -> 2784),
    two for verify's one row tile at head dim 64 (9/3/64 64 x 4 x 2048 57.4 -> 52.7 us). Decode at head dim 64
    keeps three (64 x 8192: 148.0 us, two: 152.1) and verify at 128 two (64 x 8 x 4096: 378.8 us, one: 388.1)."""
    if head_dim == 128 and rows <= 8:
        return 1
    if head_dim == 64 and 8 < rows <= 16:
        return 2
    return 0


def row_tiles(rows: int) -> int:
    """16-row MMA tiles per CTA (1, 2 or 4) for `rows` query rows (tokens x group) per request and KV head;
    more rows make more work units of that many rows."""
    tiles = -(-rows // 16)
    return 1 if tiles <= 1 else 2 if tiles <= 2 else 4


def merge_kernel_name(dtype_tag: str, rows: int, head_dim: int, group: int) -> str:
    return f"merge_split<{dtype_tag}, {rows}, {head_dim}, {group}>"


def kernel_name(dtype_tag: str, head_dim: int, group: int, page_size: int, soft_cap: bool, m_tiles: int = 1,
                mask: int = NO_MASK, high_rows: bool | None = None, rows: int = 1) -> str:
    """`high_rows`: some request has more than 8 query rows (defaults to: more than one token or group > 8);
    `rows`: the most query rows of a request (the pipeline depth, _stages)."""
    soft = "true" if soft_cap else "false"
    high = (mask != NO_MASK or m_tiles > 1 or group > 8) if high_rows is None else high_rows
    return (f"decode<{dtype_tag}, {head_dim}, {group}, {page_size}, {soft}, {_stages(head_dim, rows)[0]}, "
            f"{m_tiles}, {mask}, {'true' if high else 'false'}>")


# A representative set for the CI compile check: every dtype, head dim, soft-cap flag, and groups and page
# sizes at both ends and in between. Other combinations compile on first use.
SPECIALIZATIONS = [("decode.cu", kernel_name(*spec)) for spec in [
    ("bf16", 128, 4, 16, False), ("fp16", 64, 3, 1, True), ("bf16", 80, 5, 256, False),
    ("fp16", 96, 8, 32, True), ("bf16", 256, 16, 8, False), ("bf16", 64, 1, 64, False),
    ("fp16", 128, 7, 128, False), ("bf16", 128, 4, 16, False, 2, CAUSAL), ("fp16", 64, 3, 16, True, 4, TREE),
    ("bf16", 256, 16, 1, False, 4, CAUSAL), ("bf16", 96, 2, 64, False, 4, CUSTOM), ("fp16", 80, 1, 8, True, 4, NO_MASK),
    ("bf16", 128, 4, 16, False, 4, TREE, True, 64), ("bf16", 128, 4, 16, False, 4, CAUSAL, True, 64)]]
SPECIALIZATIONS += [("decode.cu", merge_kernel_name(*spec)) for spec in [
    ("bf16", 32, 128, 4), ("fp16", 64, 64, 3), ("bf16", 64, 256, 16), ("fp16", 32, 80, 1), ("bf16", 64, 96, 7)]]


@dataclass(frozen=True)
class KernelSpec:
    """One kernel specialisation and how plan() cuts work for it."""
    source: str
    name: str
    threads: int
    rows: int       # query rows (token x head) per work unit
    tile: int       # keys per pipeline stage: split chunks are whole tiles
    min_chunk: int  # shortest split chunk, in keys
    smem: int       # dynamic shared memory, bytes
    persistent: bool = False  # one wave of CTAs, each taking (item, KV head) pairs until none are left
    ctas_per_sm: int = 0  # the most CTAs sharing a multiprocessor (0: as many as fit); plan() pads smem for it


def decode_spec(dtype_tag: str, head_dim: int, group: int, page_size: int, soft_cap: bool, max_tokens: int,
                mask: int) -> KernelSpec:
    """decode.cu (mma.sync, every architecture from sm_80) for requests of up to `max_tokens` query tokens."""
    rows = max_tokens * group
    m_tiles = row_tiles(rows)
    name = kernel_name(dtype_tag, head_dim, group, page_size, soft_cap, m_tiles, mask, rows > 8, rows)
    return KernelSpec("decode.cu", name, _THREADS, 16 * m_tiles, _TILE, _MIN_CHUNK, _stages(head_dim, rows)[1],
                      ctas_per_sm=_ctas_per_sm(head_dim, rows))


class DecodeWrapper:
    MAX_QO_LEN = 1  # query tokens per request this wrapper accepts (VerifyWrapper: 16, PrefillWrapper: 32768)
    LONGEST_FIRST = False  # order work items longest first, by request within a size class (plan.py)

    def __init__(self, device="cuda", *, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 max_batch_size: int | None = None, max_pages: int | None = None,
                 workspace: torch.Tensor | None = None, max_qo_len: int | None = None):
        """`use_cuda_graph=True` fixes every buffer at the first plan: give the largest batch
        (`max_batch_size`), the most page ids (`max_pages`, the summed page count of a batch) and, for
        verify and prefill, the most query tokens per request (`max_qo_len`) it will see. `workspace`
        (uint8, owned by the caller) holds those buffers instead of allocations of the wrapper's own; plan()
        says how many bytes it needs if it is too small."""
        max_qo_len = self.MAX_QO_LEN if max_qo_len is None else max_qo_len
        if not 1 <= max_qo_len <= self.MAX_QO_LEN:
            fail("max_qo_len", f"1 to {self.MAX_QO_LEN} tokens per request", max_qo_len)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.kv_layout = kv_layout
        self.use_cuda_graph = use_cuda_graph
        if use_cuda_graph and (not max_batch_size or not max_pages or max_batch_size < 1 or max_pages < 1):
            fail("max_batch_size, max_pages", "positive capacities when use_cuda_graph=True",
                 (max_batch_size, max_pages))
        self.max_batch_size, self.max_pages = max_batch_size, max_pages
        self.max_qo_len = max_qo_len  # query tokens per request the CUDA-graph buffers are sized for
        self.workspace = workspace
        self._plan = None
        self._configs: dict = {}  # see _config
        self._buffers = None  # device buffers, grown in eager mode, fixed in CUDA-graph mode
        self._staging = planning.HostStaging()
        self._caches = CacheArgs(kv_layout)

    # ------------------------------------------------------------------------------------------ plan

    def plan(self, table: PageTable | BlockTable, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
             q_dtype: torch.dtype = torch.bfloat16, kv_dtype: torch.dtype | None = None,
             sm_scale: float | None = None, logits_soft_cap: float | None = None, window_left: int = -1,
             kv_lens_host: torch.Tensor | None = None, indptr_host: torch.Tensor | None = None) -> None:
        """Host side of one decode step. For a page table on the GPU, pass `kv_lens_host` (and, for CSR,
        `indptr_host`) to avoid a device->host copy; without them plan reads them back (one sync)."""
        self._check_table(table)
        batch = table.batch_size
        self._plan_requests(table, np.arange(batch), np.ones(batch, dtype=np.int64), num_qo_heads, num_kv_heads,
                            head_dim, q_dtype=q_dtype, kv_dtype=kv_dtype, sm_scale=sm_scale,
                            logits_soft_cap=logits_soft_cap, window_left=window_left, kv_lens_host=kv_lens_host,
                            indptr_host=indptr_host)

    def _query_offsets(self, qo_indptr: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(first q row, query tokens) per request from qo_indptr (read on the host)."""
        check_tensor("qo_indptr", qo_indptr, ndim=1, dtypes=(torch.int32,))
        check_shape("qo_indptr", qo_indptr, (batch + 1,))
        offsets = qo_indptr.cpu().numpy().astype(np.int64)
        qo_lens = np.diff(offsets)
        if offsets[0] != 0 or qo_lens.min() < 1 or qo_lens.max() > self.max_qo_len:
            fail("qo_indptr", f"offsets from 0 with 1 to {self.max_qo_len} tokens per request", offsets.tolist()[:8])
        return offsets[:-1], qo_lens

    @staticmethod
    def _mask_offsets(name: str, mask_bits, indptr_name: str, mask_indptr, need: np.ndarray) -> np.ndarray:
        """Byte offsets of each request's packed mask, checked to give request i `need[i]` bytes."""
        check_tensor(name, mask_bits, ndim=1, dtypes=(torch.uint8,))
        check_tensor(indptr_name, mask_indptr, ndim=1, dtypes=(torch.int32,))
        check_shape(indptr_name, mask_indptr, (need.shape[0] + 1,))
        offsets = mask_indptr.cpu().numpy().astype(np.int64)
        if offsets[0] < 0 or bool((offsets[1:] - offsets[:-1] < need).any()) or offsets[-1] > mask_bits.numel():
            fail(indptr_name, f"byte offsets giving each request its packed bits of {name}", offsets.tolist()[:8])
        return offsets[:-1]

    def _check_table(self, table) -> None:
        if not isinstance(table, (PageTable, BlockTable)):
            fail("table", "a PageTable or BlockTable (pagedinfer.csr_page_table / block_page_table)",
                 type(table).__name__)
        if self.use_cuda_graph and table.batch_size > self.max_batch_size:
            fail("table", f"at most max_batch_size={self.max_batch_size} requests", table.batch_size)

    def _plan_requests(self, table, qo_starts: np.ndarray, qo_lens: np.ndarray, num_qo_heads: int,
                       num_kv_heads: int, head_dim: int, *, q_dtype, kv_dtype, sm_scale, logits_soft_cap,
                       window_left, kv_lens_host, indptr_host, mask: int = NO_MASK, mask_bits=None,
                       mask_offsets: np.ndarray | None = None, mask_spans=None) -> None:
        """The plan shared by decode, verify and prefill: request i has qo_lens[i] query tokens from row
        qo_starts[i] of q, the last qo_lens[i] keys of its KV being their own. `mask_bits` (uint8 on the
        device) holds the packed tree or custom masks, request i's at byte mask_offsets[i]; `mask_spans`
        (custom masks) the keys each query token's row sees, as masks.visible_spans gives them."""
        batch = table.batch_size
        on_device = self._plans_on_device(table, qo_lens, mask)
        if on_device:
            lens = None if kv_lens_host is None else self._host_lengths(table, kv_lens_host, indptr_host)[0]
        else:
            lens, row_starts = self._host_lengths(table, kv_lens_host, indptr_host)
        if lens is not None:
            if lens.min() < 1:
                fail("kv lengths", "every request holding at least one token", int(lens.min()))
            if bool((qo_lens > lens).any()):
                fail("qo_indptr", "at most kv_len query tokens per request (their keys are in the cache)",
                     f"qo_len {int(qo_lens.max())} with kv lengths down to {int(lens.min())}")
        max_tokens = self.max_qo_len if self.use_cuda_graph else int(qo_lens.max())
        group, scale, cap, window, spec, kernel, target, merger = self._config(
            q_dtype, kv_dtype, head_dim, num_qo_heads, num_kv_heads, table.page_size, sm_scale, logits_soft_cap,
            window_left, max_tokens, mask)
        shape = (num_qo_heads, num_kv_heads, head_dim, spec.rows)
        if on_device:
            capacity = self._graph_buffers(group, spec, num_kv_heads, target, shape, 0)
            split = batch * -(-int(qo_lens[0]) * group // spec.rows) < target // num_kv_heads  # as plan.cu
            page_ids = self._plan_on_device(table, int(qo_lens[0]), group, spec, target // num_kv_heads, window,
                                            mask)
        else:
            work = self._work_list(qo_starts, qo_lens, lens, row_starts, group, spec, num_kv_heads, target,
                                   window, mask, mask_offsets, mask_spans)
            split = work.num_slots > 0
            page_ids_dev, host_ids = self._page_ids_source(table)
            mask_bytes = 0 if mask_bits is None else mask_bits.numel()
            if self.use_cuda_graph:
                capacity = self._graph_buffers(group, spec, num_kv_heads, target, shape, mask_bytes)
            else:
                capacity = work.num_items
                self._check_capacity(capacity, spec.rows)
                self._ensure_buffers(dict(items=capacity, slots=max(work.num_slots, 1),
                                          ids=0 if host_ids is None else host_ids.numel(), mask=mask_bytes + 32),
                                     shape)
            page_ids = self._upload(work, host_ids, page_ids_dev)
            if mask_bits is not None:
                self._buffers["mask"][:mask_bytes].copy_(mask_bits, non_blocking=True)

        # A graph replays the launches of its capture: merge_split or not, correct for any later plan.
        merger = merger if split else None
        b = self._buffers
        qk_scale = scale / cap if cap > 0 else scale * LOG2E
        ptrs = (page_ids, b["work"][planning.ITEM_INTS:], b["work"], b["mask"])
        self._plan = dict(
            kernel=kernel, tokens=int(qo_lens.sum()), q_heads=num_qo_heads, kv_heads=num_kv_heads,
            head_dim=head_dim, dtype=q_dtype, page_size=table.page_size,
            # persistent: at least one CTA per SM (the few past it find the queue empty when they start)
            grid=(num_kv_heads, min(capacity, -(-target // num_kv_heads)) if spec.persistent else capacity),
            threads=(spec.threads,), smem=spec.smem, merger=merger,
            work_args=tuple(np.uint64(t.data_ptr()) for t in ptrs),
            tail_args=(*(np.uint64(b[k].data_ptr()) for k in ("partial_o", "partial_lse", "counters")),
                       np.float32(qk_scale), np.float32(cap * LOG2E), np.int32(window),
                       np.int32(merger is not None)),  # merge_apart
            keep_alive=page_ids)  # the kernel reads these page ids by address

    def _work_list(self, qo_starts, qo_lens, lens, row_starts, group, spec, num_kv_heads, target, window, mask,
                   mask_offsets, mask_spans) -> planning.WorkList:
        """Work units (request, block of `spec.rows` query rows), each over the keys its rows can see, cut
        into items by split_kv, each with its request's numbers."""
        batch, block = qo_lens.shape[0], spec.rows
        prefix = lens - qo_lens
        blocks = -(-qo_lens * group // block)
        unit_req = np.repeat(np.arange(batch), blocks)
        unit_block = planning.positions_within(blocks)
        first_tok = unit_block * block // group
        last_tok = np.minimum(qo_lens[unit_req] - 1, (unit_block * block + block - 1) // group)
        ends = lens[unit_req]
        if mask == CAUSAL:
            ends = np.minimum(ends, prefix[unit_req] + last_tok + 1)
        begins = (np.maximum(0, prefix[unit_req] + first_tok - window) if window >= 0
                  else np.zeros_like(ends))
        if mask_spans is not None:
            begins, ends = self._custom_bounds(begins, ends, mask_spans, qo_lens, unit_req, first_tok, last_tok)
        work = planning.split_kv(row_starts[unit_req], begins, ends, kv_heads=num_kv_heads, tile=spec.tile,
                                 target_ctas=target, min_chunk=spec.min_chunk)
        work.items[:, 7] = unit_block[work.items[:, 0]]
        work.items[:, 0] = unit_req[work.items[:, 0]]
        requests = np.stack([qo_starts, qo_lens, lens, np.zeros(batch, np.int64) if mask_offsets is None
                             else mask_offsets], axis=1)
        work.items[:, 8:12] = requests[work.items[:, 0]]
        if self.LONGEST_FIRST:  # prefill's uneven causal units
            work = planning.WorkList(planning.longest_first_by_request(work.items, spec.tile), work.num_slots)
        return work

    @staticmethod
    def _custom_bounds(begins, ends, mask_spans, qo_lens, unit_req, first_tok, last_tok):
        """Narrows each unit's keys to those its rows' custom masks set, so that masked-off keys cost
        nothing and split_kv balances the true work (a causal pattern given as bits plans as causal). A
        unit that sees no key keeps one (its rows come out as zeros with LSE -inf)."""
        first, end = mask_spans
        tok0 = (np.cumsum(qo_lens) - qo_lens)[unit_req]
        # Units hold consecutive tokens of a request; neighbours may share one when rows % group != 0, so
        # each range is [its first token, the next unit's first) plus its last token.
        lo, hi = tok0 + first_tok, tok0 + last_tok
        unit_first = np.minimum(np.minimum.reduceat(first, lo), first[hi])
        unit_end = np.maximum(np.maximum.reduceat(end, lo), end[hi])
        begins, ends = np.maximum(begins, unit_first), np.minimum(ends, unit_end)
        empty = begins >= ends
        begins = np.where(empty, np.minimum(begins, ends - 1).clip(min=0), begins)
        return begins, np.where(empty, begins + 1, ends)

    def _graph_buffers(self, group, spec, num_kv_heads, target, shape, mask_bytes: int) -> int:
        """CUDA-graph mode: the fixed buffers, sized for the capacities; returns the grid's item count."""
        units = self.max_batch_size * -(-self.max_qo_len * group // spec.rows)
        capacity = planning.max_items(units, num_kv_heads, target)
        self._check_capacity(capacity, spec.rows)
        need = dict(items=capacity, slots=capacity, ids=self.max_pages,
                    mask=self.max_batch_size * -(-self.max_qo_len ** 2 // 8) + 32)  # byte-aligned segments
        if mask_bytes + 32 > need["mask"]:  # 32 bytes of padding: kernels read masks in whole words
            fail("tree_mask", f"at most {need['mask'] - 32} bytes (max_batch_size x max_qo_len^2 bits)", mask_bytes)
        self._ensure_buffers(need, shape)
        return capacity

    @staticmethod
    def _check_capacity(capacity: int, rows: int) -> None:
        if capacity > 65535:  # the grid's y dimension
            fail("qo_indptr", f"at most 65535 work items of {rows} query rows per plan (split the batch)", capacity)

    def _plans_on_device(self, table, qo_lens: np.ndarray, mask: int) -> bool:
        """CUDA-graph steps of uniform batches over a block table on the GPU (what engines capture) are
        planned by a kernel that reads the lengths on the device: no host work list, no copy, no sync."""
        return (self.use_cuda_graph and not self.LONGEST_FIRST and mask in (NO_MASK, CAUSAL)
                and isinstance(table, BlockTable) and table.block_table.device == self.device
                and table.block_table.dtype == table.seq_lens.dtype == torch.int32 and table.seq_lens.is_contiguous()
                and bool(qo_lens.min() == qo_lens.max()))

    def _plan_on_device(self, table: BlockTable, qo_len: int, group: int, spec: KernelSpec, budget: int,
                        window: int, mask: int) -> torch.Tensor:
        """Launches plan.cu's plan_uniform: items and the used page ids into the fixed buffers."""
        bt = table.block_table
        if table.batch_size * bt.stride(0) > self.max_pages:
            fail("table", f"at most max_pages={self.max_pages} page ids", table.batch_size * bt.stride(0))
        b = self._buffers
        page_ids = b["work"][self._ids_at():]
        planning.plan_on_device(self.device, table.seq_lens, bt, qo_len=qo_len, group=group, rows=spec.rows,
                                page_size=table.page_size, tile=spec.tile, min_chunk=spec.min_chunk,
                                budget=budget, window_left=window, causal=mask == CAUSAL, work=b["work"],
                                page_ids=page_ids)
        return page_ids

    def _config(self, q_dtype, kv_dtype, head_dim, num_qo_heads, num_kv_heads, page_size, sm_scale, logits_soft_cap,
                window_left, max_tokens, mask) -> tuple:
        """The checked arguments, kernel and wave size of a plan: the same every step of an engine, so worked
        out once per combination (plan() runs on the host before every step)."""
        key = (q_dtype, kv_dtype, head_dim, num_qo_heads, num_kv_heads, page_size, sm_scale, logits_soft_cap,
               window_left, max_tokens, mask)
        hit = self._configs.get(key)
        if hit is not None:
            return hit
        kv_dtype = q_dtype if kv_dtype is None else kv_dtype
        check_head_dim("head_dim", head_dim)
        group = check_group(num_qo_heads, num_kv_heads)
        if q_dtype not in HALF_DTYPES:
            fail("q_dtype", "torch.float16 or torch.bfloat16", q_dtype)
        if kv_dtype != q_dtype:
            fail("kv_dtype", f"the query dtype {q_dtype}", kv_dtype)
        scale = check_sm_scale(sm_scale, head_dim)
        cap = check_soft_cap(logits_soft_cap)
        window = check_window(window_left)
        spec = self._kernel_spec(_DTYPE_TAGS[q_dtype], head_dim, group, page_size, cap > 0, max_tokens, mask)
        from .kernels import get_kernel
        kernel = get_kernel(spec.source, spec.name, device_index=self.device.index)
        if spec.ctas_per_sm:
            spec = replace(spec, smem=kernel.capped_shared_memory(spec.smem, spec.ctas_per_sm))
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        target = max(1, kernel.max_active_blocks(spec.threads, spec.smem)) * sms  # one full wave of CTAs
        merger = (get_kernel(spec.source, merge_kernel_name(_DTYPE_TAGS[q_dtype], spec.rows, head_dim, group),
                             device_index=self.device.index)
                  if spec.source == "decode.cu" and spec.rows >= _MERGE_APART_ROWS
                  and os.environ.get("PAGEDINFER_MERGE_APART", "1") != "0" else None)
        self._configs[key] = (group, scale, cap, window, spec, kernel, target, merger)
        return self._configs[key]

    def _kernel_spec(self, dtype_tag: str, head_dim: int, group: int, page_size: int, soft_cap: bool,
                     max_tokens: int, mask: int) -> KernelSpec:
        """The kernel for a plan whose requests have up to `max_tokens` query tokens."""
        return decode_spec(dtype_tag, head_dim, group, page_size, soft_cap, max_tokens, mask)

    @staticmethod
    def _host_lengths(table, kv_lens_host, indptr_host) -> tuple[np.ndarray, np.ndarray]:
        """kv lengths and page-id row starts on the host: the caller's host copies, else read back (a sync
        when the table is on the GPU)."""
        for name, t, n in (("kv_lens_host", kv_lens_host, table.batch_size),
                           ("indptr_host", indptr_host, table.batch_size + 1)):
            if t is not None:
                check_tensor(name, t, ndim=1, device="cpu")
                check_shape(name, t, (n,))
        lens = (kv_lens_host if kv_lens_host is not None else table.kv_lens().cpu()).numpy().astype(np.int64)
        if isinstance(table, BlockTable):
            starts = np.arange(table.batch_size, dtype=np.int64) * table.block_table.stride(0)
        else:
            starts = (indptr_host if indptr_host is not None else table.indptr.cpu())[:-1].numpy().astype(np.int64)
        return lens, starts

    def _page_ids_source(self, table):
        """(device page ids to read in place, or None) and (host page ids to upload, or None)."""
        ids = table.block_table.reshape(-1) if isinstance(table, BlockTable) else table.indices
        if ids.device.type == "cpu":
            return None, ids.to(torch.int32)
        if ids.device != self.device:
            fail("table", f"page ids on {self.device} or the CPU", ids.device)
        return ids, None

    def _ensure_buffers(self, need: dict, shape: tuple) -> None:
        """Device buffers with room for `need`; grown in eager mode, fixed after the first plan with graphs."""
        b = self._buffers
        if b is not None:
            if b["shape"] == shape and all(b["need"][k] >= v for k, v in need.items()):
                return
            if self.use_cuda_graph:
                fail("plan", "the head counts and head dim of the first plan (CUDA-graph buffers are fixed)",
                     shape)
            if b["shape"] == shape:  # grow, never shrink
                need = {k: max(v, b["need"][k]) for k, v in need.items()}
        q_heads, kv_heads, head_dim, block = shape
        self._buffers = planning.carve_buffers([
            ("work", planning.ITEM_INTS * (1 + need["items"]) + need["ids"], torch.int32),
            ("partial_o", need["slots"] * kv_heads * block * head_dim, torch.float32),
            ("partial_lse", need["slots"] * kv_heads * block, torch.float32),
            # per split slot and KV head, and one more: the Hopper prefill kernel's work queue
            ("counters", need["slots"] * kv_heads + 1, torch.int32),
            ("mask", need["mask"], torch.uint8)], self.device, self.workspace)
        self._buffers["counters"].zero_()  # the kernel leaves them at zero after every launch
        self._buffers.update(need=need, shape=shape)

    def _ids_at(self) -> int:
        """Where the page ids a plan uploads or copies start in the work buffer, after the items."""
        return planning.ITEM_INTS * (1 + self._buffers["need"]["items"])

    def _upload(self, work: planning.WorkList, host_ids, page_ids_dev):
        """One copy: [item count | items | host page ids] -> the device work buffer. Returns the page ids the
        kernel reads."""
        b = self._buffers
        ids_at = self._ids_at()
        for ids in (host_ids, page_ids_dev):
            if ids is not None and self.use_cuda_graph and ids.numel() > self.max_pages:
                fail("table", f"at most max_pages={self.max_pages} page ids", ids.numel())
        items_end = planning.ITEM_INTS * (1 + work.num_items)
        end = ids_at + host_ids.numel() if host_ids is not None else items_end
        host = self._staging.take(end)
        view = host.numpy()  # the pinned buffer's memory: numpy slice stores cost less than torch's
        view[0] = work.num_items
        view[planning.ITEM_INTS:items_end] = work.items.reshape(-1)
        if host_ids is not None:
            host[ids_at:end] = host_ids
        b["work"][:end].copy_(host, non_blocking=True)
        self._staging.sent()
        if page_ids_dev is None:
            return b["work"][ids_at:]
        if self.use_cuda_graph:  # the graph holds the buffer's address, not the caller's table
            b["work"][ids_at:ids_at + page_ids_dev.numel()].copy_(page_ids_dev)
            return b["work"][ids_at:]
        return page_ids_dev

    # ------------------------------------------------------------------------------------------ run

    def run(self, q: torch.Tensor, kv_cache, out: torch.Tensor | None = None, return_lse: bool = False):
        """q [tokens, num_qo_heads, head_dim] (decode: one token per request) -> out (same shape), and the
        LSE [tokens, num_qo_heads] (natural log) when return_lse."""
        p = self._plan
        if p is None:
            fail("run", "a plan() first", "no plan")
        shape = (p["tokens"], p["q_heads"], p["head_dim"])
        check_rows("q", q, shape, p["dtype"], self.device)
        cache, cache_args = self._caches.get(kv_cache)
        if cache.dtype != p["dtype"] or cache.device != self.device or (
                cache.kv_heads, cache.head_dim, cache.page_size) != (p["kv_heads"], p["head_dim"], p["page_size"]):
            fail("kv_cache", f"{p['dtype']} on {self.device} with kv_heads={p['kv_heads']}, head_dim="
                 f"{p['head_dim']}, page_size={p['page_size']} as planned", f"{cache.dtype} on {cache.device} "
                 f"with {cache.kv_heads}, {cache.head_dim}, {cache.page_size}")
        if out is None:
            out = torch.empty_like(q)
        else:
            check_rows("out", out, shape, p["dtype"], self.device)
        lse = torch.empty(shape[:2], dtype=torch.float32, device=self.device) if return_lse else None
        out_args = (np.uint64(out.data_ptr()), np.int64(out.stride(0)), np.int64(out.stride(1)),
                    np.uint64(lse.data_ptr() if return_lse else 0))
        p["kernel"].launch_prepared(p["grid"], p["threads"], (
            np.uint64(q.data_ptr()), np.int64(q.stride(0)), np.int64(q.stride(1)), *cache_args, *p["work_args"],
            *out_args, *p["tail_args"]), p["smem"])
        if p["merger"] is not None:  # items, item count; partial outputs and LSEs
            p["merger"].launch_prepared(p["grid"], p["threads"], (
                *p["work_args"][1:3], *p["tail_args"][:2], *out_args))
        return (out, lse) if return_lse else out


def decode(q, kv_cache, table, *, kv_layout: str = "NHD", sm_scale=None, logits_soft_cap=None,
           window_left: int = -1, return_lse: bool = False):
    """One-shot decode (plan + run). CPU tensors go through the PyTorch reference."""
    if q.device.type == "cpu":
        from . import reference
        out, lse = reference.decode(q, kv_cache, table, kv_layout=kv_layout, sm_scale=sm_scale,
                                    logits_soft_cap=logits_soft_cap or 0.0, window_left=window_left)
        return (out, lse) if return_lse else out
    cache = as_paged_kv_cache(kv_cache, kv_layout)
    wrapper = DecodeWrapper(q.device, kv_layout=kv_layout)
    wrapper.plan(table, q.shape[1], cache.kv_heads, q.shape[2], q_dtype=q.dtype, kv_dtype=cache.dtype,
                 sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, window_left=window_left)
    return wrapper.run(q, cache, return_lse=return_lse)

