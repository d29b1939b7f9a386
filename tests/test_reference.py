"""The reference ops against naive float64 formulas written out here, plus argument validation.

Every naive formula loops over requests and heads explicitly and builds masks element by element from
the positions, so it shares no code with pagedinfer.reference beyond the cache and table constructors.
"""
import itertools
import random
from types import SimpleNamespace

import pytest
import torch
from paged_cases import tree_mask

from pagedinfer import reference as R
from pagedinfer.masks import pack_masks
from pagedinfer.paged import (BlockTable, PageTable, as_paged_kv_cache, block_page_table, csr_page_table,
                              empty_csr)

GROUPS = (1, 3, 4, 8)
HEAD_DIMS = (64, 128, 80)
PAGE_SIZES = (1, 16, 32)
HKV = 2
# (sm_scale, logits_soft_cap, window_left)
SCORE_OPTIONS = ((None, 0.0, -1), (0.07, 0.0, -1), (None, 2.0, -1), (None, 0.0, 5), (0.2, 3.0, 0))


# ----------------------------------------------------------------------------------------------
# Building random caches and tables
# ----------------------------------------------------------------------------------------------

def build_cache(gen, num_pages, ps, d, dtype, layout, form, strided):
    """Random logical K/V `[pages, ps, HKV, d]` and a cache holding them in the requested storage form."""
    k_log = torch.randn(num_pages, ps, HKV, d, generator=gen).to(dtype)
    v_log = torch.randn(num_pages, ps, HKV, d, generator=gen).to(dtype)
    inner = (ps, HKV) if layout == "NHD" else (HKV, ps)
    pad, step = (8, 2) if strided else (0, 1)

    def storage(*lead):
        # Strided: every other page and a padded head_dim row, so no dimension but head_dim is dense.
        base = torch.full((num_pages * step, *lead, *inner, d + pad), float("nan"), dtype=dtype)
        return base[::step, ..., :d]

    def physical(x):
        return x if layout == "NHD" else x.transpose(1, 2)

    if form == "5d":
        cache = storage(2)
        cache[:, 0], cache[:, 1] = physical(k_log), physical(v_log)
    else:
        k, v = storage(), storage()
        k.copy_(physical(k_log))
        v.copy_(physical(v_log))
        cache = (k, v)
    return cache, k_log, v_log


def build_table(gen, kv_lens, ps, num_pages, form):
    """A table giving request b ceil(kv_lens[b] / ps) pages from a random permutation of the pool."""
    perm = torch.randperm(num_pages, generator=gen).tolist()
    counts = [-(-n // ps) for n in kv_lens]
    pages, at = [], 0
    for c in counts:
        pages.append(perm[at:at + c])
        at += c
    i32 = dict(dtype=torch.int32)
    if form == "csr":
        indptr = torch.tensor([0] + list(itertools.accumulate(counts)), **i32)
        # Three trailing junk entries: the table may be longer than indptr[-1].
        indices = torch.tensor(sum(pages, []) + [num_pages - 1] * 3, **i32)
        last = torch.tensor([n - (c - 1) * ps if c else 0 for n, c in zip(kv_lens, counts)], **i32)
        table = csr_page_table(indptr, indices, last, ps, num_pages)
    else:
        max_blocks = max(counts) + 2
        # Unused entries hold valid but wrong page ids, so reading one shows up as a wrong result.
        bt = torch.randint(0, num_pages, (len(kv_lens), max_blocks), generator=gen, **i32)
        for b, row in enumerate(pages):
            bt[b, :len(row)] = torch.tensor(row, **i32)
        table = block_page_table(bt, torch.tensor(kv_lens, **i32), ps, num_pages)
    return table, pages


def paged_setup(seed, kv_lens, *, group, head_dim, page_size, layout="NHD", cache_form="5d",
                strided=False, table_form="csr", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-n // page_size) for n in kv_lens) + 3
    cache, k_log, v_log = build_cache(gen, num_pages, page_size, head_dim, dtype, layout, cache_form, strided)
    table, pages = build_table(gen, kv_lens, page_size, num_pages, table_form)
    return SimpleNamespace(gen=gen, cache=cache, k_log=k_log, v_log=v_log, table=table, pages=pages,
                           kv_lens=list(kv_lens), ps=page_size, hq=HKV * group, d=head_dim, dtype=dtype,
                           layout=layout)


def naive_kv(s, b):
    """Request b's keys and values in float64, addressed key by key: key j is at (page j // ps, j % ps)."""
    page_of = [s.pages[b][j // s.ps] for j in range(s.kv_lens[b])]
    slot_of = [j % s.ps for j in range(s.kv_lens[b])]
    return s.k_log[page_of, slot_of].double(), s.v_log[page_of, slot_of].double()


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


# ----------------------------------------------------------------------------------------------
# The naive float64 formulas
# ----------------------------------------------------------------------------------------------

def naive_attention(q, k, v, visible, sm_scale, cap):
    """q `[n, Hq, D]`, k/v `[m, Hkv, D]` (any float dtype, computed in float64), visible bool `[n, m]`."""
    q, k, v = q.double(), k.double(), v.double()
    n, hq, d = q.shape
    group = hq // k.shape[1]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    out = torch.zeros(n, hq, d, dtype=torch.float64)
    lse = torch.full((n, hq), float("-inf"), dtype=torch.float64)
    seen = visible.any(dim=1)
    for h in range(hq):
        kh = h // group
        scores = (q[:, h] @ k[:, kh].T) * scale
        if cap > 0:
            scores = cap * torch.tanh(scores / cap)
        scores = scores.masked_fill(~visible, float("-inf"))
        for i in range(n):
            if not seen[i]:
                continue
            row_max = scores[i].max()
            p = torch.exp(scores[i] - row_max)
            out[i, h] = (p @ v[:, kh]) / p.sum()
            lse[i, h] = row_max + torch.log(p.sum())
    return out, lse


def naive_visible(qo_len, kv_len, window, rule):
    """[qo_len, kv_len] bool: rule(i, j, p) for query i at position p = kv_len - qo_len + i, and j >= p - window."""
    rows = []
    for i in range(qo_len):
        p = kv_len - qo_len + i
        rows.append([rule(i, j, p) and (window < 0 or j >= p - window) for j in range(kv_len)])
    return torch.tensor(rows, dtype=torch.bool).reshape(qo_len, kv_len)


def naive_batch(q, qo_offsets, kv_of, visible_of, sm_scale, cap):
    """Runs naive_attention per request; kv_of(b) -> (k, v), visible_of(b, qo_len, kv_len) -> mask."""
    outs, lses = [], []
    for b in range(len(qo_offsets) - 1):
        lo, hi = qo_offsets[b], qo_offsets[b + 1]
        k, v = kv_of(b)
        o, l = naive_attention(q[lo:hi], k, v, visible_of(b, hi - lo, k.shape[0]), sm_scale, cap)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    if dtype == torch.float32:
        tol = dict(rtol=2e-5, atol=2e-5)
    else:  # half inputs: the output is rounded to 8 (bf16) or 11 (fp16) mantissa bits
        tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-5, atol=2e-5)


def case_choices(i):
    """Deterministic per-case choice of the axes a test does not enumerate."""
    rnd = random.Random(1000 + i)
    return dict(layout=rnd.choice(("NHD", "HND")), cache_form=rnd.choice(("5d", "tuple")),
                strided=rnd.random() < 0.4, table_form=rnd.choice(("csr", "block")),
                dtype=torch.bfloat16 if rnd.random() < 0.25 else torch.float32)


def lengths_for(page_size, gen):
    """kv lengths including 1, exactly one page, exactly two pages, and a random one."""
    return [1, page_size, 2 * page_size, int(torch.randint(2, 2 * page_size + 6, (1,), generator=gen))]


GRID = list(itertools.product(GROUPS, HEAD_DIMS, PAGE_SIZES))


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------

def run_decode(s, sm_scale, cap, window):
    q = randn(s.gen, len(s.kv_lens), s.hq, s.d, dtype=s.dtype)
    out, lse = R.decode(q, s.cache, s.table, kv_layout=s.layout, sm_scale=sm_scale,
                        logits_soft_cap=cap, window_left=window)
    offsets = list(range(len(s.kv_lens) + 1))
    ref = naive_batch(q, offsets, lambda b: naive_kv(s, b),
                      lambda b, n, m: naive_visible(n, m, window, lambda i, j, p: True), sm_scale, cap)
    assert_matches(out, lse, *ref, s.dtype)


@pytest.mark.parametrize("i,group,head_dim,page_size", [(i, *c) for i, c in enumerate(GRID)])
def test_decode(i, group, head_dim, page_size):
    gen = torch.Generator().manual_seed(i)
    s = paged_setup(i, lengths_for(page_size, gen), group=group, head_dim=head_dim, page_size=page_size,
                    **case_choices(i))
    run_decode(s, *SCORE_OPTIONS[i % len(SCORE_OPTIONS)])


@pytest.mark.parametrize("layout,cache_form,strided,table_form",
                         list(itertools.product(("NHD", "HND"), ("5d", "tuple"), (False, True), ("csr", "block"))))
def test_decode_storage_forms(layout, cache_form, strided, table_form):
    s = paged_setup(7, [1, 16, 33, 5], group=4, head_dim=64, page_size=16, layout=layout,
                    cache_form=cache_form, strided=strided, table_form=table_form)
    assert_strided_as_requested(s, strided)
    run_decode(s, None, 0.0, -1)


def assert_strided_as_requested(s, strided):
    view = as_paged_kv_cache(s.cache, s.layout)
    base = s.cache if isinstance(s.cache, torch.Tensor) else s.cache[0]
    assert base.is_contiguous() != strided
    assert view.k.stride(3) == 1


def test_decode_accepts_paged_kv_cache_and_fp16():
    s = paged_setup(3, [3, 20], group=3, head_dim=80, page_size=16, layout="HND", dtype=torch.float16)
    s.cache = as_paged_kv_cache(s.cache, "HND")  # already wrapped: kv_layout is then ignored
    run_decode(s, None, 0.0, -1)


# ----------------------------------------------------------------------------------------------
# prefill (paged) and prefill_ragged
# ----------------------------------------------------------------------------------------------

def prefill_rule(mode, custom_b):
    if mode == "causal":
        return lambda i, j, p: j <= p
    if mode == "custom":
        return lambda i, j, p: custom_b[i][j]
    return lambda i, j, p: True


def random_custom_masks(gen, qo_lens, kv_lens):
    return [torch.rand(n, m, generator=gen) < 0.7 for n, m in zip(qo_lens, kv_lens)]


def qo_lens_for(gen, kv_lens):
    """One query, a partial extend, a full prefill, and a random split."""
    rand = [int(torch.randint(1, m + 1, (1,), generator=gen)) for m in kv_lens]
    return [1, rand[1], kv_lens[2], rand[3]]


PREFILL_GRID = list(itertools.product(GROUPS, ("none", "causal", "custom"), PAGE_SIZES))


@pytest.mark.parametrize("i,group,mode,page_size", [(i, *c) for i, c in enumerate(PREFILL_GRID)])
def test_prefill(i, group, mode, page_size):
    gen = torch.Generator().manual_seed(100 + i)
    kv_lens = lengths_for(page_size, gen)
    s = paged_setup(100 + i, kv_lens, group=group, head_dim=HEAD_DIMS[i % 3], page_size=page_size,
                    **case_choices(100 + i))
    qo_lens = qo_lens_for(gen, kv_lens)
    sm_scale, cap, window = SCORE_OPTIONS[i % len(SCORE_OPTIONS)]
    q = randn(gen, sum(qo_lens), s.hq, s.d, dtype=s.dtype)
    qo_indptr = torch.tensor([0] + list(itertools.accumulate(qo_lens)), dtype=torch.int32)
    customs = random_custom_masks(gen, qo_lens, kv_lens) if mode == "custom" else None
    packed, mask_indptr = pack_masks(customs) if customs else (None, None)
    out, lse = R.prefill(q, qo_indptr, s.cache, s.table, causal=mode == "causal", packed_mask=packed,
                         mask_indptr=mask_indptr, kv_layout=s.layout, sm_scale=sm_scale,
                         logits_soft_cap=cap, window_left=window)
    rule = lambda b: prefill_rule(mode, customs[b].tolist() if customs else None)
    ref = naive_batch(q, qo_indptr.tolist(), lambda b: naive_kv(s, b),
                      lambda b, n, m: naive_visible(n, m, window, rule(b)), sm_scale, cap)
    assert_matches(out, lse, *ref, s.dtype)


@pytest.mark.parametrize("i,group,mode", [(i, g, m) for i, (g, m) in
                                          enumerate(itertools.product(GROUPS, ("none", "causal", "custom")))])
def test_prefill_ragged(i, group, mode):
    gen = torch.Generator().manual_seed(200 + i)
    d = HEAD_DIMS[i % 3]
    dtype = torch.bfloat16 if i % 4 == 3 else torch.float32
    kv_lens = [1, 7, 40, int(torch.randint(1, 50, (1,), generator=gen))]
    qo_lens = qo_lens_for(gen, kv_lens)
    sm_scale, cap, window = SCORE_OPTIONS[i % len(SCORE_OPTIONS)]
    k = randn(gen, sum(kv_lens), HKV, d, dtype=dtype)
    v = randn(gen, sum(kv_lens), HKV, d, dtype=dtype)
    q = randn(gen, sum(qo_lens), HKV * group, d, dtype=dtype)
    qo_indptr = torch.tensor([0] + list(itertools.accumulate(qo_lens)), dtype=torch.int32)
    kv_indptr = torch.tensor([0] + list(itertools.accumulate(kv_lens)), dtype=torch.int32)
    customs = random_custom_masks(gen, qo_lens, kv_lens) if mode == "custom" else None
    packed, mask_indptr = pack_masks(customs) if customs else (None, None)
    out, lse = R.prefill_ragged(q, qo_indptr, k, v, kv_indptr, causal=mode == "causal", packed_mask=packed,
                                mask_indptr=mask_indptr, sm_scale=sm_scale, logits_soft_cap=cap,
                                window_left=window)
    ko = kv_indptr.tolist()
    rule = lambda b: prefill_rule(mode, customs[b].tolist() if customs else None)
    ref = naive_batch(q, qo_indptr.tolist(), lambda b: (k[ko[b]:ko[b + 1]], v[ko[b]:ko[b + 1]]),
                      lambda b, n, m: naive_visible(n, m, window, rule(b)), sm_scale, cap)
    assert_matches(out, lse, *ref, dtype)


def test_prefill_window_is_a_left_bound_only():
    # Without causal, a window keeps keys after the query visible (FlashInfer's window_left).
    gen = torch.Generator().manual_seed(5)
    q, k, v = randn(gen, 3, 2, 64), randn(gen, 6, 2, 64), randn(gen, 6, 2, 64)
    qo_indptr, kv_indptr = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 6], dtype=torch.int32)
    out, lse = R.prefill_ragged(q, qo_indptr, k, v, kv_indptr, window_left=1)
    # Query 0 sits at position 3: it sees keys 2..5.
    visible = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert_matches(out, lse, *naive_attention(q, k, v, visible, None, 0.0), torch.float32)


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------

def random_tree(gen, n):
    """A random forest of drafts: each draft hangs under an earlier one or starts a new root."""
    return tree_mask([-1] + [int(torch.randint(-1, j, (1,), generator=gen)) for j in range(1, n)])


VERIFY_GRID = list(itertools.product(GROUPS, ("causal", "tree"), PAGE_SIZES))


@pytest.mark.parametrize("i,group,mode,page_size", [(i, *c) for i, c in enumerate(VERIFY_GRID)])
def test_verify(i, group, mode, page_size):
    gen = torch.Generator().manual_seed(300 + i)
    qo_lens = [1, 4, 6, int(torch.randint(1, 9, (1,), generator=gen))]
    # Prefixes: none, one that ends the drafts exactly on a page boundary, one key, a random one.
    boundary = 2 * page_size - 4 if page_size > 4 else page_size
    prefixes = [0, boundary, 1, int(torch.randint(0, 40, (1,), generator=gen))]
    kv_lens = [p + n for p, n in zip(prefixes, qo_lens)]
    s = paged_setup(300 + i, kv_lens, group=group, head_dim=HEAD_DIMS[i % 3], page_size=page_size,
                    **case_choices(300 + i))
    sm_scale, cap, window = SCORE_OPTIONS[i % len(SCORE_OPTIONS)]
    q = randn(gen, sum(qo_lens), s.hq, s.d, dtype=s.dtype)
    qo_indptr = torch.tensor([0] + list(itertools.accumulate(qo_lens)), dtype=torch.int32)
    trees = [random_tree(gen, n) for n in qo_lens] if mode == "tree" else None
    packed, tree_indptr = pack_masks(trees) if trees else (None, None)
    out, lse = R.verify(q, qo_indptr, s.cache, s.table, tree_mask=packed, tree_mask_indptr=tree_indptr,
                        kv_layout=s.layout, sm_scale=sm_scale, logits_soft_cap=cap, window_left=window)

    def rule(b):
        prefix = s.kv_lens[b] - qo_lens[b]
        if trees is None:
            return lambda i, j, p: j <= p
        t = trees[b].tolist()
        return lambda i, j, p: j < prefix or t[i][j - prefix]

    ref = naive_batch(q, qo_indptr.tolist(), lambda b: naive_kv(s, b),
                      lambda b, n, m: naive_visible(n, m, window, rule(b)), sm_scale, cap)
    assert_matches(out, lse, *ref, s.dtype)


def test_verify_tree_bit_convention_by_hand():
    # Two drafts after a prefix of 3. Bits set: 0 (draft 0 -> draft 0) and 2 = 1 * 2 + 0 (draft 1 ->
    # draft 0); bit 3 (draft 1 -> itself) is clear. So draft 1 sees keys 0, 1, 2, 3 but not 4.
    s = paged_setup(11, [5], group=1, head_dim=64, page_size=16)
    q = randn(s.gen, 2, s.hq, s.d)
    packed = torch.tensor([0b0101], dtype=torch.uint8)
    out, lse = R.verify(q, torch.tensor([0, 2], dtype=torch.int32), s.cache, s.table, tree_mask=packed,
                        tree_mask_indptr=torch.tensor([0, 1], dtype=torch.int32))
    k, v = naive_kv(s, 0)
    visible = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert_matches(out, lse, *naive_attention(q, k, v, visible, None, 0.0), torch.float32)


# ----------------------------------------------------------------------------------------------
# attention core, fully masked rows
# ----------------------------------------------------------------------------------------------

def test_attention_float64_matches_naive():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (randn(gen, *sh, dtype=torch.float64) for sh in ((5, 6, 80), (9, 2, 80), (9, 2, 80)))
    mask = torch.rand(5, 9, generator=gen) < 0.6
    mask[:, 0] = True
    out, lse = R.attention(q, k, v, mask, sm_scale=0.1, logits_soft_cap=1.5)
    ref_out, ref_lse = naive_attention(q, k, v, mask, 0.1, 1.5)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def assert_empty_rows(out, lse, rows):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[rows] == 0).all()
    assert torch.isneginf(lse[rows]).all()


def test_fully_masked_rows_attention():
    gen = torch.Generator().manual_seed(2)
    q, k, v = randn(gen, 4, 4, 64), randn(gen, 6, 2, 64), randn(gen, 6, 2, 64)
    mask = torch.rand(4, 6, generator=gen) < 0.5
    mask[1] = False
    mask[3] = False
    out, lse = R.attention(q, k, v, mask, sm_scale=None)
    assert_empty_rows(out, lse, [1, 3])
    assert torch.isfinite(lse[[0, 2]]).all()
    out, lse = R.attention(q, k[:0], v[:0], None, sm_scale=None)  # no keys at all
    assert_empty_rows(out, lse, slice(None))


@pytest.mark.parametrize("table_form", ["csr", "block"])
def test_fully_masked_rows_decode_empty_request(table_form):
    s = paged_setup(4, [5, 0, 17], group=2, head_dim=64, page_size=16, table_form=table_form)
    q = randn(s.gen, 3, s.hq, s.d)
    out, lse = R.decode(q, s.cache, s.table)
    assert_empty_rows(out, lse, [1])
    ref = naive_batch(q, [0, 1, 2, 3], lambda b: naive_kv(s, b),
                      lambda b, n, m: naive_visible(n, m, -1, lambda i, j, p: True), None, 0.0)
    assert_matches(out, lse, *ref, torch.float32)


def test_fully_masked_rows_prefill_custom_mask():
    s = paged_setup(5, [6, 4], group=2, head_dim=64, page_size=1)
    q = randn(s.gen, 5, s.hq, s.d)
    masks = [torch.ones(3, 6, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)]
    masks[0][1] = False
    masks[1][0] = False
    packed, mask_indptr = pack_masks(masks)
    out, lse = R.prefill(q, torch.tensor([0, 3, 5], dtype=torch.int32), s.cache, s.table,
                         packed_mask=packed, mask_indptr=mask_indptr)
    assert_empty_rows(out, lse, [1, 3])


# ----------------------------------------------------------------------------------------------
# merge_state
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_state_equals_attention_over_all_keys(dtype):
    gen = torch.Generator().manual_seed(6)
    q, k, v = randn(gen, 7, 8, 64, dtype=dtype), randn(gen, 30, 2, 64, dtype=dtype), randn(gen, 30, 2, 64, dtype=dtype)
    side_a = torch.rand(30, generator=gen) < 0.5
    a = side_a[None].expand(7, 30)
    out_a, lse_a = R.attention(q, k, v, a, sm_scale=None)
    out_b, lse_b = R.attention(q, k, v, ~a, sm_scale=None)
    out, lse = R.merge_state(out_a, lse_a, out_b, lse_b)
    ref = naive_attention(q, k, v, torch.ones(7, 30, dtype=torch.bool), None, 0.0)
    assert_matches(out, lse, *ref, dtype)


def test_merge_state_empty_sides():
    gen = torch.Generator().manual_seed(8)
    v_a, v_b = randn(gen, 3, 2, 16), randn(gen, 3, 2, 16)
    s_a, s_b = randn(gen, 3, 2), randn(gen, 3, 2)
    s_b[0] = float("-inf")  # row 0: only side a
    s_a[1] = float("-inf")  # row 1: only side b
    s_a[2] = s_b[2] = float("-inf")  # row 2: neither
    v, s = R.merge_state(v_a, s_a, v_b, s_b)
    assert not torch.isnan(v).any() and not torch.isnan(s).any()
    torch.testing.assert_close(v[0], v_a[0])
    torch.testing.assert_close(s[0], s_a[0])
    torch.testing.assert_close(v[1], v_b[1])
    torch.testing.assert_close(s[1], s_b[1])
    assert (v[2] == 0).all() and torch.isneginf(s[2]).all()


# ----------------------------------------------------------------------------------------------
# append_kv
# ----------------------------------------------------------------------------------------------

def whole_pool_table(num_pages, ps):
    """One request that reads every page in order, so gather_kv returns the pool slot by slot."""
    i32 = dict(dtype=torch.int32)
    return csr_page_table(torch.tensor([0, num_pages], **i32), torch.arange(num_pages, **i32),
                          torch.tensor([ps], **i32), ps, num_pages)


@pytest.mark.parametrize("layout,cache_form,strided,slot_dtype",
                         [("NHD", "5d", False, torch.int64), ("HND", "5d", True, torch.int32),
                          ("NHD", "tuple", True, torch.int32), ("HND", "tuple", False, torch.int64)])
def test_append_kv_round_trip(layout, cache_form, strided, slot_dtype):
    gen = torch.Generator().manual_seed(9)
    num_pages, ps, d = 5, 16, 64
    cache, k_log, v_log = build_cache(gen, num_pages, ps, d, torch.bfloat16, layout, cache_form, strided)
    slots = torch.randperm(num_pages * ps, generator=gen)[:12].to(slot_dtype)
    slots[[2, 7]] = -1  # padding rows
    k_new = randn(gen, 12, HKV, d, dtype=torch.bfloat16)
    v_new = randn(gen, 12, HKV, d, dtype=torch.bfloat16)
    R.append_kv(k_new, v_new, cache, slots, kv_layout=layout)

    view = as_paged_kv_cache(cache, layout)
    k_all, v_all = R.gather_kv(view, whole_pool_table(num_pages, ps), 0)
    expect_k, expect_v = k_log.reshape(-1, HKV, d).clone(), v_log.reshape(-1, HKV, d).clone()
    keep = slots >= 0
    expect_k[slots[keep].long()] = k_new[keep]
    expect_v[slots[keep].long()] = v_new[keep]
    assert torch.equal(k_all, expect_k) and torch.equal(v_all, expect_v)
    # The padding in strided storage is untouched (still NaN).
    if strided:
        base = cache if cache_form == "5d" else cache[0]
        assert torch.isnan(base.as_strided((base.numel(),), (1,))[d:d + 8]).all()


# ----------------------------------------------------------------------------------------------
# csr_from_block_table
# ----------------------------------------------------------------------------------------------

def test_csr_from_block_table_matches_hand_built_and_decodes_the_same():
    i32 = dict(dtype=torch.int32)
    ps, num_pages = 4, 12
    bt = torch.tensor([[3, 7, 1, 9], [5, 11, 11, 11], [0, 2, 4, 6], [8, 10, 10, 10]], **i32)
    seq_lens = torch.tensor([9, 0, 16, 1], **i32)  # 3 pages, none, exactly 4 pages, 1 key
    block = block_page_table(bt, seq_lens, ps, num_pages)
    out = empty_csr(4, 16, ps, "cpu")
    out.indices.fill_(-7)
    R.csr_from_block_table(block, out)
    assert out.indptr.tolist() == [0, 3, 3, 7, 8]
    assert out.indices.tolist()[:8] == [3, 7, 1, 0, 2, 4, 6, 8]
    assert out.indices.tolist()[8:] == [-7] * 8  # the tail is left alone
    assert out.last_page_len.tolist() == [1, 0, 4, 1]
    assert torch.equal(out.kv_lens(), seq_lens)
    csr = csr_page_table(out.indptr, out.indices, out.last_page_len, ps, num_pages)  # passes validation

    gen = torch.Generator().manual_seed(10)
    cache, _, _ = build_cache(gen, num_pages, ps, 64, torch.float32, "NHD", "5d", False)
    q = randn(gen, 4, 6, 64)
    out_block = R.decode(q, cache, block)
    out_csr = R.decode(q, cache, csr)
    assert torch.equal(out_block[0], out_csr[0]) and torch.equal(out_block[1], out_csr[1])


# ----------------------------------------------------------------------------------------------
# Validation: one check per rule, each error names its argument
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def small():
    s = paged_setup(12, [5, 9], group=2, head_dim=64, page_size=16)
    s.q = randn(s.gen, 2, s.hq, s.d)
    s.qo_indptr = torch.tensor([0, 1, 2], dtype=torch.int32)
    return s


def raises(name):
    return pytest.raises(ValueError, match="^" + name.replace("[", r"\[").replace("]", r"\]") + ":")


def test_validate_attention():
    q, k = torch.randn(2, 4, 64), torch.randn(3, 2, 64)
    with raises("q"):
        R.attention(torch.randn(2, 4, 80), k, k, sm_scale=None)
    with raises("num_qo_heads"):
        R.attention(torch.randn(2, 3, 64), k, k, sm_scale=None)
    with raises("v"):
        R.attention(q, k, torch.randn(4, 2, 64), sm_scale=None)
    with raises("mask"):
        R.attention(q, k, k, torch.ones(2, 4, dtype=torch.bool), sm_scale=None)
    with raises("mask"):
        R.attention(q, k, k, torch.ones(2, 3), sm_scale=None)
    with raises("q"):
        R.attention(q.to(torch.int32), k, k, sm_scale=None)
    with raises("sm_scale"):
        R.attention(q, k, k, sm_scale=-1.0)
    with raises("logits_soft_cap"):
        R.attention(q, k, k, sm_scale=None, logits_soft_cap=-1.0)


def test_validate_decode(small):
    s = small
    with raises("q"):
        R.decode(s.q[:1], s.cache, s.table)  # batch mismatch
    with raises("q"):
        R.decode(s.q[..., :32], s.cache, s.table)  # head_dim mismatch
    with raises("q"):
        R.decode(s.q[0], s.cache, s.table)  # ndim
    with raises("num_qo_heads"):
        R.decode(s.q[:, :3], s.cache, s.table)
    with raises("table"):
        R.decode(s.q, s.cache, "not a table")
    with raises("table"):
        R.decode(s.q, s.cache, PageTable(s.table.indptr, s.table.indices, s.table.last_page_len, 32))
    with raises("kv_layout"):
        R.decode(s.q, s.cache, s.table, kv_layout="NDH")
    with raises("window_left"):
        R.decode(s.q, s.cache, s.table, window_left=-2)
    with raises("sm_scale"):
        R.decode(s.q, s.cache, s.table, sm_scale=0.0)
    with raises("logits_soft_cap"):
        R.decode(s.q, s.cache, s.table, logits_soft_cap=-3.0)


def test_validate_prefill(small):
    s = small
    packed, mask_indptr = pack_masks([torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)])
    with pytest.raises(ValueError, match="causal") as err:
        R.prefill(s.q, s.qo_indptr, s.cache, s.table, causal=True, packed_mask=packed, mask_indptr=mask_indptr)
    assert "packed_mask" in str(err.value)
    with raises("mask_indptr"):
        R.prefill(s.q, s.qo_indptr, s.cache, s.table, packed_mask=packed)
    with raises("packed_mask"):
        R.prefill(s.q, s.qo_indptr, s.cache, s.table, mask_indptr=mask_indptr)
    with raises("packed_mask"):
        R.prefill(s.q, s.qo_indptr, s.cache, s.table, packed_mask=packed.to(torch.int32), mask_indptr=mask_indptr)
    with raises("mask_indptr"):
        R.prefill(s.q, s.qo_indptr, s.cache, s.table, packed_mask=packed, mask_indptr=mask_indptr[:2])
    with raises("packed_mask"):  # request 1's 9 bits need 2 bytes; this buffer is 1 byte short
        R.prefill(s.q, s.qo_indptr, s.cache, s.table, packed_mask=packed[:2], mask_indptr=mask_indptr)
    with raises("qo_indptr"):  # wrong length
        R.prefill(s.q, s.qo_indptr[:2], s.cache, s.table)
    with raises("qo_indptr"):  # wrong dtype
        R.prefill(s.q, s.qo_indptr.long(), s.cache, s.table)
    with raises("qo_indptr"):  # does not end at q.shape[0]
        R.prefill(s.q, torch.tensor([0, 1, 1], dtype=torch.int32), s.cache, s.table)
    with raises("qo_indptr"):  # decreasing
        R.prefill(s.q, torch.tensor([0, 3, 2], dtype=torch.int32), s.cache, s.table)
    q7 = randn(s.gen, 7, s.hq, s.d)
    with raises("qo_indptr"):  # request 0: qo_len 6 > kv_len 5
        R.prefill(q7, torch.tensor([0, 6, 7], dtype=torch.int32), s.cache, s.table)


def test_validate_prefill_ragged():
    q, k = torch.randn(3, 4, 64), torch.randn(5, 2, 64)
    qo_indptr, kv_indptr = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    with raises("kv_indptr"):
        R.prefill_ragged(q, qo_indptr, k, k, torch.tensor([0, 4], dtype=torch.int32))
    with raises("kv_indptr"):
        R.prefill_ragged(q, qo_indptr, k, k, torch.tensor([0, 2, 5], dtype=torch.int32))
    with raises("v"):
        R.prefill_ragged(q, qo_indptr, k, k[:4], kv_indptr)
    with raises("q"):
        R.prefill_ragged(q[..., :32], qo_indptr, k, k, kv_indptr)
    with raises("qo_indptr"):
        R.prefill_ragged(q, torch.tensor([0], dtype=torch.int32), k, k, kv_indptr)
    with raises("qo_indptr"):  # 3 queries over 2 keys
        R.prefill_ragged(q, qo_indptr, k[:2], k[:2], torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="causal"):
        R.prefill_ragged(q, qo_indptr, k, k, kv_indptr, causal=True, packed_mask=torch.zeros(2, dtype=torch.uint8),
                         mask_indptr=torch.tensor([0, 2], dtype=torch.int32))


def test_validate_verify(small):
    s = small
    packed, tree_indptr = pack_masks([torch.ones(1, 1, dtype=torch.bool)] * 2)
    with raises("tree_mask_indptr"):
        R.verify(s.q, s.qo_indptr, s.cache, s.table, tree_mask=packed)
    with raises("tree_mask"):
        R.verify(s.q, s.qo_indptr, s.cache, s.table, tree_mask_indptr=tree_indptr)
    with raises("tree_mask"):  # [2, 2] trees need a byte each; the buffer has 2 bytes for 2 requests,
        R.verify(randn(s.gen, 4, s.hq, s.d), torch.tensor([0, 2, 4], dtype=torch.int32), s.cache, s.table,
                 tree_mask=packed[:1], tree_mask_indptr=tree_indptr)  # but it is cut to 1
    q7 = randn(s.gen, 7, s.hq, s.d)
    with raises("qo_indptr"):
        R.verify(q7, torch.tensor([0, 6, 7], dtype=torch.int32), s.cache, s.table)


def test_validate_gather_kv(small):
    s = small
    view = as_paged_kv_cache(s.cache)
    with raises("cache"):
        R.gather_kv(s.cache, s.table, 0)
    with raises("b"):
        R.gather_kv(view, s.table, 2)
    bad_ids = PageTable(s.table.indptr, s.table.indices + 100, s.table.last_page_len, 16)
    with raises("table"):
        R.gather_kv(view, bad_ids, 0)
    short = BlockTable(torch.zeros(2, 1, dtype=torch.int32), torch.tensor([5, 20], dtype=torch.int32), 16)
    with raises("table"):  # 20 keys need 2 pages, the row has 1
        R.gather_kv(view, short, 1)


def test_validate_merge_state():
    v, s = torch.randn(3, 2, 16), torch.randn(3, 2)
    with raises("v_b"):
        R.merge_state(v, s, v[:2], s)
    with raises("v_b"):
        R.merge_state(v, s, v.double(), s)
    with raises("s_a"):
        R.merge_state(v, s[:, :1], v, s)
    with raises("s_b"):
        R.merge_state(v, s, v, s[0])
    with raises("v_a"):
        R.merge_state(v[0], s, v, s)


def test_validate_append_kv():
    gen = torch.Generator().manual_seed(13)
    cache, _, _ = build_cache(gen, 2, 16, 64, torch.float16, "NHD", "5d", False)
    k = torch.randn(3, HKV, 64).half()
    slots = torch.tensor([0, 5, 31], dtype=torch.int32)
    with raises("k_new"):
        R.append_kv(k.float(), k, cache, slots)
    with raises("k_new"):
        R.append_kv(k[:, :1], k, cache, slots)
    with raises("v_new"):
        R.append_kv(k, k[:2], cache, slots)
    with raises("slot_mapping"):
        R.append_kv(k, k, cache, torch.tensor([0, 5, 32], dtype=torch.int32))
    with raises("slot_mapping"):
        R.append_kv(k, k, cache, slots.float())
    with raises("slot_mapping"):
        R.append_kv(k, k, cache, slots[:2])


def test_validate_csr_from_block_table():
    i32 = dict(dtype=torch.int32)
    block = block_page_table(torch.tensor([[0, 1], [2, 3]], **i32), torch.tensor([20, 3], **i32), 16)
    with raises("table"):
        R.csr_from_block_table(empty_csr(2, 4, 16, "cpu"), empty_csr(2, 4, 16, "cpu"))
    with raises("out"):
        R.csr_from_block_table(block, "nope")
    with raises("out"):
        R.csr_from_block_table(block, empty_csr(2, 4, 32, "cpu"))
    with raises("out.indptr"):
        R.csr_from_block_table(block, empty_csr(3, 4, 16, "cpu"))
    with raises("out.indices"):
        R.csr_from_block_table(block, empty_csr(2, 2, 16, "cpu"))
    unchecked = BlockTable(torch.tensor([[0], [2]], **i32), torch.tensor([20, 3], **i32), 16)
    with raises("seq_lens"):  # 20 keys need 2 pages, rows hold 1
        R.csr_from_block_table(unchecked, empty_csr(2, 4, 16, "cpu"))
