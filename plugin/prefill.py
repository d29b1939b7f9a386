"""Batch prefill / extend: ragged query tokens (`qo_indptr`) against a paged KV cache that holds each
request's cached prefix followed by the new tokens' own K/V (chunked prefill and prefix caching are the
same case: query token i of a request sits at position kv_len - qo_len + i).

`RaggedPrefillWrapper` / `prefill_ragged` take K/V that are not in pages: request i's keys are rows
kv_indptr[i]:kv_indptr[i+1] of contiguous `k` and `v` [tokens, kv_heads, head_dim] (e.g. the new tokens of
a prompt with no cached prefix, before they are written to the cache).

Masks: causal (aligned to the end of each request's KV), none, or a packed custom mask per request:
bit i * kv_len + j set when query token i may attend key j, little bit order, each request's segment
starting on a byte at mask_indptr[i] (`pagedinfer.pack_masks` of [qo_len, kv_len] bool masks). plan()
reads a custom mask to give each block of query rows only the keys their rows see (so a mask costs what
its visible keys cost): a mask on the GPU is read back once (a sync), one on the CPU is not. Sliding
window (window_left), logits soft cap, sm_scale and the LSE as for decode.

Kernels: on Hopper (sm_90a), head dims 64 and 128, requests of more than 64 query rows (tokens x group)
run kernels/prefill_sm90.cu (warpgroup tensor cores, work items of 128 query rows, one wave of persistent
CTAs taking them from a queue); everything else (other GPUs, head dims 80/96/256, short requests) the decode
kernel with up to 64 query rows per CTA (mma.sync).
"""
from __future__ import annotations

import numpy as np
import torch

from . import plan as planning
from .decode import CAUSAL, CUSTOM, NO_MASK, DecodeWrapper, KernelSpec, decode_spec
from .masks import visible_spans
from .paged import csr_page_table
from .validate import check_shape, check_tensor, fail

MAX_QO_LEN = 32768
# Mirrors kernels/prefill_sm90.cu: two consumer warpgroups of 64 query rows and a producer warpgroup, 128-key
# tiles of 128-byte swizzled rows.
SM90_HEAD_DIMS = (64, 128)
_SM90_THREADS = 384
_SM90_ROWS = 128
_SM90_TILE = 128
_SM90_SMEM = 227 * 1024  # an H100's most per CTA; one CTA per multiprocessor (the registers allow no second)


def _sm90_stages(head_dim: int) -> tuple[int, int]:
    """Stages of a K and a V tile (3 or 4) and the dynamic shared memory: the stages, the query tile and
    1 KB to align."""
    stage_bytes, q_bytes = 2 * _SM90_TILE * head_dim * 2, _SM90_ROWS * head_dim * 2
    stages = min(4, (_SM90_SMEM - q_bytes - 1024) // stage_bytes)
    return stages, stages * stage_bytes + q_bytes + 1024


def sm90_kernel_name(dtype_tag: str, head_dim: int, group: int, page_size: int, soft_cap: bool, mask: int) -> str:
    return (f"prefill_sm90_kernel<{dtype_tag}, {head_dim}, {group}, {page_size}, {'true' if soft_cap else 'false'}, "
            f"{_sm90_stages(head_dim)[0]}, {mask}>")


def prefill_spec(dtype_tag: str, head_dim: int, group: int, page_size: int, soft_cap: bool, max_tokens: int,
                 mask: int, hopper: bool) -> KernelSpec:
    """The Hopper kernel where it applies (see the module docstring), else the decode kernel."""
    if hopper and head_dim in SM90_HEAD_DIMS and max_tokens * group > 64:
        return KernelSpec("prefill_sm90.cu", sm90_kernel_name(dtype_tag, head_dim, group, page_size, soft_cap, mask),
                          _SM90_THREADS, _SM90_ROWS, _SM90_TILE, _SM90_TILE, _sm90_stages(head_dim)[1],
                          persistent=True)
    return decode_spec(dtype_tag, head_dim, group, page_size, soft_cap, max_tokens, mask)


# The CI compile check (sm_90a only: wgmma): both dtypes and head dims, each mask, soft cap, page sizes.
SPECIALIZATIONS = [("prefill_sm90.cu", sm90_kernel_name(*spec)) for spec in [
    ("bf16", 128, 4, 16, False, CAUSAL), ("fp16", 64, 3, 1, True, NO_MASK), ("bf16", 64, 7, 256, False, CUSTOM),
    ("fp16", 128, 1, 64, True, CAUSAL), ("bf16", 128, 16, 8, False, NO_MASK)]]


class PrefillWrapper(DecodeWrapper):
    MAX_QO_LEN = MAX_QO_LEN
    LONGEST_FIRST = True

    def _kernel_spec(self, dtype_tag, head_dim, group, page_size, soft_cap, max_tokens, mask) -> KernelSpec:
        hopper = torch.cuda.get_device_capability(self.device) == (9, 0)
        return prefill_spec(dtype_tag, head_dim, group, page_size, soft_cap, max_tokens, mask, hopper)

    def plan(self, qo_indptr: torch.Tensor, table, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
             causal: bool = False, custom_mask: torch.Tensor | None = None, mask_indptr: torch.Tensor | None = None,
             q_dtype: torch.dtype = torch.bfloat16, kv_dtype: torch.dtype | None = None,
             sm_scale: float | None = None, logits_soft_cap: float | None = None, window_left: int = -1,
             kv_lens_host: torch.Tensor | None = None, indptr_host: torch.Tensor | None = None) -> None:
        self._check_table(table)
        qo_starts, qo_lens = self._query_offsets(qo_indptr, table.batch_size)
        mask, mask_offsets, spans = (CAUSAL if causal else NO_MASK), None, None
        if custom_mask is not None or mask_indptr is not None:
            if causal:
                fail("causal, custom_mask", "one of the two", "both")
            if custom_mask is None or mask_indptr is None:
                fail("custom_mask, mask_indptr", "both or neither", "only one")
            if self.use_cuda_graph:
                fail("custom_mask", "no custom mask with use_cuda_graph=True (its size follows the KV lengths)",
                     "a mask")
            lens = self._host_lengths(table, kv_lens_host, indptr_host)[0]
            mask_offsets = self._mask_offsets("custom_mask", custom_mask, "mask_indptr", mask_indptr,
                                              (qo_lens * lens + 7) // 8)
            first, end, run_end = visible_spans(custom_mask, mask_offsets, qo_lens, lens)
            spans, mask = (first, end), CUSTOM
            custom_mask, mask_offsets = self._with_row_runs(custom_mask, mask_offsets, qo_starts, qo_lens, first,
                                                            run_end)
        self._plan_requests(table, qo_starts, qo_lens, num_qo_heads, num_kv_heads, head_dim, q_dtype=q_dtype,
                            kv_dtype=kv_dtype, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                            window_left=window_left, kv_lens_host=kv_lens_host, indptr_host=indptr_host,
                            mask=mask, mask_bits=custom_mask, mask_offsets=mask_offsets, mask_spans=spans)

    def _with_row_runs(self, custom_mask, mask_offsets, qo_starts, qo_lens, first, run_end):
        """The mask buffer as kernels/prefill_sm90.cu reads it: per row of q, int32 (first key, end of the
        run of set keys from it), then the packed masks (their offsets moved past that table). Tiles inside
        a row's run need none of its bits."""
        rows = np.zeros((int((qo_starts + qo_lens).max()), 2), dtype=np.int32)
        index = np.repeat(qo_starts, qo_lens) + planning.positions_within(qo_lens)
        rows[index, 0], rows[index, 1] = first, run_end
        table = torch.from_numpy(rows).view(torch.uint8).reshape(-1)
        table = torch.cat([table, table.new_zeros(-table.numel() % 16)])  # the masks stay 16-byte aligned
        return torch.cat([table.to(self.device), custom_mask.to(self.device)]), mask_offsets + table.numel()


def prefill(q, qo_indptr, kv_cache, table, *, causal=False, custom_mask=None, mask_indptr=None,
            kv_layout: str = "NHD", sm_scale=None, logits_soft_cap=None, window_left: int = -1,
            return_lse: bool = False):
    """One-shot prefill (plan + run). CPU tensors go through the PyTorch reference."""
    if q.device.type == "cpu":
        from . import reference
        out, lse = reference.prefill(q, qo_indptr, kv_cache, table, causal=causal, packed_mask=custom_mask,
                                     mask_indptr=mask_indptr, kv_layout=kv_layout, sm_scale=sm_scale,
                                     logits_soft_cap=logits_soft_cap or 0.0, window_left=window_left)
        return (out, lse) if return_lse else out
    from .paged import as_paged_kv_cache
    cache = as_paged_kv_cache(kv_cache, kv_layout)
    wrapper = PrefillWrapper(q.device, kv_layout=kv_layout)
    wrapper.plan(qo_indptr, table, q.shape[1], cache.kv_heads, q.shape[2], causal=causal, custom_mask=custom_mask,
                 mask_indptr=mask_indptr, q_dtype=q.dtype, kv_dtype=cache.dtype, sm_scale=sm_scale,
                 logits_soft_cap=logits_soft_cap, window_left=window_left)
    return wrapper.run(q, cache, return_lse=return_lse)


class RaggedPrefillWrapper:
    """Prefill over contiguous K/V. The rows are read as a paged cache of one-token pages whose page ids are
    the row numbers, so the paged kernel and its planning serve this case unchanged."""

    def __init__(self, device="cuda"):
        self._paged = PrefillWrapper(device)

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, num_qo_heads: int, num_kv_heads: int,
             head_dim: int, **options) -> None:
        """`options` as for PrefillWrapper.plan (causal, custom_mask + mask_indptr, dtypes, sm_scale,
        logits_soft_cap, window_left)."""
        check_tensor("kv_indptr", kv_indptr, ndim=1, dtypes=(torch.int32,))
        check_shape("kv_indptr", kv_indptr, (qo_indptr.shape[0],))
        offsets = kv_indptr.cpu()
        lens = offsets[1:] - offsets[:-1]
        if int(offsets[0]) != 0 or bool((lens < 1).any()):
            fail("kv_indptr", "offsets from 0 with at least one key per request", offsets.tolist()[:8])
        table = csr_page_table(offsets, torch.arange(int(offsets[-1]), dtype=torch.int32),
                               torch.ones_like(lens), page_size=1)
        self._paged.plan(qo_indptr, table, num_qo_heads, num_kv_heads, head_dim, kv_lens_host=lens,
                         indptr_host=offsets, **options)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None,
            return_lse: bool = False):
        """q [qo_indptr[-1], num_qo_heads, head_dim]; k, v [kv_indptr[-1] (or more), num_kv_heads, head_dim]."""
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, ndim=3)
        return self._paged.run(q, (k.unsqueeze(1), v.unsqueeze(1)), out=out, return_lse=return_lse)


def prefill_ragged(q, qo_indptr, k, v, kv_indptr, *, causal=False, custom_mask=None, mask_indptr=None,
                   sm_scale=None, logits_soft_cap=None, window_left: int = -1, return_lse: bool = False):
    """One-shot prefill over contiguous K/V (plan + run). CPU tensors go through the PyTorch reference."""
    if q.device.type == "cpu":
        from . import reference
        out, lse = reference.prefill_ragged(q, qo_indptr, k, v, kv_indptr, causal=causal, packed_mask=custom_mask,
                                            mask_indptr=mask_indptr, sm_scale=sm_scale,
                                            logits_soft_cap=logits_soft_cap or 0.0, window_left=window_left)
        return (out, lse) if return_lse else out
    wrapper = RaggedPrefillWrapper(q.device)
    wrapper.plan(qo_indptr, kv_indptr, q.shape[1], k.shape[1], q.shape[2], causal=causal, custom_mask=custom_mask,
                 mask_indptr=mask_indptr, q_dtype=q.dtype, kv_dtype=k.dtype, sm_scale=sm_scale,
                 logits_soft_cap=logits_soft_cap, window_left=window_left)
    return wrapper.run(q, k, v, return_lse=return_lse)
