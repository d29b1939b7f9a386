"""Prefill / extend: pagedinfer vs FlashInfer's BatchPrefillWithPagedKVCacheWrapper (backends auto and fa2,
best of the two) and torch SDPA on contiguous K/V, causal, bf16, page size 16, same random paged caches.
TFLOP/s counts only unmasked work. Writes prefill.json (benchmarks/results format) and prefill.png to $OUT.

    python benchmarks/bench_prefill.py [--skip-anchor]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import PAGE, make_inputs  # noqa: E402
from common import anchor_parser, flashinfer_wanted, fmt, median_us, plot_speedups, write_results  # noqa: E402

from pagedinfer import csr_page_table  # noqa: E402
from pagedinfer.prefill import PrefillWrapper  # noqa: E402

# (q heads, kv heads, head dim), [(batch, new tokens, cached prefix)]
CASES = [((32, 8, 128), [(1, 4096, 0), (4, 2048, 0), (1, 16384, 0), (16, 1024, 0), (8, 512, 4096)]),
         ((9, 3, 64), [(8, 2048, 0)])]


def causal_flops(batch, hq, d, qo, prefix):
    keys = sum(prefix + i + 1 for i in range(qo))
    return 4 * batch * hq * d * keys


def main():
    have_fi = flashinfer_wanted(anchor_parser().parse_args())
    if have_fi:
        import flashinfer
    workspace = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    records, rows = [], []
    for (hq, hk, d), sizes in CASES:
        for batch, qo, prefix in sizes:
            kv_len = prefix + qo
            kv, ids, indptr, last, _ = make_inputs(hq, hk, d, batch, kv_len)
            q = torch.randn(batch * qo, hq, d, device="cuda", dtype=torch.bfloat16)
            qo_indptr = torch.arange(0, batch + 1, dtype=torch.int32) * qo
            table = csr_page_table(indptr, ids, last, PAGE)
            wrapper = PrefillWrapper("cuda")
            wrapper.plan(qo_indptr, table, hq, hk, d, causal=True, kv_lens_host=table.kv_lens().cpu(),
                         indptr_host=indptr.cpu())
            out = torch.empty_like(q)
            t = median_us(lambda: wrapper.run(q, kv, out=out))
            flops = causal_flops(batch, hq, d, qo, prefix)
            # torch SDPA on contiguous K/V (the cache gathered once, outside the timing)
            pages = ids.view(batch, -1).long()
            k = kv[pages, 0].reshape(batch, -1, hk, d)[:, :kv_len].transpose(1, 2).contiguous()
            v = kv[pages, 1].reshape(batch, -1, hk, d)[:, :kv_len].transpose(1, 2).contiguous()
            qs = q.view(batch, qo, hq, d).transpose(1, 2)
            mask = None
            if prefix:  # bottom-right aligned causal mask
                mask = torch.ones(qo, kv_len, dtype=torch.bool, device="cuda").tril(prefix)
            sdpa = lambda: F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, is_causal=mask is None,  # noqa: E731
                                                         enable_gqa=True)
            ts = median_us(sdpa)
            ref = sdpa().transpose(1, 2).reshape(-1, hq, d)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            op = "extend" if prefix else "prefill"
            base = dict(op=op, batch=batch, q_heads=hq, kv_heads=hk, head_dim=d, kv_len=kv_len, qo_len=qo,
                        page_size=PAGE, mask="causal", dtype="bf16", pagedinfer_us=t, tflops=flops / (t * 1e-6) / 1e12,
                        rel_err_vs_sdpa=err)
            records.append(dict(base, anchor="torch-sdpa-contiguous", anchor_us=ts, speedup=ts / t,
                                label=f"{hq}/{hk}/{d} {batch}x{qo}+{prefix} vs sdpa"))
            fi_t = None
            if have_fi:
                for backend in ("auto", "fa2"):
                    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
                    w.plan(qo_indptr.cuda(), indptr, ids, last, hq, hk, d, PAGE, causal=True,
                           q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
                    fo = torch.empty_like(q)
                    ft = median_us(lambda: w.run(q, kv, out=fo))
                    fi_t = ft if fi_t is None else min(fi_t, ft)
                    records.append(dict(base, anchor=f"flashinfer-{backend}", anchor_us=ft, speedup=ft / t,
                                        label=f"{hq}/{hk}/{d} {batch}x{qo}+{prefix} vs fi-{backend}"))
            rows.append((f"{hq}/{hk}/{d}", f"{batch}x{qo}+{prefix}", fi_t, ts, t, flops / (t * 1e-6) / 1e12, err))
            del kv, k, v
            torch.cuda.empty_cache()
    path = write_results("prefill" if have_fi else "prefill-no-flashinfer", records)
    plot_speedups("prefill", records, f"prefill vs anchors, {torch.cuda.get_device_name()}")
    print(f"\nresults {path}")
    print(f"{'shape':<10}{'BxQ+P':>14}{'FI us':>9}{'SDPA us':>9}{'ours us':>9}{'TFLOP/s':>9}{'x FI':>6}{'err':>9}")
    for shape, size, fi_t, ts, t, tf, err in rows:
        print(f"{shape:<10}{size:>14}{fmt(fi_t):>9}{fmt(ts):>9}{fmt(t):>9}{fmt(tf):>9}"
              f"{fmt(fi_t / t if fi_t else None, 2):>6}{err:>9.1e}")


if __name__ == "__main__":
    main()
