"""append_kv and block table -> CSR: validation on the CPU, kernels against the reference on the GPU."""
import pytest
import torch

import pagedinfer.cache as cache_ops
from pagedinfer import reference
from pagedinfer.paged import as_paged_kv_cache, block_page_table, empty_csr


def random_block_table(batch, page_size, num_pages, device, max_len=300):
    seq_lens = torch.randint(0, max_len, (batch,), dtype=torch.int32)
    seq_lens[0] = page_size  # exactly one full page
    max_blocks = int(-(-int(seq_lens.max()) // page_size)) + 2
    bt = torch.randperm(num_pages)[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    return block_page_table(bt.to(device), seq_lens.to(device), page_size)


def make_cache(layout, form, pages, page_size, heads, dim, dtype, device):
    if layout == "NHD":
        t = torch.randn(pages, 2, page_size, heads, dim, dtype=dtype, device=device)
    else:
        t = torch.randn(pages, 2, heads, page_size, dim, dtype=dtype, device=device)
    if form == "tuple":
        return (t[:, 0].clone(), t[:, 1].clone())
    if form == "strided":  # a view into a wider allocation: page stride larger than the page
        wide = torch.randn(pages, 3, *t.shape[2:], dtype=dtype, device=device)
        return wide[:, :2]
    return t


# ------------------------------------------------------------------------------ validation (CPU)

def test_append_kv_rejects_wrong_head_dim():
    cache = torch.zeros(4, 2, 16, 2, 64)
    with pytest.raises(ValueError, match=r"k_new: expected shape \[\*, 2, 64\]"):
        cache_ops.append_kv(torch.zeros(3, 2, 32), torch.zeros(3, 2, 32), cache, torch.zeros(3, dtype=torch.int32))


def test_append_kv_rejects_slot_out_of_range():
    cache = torch.zeros(4, 2, 16, 2, 64)
    with pytest.raises(ValueError, match="slot_mapping: expected slots < num_pages \\* page_size = 64, got 64"):
        cache_ops.append_kv(torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), cache, torch.tensor([64]))


def test_append_kv_rejects_float_slots_and_dtype_mismatch():
    cache = torch.zeros(4, 2, 16, 2, 64)
    with pytest.raises(ValueError, match="slot_mapping: expected dtype int32 or int64"):
        cache_ops.append_kv(torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), cache, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="k_new: expected dtype float32"):
        cache_ops.append_kv(torch.zeros(1, 2, 64, dtype=torch.float16), torch.zeros(1, 2, 64), cache,
                            torch.tensor([1]))


def test_csr_out_buffer_must_fit():
    table = random_block_table(3, 16, 64, "cpu")
    with pytest.raises(ValueError, match="out: expected a CSR table"):
        cache_ops.csr_from_block_table(table, empty_csr(3, 1, 16, "cpu"))


def test_csr_on_cpu_matches_reference():
    table = random_block_table(5, 8, 200, "cpu")
    out = cache_ops.csr_from_block_table(table)
    for b in range(5):
        torch.testing.assert_close(out.request_pages(b), table.request_pages(b))
    torch.testing.assert_close(out.kv_lens(), table.seq_lens)


# ------------------------------------------------------------------------------ kernels (GPU)

@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("form", ["tensor", "tuple", "strided"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_append_kv_matches_reference(layout, form, dtype, slot_dtype):
    torch.manual_seed(0)
    for page_size, heads, dim in [(16, 8, 128), (1, 3, 64), (32, 2, 80), (256, 1, 256)]:
        pages = 40
        gpu = make_cache(layout, form, pages, page_size, heads, dim, dtype, "cuda")
        cpu = tuple(t.cpu() for t in gpu) if isinstance(gpu, tuple) else gpu.cpu()
        n = 37
        slots = torch.randperm(pages * page_size)[:n]
        slots[::5] = -1  # padding rows
        k, v = (torch.randn(n, heads, dim, dtype=dtype) for _ in range(2))
        cache_ops.append_kv(k.cuda(), v.cuda(), gpu, slots.to(slot_dtype).cuda(), kv_layout=layout)
        reference.append_kv(k, v, as_paged_kv_cache(cpu, layout), slots.to(slot_dtype))
        g, c = as_paged_kv_cache(gpu, layout), as_paged_kv_cache(cpu, layout)
        assert torch.equal(g.k.cpu(), c.k) and torch.equal(g.v.cpu(), c.v)


@pytest.mark.gpu
def test_append_kv_unaligned_rows_use_the_element_path():
    cache = torch.randn(8, 2, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(5, 2, 65, dtype=torch.bfloat16, device="cuda")[:, :, 1:]  # rows start 2 bytes off
    v = torch.randn(5, 2, 65, dtype=torch.bfloat16, device="cuda")[:, :, 1:]
    slots = torch.tensor([0, 17, 33, 100, 127], device="cuda")
    cache_ops.append_kv(k, v, cache, slots)
    view = as_paged_kv_cache(cache)
    assert torch.equal(view.k.reshape(-1, 2, 64)[slots], k)
    assert torch.equal(view.v.reshape(-1, 2, 64)[slots], v)


@pytest.mark.gpu
def test_append_kv_takes_k_and_v_with_different_strides():
    """As engines pass them: K a view into a fused qkv projection, V contiguous."""
    cache = torch.randn(8, 2, 16, 3, 64, dtype=torch.bfloat16, device="cuda")
    qkv = torch.randn(6, (9 + 3) * 64, dtype=torch.bfloat16, device="cuda")
    k = qkv[:, 9 * 64:].view(6, 3, 64)
    v = torch.randn(6, 3, 64, dtype=torch.bfloat16, device="cuda")
    slots = torch.tensor([0, 5, 17, 33, -1, 127], device="cuda")
    cache_ops.append_kv(k, v, cache, slots)
    view = as_paged_kv_cache(cache)
    kept = slots >= 0
    assert torch.equal(view.k.reshape(-1, 3, 64)[slots[kept]], k[kept])
    assert torch.equal(view.v.reshape(-1, 3, 64)[slots[kept]], v[kept])


@pytest.mark.gpu
@pytest.mark.parametrize("batch,page_size", [(1, 16), (7, 1), (64, 16), (300, 32)])
def test_csr_from_block_table_matches_reference(batch, page_size):
    torch.manual_seed(batch)
    table = random_block_table(batch, page_size, 40000, "cuda", max_len=2000)
    out = empty_csr(batch, table.block_table.numel(), page_size, "cuda")
    out.indices.fill_(-7)
    cache_ops.csr_from_block_table(table, out)
    cpu_table = block_page_table(table.block_table.cpu(), table.seq_lens.cpu(), page_size)
    expect = empty_csr(batch, table.block_table.numel(), page_size, "cpu")
    reference.csr_from_block_table(cpu_table, expect)
    n = int(expect.indptr[-1])
    assert torch.equal(out.indptr.cpu(), expect.indptr)
    assert torch.equal(out.last_page_len.cpu(), expect.last_page_len)
    assert torch.equal(out.indices.cpu()[:n], expect.indices[:n])


@pytest.mark.gpu
def test_csr_from_block_table_in_a_cuda_graph():
    table = random_block_table(16, 16, 4000, "cuda")
    out = empty_csr(16, table.block_table.numel(), 16, "cuda")
    cache_ops.csr_from_block_table(table, out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache_ops.csr_from_block_table(table, out)
    table.seq_lens.copy_(torch.randint(1, 300, (16,), dtype=torch.int32, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.kv_lens(), table.seq_lens)
