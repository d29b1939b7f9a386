"""KV-cache operations: append new K/V rows by slot mapping, convert a block table to CSR.

Both run one kernel on PyTorch's current stream with no host sync and no allocation when `out` is given
(CUDA-graph safe); CPU tensors go through the PyTorch reference.
"""
from __future__ import annotations

import numpy as np
import torch

from . import reference
from .paged import BlockTable, PageTable, as_paged_kv_cache, empty_csr
from .validate import HALF_DTYPES, check_shape, check_tensor, debug_enabled, fail

_THREADS = 256

# Every kernel instantiation this module can launch: the CI compile check builds each for sm_80 and sm_90a.
SPECIALIZATIONS = [("cache.cu", f"append_kv<{slot}, {unit}>") for slot in ("int", "long long") for unit in (2, 16)]
SPECIALIZATIONS.append(("cache.cu", "csr_from_block_table"))


def _byte_strides(t: torch.Tensor, dims) -> list[np.int64]:
    return [np.int64(t.stride(d) * t.element_size()) for d in dims]


def _copy_unit(*tensors: torch.Tensor, row_bytes: int) -> int:
    """16-byte pieces when every row start is 16-byte aligned, else one element at a time."""
    aligned = row_bytes % 16 == 0 and all(
        t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
        for t in tensors)
    return 16 if aligned else tensors[0].element_size()


def append_kv(k_new: torch.Tensor, v_new: torch.Tensor, kv_cache, slot_mapping: torch.Tensor, *,
              kv_layout: str = "NHD") -> None:
    """Writes row n of k_new/v_new ([N, kv_heads, head_dim]) into slot slot_mapping[n] = page * page_size +
    offset of the cache; negative slots are padding and are skipped. Slots are trusted to lie inside the
    cache (vLLM and SGLang allocate them); PAGEDINFER_DEBUG=1 checks them."""
    cache = as_paged_kv_cache(kv_cache, kv_layout)
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check_tensor(name, t, ndim=3, dtypes=(cache.dtype,), device=cache.device)
        check_shape(name, t, (None, cache.kv_heads, cache.head_dim))
        if t.stride(2) != 1:
            fail(name, "head_dim contiguous (stride 1)", f"strides {t.stride()}")
    if k_new.shape != v_new.shape:  # strides may differ: engines hand in views of a fused qkv projection
        fail("v_new", f"the shape of k_new {list(k_new.shape)}", f"{list(v_new.shape)}")
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64), device=cache.device)
    check_shape("slot_mapping", slot_mapping, (k_new.shape[0],))
    if slot_mapping.device.type == "cpu" or debug_enabled():
        top = int(slot_mapping.max()) if slot_mapping.numel() else -1
        if top >= cache.num_pages * cache.page_size:
            fail("slot_mapping", f"slots < num_pages * page_size = {cache.num_pages * cache.page_size}", top)
    if cache.device.type == "cpu":
        reference.append_kv(k_new, v_new, cache, slot_mapping)
        return
    if cache.dtype not in HALF_DTYPES:
        fail("kv_cache", "dtype float16 or bfloat16 on the GPU", cache.dtype)
    if k_new.shape[0] == 0:
        return
    from .kernels import get_kernel
    row_bytes = cache.head_dim * cache.k.element_size()
    unit = _copy_unit(k_new, v_new, cache.k, cache.v, row_bytes=row_bytes)
    slot_type = "int" if slot_mapping.dtype == torch.int32 else "long long"
    kernel = get_kernel("cache.cu", f"append_kv<{slot_type}, {unit}>", device_index=cache.device.index)
    total = k_new.shape[0] * cache.kv_heads * (row_bytes // unit)
    blocks = min(-(-total // _THREADS), 65535)
    kernel.launch((blocks,), (_THREADS,), (
        k_new, v_new, *_byte_strides(k_new, (0, 1)), *_byte_strides(v_new, (0, 1)), cache.k, cache.v,
        *_byte_strides(cache.k, (0, 1, 2)),
        slot_mapping.contiguous(), np.int32(k_new.shape[0]), np.int32(cache.kv_heads), np.int32(row_bytes),
        np.int32(cache.page_size)))


def csr_from_block_table(table: BlockTable, out: PageTable | None = None) -> PageTable:
    """Converts a block table + seq_lens to a CSR page table. On the GPU: one launch, no sync. Pass `out`
    (e.g. from `empty_csr`) with room for block_table.numel() ids to make it allocation-free."""
    bt = table.block_table
    if out is None:
        out = empty_csr(table.batch_size, bt.numel(), table.page_size, bt.device)
    elif (out.batch_size != table.batch_size or out.indices.shape[0] < bt.numel()
          or out.indptr.device != bt.device or out.page_size != table.page_size):
        fail("out", f"a CSR table on {bt.device}, page_size {table.page_size}, for {table.batch_size} requests "
             f"with >= {bt.numel()} ids", f"{out.batch_size} requests, {out.indices.shape[0]} ids, "
             f"page_size {out.page_size} on {out.indptr.device}")
    if bt.device.type == "cpu":
        reference.csr_from_block_table(table, out)
        return out
    from .kernels import get_kernel
    kernel = get_kernel("cache.cu", "csr_from_block_table", device_index=bt.device.index)
    kernel.launch((table.batch_size,), (_THREADS,), (
        bt, np.int64(bt.stride(0)), table.seq_lens.contiguous(), np.int32(table.batch_size),
        np.int32(table.page_size), out.indptr, out.indices, out.last_page_len))
    return out

