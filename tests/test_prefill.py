"""Prefill / extend against the PyTorch reference: validation on the CPU; on the GPU a fuzz over query and
prefix lengths, causal / none / packed custom masks, and the decode coverage (dtypes, head dims, groups,
page sizes, layouts, page tables, soft cap, window), plus CUDA-graph replay."""
import math

import numpy as np
import pytest
import torch
from paged_cases import (DTYPES, assert_matches, build_paged, cpu_block_table, fuzz, random_queries, run_planned,
                         run_ragged, spec_pool)

from pagedinfer import kernels, reference
from pagedinfer.decode import CAUSAL, CUSTOM, NO_MASK
from pagedinfer.masks import pack_masks, visible_spans
from pagedinfer.paged import as_paged_kv_cache, block_page_table
from pagedinfer.prefill import PrefillWrapper, RaggedPrefillWrapper, prefill, prefill_ragged, prefill_spec

MASKS = ["causal", "none", "custom"]


def random_custom_mask(rng, qo_len: int, kv_len: int) -> torch.Tensor:
    """[qo_len, kv_len] bool: random bits, or the causal pattern (whole or with holes), or a band of keys per
    row, with some rows seeing nothing (plan() narrows each block of rows to the keys its rows see, and the
    kernel reads no bits where a row's run of visible keys covers a tile)."""
    kind = rng.choice(["random", "causal", "holes", "band"])
    if kind == "random":
        mask = rng.random((qo_len, kv_len)) < 0.7
    elif kind in ("causal", "holes"):
        mask = np.tri(qo_len, kv_len, kv_len - qo_len, dtype=bool)
        if kind == "holes":
            mask &= rng.random((qo_len, kv_len)) < 0.97
    else:
        lo = rng.integers(0, kv_len, qo_len)
        hi = lo + rng.integers(1, max(2, kv_len // 4), qo_len)
        keys = np.arange(kv_len)
        mask = (keys >= lo[:, None]) & (keys < hi[:, None])
    mask[rng.random(qo_len) < 0.05] = False
    return torch.from_numpy(mask)


def make_case(rng, spec, device="cuda", qo_lens=None, prefixes=None, mask=None):
    dtype_name, head_dim, group, page_size, soft_cap = spec
    dtype = DTYPES[dtype_name]
    kv_heads = int(rng.choice([1, 2, 3]))
    batch = len(qo_lens) if qo_lens else int(rng.choice([1, 2, 3, 5]))
    qo_lens = qo_lens or [int(rng.integers(1, 300)) if rng.random() < 0.85 else int(rng.integers(300, 1500))
                          for _ in range(batch)]
    prefixes = prefixes or [int(rng.integers(0, 1500)) if rng.random() < 0.6 else 0 for _ in range(batch)]
    lens = [p + n for p, n in zip(prefixes, qo_lens)]
    cache, table, layout = build_paged(rng, lens, page_size, kv_heads, head_dim, dtype, device)
    qo_indptr = torch.tensor(np.concatenate([[0], np.cumsum(qo_lens)]), dtype=torch.int32, device=device)
    mask = mask or str(rng.choice(MASKS))
    masks = dict(causal=mask == "causal")
    if mask == "custom":
        packed, mask_indptr = pack_masks([random_custom_mask(rng, n, k) for n, k in zip(qo_lens, lens)])
        masks = dict(custom_mask=packed.to(device), mask_indptr=mask_indptr.to(device))
    options = dict(sm_scale=float(rng.uniform(0.5, 1.5)) / math.sqrt(head_dim) if rng.random() < 0.5 else None,
                   logits_soft_cap=float(rng.uniform(5, 50)) if soft_cap else None,
                   window_left=int(rng.integers(0, 1000)) if rng.random() < 0.2 else -1)
    q = random_queries(rng, sum(qo_lens), kv_heads * group, kv_heads, head_dim, dtype, device)
    return dict(q=q, qo_indptr=qo_indptr, cache=cache, table=table, layout=layout, masks=masks, options=options,
                dtype=dtype)


def check_against_reference(case, out, lse):
    masks = case["masks"]
    ref_out, ref_lse = reference.prefill(case["q"], case["qo_indptr"], case["cache"], case["table"],
                                         causal=masks.get("causal", False), packed_mask=masks.get("custom_mask"),
                                         mask_indptr=masks.get("mask_indptr"), kv_layout=case["layout"],
                                         sm_scale=case["options"]["sm_scale"],
                                         logits_soft_cap=case["options"]["logits_soft_cap"] or 0.0,
                                         window_left=case["options"]["window_left"])
    assert_matches(out, lse, ref_out, ref_lse, case["dtype"])


def run_case(case, wrapper=None):
    return run_ragged(PrefillWrapper, case, wrapper)


# ------------------------------------------------------------------------------ CPU: validation


def test_plan_rejects_causal_with_custom_mask():
    qo = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="causal, custom_mask: expected one of the two, got both"):
        PrefillWrapper("cpu").plan(qo, cpu_block_table([40, 50]), 8, 2, 64, causal=True,
                                   custom_mask=torch.zeros(100, dtype=torch.uint8),
                                   mask_indptr=torch.tensor([0, 20, 45], dtype=torch.int32))


def test_plan_rejects_short_custom_mask_segments():
    qo = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="mask_indptr: expected byte offsets giving each request"):
        PrefillWrapper("cpu").plan(qo, cpu_block_table([40, 50]), 8, 2, 64, custom_mask=torch.zeros(100, dtype=torch.uint8),
                                   mask_indptr=torch.tensor([0, 10, 45], dtype=torch.int32))


def test_plan_rejects_empty_and_too_long_queries():
    with pytest.raises(ValueError, match="qo_indptr: expected offsets from 0 with 1 to 32768 tokens"):
        PrefillWrapper("cpu").plan(torch.tensor([0, 0, 4], dtype=torch.int32), cpu_block_table([40, 50]), 8, 2, 64)
    with pytest.raises(ValueError, match="qo_indptr: expected at most kv_len query tokens per request"):
        PrefillWrapper("cpu").plan(torch.tensor([0, 41, 45], dtype=torch.int32), cpu_block_table([40, 50]), 8, 2, 64)


def test_graph_mode_refuses_custom_masks():
    w = PrefillWrapper("cpu", use_cuda_graph=True, max_batch_size=2, max_pages=16, max_qo_len=64)
    with pytest.raises(ValueError, match="custom_mask: expected no custom mask with use_cuda_graph=True"):
        w.plan(torch.tensor([0, 4, 8], dtype=torch.int32), cpu_block_table([40, 50]), 8, 2, 64,
               custom_mask=torch.zeros(100, dtype=torch.uint8),
               mask_indptr=torch.tensor([0, 20, 45], dtype=torch.int32))


def test_one_shot_prefill_on_cpu_is_the_reference():
    rng = np.random.default_rng(0)
    case = make_case(rng, ("bf16", 64, 4, 16, False), device="cpu", qo_lens=[7, 30], prefixes=[5, 0])
    out, lse = prefill(case["q"], case["qo_indptr"], case["cache"], case["table"], kv_layout=case["layout"],
                       return_lse=True, **case["masks"], **case["options"])
    check_against_reference(case, out, lse)


def test_custom_mask_plans_only_the_keys_its_rows_see():
    qo_lens, lens, group = np.array([300, 1000, 50]), np.array([500, 1000, 3000]), 4
    spec = prefill_spec("bf16", 128, group, 16, False, 1000, CUSTOM, True)
    plan = lambda mask, offsets=None, spans=None: PrefillWrapper("cpu")._work_list(  # noqa: E731
        np.cumsum(qo_lens) - qo_lens, qo_lens, lens, np.zeros(3, np.int64), group, spec, 8, 132, -1, mask, offsets,
        spans).items[:, :8]  # the keys (the request's numbers differ by the mask offset)
    causal = [torch.from_numpy(np.tri(n, k, k - n, dtype=bool)) for n, k in zip(qo_lens, lens)]
    packed, indptr = pack_masks(causal)
    offsets = indptr[:-1].numpy().astype(np.int64)
    # The causal pattern given as bits plans exactly as causal: the same items over the same keys.
    assert np.array_equal(plan(CUSTOM, offsets, visible_spans(packed, offsets, qo_lens, lens)[:2]), plan(CAUSAL))
    # Rows 0-39 of request 0 see nothing, rows 40-299 keys 100-199: the first unit (32 tokens) keeps one key.
    band = torch.zeros(300, 500, dtype=torch.bool)
    band[40:, 100:200] = True
    packed, indptr = pack_masks([band, *causal[1:]])
    offsets = indptr[:-1].numpy().astype(np.int64)
    items = plan(CUSTOM, offsets, visible_spans(packed, offsets, qo_lens, lens)[:2])
    first = items[items[:, 0] == 0]
    spans = {(int(i[7]), int(i[2]), int(i[3])) for i in first}
    assert spans == {(0, 0, 1)} | {(b, 100, 200) for b in range(1, 10)}


@pytest.mark.parametrize("group", [3, 4, 7])  # 128 rows hold whole tokens for 4 only: neighbours share one
def test_custom_bounds_are_the_union_of_each_units_rows(group):
    rng = np.random.default_rng(group)
    qo_lens, lens = np.array([90, 1, 200]), np.array([400, 50, 900])
    first = np.concatenate([rng.integers(0, n, q) for q, n in zip(qo_lens, lens)])
    end = np.minimum(first + np.concatenate([rng.integers(1, n, q) for q, n in zip(qo_lens, lens)]),
                     np.repeat(lens, qo_lens))
    blocks = -(-qo_lens * group // 128)
    unit_req = np.repeat(np.arange(3), blocks)
    unit_block = np.arange(int(blocks.sum())) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    first_tok = unit_block * 128 // group
    last_tok = np.minimum(qo_lens[unit_req] - 1, (unit_block * 128 + 127) // group)
    begins, ends = PrefillWrapper._custom_bounds(np.zeros_like(unit_req), lens[unit_req], (first, end), qo_lens,
                                                 unit_req, first_tok, last_tok)
    tok0 = np.cumsum(qo_lens) - qo_lens
    for u in range(len(unit_req)):
        rows = slice(tok0[unit_req[u]] + first_tok[u], tok0[unit_req[u]] + last_tok[u] + 1)
        assert (begins[u], ends[u]) == (first[rows].min(), end[rows].max())


def test_mask_buffer_starts_with_each_q_rows_run_of_visible_keys():
    wrapper = PrefillWrapper("cpu")
    mask = torch.arange(7, dtype=torch.uint8)
    # Requests' rows at q rows 0-1 and 4-6 (q rows 2-3 belong to no request: an empty run).
    buffer, offsets = wrapper._with_row_runs(mask, np.array([0, 3]), np.array([0, 4]), np.array([2, 3]),
                                             np.array([1, 2, 3, 4, 5]), np.array([9, 8, 7, 6, 5]))
    runs = buffer[:56].view(torch.int32).view(7, 2).tolist()
    assert runs == [[1, 9], [2, 8], [0, 0], [0, 0], [3, 7], [4, 6], [5, 5]]
    assert offsets.tolist() == [64, 67] and torch.equal(buffer[64:], mask) and not buffer[56:64].any()


def test_hopper_kernel_takes_long_requests_of_its_head_dims():
    def source(head_dim, max_tokens, group, hopper=True):
        return prefill_spec("bf16", head_dim, group, 16, False, max_tokens, CAUSAL, hopper).source
    assert source(128, 4096, 4) == source(64, 17, 4) == "prefill_sm90.cu"
    assert source(64, 16, 4) == "decode.cu"          # 64 rows: the decode kernel's block holds them
    assert source(96, 4096, 4) == source(256, 4096, 4) == "decode.cu"
    assert source(128, 4096, 4, hopper=False) == "decode.cu"
    spec = prefill_spec("bf16", 128, 4, 16, False, 4096, CAUSAL, True)
    assert (spec.threads, spec.rows, spec.tile) == (384, 128, 128) and spec.smem <= 227 * 1024


def make_ragged_case(rng, spec, device="cuda"):
    """Contiguous K/V per request (kv_indptr), queries at the end of each request's keys, a random mask."""
    dtype_name, head_dim, group, _, soft_cap = spec
    dtype, kv_heads = DTYPES[dtype_name], int(rng.choice([1, 2, 3]))
    qo_lens = [int(rng.integers(1, 300)) for _ in range(int(rng.choice([1, 2, 4])))]
    kv_lens = [n + (int(rng.integers(0, 700)) if rng.random() < 0.5 else 0) for n in qo_lens]
    mask = str(rng.choice(MASKS))
    masks = dict(causal=mask == "causal")
    if mask == "custom":
        packed, mask_indptr = pack_masks([random_custom_mask(rng, n, k) for n, k in zip(qo_lens, kv_lens)])
        masks = dict(custom_mask=packed.to(device), mask_indptr=mask_indptr.to(device))
    indptr = lambda lens: torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=device)  # noqa: E731
    total = sum(kv_lens)
    return dict(q=random_queries(rng, sum(qo_lens), kv_heads * group, kv_heads, head_dim, dtype, device),
                k=torch.randn(total, kv_heads, head_dim, dtype=dtype, device=device),
                v=torch.randn(total, kv_heads, head_dim, dtype=dtype, device=device),
                qo_indptr=indptr(qo_lens), kv_indptr=indptr(kv_lens), masks=masks, dtype=dtype,
                options=dict(sm_scale=None, logits_soft_cap=float(rng.uniform(5, 50)) if soft_cap else None,
                             window_left=int(rng.integers(0, 500)) if rng.random() < 0.2 else -1))


def check_ragged(case, out, lse):
    masks = case["masks"]
    ref_out, ref_lse = reference.prefill_ragged(
        case["q"], case["qo_indptr"], case["k"], case["v"], case["kv_indptr"], causal=masks.get("causal", False),
        packed_mask=masks.get("custom_mask"), mask_indptr=masks.get("mask_indptr"),
        sm_scale=case["options"]["sm_scale"], logits_soft_cap=case["options"]["logits_soft_cap"] or 0.0,
        window_left=case["options"]["window_left"])
    assert_matches(out, lse, ref_out, ref_lse, case["dtype"])


def test_one_shot_ragged_prefill_on_cpu_is_the_reference():
    case = make_ragged_case(np.random.default_rng(4), ("bf16", 64, 3, 1, True), device="cpu")
    out, lse = prefill_ragged(case["q"], case["qo_indptr"], case["k"], case["v"], case["kv_indptr"],
                              return_lse=True, **case["masks"], **case["options"])
    check_ragged(case, out, lse)


def test_ragged_plan_rejects_bad_kv_indptr():
    qo = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_indptr: expected offsets from 0 with at least one key"):
        RaggedPrefillWrapper("cpu").plan(qo, torch.tensor([0, 10, 10], dtype=torch.int32), 8, 2, 64)
    with pytest.raises(ValueError, match="kv_indptr"):
        RaggedPrefillWrapper("cpu").plan(qo, torch.tensor([0, 10], dtype=torch.int32), 8, 2, 64)


# ------------------------------------------------------------------------------ GPU

def hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(scope="module")
def warm_kernels():
    specs = {(s.source, s.name) for dtype, d, g, p, cap in spec_pool(48, 91) for page in (p, 1)  # 1: ragged KV
             for mask in (NO_MASK, CAUSAL, CUSTOM) for tokens in (300, 1500)
             for s in [prefill_spec(dtype, d, g, page, cap, tokens, mask, hopper())]}
    kernels.precompile(specs, kernels.device_arch())


def make_long_case(rng, spec, device="cuda"):
    """Requests of 17 to 2000 query tokens: more than 64 query rows, the Hopper kernel's work on sm_90."""
    batch = int(rng.choice([1, 2, 3]))
    return make_case(rng, spec, device, qo_lens=[int(rng.integers(17, 2000)) for _ in range(batch)],
                     prefixes=[int(rng.integers(0, 2000)) if rng.random() < 0.5 else 0 for _ in range(batch)])


@pytest.mark.gpu
def test_hopper_kernel_fuzz_100_long_cases(warm_kernels):
    pool = [s for s in spec_pool(48, 91) if s[1] in (64, 128)]
    fuzz(100, 4242, pool, make_long_case, run_case, check_against_reference,
          lambda c: f"qo={torch.diff(c['qo_indptr']).tolist()} kv={c['table'].kv_lens().tolist()} "
                    f"masks={list(c['masks'])} {c['layout']} {c['options']}")


@pytest.mark.gpu
def test_long_prefills_run_on_the_hopper_kernel():
    if not hopper():
        pytest.skip("the wgmma kernel is for sm_90 only")
    case = make_case(np.random.default_rng(5), ("bf16", 128, 4, 16, False), qo_lens=[300], prefixes=[0])
    kv_heads = as_paged_kv_cache(case["cache"], case["layout"]).kv_heads
    wrapper = PrefillWrapper("cuda", kv_layout=case["layout"])
    wrapper.plan(case["qo_indptr"], case["table"], 4 * kv_heads, kv_heads, 128, causal=True)
    assert wrapper._plan["kernel"].name.startswith("prefill_sm90_kernel<bf16, 128, 4, 16")


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["causal", "custom"])
def test_hopper_kernel_serves_every_item_at_each_launch(mask):
    """More work than CTAs: the CTAs take (item, KV head) pairs from one queue, which the last take resets,
    so a second launch of the same plan serves them all again."""
    if not hopper():
        pytest.skip("the wgmma kernel is for sm_90 only")
    case = make_case(np.random.default_rng(8), ("bf16", 128, 4, 16, False), qo_lens=[4096, 300, 4096],
                     prefixes=[0, 700, 100], mask=mask)
    wrapper = PrefillWrapper("cuda", kv_layout=case["layout"])
    first = run_case(case, wrapper)
    assert wrapper._plan["grid"][1] < int(wrapper._buffers["work"][0])  # CTAs per KV head < items
    out, lse = run_planned(wrapper, case)
    assert torch.equal(out, first[0]) and torch.equal(lse, first[1])
    check_against_reference(case, out, lse)


@pytest.mark.gpu
def test_fuzz_300_cases_match_reference(warm_kernels):
    fuzz(300, 777, spec_pool(48, 91), make_case, run_case, check_against_reference,
          lambda c: f"qo={torch.diff(c['qo_indptr']).tolist()} kv={c['table'].kv_lens().tolist()} "
                    f"masks={list(c['masks'])} {c['layout']} {c['options']}")


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["causal", "none"])
def test_long_prompt_with_prefix(mask):
    rng = np.random.default_rng(3)
    case = make_case(rng, ("bf16", 128, 4, 16, False), qo_lens=[4096, 1], prefixes=[3000, 9000], mask=mask)
    case["options"] = dict(sm_scale=None, logits_soft_cap=None, window_left=-1)
    check_against_reference(case, *run_case(case))


@pytest.mark.gpu
def test_cuda_graph_replay_after_a_new_plan():
    rng = np.random.default_rng(11)
    spec = ("bf16", 128, 4, 16, False)
    first = make_case(rng, spec, qo_lens=[100, 20, 60], prefixes=[500, 0, 40], mask="causal")
    first["options"] = dict(sm_scale=None, logits_soft_cap=None, window_left=-1)
    cache, layout = first["cache"], first["layout"]
    view = as_paged_kv_cache(cache, layout)
    wrapper = PrefillWrapper("cuda", kv_layout=layout, use_cuda_graph=True, max_batch_size=4, max_pages=4000,
                             max_qo_len=128)
    q_heads = first["q"].shape[1]
    wrapper.plan(first["qo_indptr"], first["table"], q_heads, view.kv_heads, 128, causal=True)
    eager = wrapper.run(first["q"], cache)
    out = torch.empty_like(first["q"])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, graph_lse = wrapper.run(first["q"], cache, out=out, return_lse=True)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)

    lens = [30, 200, 50]  # the same 180 query tokens split 30 + 120 + 30, other lengths and pages
    width = max(math.ceil(n / 16) for n in lens)
    ids = torch.randperm(view.num_pages)[: 3 * width].view(3, width).to(torch.int32).cuda()
    view.k.normal_()  # pages change owners: none keeps build_paged's NaN past a request's end
    view.v.normal_()
    table = block_page_table(ids, torch.tensor(lens, dtype=torch.int32).cuda(), 16)
    second = dict(first, table=table, qo_indptr=torch.tensor([0, 30, 150, 180], dtype=torch.int32, device="cuda"))
    first["q"].copy_(torch.randn_like(first["q"]))
    wrapper.plan(second["qo_indptr"], table, q_heads, view.kv_heads, 128, causal=True)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_against_reference(second, out, graph_lse)


def run_ragged_case(case):
    wrapper = RaggedPrefillWrapper("cuda")
    wrapper.plan(case["qo_indptr"], case["kv_indptr"], case["q"].shape[1], case["k"].shape[1], case["k"].shape[2],
                 q_dtype=case["dtype"], **case["masks"], **case["options"])
    out = torch.full(case["q"].shape, float("nan"), dtype=case["dtype"], device="cuda")
    _, lse = wrapper.run(case["q"], case["k"], case["v"], out=out, return_lse=True)
    return out, lse


@pytest.mark.gpu
def test_ragged_kv_fuzz_100_cases_match_reference(warm_kernels):
    fuzz(100, 21, spec_pool(48, 91), make_ragged_case, run_ragged_case, check_ragged,
          lambda c: f"qo={torch.diff(c['qo_indptr']).tolist()} kv={torch.diff(c['kv_indptr']).tolist()} "
                    f"masks={list(c['masks'])} {c['options']}")


@pytest.mark.gpu
def test_sanitizer_sweep_prefill():
    """A representative sweep, small enough to run under compute-sanitizer (memcheck and racecheck)."""
    rng = np.random.default_rng(13)
    for spec in [("bf16", 128, 4, 16, False), ("fp16", 64, 3, 1, True), ("bf16", 80, 16, 32, False)]:
        for mask in MASKS:
            case = make_case(rng, spec, qo_lens=[70, 3], prefixes=[100, 0], mask=mask)
            check_against_reference(case, *run_case(case))
    case = make_ragged_case(rng, ("bf16", 128, 4, 1, False))
    check_ragged(case, *run_ragged_case(case))
    if hopper():  # a grid of two CTAs per KV head, several items each: the queue, Q's reuse, the ring across items
        for mask in ("causal", "custom"):
            case = make_case(rng, ("bf16", 128, 4, 16, False), qo_lens=[300, 40], prefixes=[200, 0], mask=mask)
            check_against_reference(case, *run_on_two_ctas(case))


def run_on_two_ctas(case):
    """plan + run with the Hopper kernel's grid cut to two CTAs per KV head, which then serve every item."""
    wrapper = PrefillWrapper("cuda", kv_layout=case["layout"])
    run_case(case, wrapper)
    wrapper._plan["grid"] = (wrapper._plan["grid"][0], 2)
    return run_planned(wrapper, case)
