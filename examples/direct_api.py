"""The direct API on a paged KV cache: decode and causal prefill (extend) with DecodeWrapper / PrefillWrapper
plan + run, checked against the PyTorch reference. Needs an NVIDIA GPU (compute capability 8.0+) and CuPy.

    python examples/direct_api.py
"""
import torch

import pagedinfer
from pagedinfer import reference

torch.manual_seed(0)
q_heads, kv_heads, head_dim, page_size = 32, 8, 128, 16
seq_lens = torch.tensor([1, 17, 300, 1024], dtype=torch.int32)  # tokens each request has in the cache
batch = len(seq_lens)

# The cache [pages, K/V, page_size, kv_heads, head_dim] (NHD), and a block table handing each request pages
# in random order, as an engine's allocator does after a while.
pages_per_request = (seq_lens + page_size - 1) // page_size
num_pages = int(pages_per_request.sum()) + 8
cache = torch.randn(num_pages, 2, page_size, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
block_table = torch.zeros(batch, int(pages_per_request.max()), dtype=torch.int32)
free_pages = torch.randperm(num_pages, dtype=torch.int32).tolist()
for b, n in enumerate(pages_per_request.tolist()):
    block_table[b, :n] = torch.tensor([free_pages.pop() for _ in range(n)])
table = pagedinfer.block_page_table(block_table.cuda(), seq_lens.cuda(), page_size, num_pages=num_pages)


def report(what, out, ref):
    err = (out.float() - ref.float()).abs().max().item()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"{what}: max |out - reference| = {err:.4f}, relative error {rel:.1e}")
    return rel


# Decode: one new query token per request. plan() once per step (host side), run() once per layer.
decode = pagedinfer.DecodeWrapper("cuda")
decode.plan(table, q_heads, kv_heads, head_dim, kv_lens_host=seq_lens)
q = torch.randn(batch, q_heads, head_dim, dtype=torch.bfloat16, device="cuda")
worst = report("decode", decode.run(q, cache), reference.decode(q, cache, table)[0])

# Prefill / extend: the last qo_len tokens of each request are new (their K/V already in the cache); causal.
qo_lens = torch.tensor([1, 5, 64, 300], dtype=torch.int32)
qo_indptr = torch.cat([torch.zeros(1, dtype=torch.int32), qo_lens.cumsum(0).int()])
prefill = pagedinfer.PrefillWrapper("cuda")
prefill.plan(qo_indptr, table, q_heads, kv_heads, head_dim, causal=True, kv_lens_host=seq_lens)
q = torch.randn(int(qo_lens.sum()), q_heads, head_dim, dtype=torch.bfloat16, device="cuda")
worst = max(worst, report("prefill", prefill.run(q, cache),
                          reference.prefill(q, qo_indptr, cache, table, causal=True)[0]))

if worst > 1e-2:  # bf16 outputs against a float32 reference
    raise SystemExit(f"relative error {worst:.1e} is above 1e-2")
