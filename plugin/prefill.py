"""Batch prefill / extend: ragged query tokens (`qo_indptr`) against a paged KV cache that holds each
request's cached prefix followed by the new tokens' own K/V (chunked prefill and prefix caching are the
same case: query token i of a request sits at position kv_len - qo_len + i).

Masks: causal (aligned to the end of each request's KV), none, or a packed custom mask per request:
bit i * kv_len + j set when query token i may attend key j, little bit order, each request's segment
starting on a byte at mask_indptr[i] (`pagedinfer.pack_masks` of [qo_len, kv_len] bool masks). Sliding
window (window_left), logits soft cap, sm_scale and the LSE as for decode.

The kernel is the decode kernel with 64 query rows (token x head) per CTA: correct for the whole coverage,
but an mma.sync design; the Hopper wgmma kernel that compute-bound prefill needs is not written yet.
"""
from __future__ import annotations

import numpy as np
import torch

from .decode import CAUSAL, CUSTOM, NO_MASK, DecodeWrapper
from .validate import check_shape, check_tensor, fail

MAX_QO_LEN = 32768


class PrefillWrapper(DecodeWrapper):
    def __init__(self, device="cuda", *, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 max_batch_size: int | None = None, max_pages: int | None = None,
                 workspace: torch.Tensor | None = None, max_qo_len: int = MAX_QO_LEN):
        """As DecodeWrapper; with use_cuda_graph=True, `max_qo_len` bounds the query tokens per request."""
        if not 1 <= max_qo_len <= MAX_QO_LEN:
            fail("max_qo_len", f"1 to {MAX_QO_LEN} tokens per request", max_qo_len)
        super().__init__(device, kv_layout=kv_layout, use_cuda_graph=use_cuda_graph,
                         max_batch_size=max_batch_size, max_pages=max_pages, workspace=workspace,
                         max_qo_len=max_qo_len)

    def plan(self, qo_indptr: torch.Tensor, table, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
             causal: bool = False, custom_mask: torch.Tensor | None = None, mask_indptr: torch.Tensor | None = None,
             q_dtype: torch.dtype = torch.bfloat16, kv_dtype: torch.dtype | None = None,
             sm_scale: float | None = None, logits_soft_cap: float | None = None, window_left: int = -1,
             kv_lens_host: torch.Tensor | None = None, indptr_host: torch.Tensor | None = None) -> None:
        self._check_table(table)
        batch = table.batch_size
        check_tensor("qo_indptr", qo_indptr, ndim=1, dtypes=(torch.int32,))
        check_shape("qo_indptr", qo_indptr, (batch + 1,))
        offsets = qo_indptr.cpu().numpy().astype(np.int64)
        qo_lens = np.diff(offsets)
        if offsets[0] != 0 or qo_lens.min() < 1 or qo_lens.max() > self.max_qo_len:
            fail("qo_indptr", f"offsets from 0 with 1 to {self.max_qo_len} tokens per request", offsets.tolist()[:8])
        mask, mask_offsets = (CAUSAL if causal else NO_MASK), None
        if custom_mask is not None or mask_indptr is not None:
            if causal:
                fail("causal, custom_mask", "one of the two", "both")
            if custom_mask is None or mask_indptr is None:
                fail("custom_mask, mask_indptr", "both or neither", "only one")
            if self.use_cuda_graph:
                fail("custom_mask", "no custom mask with use_cuda_graph=True (its size follows the KV lengths)",
                     "a mask")
            check_tensor("custom_mask", custom_mask, ndim=1, dtypes=(torch.uint8,))
            check_tensor("mask_indptr", mask_indptr, ndim=1, dtypes=(torch.int32,))
            check_shape("mask_indptr", mask_indptr, (batch + 1,))
            mask_offsets = mask_indptr.cpu().numpy().astype(np.int64)
            lens = self._host_lengths(table, kv_lens_host, indptr_host)[0]
            need = (qo_lens * lens + 7) // 8
            if mask_offsets[0] < 0 or bool((mask_offsets[1:] - mask_offsets[:-1] < need).any()) \
                    or mask_offsets[-1] > custom_mask.numel():
                fail("mask_indptr", "byte offsets giving each request ceil(qo_len * kv_len / 8) bytes of "
                     "custom_mask", mask_offsets.tolist()[:8])
            mask, mask_offsets = CUSTOM, mask_offsets[:-1]
            custom_mask = custom_mask.to(self.device)
        self._plan_requests(table, offsets[:-1], qo_lens, num_qo_heads, num_kv_heads, head_dim, q_dtype=q_dtype,
                            kv_dtype=kv_dtype, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                            window_left=window_left, kv_lens_host=kv_lens_host, indptr_host=indptr_host,
                            mask=mask, mask_bits=custom_mask, mask_offsets=mask_offsets)


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
