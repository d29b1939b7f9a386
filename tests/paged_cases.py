"""Random paged caches, page tables and queries shared by the kernel tests."""
import itertools
import math

import numpy as np
import torch

from pagedinfer.paged import block_page_table, csr_page_table

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = [64, 80, 96, 128, 256]
PAGE_SIZES = [1, 8, 16, 32, 64, 128, 256]


def spec_pool(size, seed):
    """Kernel specialisations a fuzz draws from, (dtype, head dim, group, page size, soft cap): every group,
    head dim, page size, dtype and soft-cap flag appears, while the number of distinct compilations stays
    bounded."""
    rng = np.random.default_rng(seed)
    return [("bf16" if i % 2 else "fp16", HEAD_DIMS[i % 5], 1 + i % 16, PAGE_SIZES[i % 7], bool(rng.random() < 0.3))
            for i in range(size)]


def build_paged(rng, lens, page_size, kv_heads, head_dim, dtype, device):
    """A cache holding `lens` tokens per request on randomly permuted pages (plus a few unused ones), in a
    random layout and storage form, and a CSR or block-table page table over it."""
    batch = len(lens)
    pages = [math.ceil(n / page_size) for n in lens]
    last_lens = [n - (p - 1) * page_size for n, p in zip(lens, pages)]  # tokens in each request's last page
    num_pages = sum(pages) + int(rng.integers(0, 5))
    layout = str(rng.choice(["NHD", "HND"]))
    shape = (num_pages, 2, page_size, kv_heads, head_dim) if layout == "NHD" else \
        (num_pages, 2, kv_heads, page_size, head_dim)
    cache = torch.randn(shape, dtype=dtype, device=device)
    perm = torch.randperm(num_pages, device=device).to(torch.int32)
    # What no request owns holds anything: NaN in the unused pages and past each request's end in its last
    # page (a kernel must not let them reach an output, e.g. as 0 x NaN).
    cache[perm[sum(pages):].long()] = float("nan")
    ends = list(itertools.accumulate(pages))
    for used, end in zip(last_lens, ends):
        tail = cache[int(perm[end - 1])]
        (tail[:, used:] if layout == "NHD" else tail[:, :, used:]).fill_(float("nan"))
    if rng.random() < 0.3:
        cache = (cache[:, 0], cache[:, 1])  # a (k, v) pair of strided views
    if rng.random() < 0.5:
        indptr = torch.tensor([0] + ends, dtype=torch.int32, device=device)
        last = torch.tensor(last_lens, dtype=torch.int32, device=device)
        table = csr_page_table(indptr, perm[: sum(pages)], last, page_size)
    else:
        width = max(pages) + int(rng.integers(0, 3))
        bt = torch.zeros(batch, width, dtype=torch.int32, device=device)
        at = 0
        for b, p in enumerate(pages):
            bt[b, :p] = perm[at:at + p]
            at += p
        table = block_page_table(bt, torch.tensor(lens, dtype=torch.int32, device=device), page_size)
    return cache, table, layout


def random_queries(rng, tokens, q_heads, kv_heads, head_dim, dtype, device):
    """[tokens, q_heads, head_dim]; sometimes a view into a fused qkv projection (strided rows)."""
    if rng.random() < 0.3:
        fused = torch.randn(tokens, q_heads + 2 * kv_heads, head_dim, dtype=dtype, device=device)
        return fused[:, :q_heads]
    return torch.randn(tokens, q_heads, head_dim, dtype=dtype, device=device)


TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    """Every output written (the caller poisons it with NaN first), relative error within the dtype's
    tolerance, LSE within 1e-3."""
    assert not torch.isnan(out).any(), "unwritten (poisoned) output"
    err = (out.float() - ref_out.float()).norm() / ref_out.float().norm().clamp(min=1e-6)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0)


def fuzz(count, seed, pool, make_case, run_case, check, describe):
    """Runs `count` cases drawn from a pool of kernel specialisations and fails with a line per failing case
    (every case runs, so a report shows the pattern, not just the first miss)."""
    rng = np.random.default_rng(seed)
    failures = []
    for i in range(count):
        spec = pool[int(rng.integers(len(pool)))]
        case = make_case(rng, spec)
        try:
            check(case, *run_case(case))
        except AssertionError as e:
            failures.append(f"case {i} {spec} {describe(case)}: {str(e).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {count} cases failed:\n" + "\n".join(failures[:20])


def run_ragged(wrapper_cls, case, wrapper=None):
    """plan + run of a verify or prefill case (ragged queries) into a NaN-poisoned output; (out, lse)."""
    from pagedinfer.paged import as_paged_kv_cache
    wrapper = wrapper or wrapper_cls(case["q"].device, kv_layout=case["layout"])
    cache = as_paged_kv_cache(case["cache"], case["layout"])
    wrapper.plan(case["qo_indptr"], case["table"], case["q"].shape[1], cache.kv_heads, cache.head_dim,
                 q_dtype=case["dtype"], **case["masks"], **case["options"])
    return run_planned(wrapper, case)


def run_planned(wrapper, case):
    """run of a planned wrapper on the case into a NaN-poisoned output; (out, lse)."""
    out = torch.full(case["q"].shape, float("nan"), dtype=case["dtype"], device=case["q"].device)
    _, lse = wrapper.run(case["q"], case["cache"], out=out, return_lse=True)
    return out, lse


def cpu_block_table(lens, page_size=16, width=8):
    """A CPU block table (all pages 0) for validation tests that never reach a kernel."""
    return block_page_table(torch.zeros(len(lens), width, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                            page_size)


def tree_mask(parents):
    """[n, n] bool tree mask: draft j attends draft i when i is j or an ancestor of j (parents[j] < j, or -1)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for j in range(n):
        i = j
        while i >= 0:
            mask[j, i] = True
            i = parents[i]
    return mask
