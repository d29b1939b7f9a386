"""One launch each of pagedinfer and FlashInfer on the same inputs, for Nsight Compute to compare:
    ncu --metrics ... python3 benchmarks/ncu_pair.py
decode 32/8/128 256x4096 (ours vs FlashInfer's tensor-core decode) and verify 32/8/128 64x4x2048 causal
(ours vs FlashInfer's fa2 prefill). Each is run twice first (JIT, warm-up), then once under NVTX ranges."""
import torch

from pagedinfer import bench
from pagedinfer.decode import DecodeWrapper
from pagedinfer.paged import csr_page_table
from pagedinfer.verify import VerifyWrapper


def main():
    import flashinfer
    heads = (32, 8, 128)
    q_heads, kv_heads, head_dim = heads
    workspace = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    calls = []
    kv, ids, indptr, last = bench.make_inputs(heads, 256, 4096)
    table = csr_page_table(indptr, ids, last, bench.PAGE)
    q = torch.randn(256, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    ours = DecodeWrapper("cuda")
    ours.plan(table, q_heads, kv_heads, head_dim, kv_lens_host=table.kv_lens().cpu(), indptr_host=indptr.cpu())
    fi = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    fi.plan(indptr, ids, last, q_heads, kv_heads, head_dim, bench.PAGE, q_data_type=torch.bfloat16,
            kv_data_type=torch.bfloat16)
    calls += [("decode-ours", lambda: ours.run(q, kv)), ("decode-fi", lambda: fi.run(q, kv))]

    kv2, ids2, indptr2, last2 = bench.make_inputs(heads, 64, 2048)
    table2 = csr_page_table(indptr2, ids2, last2, bench.PAGE)
    q2 = torch.randn(64 * 4, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    qo = torch.arange(0, 65, dtype=torch.int32) * 4
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
