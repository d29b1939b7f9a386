"""Speculative-decoding verification: 1-16 draft tokens per request against the request's paged context,
on the decode kernel (each K/V page is read once for all drafts and all query heads of a KV head).

The drafts' K/V are already appended: request i's last qo_len keys are its drafts, draft j sits at position
kv_len - qo_len + j. Every draft sees the whole prefix (subject to the sliding window); among the drafts the
mask is causal, or a packed tree mask per request: bit j * qo_len + i set when draft j may attend draft i,
little bit order, each request's segment starting on a byte at tree_mask_indptr[i] (`pagedinfer.pack_masks`
of [qo_len, qo_len] bool masks builds it; the same order as the prefill custom mask).

    wrapper = VerifyWrapper()
    wrapper.plan(qo_indptr, table, 32, 8, 128, tree_mask=packed, tree_mask_indptr=offsets)
    out = wrapper.run(q, kv_cache)       # q [qo_indptr[-1], 32, 128]
"""
from __future__ import annotations

import numpy as np
import torch

from .decode import CAUSAL, TREE, DecodeWrapper
from .validate import check_shape, check_tensor, fail

MAX_DRAFTS = 16


class VerifyWrapper(DecodeWrapper):
    def __init__(self, device="cuda", *, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 max_batch_size: int | None = None, max_pages: int | None = None,
                 workspace: torch.Tensor | None = None, max_qo_len: int = MAX_DRAFTS):
        """As DecodeWrapper; with use_cuda_graph=True, `max_qo_len` bounds the draft tokens per request."""
        if not 1 <= max_qo_len <= MAX_DRAFTS:
            fail("max_qo_len", f"1 to {MAX_DRAFTS} tokens per request", max_qo_len)
        super().__init__(device, kv_layout=kv_layout, use_cuda_graph=use_cuda_graph,
                         max_batch_size=max_batch_size, max_pages=max_pages, workspace=workspace,
                         max_qo_len=max_qo_len)

    def plan(self, qo_indptr: torch.Tensor, table, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
             tree_mask: torch.Tensor | None = None, tree_mask_indptr: torch.Tensor | None = None,
             q_dtype: torch.dtype = torch.bfloat16, kv_dtype: torch.dtype | None = None,
             sm_scale: float | None = None, logits_soft_cap: float | None = None, window_left: int = -1,
             kv_lens_host: torch.Tensor | None = None, indptr_host: torch.Tensor | None = None) -> None:
        """Host side of one verification step; causal among the drafts unless a tree mask is given."""
        self._check_table(table)
        batch = table.batch_size
        check_tensor("qo_indptr", qo_indptr, ndim=1, dtypes=(torch.int32,))
        check_shape("qo_indptr", qo_indptr, (batch + 1,))
        offsets = qo_indptr.cpu().numpy().astype(np.int64)
        qo_lens = np.diff(offsets)
        if offsets[0] != 0 or qo_lens.min() < 1 or qo_lens.max() > self.max_qo_len:
            fail("qo_indptr", f"offsets from 0 with 1 to {self.max_qo_len} tokens per request",
                 offsets.tolist()[:8])
        mask, mask_offsets = CAUSAL, None
        if tree_mask is not None or tree_mask_indptr is not None:
            if tree_mask is None or tree_mask_indptr is None:
                fail("tree_mask, tree_mask_indptr", "both or neither", "only one")
            check_tensor("tree_mask", tree_mask, ndim=1, dtypes=(torch.uint8,))
            check_tensor("tree_mask_indptr", tree_mask_indptr, ndim=1, dtypes=(torch.int32,))
            check_shape("tree_mask_indptr", tree_mask_indptr, (batch + 1,))
            mask_offsets = tree_mask_indptr.cpu().numpy().astype(np.int64)
            need = (qo_lens * qo_lens + 7) // 8
            if mask_offsets[0] < 0 or bool((mask_offsets[1:] - mask_offsets[:-1] < need).any()) \
                    or mask_offsets[-1] > tree_mask.numel():
                fail("tree_mask_indptr", "byte offsets giving each request ceil(qo_len^2 / 8) bytes of tree_mask",
                     mask_offsets.tolist()[:8])
            mask, mask_offsets = TREE, mask_offsets[:-1]
            tree_mask = tree_mask.to(self.device)
        self._plan_requests(table, offsets[:-1], qo_lens, num_qo_heads, num_kv_heads, head_dim, q_dtype=q_dtype,
                            kv_dtype=kv_dtype, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                            window_left=window_left, kv_lens_host=kv_lens_host, indptr_host=indptr_host,
                            mask=mask, mask_bits=tree_mask, mask_offsets=mask_offsets)


def verify(q, qo_indptr, kv_cache, table, *, tree_mask=None, tree_mask_indptr=None, kv_layout: str = "NHD",
           sm_scale=None, logits_soft_cap=None, window_left: int = -1, return_lse: bool = False):
    """One-shot verification (plan + run). CPU tensors go through the PyTorch reference."""
    if q.device.type == "cpu":
        from . import reference
        out, lse = reference.verify(q, qo_indptr, kv_cache, table, tree_mask=tree_mask,
                                    tree_mask_indptr=tree_mask_indptr, kv_layout=kv_layout, sm_scale=sm_scale,
                                    logits_soft_cap=logits_soft_cap or 0.0, window_left=window_left)
        return (out, lse) if return_lse else out
    from .paged import as_paged_kv_cache
    cache = as_paged_kv_cache(kv_cache, kv_layout)
    wrapper = VerifyWrapper(q.device, kv_layout=kv_layout)
    wrapper.plan(qo_indptr, table, q.shape[1], cache.kv_heads, q.shape[2], tree_mask=tree_mask,
                 tree_mask_indptr=tree_mask_indptr, q_dtype=q.dtype, kv_dtype=cache.dtype, sm_scale=sm_scale,
                 logits_soft_cap=logits_soft_cap, window_left=window_left)
    return wrapper.run(q, cache, return_lse=return_lse)
