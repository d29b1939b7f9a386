"""The paged cache view and the page-table constructors: accepted forms and one test per validation rule."""
import pytest
import torch

from pagedinfer.launch_args import check_rows
from pagedinfer.paged import as_paged_kv_cache, block_page_table, csr_page_table

I32 = torch.int32


def test_layouts_and_forms_give_the_same_logical_view():
    nhd = torch.randn(3, 2, 16, 4, 64)
    hnd = nhd.transpose(2, 3).contiguous()
    a, b = as_paged_kv_cache(nhd, "NHD"), as_paged_kv_cache(hnd, "HND")
    c = as_paged_kv_cache((nhd[:, 0], nhd[:, 1]), "NHD")
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.k, c.k)
    assert (a.num_pages, a.page_size, a.kv_heads, a.head_dim) == (3, 16, 4, 64)
    assert b.strides() == (hnd.stride(0), hnd.stride(3), hnd.stride(2))


@pytest.mark.parametrize("cache,layout,message", [
    (torch.zeros(3, 3, 16, 4, 64), "NHD", r"kv_cache: expected shape \[pages, 2, ...\]"),
    (torch.zeros(3, 2, 16, 4, 64, dtype=torch.int32), "NHD", "kv_cache: expected dtype float16 or bfloat16 or float32"),
    (torch.zeros(3, 2, 16, 4), "NHD", "kv_cache: expected a 5-D tensor"),
    (torch.zeros(3, 2, 16, 4, 64), "NDH", "kv_layout: expected one of NHD, HND, got NDH"),
    (torch.zeros(3, 2, 16, 4, 128)[..., ::2], "NHD", r"kv_cache: expected head_dim contiguous"),
    (torch.zeros(3, 2, 12, 4, 64), "NHD", "page_size: expected one of 1, 2, 4, 8, 16, 32, 64, 128, 256, got 12"),
    ((torch.zeros(3, 16, 4, 64), torch.zeros(3, 16, 4, 32)), "NHD", "kv_cache: expected k and v of one shape"),
    ("cache", "NHD", "kv_cache: expected a 5-D tensor or a \\(k, v\\) pair"),
])
def test_cache_rejects(cache, layout, message):
    with pytest.raises(ValueError, match=message):
        as_paged_kv_cache(cache, layout)


@pytest.mark.parametrize("indptr,indices,last,message", [
    ([0], [], [], "kv_indptr: expected batch_size \\+ 1 >= 2 entries"),
    ([1, 2], [0, 1], [3], "kv_indptr: expected non-decreasing offsets starting at 0"),
    ([0, 2, 1], [0, 1], [3, 3], "kv_indptr: expected non-decreasing offsets starting at 0"),
    ([0, 3], [0, 1], [3], "kv_indices: expected at least kv_indptr\\[-1\\]=3 entries"),
    ([0, 2], [0, 1], [0], "kv_last_page_len: expected values in \\[1, 16\\]"),
    ([0, 2], [0, 1], [17], "kv_last_page_len: expected values in \\[1, 16\\]"),
    ([0, 2], [0, 9], [3], "kv_indices: expected page ids in \\[0, 7\\], got ids from 0 to 9"),
    ([0, 2], [-1, 1], [3], "kv_indices: expected page ids in \\[0, 7\\], got ids from -1 to 1"),
])
def test_csr_rejects(indptr, indices, last, message):
    with pytest.raises(ValueError, match=message):
        csr_page_table(torch.tensor(indptr, dtype=I32), torch.tensor(indices, dtype=I32),
                       torch.tensor(last, dtype=I32), 16, num_pages=8)


def test_csr_rejects_int64_indices():
    with pytest.raises(ValueError, match="kv_indptr: expected dtype int32, got int64"):
        csr_page_table(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1]), 16)


@pytest.mark.parametrize("table,lens,message", [
    ([[0, 1]], [-1], "seq_lens: expected lengths >= 0"),
    ([[0, 1]], [33], "seq_lens: expected lengths <= max_blocks \\* page_size = 32, got 33"),
    ([[0, 8]], [20], "block_table: expected page ids in \\[0, 7\\], got ids from 0 to 8"),
    ([[0, 1], [2, 3]], [5], "block_table: expected shape \\[1, \\*\\]"),
])
def test_block_table_rejects(table, lens, message):
    with pytest.raises(ValueError, match=message):
        block_page_table(torch.tensor(table, dtype=I32), torch.tensor(lens, dtype=I32), 16, num_pages=8)


def test_block_table_rejects_an_empty_batch_and_strided_rows():
    with pytest.raises(ValueError, match="seq_lens: expected a non-empty batch"):
        block_page_table(torch.zeros(0, 2, dtype=I32), torch.zeros(0, dtype=I32), 16)
    with pytest.raises(ValueError, match="block_table: expected rows contiguous"):
        block_page_table(torch.zeros(4, 2, dtype=I32).t(), torch.tensor([1, 1], dtype=I32), 16)


def test_unused_block_table_entries_are_not_checked():
    table = block_page_table(torch.tensor([[3, 99]], dtype=I32), torch.tensor([10], dtype=I32), 16, num_pages=8)
    assert table.request_pages(0).tolist() == [3]


def test_query_rows_rule_names_device_dtype_shape_and_alignment():
    q = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    check_rows("q", q, (2, 8, 64), torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match="q: expected a tensor on cpu, got a tensor on meta"):
        check_rows("q", q.to("meta"), (2, 8, 64), torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match="q: expected dtype bfloat16, got float16"):
        check_rows("q", q.half(), (2, 8, 64), torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"q: expected shape \[2, 8, 64\], got \[2, 4, 64\]"):
        check_rows("q", q[:, :4], (2, 8, 64), torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match="q: expected 16-byte aligned rows"):
        check_rows("q", torch.zeros(2, 8, 65, dtype=torch.bfloat16)[..., 1:], (2, 8, 64), torch.bfloat16,
                   torch.device("cpu"))


def test_cache_operations_are_reachable_from_paged():
    import pagedinfer.cache
    import pagedinfer.paged
    assert pagedinfer.paged.append_kv is pagedinfer.cache.append_kv
    assert pagedinfer.paged.csr_from_block_table is pagedinfer.cache.csr_from_block_table
    with pytest.raises(AttributeError):
        pagedinfer.paged.no_such_thing  # noqa: B018


def test_cache_strides_of_4gib_or_more_are_refused_by_name():
    from pagedinfer.launch_args import CacheArgs
    k = torch.empty(0, dtype=torch.bfloat16, device="meta").as_strided((2, 16, 8, 128), (2**31, 1024, 128, 1))
    with pytest.raises(ValueError, match=r"kv_cache: expected strides under 4 GiB, got strides \(2147483648, "):
        CacheArgs("NHD").get((k, k))
