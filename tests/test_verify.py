"""Speculative verification against the PyTorch reference: validation on the CPU; on the GPU a fuzz over
draft counts 1-16, causal and tree masks (random trees and arbitrary bit patterns), the decode coverage
(dtypes, head dims, groups, page sizes, layouts, page tables, soft cap, window), and CUDA-graph replay."""
import math

import numpy as np
import pytest
import torch
from paged_cases import (DTYPES, assert_matches, build_paged, cpu_block_table, fuzz, random_queries, run_ragged,
                         spec_pool, tree_mask)

from pagedinfer import kernels, reference
from pagedinfer.decode import CAUSAL, TREE, decode_spec, row_tiles
from pagedinfer.masks import pack_masks
from pagedinfer.paged import as_paged_kv_cache, block_page_table
from pagedinfer.verify import VerifyWrapper, verify


def random_tree(rng, n):
    """EAGLE-style token tree: each draft hangs under an earlier one."""
    return tree_mask([-1] + [int(rng.integers(0, i)) for i in range(1, n)])


def make_case(rng, spec, device="cuda", qo_lens=None, tree=None):
    dtype_name, head_dim, group, page_size, soft_cap = spec
    dtype = DTYPES[dtype_name]
    kv_heads = int(rng.choice([1, 2, 3]))
    batch = len(qo_lens) if qo_lens else int(rng.choice([1, 2, 3, 6, 11]))
    qo_lens = qo_lens or [int(rng.integers(1, 17)) for _ in range(batch)]
    lens = [n + (int(rng.integers(0, 3000)) if rng.random() < 0.8 else int(rng.integers(0, 3))) for n in qo_lens]
    cache, table, layout = build_paged(rng, lens, page_size, kv_heads, head_dim, dtype, device)
    qo_indptr = torch.tensor(np.concatenate([[0], np.cumsum(qo_lens)]), dtype=torch.int32, device=device)
    tree = bool(rng.random() < 0.6) if tree is None else tree
    masks = {}
    if tree:
        trees = [random_tree(rng, n) if rng.random() < 0.8 else torch.from_numpy(rng.random((n, n)) < 0.5)
                 for n in qo_lens]
        packed, mask_indptr = pack_masks(trees)
        masks = dict(tree_mask=packed.to(device), tree_mask_indptr=mask_indptr.to(device))
    options = dict(sm_scale=float(rng.uniform(0.5, 1.5)) / math.sqrt(head_dim) if rng.random() < 0.5 else None,
                   logits_soft_cap=float(rng.uniform(5, 50)) if soft_cap else None,
                   window_left=int(rng.integers(0, 2000)) if rng.random() < 0.2 else -1)
    q = random_queries(rng, sum(qo_lens), kv_heads * group, kv_heads, head_dim, dtype, device)
    return dict(q=q, qo_indptr=qo_indptr, cache=cache, table=table, layout=layout, masks=masks, options=options,
                dtype=dtype)


def check_against_reference(case, out, lse):
    ref_out, ref_lse = reference.verify(case["q"], case["qo_indptr"], case["cache"], case["table"],
                                        kv_layout=case["layout"], sm_scale=case["options"]["sm_scale"],
                                        logits_soft_cap=case["options"]["logits_soft_cap"] or 0.0,
                                        window_left=case["options"]["window_left"], **case["masks"])
    assert_matches(out, lse, ref_out, ref_lse, case["dtype"])


def run_case(case, wrapper=None):
    return run_ragged(VerifyWrapper, case, wrapper)


# ------------------------------------------------------------------------------ CPU: validation


@pytest.mark.parametrize("qo_indptr,message", [
    ([1, 3, 5], "qo_indptr: expected offsets from 0 with 1 to 16 tokens per request"),
    ([0, 3, 3], "qo_indptr: expected offsets from 0 with 1 to 16 tokens per request"),
    ([0, 17, 18], "qo_indptr: expected offsets from 0 with 1 to 16 tokens per request"),
    ([0, 3], "qo_indptr: expected shape \\[3\\]"),
])
def test_plan_rejects_bad_qo_indptr(qo_indptr, message):
    with pytest.raises(ValueError, match=message):
        VerifyWrapper("cpu").plan(torch.tensor(qo_indptr, dtype=torch.int32), cpu_block_table([40, 50]), 8, 2, 64)


def test_plan_rejects_more_drafts_than_keys():
    with pytest.raises(ValueError, match="qo_indptr: expected at most kv_len query tokens per request"):
        VerifyWrapper("cpu").plan(torch.tensor([0, 4, 8], dtype=torch.int32), cpu_block_table([40, 3]), 8, 2, 64)


def test_plan_rejects_half_a_tree_and_short_segments():
    qo = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="tree_mask, tree_mask_indptr: expected both or neither"):
        VerifyWrapper("cpu").plan(qo, cpu_block_table([40, 50]), 8, 2, 64, tree_mask=torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="tree_mask_indptr: expected byte offsets giving each request its packed"):
        VerifyWrapper("cpu").plan(qo, cpu_block_table([40, 50]), 8, 2, 64, tree_mask=torch.zeros(4, dtype=torch.uint8),
                                  tree_mask_indptr=torch.tensor([0, 1, 2], dtype=torch.int32))


def test_max_qo_len_is_bounded():
    with pytest.raises(ValueError, match="max_qo_len: expected 1 to 16 tokens per request, got 17"):
        VerifyWrapper("cpu", max_qo_len=17)


def test_row_tiles():
    assert [row_tiles(n) for n in (4, 16, 17, 32, 48, 64, 256)] == [1, 1, 2, 2, 4, 4, 4]


def test_pipeline_depth_and_ctas_per_sm():
    """Verification that fills four row tiles at head dim 128 (9-16 drafts at group 4): four stages, which leave
    one CTA per SM, with either mask. Three otherwise, and for the longer prefills that share the
    kernel. At most two CTAs per SM for one row tile at head dim 64 (4 drafts at group 3); no cap for the others."""
    def stages(drafts, head_dim=128, group=4, mask=CAUSAL):
        spec = decode_spec("bf16", head_dim, group, 16, False, drafts, mask)
        return int(spec.name.split(", ")[5]), spec.smem, spec.ctas_per_sm
    assert [stages(n)[0] for n in (4, 8, 9, 16, 17, 1024)] == [3, 3, 4, 4, 3, 3]
    assert [stages(n, mask=TREE)[0] for n in (4, 9, 16, 17)] == [3, 4, 4, 3]
    assert stages(16) == (4, 4 * 32768, 0) and stages(8) == (3, 3 * 32768, 0)
    assert stages(16, head_dim=64)[0] == 4 and stages(16, head_dim=256)[0] == 2
    assert [stages(n, head_dim=64, group=3)[2] for n in (2, 4, 5, 6, 16)] == [0, 2, 2, 0, 0]


def test_query_and_mask_offsets_on_the_host():
    w = VerifyWrapper("cpu")
    starts, lens = w._query_offsets(torch.tensor([0, 3, 7], dtype=torch.int32), 2)
    assert starts.tolist() == [0, 3] and lens.tolist() == [3, 4]
    offsets = w._mask_offsets("tree_mask", torch.zeros(5, dtype=torch.uint8), "tree_mask_indptr",
                              torch.tensor([0, 2, 4], dtype=torch.int32), np.array([2, 2]))
    assert offsets.tolist() == [0, 2]


def test_one_shot_verify_on_cpu_is_the_reference():
    rng = np.random.default_rng(0)
    case = make_case(rng, ("bf16", 64, 4, 16, False), device="cpu")
    out, lse = verify(case["q"], case["qo_indptr"], case["cache"], case["table"], kv_layout=case["layout"],
                      return_lse=True, **case["masks"], **case["options"])
    check_against_reference(case, out, lse)


# ------------------------------------------------------------------------------ GPU

@pytest.fixture(scope="module")
def warm_kernels():
    specs = []
    for dtype, d, g, p, cap in spec_pool(64, 77):
        for n in (4, 16):  # the row tiling of short and long draft runs
            for mask in (CAUSAL, TREE):
                specs.append(("decode.cu", decode_spec(dtype, d, g, p, cap, n, mask).name))
    kernels.precompile(specs, kernels.device_arch())


@pytest.mark.gpu
def test_fuzz_300_cases_match_reference(warm_kernels):
    fuzz(300, 4242, spec_pool(64, 77), make_case, run_case, check_against_reference,
          lambda c: f"qo={torch.diff(c['qo_indptr']).tolist()} kv={c['table'].kv_lens().tolist()[:6]} "
                    f"tree={bool(c['masks'])} {c['layout']} {c['options']}")


@pytest.mark.gpu
def test_long_context_split_with_tree():
    rng = np.random.default_rng(5)
    case = make_case(rng, ("bf16", 128, 4, 16, False), qo_lens=[8], tree=True)
    lens = [60000]
    case.update(zip(("cache", "table", "layout"), build_paged(rng, lens, 16, 2, 128, torch.bfloat16, "cuda")))
    case["q"] = random_queries(rng, 8, 8, 2, 128, torch.bfloat16, "cuda")
    case["options"] = dict(sm_scale=None, logits_soft_cap=None, window_left=-1)
    check_against_reference(case, *run_case(case))


@pytest.mark.gpu
@pytest.mark.parametrize("apart", ["1", "0"])
@pytest.mark.parametrize("qo_lens,tree", [([8], False), ([16, 3], True), ([8, 8, 1, 5], False)])
def test_split_units_of_many_rows_merge_in_a_second_launch(monkeypatch, apart, qo_lens, tree):
    """Split work units of 32 or more query rows leave their chunks' partials to merge_split, each chunk's CTA
    merging a share of the rows (PAGEDINFER_MERGE_APART=0: the last chunk's CTA merges them all)."""
    monkeypatch.setenv("PAGEDINFER_MERGE_APART", apart)
    rng = np.random.default_rng(len(qo_lens))
    case = make_case(rng, ("bf16", 128, 4, 16, False), qo_lens=qo_lens, tree=tree)
    lens = [n + int(rng.integers(5000, 30000)) for n in qo_lens]
    case.update(zip(("cache", "table", "layout"), build_paged(rng, lens, 16, 2, 128, torch.bfloat16, "cuda")))
    case["q"] = random_queries(rng, sum(qo_lens), 8, 2, 128, torch.bfloat16, "cuda")
    case["options"] = dict(sm_scale=None, logits_soft_cap=None, window_left=-1)
    wrapper = VerifyWrapper("cuda", kv_layout=case["layout"])
    check_against_reference(case, *run_case(case, wrapper))
    assert (wrapper._plan["merger"] is not None) == (apart == "1")


@pytest.mark.gpu
def test_cuda_graph_replay_after_a_new_plan():
    rng = np.random.default_rng(9)
    spec = ("bf16", 128, 4, 16, False)
    first = make_case(rng, spec, qo_lens=[4, 8, 2], tree=True)
    cache, layout = first["cache"], first["layout"]
    wrapper = VerifyWrapper("cuda", kv_layout=layout, use_cuda_graph=True, max_batch_size=4, max_pages=4000,
                            max_qo_len=8)
    first["options"] = dict(sm_scale=None, logits_soft_cap=None, window_left=-1)
    cache_view = as_paged_kv_cache(cache, layout)
    wrapper.plan(first["qo_indptr"], first["table"], first["q"].shape[1], cache_view.kv_heads, 128,
                 **first["masks"])
    eager, eager_lse = wrapper.run(first["q"], cache, return_lse=True)
    out = torch.empty_like(first["q"])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, graph_lse = wrapper.run(first["q"], cache, out=out, return_lse=True)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(graph_lse, eager_lse)

    # Same token count, other draft split, other trees and lengths over the same cache: replay follows.
    qo_lens = [7, 3, 4]
    lens = [n + int(rng.integers(0, 200)) for n in qo_lens]
    pages = cache_view.num_pages
    width = max(math.ceil(n / 16) for n in lens)
    ids = torch.randperm(pages)[: 3 * width].view(3, width).to(torch.int32).cuda()
    cache_view.k.normal_()  # pages change owners: none keeps build_paged's NaN past a request's end
    cache_view.v.normal_()
    table = block_page_table(ids, torch.tensor(lens, dtype=torch.int32).cuda(), 16)
    trees = [random_tree(rng, n) for n in qo_lens]
    packed, mask_indptr = pack_masks(trees)
    second = dict(first, table=table, masks=dict(tree_mask=packed.cuda(), tree_mask_indptr=mask_indptr.cuda()),
                  qo_indptr=torch.tensor([0, 7, 10, 14], dtype=torch.int32, device="cuda"))
    first["q"].copy_(torch.randn_like(first["q"]))
    wrapper.plan(second["qo_indptr"], table, first["q"].shape[1], cache_view.kv_heads, 128, **second["masks"])
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_against_reference(second, out, graph_lse)


@pytest.mark.gpu
def test_sanitizer_sweep_verify():
    """A representative sweep, small enough to run under compute-sanitizer (memcheck and racecheck)."""
    rng = np.random.default_rng(31)
    for spec, qo_lens in [(("bf16", 128, 4, 16, False), [4, 16, 1]), (("fp16", 64, 3, 1, True), [8, 2]),
                          (("bf16", 80, 16, 32, False), [5, 16])]:
        for tree in (False, True):
            case = make_case(rng, spec, qo_lens=qo_lens, tree=tree)
            check_against_reference(case, *run_case(case))
