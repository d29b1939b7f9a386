"""Speculative verify: pagedinfer vs FlashInfer's prefill wrapper (backend fa2, and auto = fa3 on an H100),
causal drafts and a packed tree mask, in one process on the same random paged caches (bf16, page size 16,
pages randomly permuted, NHD). Eager timings (triton do_bench median). GB/s counts the K/V bytes read.
Writes verify.json (benchmarks/results format) and verify.png to $OUT.

    python benchmarks/bench_verify.py [--skip-anchor]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (anchor_parser, flashinfer_wanted, fmt, median_us, plot_speedups,  # noqa: E402
                    read_ceiling_gbps, write_results)

from bench_decode import PAGE, make_inputs  # noqa: E402
from pagedinfer import csr_page_table, pack_masks  # noqa: E402
from pagedinfer.verify import VerifyWrapper  # noqa: E402

CASES = [((32, 8, 128), [(64, 4, 2048), (64, 8, 4096), (256, 4, 1024), (16, 16, 8192), (1, 8, 32768)]),
         ((9, 3, 64), [(64, 4, 2048)])]


def draft_tree(n: int) -> torch.Tensor:
    """A fixed EAGLE-like tree: draft i hangs under draft (i - 1) // 2 (a binary tree), sees its ancestors."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for j in range(n):
        i = j
        while True:
            mask[j, i] = True
            if i == 0:
                break
            i = (i - 1) // 2
    return mask


def time_pagedinfer(hq, hk, d, batch, drafts, kv, ids, indptr, last, q, tree):
    table = csr_page_table(indptr, ids, last, PAGE)
    qo_indptr = torch.arange(0, batch + 1, dtype=torch.int32) * drafts
    wrapper = VerifyWrapper("cuda")
    masks = {}
    if tree:
        packed, mask_indptr = pack_masks([draft_tree(drafts)] * batch)
        masks = dict(tree_mask=packed.cuda(), tree_mask_indptr=mask_indptr)
    wrapper.plan(qo_indptr, table, hq, hk, d, kv_lens_host=table.kv_lens().cpu(), indptr_host=indptr.cpu(), **masks)
    out = torch.empty_like(q)
    wrapper.run(q, kv, out=out)
    return out.clone(), median_us(lambda: wrapper.run(q, kv, out=out))


def time_flashinfer(hq, hk, d, batch, drafts, kv_len, kv, ids, indptr, last, q, tree, backend, workspace):
    import flashinfer
    qo_indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * drafts
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
    extra = dict(causal=True)
    if tree:  # FlashInfer's custom mask spans the whole KV: the prefix visible, then the tree
        full = torch.ones(drafts, kv_len, dtype=torch.bool)
        full[:, kv_len - drafts:] = draft_tree(drafts)
        extra = dict(custom_mask=full.reshape(-1).repeat(batch).cuda())
    w.plan(qo_indptr, indptr, ids, last, hq, hk, d, PAGE, q_data_type=torch.bfloat16,
           kv_data_type=torch.bfloat16, **extra)
    out = torch.empty_like(q)
    w.run(q, kv, out=out)
    return out.clone(), median_us(lambda: w.run(q, kv, out=out))


def main():
    have_fi = flashinfer_wanted(anchor_parser().parse_args())
    ceiling = read_ceiling_gbps()
    workspace = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    records, rows = [], []
    for (hq, hk, d), sizes in CASES:
        for batch, drafts, kv_len in sizes:
            kv, ids, indptr, last, _ = make_inputs(hq, hk, d, batch, kv_len)
            q = torch.randn(batch * drafts, hq, d, device="cuda", dtype=torch.bfloat16)
            kv_bytes = batch * kv_len * hk * d * 2 * 2
            ours = {}
            for tree in (False, True):
                out, t = time_pagedinfer(hq, hk, d, batch, drafts, kv, ids, indptr, last, q, tree)
                ours[tree] = t
                mask = "tree" if tree else "causal"
                base = dict(op="verify", batch=batch, q_heads=hq, kv_heads=hk, head_dim=d, kv_len=kv_len,
                            qo_len=drafts, page_size=PAGE, mask=mask, dtype="bf16", pagedinfer_us=t,
                            gbps=kv_bytes / (t * 1e-6) / 1e9, kv_bytes=kv_bytes, read_ceiling_gbps=ceiling)
                anchors = {}
                for backend in (("fa2", "auto") if have_fi else ()):
                    fo, ft = time_flashinfer(hq, hk, d, batch, drafts, kv_len, kv, ids, indptr, last, q, tree,
                                             backend, workspace)
                    anchors[backend] = ft
                    records.append(dict(base, anchor=f"flashinfer-{backend}", anchor_us=ft, speedup=ft / t,
                                        anchor_gbps=kv_bytes / (ft * 1e-6) / 1e9,
                                        max_abs_diff_vs_anchor=(out.float() - fo.float()).abs().max().item(),
                                        label=f"{hq}/{hk}/{d} {batch}x{drafts}x{kv_len} {mask} vs {backend}"))
                if not anchors:
                    records.append(dict(base, label=f"{hq}/{hk}/{d} {batch}x{drafts}x{kv_len} {mask}"))
                rows.append((f"{hq}/{hk}/{d}", f"{batch}x{drafts}x{kv_len}", mask, anchors.get("fa2"),
                             anchors.get("auto"), t, base["gbps"]))
            del kv
            torch.cuda.empty_cache()
    path = write_results("verify" if have_fi else "verify-pagedinfer-only", records)
    plot_speedups("verify", [r for r in records if r.get("speedup")],
                  f"verify vs FlashInfer prefill wrapper, {torch.cuda.get_device_name()}")
    print(f"\nread ceiling {ceiling:.0f} GB/s; results {path}")
    print(f"{'shape':<10}{'BxDxL':>13}{'mask':>7}{'fa2 us':>9}{'auto us':>9}{'ours us':>9}{'x fa2':>7}{'x auto':>7}{'GB/s':>7}")
    for shape, size, mask, fa2, auto, t, gbps in rows:
        print(f"{shape:<10}{size:>13}{mask:>7}{fmt(fa2):>9}{fmt(auto):>9}{fmt(t):>9}"
              f"{fmt(fa2 / t if fa2 else None, 2):>7}{fmt(auto / t if auto else None, 2):>7}{fmt(gbps, 0):>7}")


if __name__ == "__main__":
    main()
