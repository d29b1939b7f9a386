"""The paged KV cache and its two page-table forms.

Cache: one tensor `[pages, 2, page_size, kv_heads, head_dim]` (NHD) or `[pages, 2, kv_heads, page_size,
head_dim]` (HND), or a `(k, v)` pair of `[pages, page_size, kv_heads, head_dim]` / `[pages, kv_heads,
page_size, head_dim]`. Strided views are accepted as long as head_dim is contiguous and K and V share strides.
Internally both layouts become one logical view `[pages, page_size, kv_heads, head_dim]` with explicit
strides, so kernels read either layout through the same (page, token, head) stride triple.

Page tables (int32):
- CSR (FlashInfer's form): `indptr[B+1]`, `indices[indptr[-1]]`, `last_page_len[B]` in [1, page_size]
  for a request with pages; `kv_len = (pages - 1) * page_size + last_page_len`, 0 for a request with none.
- Block table (vLLM's form): `block_table[B, max_blocks]`, `seq_lens[B]`; request b uses the first
  ceil(seq_lens[b] / page_size) entries of row b.
Kernels read both through (indices, row_start[b], kv_len[b]); see `row_starts`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .validate import (HALF_DTYPES, INDEX_DTYPES, check_choice, check_page_size, check_shape,
                       check_tensor, debug_enabled, fail)

LAYOUTS = ("NHD", "HND")
CACHE_DTYPES = HALF_DTYPES + (torch.float32,)


@dataclass(frozen=True)
class PagedKVCache:
    """K and V as logical `[pages, page_size, kv_heads, head_dim]` views of the caller's storage."""

    k: torch.Tensor
    v: torch.Tensor
    layout: str

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def strides(self) -> tuple[int, int, int]:
        """(page, token, head) strides in elements, shared by K and V."""
        return self.k.stride(0), self.k.stride(1), self.k.stride(2)


def as_paged_kv_cache(kv_cache, layout: str = "NHD") -> PagedKVCache:
    if isinstance(kv_cache, PagedKVCache):
        return kv_cache
    check_choice("kv_layout", layout, LAYOUTS)
    if isinstance(kv_cache, torch.Tensor):
        check_tensor("kv_cache", kv_cache, ndim=5, dtypes=CACHE_DTYPES)
        if kv_cache.shape[1] != 2:
            fail("kv_cache", "shape [pages, 2, ...] (K and V on dim 1)", list(kv_cache.shape))
        k, v = kv_cache[:, 0], kv_cache[:, 1]
    elif isinstance(kv_cache, (tuple, list)) and len(kv_cache) == 2:
        k, v = kv_cache
        check_tensor("kv_cache[0] (k)", k, ndim=4, dtypes=CACHE_DTYPES)
        check_tensor("kv_cache[1] (v)", v, ndim=4, dtypes=CACHE_DTYPES)
        if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
            fail("kv_cache", "k and v of one shape, dtype and device",
                 f"{list(k.shape)} {k.dtype} {k.device} vs {list(v.shape)} {v.dtype} {v.device}")
    else:
        fail("kv_cache", "a 5-D tensor or a (k, v) pair of 4-D tensors", type(kv_cache).__name__)
    if layout == "HND":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    if k.stride(3) != 1 or v.stride(3) != 1:
        fail("kv_cache", "head_dim contiguous (stride 1)", f"strides {k.stride()} / {v.stride()}")
    if k.stride() != v.stride():
        fail("kv_cache", "k and v with the same strides", f"{k.stride()} vs {v.stride()}")
    check_page_size(k.shape[1])
    return PagedKVCache(k, v, layout)


@dataclass(frozen=True)
class PageTable:
    """CSR page table."""

    indptr: torch.Tensor
    indices: torch.Tensor
    last_page_len: torch.Tensor
    page_size: int

    @property
    def batch_size(self) -> int:
        return self.last_page_len.shape[0]

    def kv_lens(self) -> torch.Tensor:
        pages = self.indptr[1:] - self.indptr[:-1]
        lens = (pages - 1).clamp(min=0) * self.page_size + self.last_page_len
        return torch.where(pages > 0, lens, torch.zeros_like(lens)).to(torch.int32)

    def row_starts(self) -> torch.Tensor:
        return self.indptr[:-1]

    def request_pages(self, b: int) -> torch.Tensor:
        return self.indices[int(self.indptr[b]):int(self.indptr[b + 1])]


@dataclass(frozen=True)
class BlockTable:
    """Block-table page table (vLLM's form)."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    page_size: int

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    def kv_lens(self) -> torch.Tensor:
        return self.seq_lens

    def row_starts(self) -> torch.Tensor:
        b = self.block_table.shape[0]
        return torch.arange(b, dtype=torch.int32, device=self.block_table.device) * self.block_table.stride(0)

    def request_pages(self, b: int) -> torch.Tensor:
        n = -(-int(self.seq_lens[b]) // self.page_size)
        return self.block_table[b, :n]


def _on_host_or_debug(*tensors) -> bool:
    """Value checks run when the data is already on the host, or on the GPU in debug mode (one sync)."""
    return all(t.device.type == "cpu" for t in tensors) or debug_enabled()


def _check_page_ids(name: str, ids: torch.Tensor, num_pages: int | None) -> None:
    if num_pages is None or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_pages:
        fail(name, f"page ids in [0, {num_pages - 1}]", f"ids from {lo} to {hi}")


def csr_page_table(indptr, indices, last_page_len, page_size: int, num_pages: int | None = None) -> PageTable:
    """Validates and wraps a CSR page table. `num_pages` (the cache's page count) bounds the page ids."""
    check_page_size(page_size)
    check_tensor("kv_indptr", indptr, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor("kv_indices", indices, ndim=1, dtypes=INDEX_DTYPES, device=indptr.device)
    check_tensor("kv_last_page_len", last_page_len, ndim=1, dtypes=INDEX_DTYPES, device=indptr.device)
    batch = indptr.shape[0] - 1
    if batch < 1:
        fail("kv_indptr", "batch_size + 1 >= 2 entries (a non-empty batch)", f"{indptr.shape[0]} entries")
    check_shape("kv_last_page_len", last_page_len, (batch,))
    if _on_host_or_debug(indptr, indices, last_page_len):
        if int(indptr[0]) != 0 or bool((indptr[1:] < indptr[:-1]).any()):
            fail("kv_indptr", "non-decreasing offsets starting at 0", indptr.tolist()[:8])
        if int(indptr[-1]) > indices.shape[0]:
            fail("kv_indices", f"at least kv_indptr[-1]={int(indptr[-1])} entries", indices.shape[0])
        pages = indptr[1:] - indptr[:-1]
        bad = (pages > 0) & ((last_page_len < 1) | (last_page_len > page_size))
        if bool(bad.any()):
            fail("kv_last_page_len", f"values in [1, {page_size}] for requests with pages",
                 last_page_len[bad].tolist()[:8])
        _check_page_ids("kv_indices", indices[: int(indptr[-1])], num_pages)
    return PageTable(indptr, indices, last_page_len, page_size)


def block_page_table(block_table, seq_lens, page_size: int, num_pages: int | None = None) -> BlockTable:
    """Validates and wraps a block table + seq_lens. Only the pages a request uses are checked."""
    check_page_size(page_size)
    check_tensor("block_table", block_table, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=block_table.device)
    if block_table.stride(1) != 1:
        fail("block_table", "rows contiguous (stride 1 on dim 1)", f"strides {block_table.stride()}")
    batch = seq_lens.shape[0]
    if batch < 1:
        fail("seq_lens", "a non-empty batch", "0 requests")
    check_shape("block_table", block_table, (batch, None))
    if _on_host_or_debug(block_table, seq_lens):
        if bool((seq_lens < 0).any()):
            fail("seq_lens", "lengths >= 0", seq_lens[seq_lens < 0].tolist()[:8])
        capacity = block_table.shape[1] * page_size
        if int(seq_lens.max()) > capacity:
            fail("seq_lens", f"lengths <= max_blocks * page_size = {capacity}", int(seq_lens.max()))
        pages = (seq_lens + page_size - 1) // page_size
        used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < pages[:, None]
        _check_page_ids("block_table", block_table[used], num_pages)
    return BlockTable(block_table, seq_lens, page_size)


def empty_csr(batch_size: int, capacity: int, page_size: int, device) -> PageTable:
    """A zeroed CSR table with room for `capacity` page ids: the fixed buffers of a CUDA-graph plan."""
    def z(n):
        return torch.zeros(n, dtype=torch.int32, device=device)
    return PageTable(z(batch_size + 1), z(capacity), z(batch_size), page_size)


def __getattr__(name):
    # The cache operations (append_kv, block table -> CSR) live in pagedinfer.cache with their kernels;
    # they are reachable from here too, next to the structures they work on.
    if name in ("append_kv", "csr_from_block_table"):
        from . import cache
        return getattr(cache, name)
    raise AttributeError(f"module 'pagedinfer.paged' has no attribute {name!r}")
