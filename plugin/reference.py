"""PyTorch implementations of every op: the test oracle for the kernels and the CPU fallback.

Conventions shared with the kernels:
- LSE convention: natural log, like torch.logsumexp; kernels work in base 2 internally and convert at
  the boundary.
- Inputs may be fp16, bf16 or fp32 (fp64 too where the input forms allow it); the math runs in float32
  (float64 when q is float64). `out` comes back in q.dtype, `lse` in float32 (float64 for float64 q).
  q and the cache may differ in dtype (both are upcast). as_paged_kv_cache takes no float64 cache, so
  a float64 paged run needs a PagedKVCache built by hand.
- A query row that sees no key gets out = 0 and lse = -inf (never NaN).
- GQA: query head h reads KV head h // (num_qo_heads // num_kv_heads).
- Scores: s = (q . k) * sm_scale (default head_dim ** -0.5); with logits_soft_cap > 0,
  s = cap * tanh(s / cap).
- Positions: a request's keys sit at positions 0 .. kv_len - 1, and its queries are aligned to the end
  of its keys: query i of qo_len sits at position kv_len - qo_len + i (decode: qo_len = 1).
- window_left = -1 is off; otherwise the query at position p sees only keys j >= p - window_left
  (a left bound; the right bound comes from causal, the tree or the custom mask).
- Masks are bit-packed as described in `masks.py`.

Loops over requests stay in Python (this is a reference); heads and tokens are vectorised.
"""
from __future__ import annotations

import torch

from .masks import _unpack_request
from .paged import BlockTable, PagedKVCache, PageTable, as_paged_kv_cache
from .validate import (INDEX_DTYPES, check_shape, check_sm_scale, check_soft_cap, check_tensor,
                       check_window, fail)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SLOT_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_size(q_heads: int, kv_heads: int) -> int:
    # The reference has no kernel limit on the group size, only the divisibility rule.
    if kv_heads < 1 or q_heads % kv_heads:
        fail("num_qo_heads", f"a multiple of num_kv_heads={kv_heads}", q_heads)
    return q_heads // kv_heads


def _check_q(q, head_dim: int, kv_heads: int, device) -> None:
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    if q.shape[2] != head_dim:
        fail("q", f"head_dim {head_dim} (the KV head_dim)", q.shape[2])
    _group_size(q.shape[1], kv_heads)


def _check_table(table, cache: PagedKVCache) -> None:
    if not isinstance(table, (PageTable, BlockTable)):
        fail("table", "a PageTable or BlockTable (see csr_page_table / block_page_table)", type(table).__name__)
    if table.page_size != cache.page_size:
        fail("table", f"page_size {cache.page_size} (the cache's)", table.page_size)


def _check_indptr(name: str, indptr, batch: int, total: int, total_name: str) -> list[int]:
    """Checks an int32 offsets array of batch + 1 entries ending at `total`; returns it as a list."""
    check_tensor(name, indptr, ndim=1, dtypes=INDEX_DTYPES)
    check_shape(name, indptr, (batch + 1,))
    offsets = indptr.tolist()
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        fail(name, "non-decreasing offsets starting at 0", offsets[:8])
    if offsets[-1] != total:
        fail(name, f"a last entry equal to {total_name} = {total}", offsets[-1])
    return offsets


def _check_qo_fits(qo_offsets: list[int], kv_lens: list[int]) -> None:
    for b, kv_len in enumerate(kv_lens):
        qo_len = qo_offsets[b + 1] - qo_offsets[b]
        if qo_len > kv_len:
            fail("qo_indptr", "qo_len <= kv_len for every request (queries are the last keys)",
                 f"request {b} with qo_len {qo_len} > kv_len {kv_len}")


def _check_mask_args(mask, mask_indptr, batch: int, mask_name: str, indptr_name: str) -> None:
    if mask is None and mask_indptr is None:
        return
    if mask is None:
        fail(mask_name, f"a uint8 tensor when {indptr_name} is given", None)
    if mask_indptr is None:
        fail(indptr_name, f"an int32 [batch_size + 1] tensor when {mask_name} is given", None)
    check_tensor(mask_name, mask, ndim=1, dtypes=(torch.uint8,))
    check_tensor(indptr_name, mask_indptr, ndim=1, dtypes=INDEX_DTYPES)
    check_shape(indptr_name, mask_indptr, (batch + 1,))


def _window_mask(q_pos: torch.Tensor, kv_len: int, window_left: int) -> torch.Tensor:
    """[n, kv_len] bool: key j is at or after q_pos - window_left (all True when the window is off)."""
    j = torch.arange(kv_len, device=q_pos.device)
    if window_left < 0:
        return torch.ones(q_pos.shape[0], kv_len, dtype=torch.bool, device=q_pos.device)
    return j[None, :] >= (q_pos[:, None] - window_left)


def _causal_mask(q_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    j = torch.arange(kv_len, device=q_pos.device)
    return j[None, :] <= q_pos[:, None]


def _query_positions(qo_len: int, kv_len: int, device) -> torch.Tensor:
    return torch.arange(kv_len - qo_len, kv_len, device=device)


# ----------------------------------------------------------------------------------------------
# The shared core
# ----------------------------------------------------------------------------------------------

def attention(q, k, v, mask=None, *, sm_scale, logits_soft_cap=0.0):
    """Attention of n queries over m keys.

    q `[n, Hq, D]`, k and v `[m, Hkv, D]`, mask bool `[n, m]` (True = visible) or None.
    Returns out `[n, Hq, D]` in q.dtype and lse `[n, Hq]` (natural log).
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    check_shape("v", v, tuple(k.shape))
    if q.shape[2] != k.shape[2]:
        fail("q", f"head_dim {k.shape[2]} (the KV head_dim)", q.shape[2])
    group = _group_size(q.shape[1], k.shape[1])
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), device=q.device)
        check_shape("mask", mask, (q.shape[0], k.shape[0]))
    scale = check_sm_scale(sm_scale, q.shape[2])
    cap = check_soft_cap(logits_soft_cap)

    cd = _compute_dtype(q.dtype)
    n, hq, d = q.shape
    m, hkv = k.shape[0], k.shape[1]
    # Split query heads into (kv_head, member) so each KV head is read once, without repeating K/V.
    qf = q.to(cd).reshape(n, hkv, group, d)
    s = torch.einsum("nkgd,mkd->kgnm", qf, k.to(cd)).reshape(hq, n, m) * scale
    if cap > 0:
        s = cap * torch.tanh(s / cap)
    if mask is not None:
        s = s.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hq, n]; -inf for a row that sees no key
    # Subtracting 0 instead of -inf keeps fully masked rows at exp(-inf) = 0 rather than NaN.
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - shift[..., None]).reshape(hkv, group, n, m)
    out = torch.einsum("kgnm,mkd->nkgd", p, v.to(cd)).reshape(n, hq, d)
    return out.to(q.dtype), lse.transpose(0, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# Paged ops
# ----------------------------------------------------------------------------------------------

def gather_kv(cache: PagedKVCache, table, b: int):
    """Request b's keys and values, `[kv_len, Hkv, D]` each, read through its pages in order."""
    if not isinstance(cache, PagedKVCache):
        fail("cache", "a PagedKVCache (see as_paged_kv_cache)", type(cache).__name__)
    _check_table(table, cache)
    if not 0 <= b < table.batch_size:
        fail("b", f"a request index in [0, {table.batch_size - 1}]", b)
    pages = table.request_pages(b).to(device=cache.device, dtype=torch.long)
    kv_len = int(table.kv_lens()[b])
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= cache.num_pages):
        fail("table", f"page ids in [0, {cache.num_pages - 1}]",
             f"ids from {int(pages.min())} to {int(pages.max())} for request {b}")
    if pages.numel() * cache.page_size < kv_len:
        fail("table", f"at least ceil(kv_len / page_size) pages for request {b} (kv_len {kv_len})",
             f"{pages.numel()} pages")
    hkv, d = cache.kv_heads, cache.head_dim
    k = cache.k[pages].reshape(-1, hkv, d)[:kv_len]
    v = cache.v[pages].reshape(-1, hkv, d)[:kv_len]
    return k, v


def _paged_setup(q, kv_cache, table, kv_layout, sm_scale, logits_soft_cap, window_left):
    """Shared checks of the paged ops; returns (cache, scale, cap, window, kv_lens as a list)."""
    cache = as_paged_kv_cache(kv_cache, kv_layout)
    _check_table(table, cache)
    _check_q(q, cache.head_dim, cache.kv_heads, cache.device)
    scale = check_sm_scale(sm_scale, q.shape[2])
    cap = check_soft_cap(logits_soft_cap)
    window = check_window(window_left)
    return cache, scale, cap, window, table.kv_lens().tolist()


def _empty_outputs(q):
    """Outputs pre-filled with the 'sees no key' values, so skipped rows are already right."""
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=_compute_dtype(q.dtype), device=q.device)
    return out, lse


def decode(q, kv_cache, table, *, kv_layout="NHD", sm_scale=None, logits_soft_cap=0.0, window_left=-1):
    """One query per request at position kv_len - 1. q `[B, Hq, D]` -> (out `[B, Hq, D]`, lse `[B, Hq]`)."""
    cache, scale, cap, window, kv_lens = _paged_setup(
        q, kv_cache, table, kv_layout, sm_scale, logits_soft_cap, window_left)
    if q.shape[0] != table.batch_size:
        fail("q", f"one row per request ({table.batch_size})", q.shape[0])
    out, lse = _empty_outputs(q)
    for b, kv_len in enumerate(kv_lens):
        if kv_len == 0:
            continue
        k, v = gather_kv(cache, table, b)
        pos = _query_positions(1, kv_len, q.device)
        mask = _window_mask(pos, kv_len, window) if window >= 0 else None
        out[b:b + 1], lse[b:b + 1] = attention(q[b:b + 1], k, v, mask, sm_scale=scale, logits_soft_cap=cap)
    return out, lse


def _prefill_mask(b, qo_len, kv_len, device, causal, window, packed_mask, mask_indptr):
    """Request b's [qo_len, kv_len] visibility: window, then causal or the custom mask."""
    pos = _query_positions(qo_len, kv_len, device)
    mask = _window_mask(pos, kv_len, window)
    if causal:
        mask &= _causal_mask(pos, kv_len)
    if packed_mask is not None:
        custom = _unpack_request(packed_mask, mask_indptr, b, qo_len, kv_len, "packed_mask", "mask_indptr")
        mask &= custom.to(device)
    return mask


def _prefill_loop(q, qo_offsets, kv_lens, get_kv, causal, packed_mask, mask_indptr, scale, cap, window):
    """Runs every request of a prefill batch through the core; get_kv(b) -> (k, v) of request b."""
    if causal and packed_mask is not None:
        fail("causal / packed_mask", "at most one of causal=True and packed_mask", "both")
    _check_mask_args(packed_mask, mask_indptr, len(kv_lens), "packed_mask", "mask_indptr")
    _check_qo_fits(qo_offsets, kv_lens)
    out, lse = _empty_outputs(q)
    for b, kv_len in enumerate(kv_lens):
        lo, hi = qo_offsets[b], qo_offsets[b + 1]
        if hi == lo:
            continue
        k, v = get_kv(b)
        mask = _prefill_mask(b, hi - lo, kv_len, q.device, causal, window, packed_mask, mask_indptr)
        out[lo:hi], lse[lo:hi] = attention(q[lo:hi], k, v, mask, sm_scale=scale, logits_soft_cap=cap)
    return out, lse


def prefill(q, qo_indptr, kv_cache, table, *, causal=False, packed_mask=None, mask_indptr=None,
            kv_layout="NHD", sm_scale=None, logits_soft_cap=0.0, window_left=-1):
    """Prefill/extend over a paged cache. q `[nnz, Hq, D]`, request b's queries are rows
    qo_indptr[b]:qo_indptr[b+1] and sit at the end of its kv_len keys."""
    cache, scale, cap, window, kv_lens = _paged_setup(
        q, kv_cache, table, kv_layout, sm_scale, logits_soft_cap, window_left)
    qo_offsets = _check_indptr("qo_indptr", qo_indptr, table.batch_size, q.shape[0], "q.shape[0]")
    return _prefill_loop(q, qo_offsets, kv_lens, lambda b: gather_kv(cache, table, b),
                         causal, packed_mask, mask_indptr, scale, cap, window)


def prefill_ragged(q, qo_indptr, k, v, kv_indptr, *, causal=False, packed_mask=None, mask_indptr=None,
                   sm_scale=None, logits_soft_cap=0.0, window_left=-1):
    """Prefill with contiguous K/V: request b's keys are rows kv_indptr[b]:kv_indptr[b+1] of k and v."""
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, device=k.device)
    check_shape("v", v, tuple(k.shape))
    _check_q(q, k.shape[2], k.shape[1], k.device)
    check_tensor("qo_indptr", qo_indptr, ndim=1, dtypes=INDEX_DTYPES)
    batch = qo_indptr.shape[0] - 1
    if batch < 1:
        fail("qo_indptr", "batch_size + 1 >= 2 entries", qo_indptr.shape[0])
    qo_offsets = _check_indptr("qo_indptr", qo_indptr, batch, q.shape[0], "q.shape[0]")
    kv_offsets = _check_indptr("kv_indptr", kv_indptr, batch, k.shape[0], "k.shape[0]")
    kv_lens = [kv_offsets[b + 1] - kv_offsets[b] for b in range(batch)]

    def get_kv(b):
        return k[kv_offsets[b]:kv_offsets[b + 1]], v[kv_offsets[b]:kv_offsets[b + 1]]

    return _prefill_loop(q, qo_offsets, kv_lens, get_kv, causal, packed_mask, mask_indptr,
                         check_sm_scale(sm_scale, q.shape[2]), check_soft_cap(logits_soft_cap),
                         check_window(window_left))


def _verify_mask(b, qo_len, kv_len, device, window, tree_mask, tree_mask_indptr):
    """[qo_len, kv_len]: the prefix is visible, drafts see drafts causally or through the tree."""
    prefix = kv_len - qo_len
    pos = _query_positions(qo_len, kv_len, device)
    mask = torch.ones(qo_len, kv_len, dtype=torch.bool, device=device)
    if tree_mask is None:
        drafts = torch.ones(qo_len, qo_len, dtype=torch.bool, device=device).tril()
    else:
        # Row j, column i = bit (j * qo_len + i): draft j may attend draft i.
        drafts = _unpack_request(tree_mask, tree_mask_indptr, b, qo_len, qo_len,
                                 "tree_mask", "tree_mask_indptr").to(device)
    mask[:, prefix:] = drafts
    return mask & _window_mask(pos, kv_len, window)


def verify(q, qo_indptr, kv_cache, table, *, tree_mask=None, tree_mask_indptr=None, kv_layout="NHD",
           sm_scale=None, logits_soft_cap=0.0, window_left=-1):
    """Speculative verification: each request's kv_len already includes its qo_len drafts (the last keys)."""
    cache, scale, cap, window, kv_lens = _paged_setup(
        q, kv_cache, table, kv_layout, sm_scale, logits_soft_cap, window_left)
    qo_offsets = _check_indptr("qo_indptr", qo_indptr, table.batch_size, q.shape[0], "q.shape[0]")
    _check_mask_args(tree_mask, tree_mask_indptr, table.batch_size, "tree_mask", "tree_mask_indptr")
    _check_qo_fits(qo_offsets, kv_lens)
    out, lse = _empty_outputs(q)
    for b, kv_len in enumerate(kv_lens):
        lo, hi = qo_offsets[b], qo_offsets[b + 1]
        if hi == lo:
            continue
        k, v = gather_kv(cache, table, b)
        mask = _verify_mask(b, hi - lo, kv_len, q.device, window, tree_mask, tree_mask_indptr)
        out[lo:hi], lse[lo:hi] = attention(q[lo:hi], k, v, mask, sm_scale=scale, logits_soft_cap=cap)
    return out, lse


# ----------------------------------------------------------------------------------------------
# State merging, KV append, page-table conversion
# ----------------------------------------------------------------------------------------------

def merge_state(v_a, s_a, v_b, s_b):
    """Combines two partial results over disjoint key sets. v `[n, H, D]`, s `[n, H]` (natural-log LSE).

    Returns (v in v_a.dtype, s in float32, float64 for float64 v_a). A side with s = -inf contributes
    nothing; both -inf gives v = 0, s = -inf.
    """
    check_tensor("v_a", v_a, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("v_b", v_b, ndim=3, dtypes=(v_a.dtype,), device=v_a.device)
    check_shape("v_b", v_b, tuple(v_a.shape))
    check_tensor("s_a", s_a, ndim=2, dtypes=FLOAT_DTYPES, device=v_a.device)
    check_tensor("s_b", s_b, ndim=2, dtypes=FLOAT_DTYPES, device=v_a.device)
    check_shape("s_a", s_a, tuple(v_a.shape[:2]))
    check_shape("s_b", s_b, tuple(v_a.shape[:2]))
    cd = _compute_dtype(v_a.dtype)
    sa, sb = s_a.to(cd), s_b.to(cd)
    m = torch.maximum(sa, sb)
    # Shift by 0 where both sides are empty so the weights are exp(-inf) = 0, not NaN.
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(sa - m), torch.exp(sb - m)
    total = wa + wb
    v = (v_a.to(cd) * wa[..., None] + v_b.to(cd) * wb[..., None]) / torch.where(total > 0, total, 1)[..., None]
    return v.to(v_a.dtype), m + torch.log(total)


def append_kv(k_new, v_new, kv_cache, slot_mapping, *, kv_layout="NHD") -> None:
    """Writes row n of k_new / v_new `[N, Hkv, D]` into cache slot slot_mapping[n] (page = slot //
    page_size, offset = slot % page_size), in place. Negative slots are padding and are skipped;
    a slot repeated in one call gets one of its rows (unspecified which)."""
    cache = as_paged_kv_cache(kv_cache, kv_layout)
    shape = (None, cache.kv_heads, cache.head_dim)
    check_tensor("k_new", k_new, ndim=3, dtypes=(cache.dtype,), device=cache.device)
    check_shape("k_new", k_new, shape)
    check_tensor("v_new", v_new, ndim=3, dtypes=(cache.dtype,), device=cache.device)
    check_shape("v_new", v_new, tuple(k_new.shape))
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=SLOT_DTYPES)
    check_shape("slot_mapping", slot_mapping, (k_new.shape[0],))
    slots = slot_mapping.to(device=cache.device, dtype=torch.long)
    keep = slots >= 0
    slots = slots[keep]
    capacity = cache.num_pages * cache.page_size
    if slots.numel() and int(slots.max()) >= capacity:
        fail("slot_mapping", f"slots < num_pages * page_size = {capacity} (or negative for padding)",
             int(slots.max()))
    page, offset = slots // cache.page_size, slots % cache.page_size
    # Indexed assignment on the strided views writes through to the caller's storage (any layout).
    cache.k[page, offset] = k_new[keep]
    cache.v[page, offset] = v_new[keep]


def csr_from_block_table(table: BlockTable, out: PageTable) -> None:
    """Fills `out` (e.g. from empty_csr) in place with the CSR form of a block table.

    indptr = prefix sums of ceil(seq_len / page_size); indices = the used entries of each row, packed
    (entries past indptr[-1] are left as they were); last_page_len = seq_len - (pages - 1) * page_size,
    and 0 for a request with no pages.
    """
    if not isinstance(table, BlockTable):
        fail("table", "a BlockTable", type(table).__name__)
    if not isinstance(out, PageTable):
        fail("out", "a PageTable (see empty_csr)", type(out).__name__)
    if out.page_size != table.page_size:
        fail("out", f"page_size {table.page_size} (the block table's)", out.page_size)
    batch, max_blocks = table.block_table.shape
    check_shape("out.indptr", out.indptr, (batch + 1,))
    check_shape("out.last_page_len", out.last_page_len, (batch,))
    ps = table.page_size
    seq_lens = table.seq_lens.to(torch.int64)
    pages = (seq_lens + ps - 1) // ps
    if batch and int(pages.max()) > max_blocks:
        fail("seq_lens", f"lengths <= max_blocks * page_size = {max_blocks * ps}", int(seq_lens.max()))
    total = int(pages.sum())
    if total > out.indices.shape[0]:
        fail("out.indices", f"room for {total} page ids", out.indices.shape[0])
    used = torch.arange(max_blocks, device=pages.device)[None, :] < pages[:, None]
    indptr = torch.cat([pages.new_zeros(1), pages.cumsum(0)])
    last = torch.where(pages > 0, seq_lens - (pages - 1) * ps, torch.zeros_like(seq_lens))
    out.indptr.copy_(indptr)
    out.indices[:total].copy_(table.block_table[used])
    out.last_page_len.copy_(last)
