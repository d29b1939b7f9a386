"""Paged decode against the PyTorch reference: validation on the CPU; on the GPU a fuzz over the whole
coverage (dtypes, head dims, GQA groups 1-16, page sizes, layouts, page-table forms, lengths, soft cap,
sliding window), CUDA-graph replay after a new plan, and a small sweep for compute-sanitizer."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from paged_cases import DTYPES, assert_matches, build_paged, fuzz, random_queries, run_planned, spec_pool

from pagedinfer import kernels, reference
from pagedinfer.decode import NO_MASK, SPECIALIZATIONS, DecodeWrapper, decode, decode_spec, kernel_name
from pagedinfer.paged import as_paged_kv_cache, block_page_table, csr_page_table


# ------------------------------------------------------------------------------ building cases

def random_lengths(rng, batch, page_size):
    choices = []
    for _ in range(batch):
        kind = rng.integers(6)
        if kind == 0:
            choices.append(1)
        elif kind == 1:
            choices.append(page_size * int(rng.integers(1, 40)))           # exactly on a page boundary
        elif kind == 2:
            choices.append(max(1, page_size * int(rng.integers(1, 40)) + int(rng.choice([-1, 1]))))
        elif kind == 3:
            choices.append(int(rng.integers(2000, 9000)))
        else:
            choices.append(int(rng.integers(1, 700)))
    return choices


def make_case(rng, spec, device="cuda", lens=None, kv_heads=None, batch=None):
    dtype_name, head_dim, group, page_size, soft_cap = spec
    dtype = DTYPES[dtype_name]
    kv_heads = kv_heads or int(rng.choice([1, 2, 3, 4]))
    batch = batch or int(rng.choice([1, 2, 3, 5, 8, 17, 33]))
    lens = lens or random_lengths(rng, batch, page_size)
    cache, table, layout = build_paged(rng, lens, page_size, kv_heads, head_dim, dtype, device)
    q_heads = kv_heads * group
    options = dict(sm_scale=float(rng.uniform(0.5, 1.5)) / math.sqrt(head_dim) if rng.random() < 0.5 else None,
                   logits_soft_cap=float(rng.uniform(5, 50)) if soft_cap else None,
                   window_left=int(rng.integers(0, 3000)) if rng.random() < 0.25 else -1)
    return dict(q=random_queries(rng, batch, q_heads, kv_heads, head_dim, dtype, device), cache=cache,
                table=table, layout=layout, options=options, dtype=dtype)


def check_against_reference(case, out, lse):
    ref_out, ref_lse = reference.decode(case["q"], case["cache"], case["table"], kv_layout=case["layout"],
                                        sm_scale=case["options"]["sm_scale"],
                                        logits_soft_cap=case["options"]["logits_soft_cap"] or 0.0,
                                        window_left=case["options"]["window_left"])
    assert_matches(out, lse, ref_out, ref_lse, case["dtype"])


def run_case(case, wrapper=None):
    wrapper = wrapper or DecodeWrapper(case["q"].device, kv_layout=case["layout"])
    cache = as_paged_kv_cache(case["cache"], case["layout"])
    wrapper.plan(case["table"], case["q"].shape[1], cache.kv_heads, cache.head_dim, q_dtype=case["dtype"],
                 **case["options"])
    return run_planned(wrapper, case)


# ------------------------------------------------------------------------------ CPU: validation

@pytest.mark.parametrize("kwargs,message", [
    (dict(head_dim=72), "head_dim: expected one of 64, 80, 96, 128, 256, got 72"),
    (dict(num_qo_heads=34), "num_qo_heads: expected a multiple of num_kv_heads=8, got 34"),
    (dict(num_qo_heads=136), "GQA group size from 1 to 16, got 17"),
    (dict(q_dtype=torch.float32), "q_dtype: expected torch.float16 or torch.bfloat16"),
    (dict(kv_dtype=torch.float16), "kv_dtype: expected the query dtype torch.bfloat16"),
    (dict(window_left=-2), "window_left: expected -1 \\(off\\) or a number of keys >= 0, got -2"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap: expected 0 \\(off\\) or a positive number"),
    (dict(sm_scale=0.0), "sm_scale: expected a positive number"),
])
def test_plan_rejects(kwargs, message):
    table = block_page_table(torch.zeros(2, 4, dtype=torch.int32), torch.tensor([5, 9], dtype=torch.int32), 16)
    args = dict(num_qo_heads=32, num_kv_heads=8, head_dim=128)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DecodeWrapper("cpu").plan(table, args.pop("num_qo_heads"), args.pop("num_kv_heads"),
                                  args.pop("head_dim"), **args)


def test_plan_rejects_empty_request():
    table = block_page_table(torch.zeros(2, 4, dtype=torch.int32), torch.tensor([5, 0], dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="kv lengths: expected every request holding at least one token"):
        DecodeWrapper("cpu").plan(table, 8, 8, 64)


def test_table_rejects_unsupported_page_size_and_bad_ids():
    with pytest.raises(ValueError, match="page_size: expected one of 1, 2, 4, 8, 16, 32, 64, 128, 256, got 12"):
        block_page_table(torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3], dtype=torch.int32), 12)
    with pytest.raises(ValueError, match=r"block_table: expected page ids in \[0, 9\], got ids from 0 to 10"):
        block_page_table(torch.tensor([[0, 10]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32), 16,
                         num_pages=10)


def test_graph_mode_needs_capacities():
    with pytest.raises(ValueError, match="max_batch_size, max_pages: expected positive capacities"):
        DecodeWrapper("cpu", use_cuda_graph=True)


def test_one_cta_per_sm_at_head_dim_128():
    """Decode's kernels at head dim 128 (up to 8 query rows) ask plan() to pad their shared memory to one CTA per
    multiprocessor; other head dims, and more rows, take as many as fit."""
    def cap(head_dim, group):
        return decode_spec("bf16", head_dim, group, 16, False, 1, NO_MASK).ctas_per_sm
    assert [cap(128, g) for g in (1, 4, 8, 16)] == [1, 1, 1, 0]
    assert [cap(d, 4) for d in (64, 80, 96, 256)] == [0, 0, 0, 0]


@pytest.mark.gpu
def test_plan_pads_shared_memory_to_one_cta_per_sm():
    case = make_case(np.random.default_rng(5), ("bf16", 128, 4, 16, False), lens=[300, 5000], batch=2)
    wrapper = DecodeWrapper(kv_layout=case["layout"])
    check_against_reference(case, *run_case(case, wrapper))
    p = wrapper._plan
    assert p["smem"] > 3 * 32768 and p["kernel"].max_active_blocks(p["threads"][0], p["smem"]) == 1


def test_run_before_plan():
    with pytest.raises(ValueError, match="run: expected a plan\\(\\) first"):
        DecodeWrapper("cpu").run(torch.zeros(1, 8, 64), torch.zeros(1, 2, 16, 8, 64))


def test_one_shot_decode_on_cpu_is_the_reference():
    rng = np.random.default_rng(0)
    case = make_case(rng, ("bf16", 64, 4, 16, False), device="cpu")
    out, lse = decode(case["q"], case["cache"], case["table"], kv_layout=case["layout"], return_lse=True,
                      **case["options"])
    check_against_reference(case, out, lse)


# ------------------------------------------------------------------------------ GPU

@pytest.fixture(scope="module")
def warm_kernels():
    """Compiles the fuzz's specialisations on every core before the sweep."""
    specs = [("decode.cu", kernel_name(*s)) for s in spec_pool(96, 1234)] + SPECIALIZATIONS
    kernels.precompile(specs, kernels.device_arch())


@pytest.mark.gpu
def test_fuzz_500_cases_match_reference(warm_kernels):
    fuzz(500, 2026, spec_pool(96, 1234), make_case, run_case, check_against_reference,
          lambda c: f"lens={c['table'].kv_lens().tolist()[:6]} layout={c['layout']} {c['options']}")


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[131072], [1, 131072, 7], [16] * 300])
def test_extreme_lengths(lens):
    rng = np.random.default_rng(len(lens))
    case = make_case(rng, ("bf16", 128, 4, 16, False), lens=lens, kv_heads=2, batch=len(lens))
    case["options"]["window_left"] = -1
    check_against_reference(case, *run_case(case))


def random_block_table(lens, page_size, num_pages, width):
    ids = torch.randperm(num_pages)[: len(lens) * width].view(len(lens), width).to(torch.int32)
    return block_page_table(ids.cuda(), torch.tensor(lens, dtype=torch.int32).cuda(), page_size)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_cuda_graph_replay_after_a_new_plan(layout):
    torch.manual_seed(7)
    shape = (2000, 2, 16, 2, 128) if layout == "NHD" else (2000, 2, 2, 16, 128)
    cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(3, 8, 128, dtype=torch.bfloat16, device="cuda")
    workspace = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")  # caller-owned fixed buffers
    wrapper = DecodeWrapper("cuda", kv_layout=layout, use_cuda_graph=True, max_batch_size=4, max_pages=2000,
                            workspace=workspace)
    out = torch.empty_like(q)

    first = random_block_table([3000, 17, 160], 16, 2000, 200)
    wrapper.plan(first, 8, 2, 128)
    eager, eager_lse = wrapper.run(q, cache, return_lse=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, graph_lse = wrapper.run(q, cache, out=out, return_lse=True)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(graph_lse, eager_lse)

    # New lengths (a long request now splits differently), new page ids, new queries: replay follows.
    second = random_block_table([5, 9000, 33], 16, 2000, 600)
    q.copy_(torch.randn_like(q))
    wrapper.plan(second, 8, 2, 128)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    case = dict(q=q, cache=cache, table=second, layout=layout, dtype=torch.bfloat16,
                options=dict(sm_scale=None, logits_soft_cap=None, window_left=-1))
    check_against_reference(case, out, graph_lse)


@pytest.mark.gpu
def test_bf16_output_is_the_fp32_result_rounded_once():
    """P enters P.V together with its bf16 rounding remainder. Rounding P itself (what other backends do)
    moves ~40% of the bf16 outputs by an ulp on these inputs; the kernel's output is the fp32 reference
    rounded once, but for a few values that sit on a rounding boundary."""
    rng = np.random.default_rng(5)
    case = make_case(rng, ("bf16", 128, 4, 16, False), lens=[300, 2000, 5000, 64], kv_heads=2, batch=4)
    case["options"].update(sm_scale=None, window_left=-1)
    out, _ = run_case(case)
    exact, _ = reference.decode(case["q"], case["cache"], case["table"], kv_layout=case["layout"])
    cache = as_paged_kv_cache(case["cache"], case["layout"])
    rounded_p = torch.empty_like(exact)
    for b in range(4):
        k, v = (x.float() for x in reference.gather_kv(cache, case["table"], b))
        q = case["q"][b].float().view(2, 4, 128)                                  # [kv head, member, dim]
        s = torch.einsum("hgd,mhd->hgm", q, k) / math.sqrt(128)
        p = torch.exp(s - s.amax(-1, keepdim=True))
        o = torch.einsum("hgm,mhd->hgd", p.bfloat16().float(), v) / p.sum(-1, keepdim=True)
        rounded_p[b] = o.reshape(8, 128).bfloat16()
    off_by_rounded_p = (rounded_p != exact).float().mean().item()
    off_by_kernel = (out != exact).float().mean().item()
    assert off_by_rounded_p > 0.2 and off_by_kernel < 0.02, (off_by_kernel, off_by_rounded_p)


@pytest.mark.gpu
def test_page_ids_outside_the_cache_read_as_zeros():
    """Device page tables are not checked on the host: an id outside the cache must not fault. The kernel
    reads such a page as zeros, the same as a real all-zero page."""
    page, heads, dim = 16, 2, 128
    cache = torch.randn(6, 2, page, heads, dim, device="cuda", dtype=torch.bfloat16)
    with_zero_page = torch.cat([cache, torch.zeros_like(cache[:1])])
    q = torch.randn(2, 8, dim, device="cuda", dtype=torch.bfloat16)
    indptr = torch.tensor([0, 3, 6], dtype=torch.int32, device="cuda")
    last = torch.tensor([16, 5], dtype=torch.int32, device="cuda")
    outs = []
    for kv, bad in ((cache, [2, 1000, 0, 5, -7, 4]), (with_zero_page, [2, 6, 0, 5, 6, 4])):
        table = csr_page_table(indptr, torch.tensor(bad, dtype=torch.int32, device="cuda"), last, page)
        wrapper = DecodeWrapper("cuda")
        wrapper.plan(table, 8, heads, dim)
        outs.append(wrapper.run(q, kv))
    torch.cuda.synchronize()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
def test_sanitizer_sweep():
    """A representative sweep, small enough to run under compute-sanitizer (memcheck and racecheck)."""
    rng = np.random.default_rng(99)
    for spec in [("bf16", 128, 4, 16, False), ("fp16", 64, 3, 1, True), ("bf16", 80, 7, 256, False),
                 ("bf16", 256, 16, 8, False), ("fp16", 96, 1, 32, True)]:
        case = make_case(rng, spec, lens=[1, 700, 33, 4100], batch=4)
        check_against_reference(case, *run_case(case))


@pytest.mark.gpu
def test_first_compile_under_2s_and_cached_load_under_0_2s(tmp_path):
    """Timed inside fresh processes after imports and CUDA start-up: NVRTC compile + load, then disk load."""
    name = kernel_name("bf16", 128, 4, 16, False)
    code = ("import sys, time, torch, cupy; torch.zeros(1, device='cuda'); from pagedinfer import kernels;"
            f"t = time.perf_counter(); kernels.get_kernel('decode.cu', {name!r}); print(time.perf_counter() - t)")
    env = dict(os.environ, PAGEDINFER_CACHE_DIR=str(tmp_path), PAGEDINFER_LOG_LEVEL="WARNING")
    first, second = (float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                          check=True).stdout) for _ in range(2))
    print(f"first compile {first:.3f} s, cached load {second:.3f} s")
    assert first < 2.0 and second < 0.2
