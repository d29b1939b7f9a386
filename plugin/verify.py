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

import torch

from .decode import CAUSAL, TREE, DecodeWrapper
from .validate import fail

MAX_DRAFTS = 16


class VerifyWrapper(DecodeWrapper):
    MAX_QO_LEN = MAX_DRAFTS

    def plan(self, qo_indptr: torch.Tensor, table, num_qo_heads: int, num_kv_heads: int, head_dim: int, *,
             tree_mask: torch.Tensor | None = None, tree_mask_indptr: torch.Tensor | None = None,
             q_dtype: torch.dtype = torch.bfloat16, kv_dtype: torch.dtype | None = None,
             sm_scale: float | None = None, logits_soft_cap: float | None = None, window_left: int = -1,
             kv_lens_host: torch.Tensor | None = None, indptr_host: torch.Tensor | None = None) -> None:
        """Host side of one verification step; causal among the drafts unless a tree mask is given."""
        self._check_table(table)
        qo_starts, qo_lens = self._query_offsets(qo_indptr, table.batch_size)
        mask, mask_offsets = CAUSAL, None
        if tree_mask is not None or tree_mask_indptr is not None:
            if tree_mask is None or tree_mask_indptr is None:
                fail("tree_mask, tree_mask_indptr", "both or neither", "only one")
            mask_offsets = self._mask_offsets("tree_mask", tree_mask, "tree_mask_indptr", tree_mask_indptr,
                                              (qo_lens * qo_lens + 7) // 8)
            mask, tree_mask = TREE, tree_mask.to(self.device)
        self._plan_requests(table, qo_starts, qo_lens, num_qo_heads, num_kv_heads, head_dim, q_dtype=q_dtype,
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
