"""One launch each of pagedinfer and FlashInfer on the same inputs, for Nsight Compute to compare:
    ncu --metrics ... python3 benchmarks/ncu_pair.py [--decode 256x4096] [--verify 64x4x2048]
decode 32/8/128 batch x kv len (ours vs FlashInfer's tensor-core decode) and verify 32/8/128 batch x drafts x
kv len, causal (ours vs FlashInfer's fa2 prefill); `--heads 9/3/64` for other q heads / kv heads / head dim.
Each is run twice first (JIT, warm-up), then once under NVTX ranges."""
import argparse

import torch

from pagedinfer import bench
from pagedinfer.decode import DecodeWrapper
from pagedinfer.paged import csr_page_table
from pagedinfer.verify import VerifyWrapper


def main():
    import flashinfer
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decode", default="256x4096")
    parser.add_argument("--verify", default="64x4x2048")
    parser.add_argument("--heads", default="32/8/128")
    args = parser.parse_args()
    batch, kv_len = map(int, args.decode.split("x"))
    vbatch, drafts, vkv_len = map(int, args.verify.split("x"))
    heads = tuple(map(int, args.heads.split("/")))
    q_heads, kv_heads, head_dim = heads
    workspace = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    calls = []
    kv, ids, indptr, last = bench.make_inputs(heads, batch, kv_len)
    table = csr_page_table(indptr, ids, last, bench.PAGE)
    q = torch.randn(batch, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    ours = DecodeWrapper("cuda")
    ours.plan(table, q_heads, kv_heads, head_dim, kv_lens_host=table.kv_lens().cpu(), indptr_host=indptr.cpu())
    fi = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    fi.plan(indptr, ids, last, q_heads, kv_heads, head_dim, bench.PAGE, q_data_type=torch.bfloat16,
            kv_data_type=torch.bfloat16)
    calls += [("decode-ours", lambda: ours.run(q, kv)), ("decode-fi", lambda: fi.run(q, kv))]

    kv2, ids2, indptr2, last2 = bench.make_inputs(heads, vbatch, vkv_len)
    table2 = csr_page_table(indptr2, ids2, last2, bench.PAGE)
    q2 = torch.randn(vbatch * drafts, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    qo = torch.arange(0, vbatch + 1, dtype=torch.int32) * drafts
    vours = VerifyWrapper("cuda")
    vours.plan(qo, table2, q_heads, kv_heads, head_dim, kv_lens_host=table2.kv_lens().cpu(),
               indptr_host=indptr2.cpu())
    vfi = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
    vfi.plan(qo.cuda(), indptr2, ids2, last2, q_heads, kv_heads, head_dim, bench.PAGE, q_data_type=torch.bfloat16,
             kv_data_type=torch.bfloat16, causal=True)
    calls += [("verify-ours", lambda: vours.run(q2, kv2)), ("verify-fi", lambda: vfi.run(q2, kv2))]
    for _ in range(2):
        for _, fn in calls:
            fn()
    torch.cuda.synchronize()
    for name, fn in calls:
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
