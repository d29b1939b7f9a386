"""pagedinfer: paged-KV attention kernels for LLM serving, compiled at run time with NVRTC.

`import pagedinfer` is cheap (engines import it in every process through entry points): the public names
below load their modules, and torch, on first use.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PagedKVCache": "paged", "as_paged_kv_cache": "paged", "PageTable": "paged", "BlockTable": "paged",
    "csr_page_table": "paged", "block_page_table": "paged", "empty_csr": "paged",
    "append_kv": "cache", "csr_from_block_table": "cache",
    "pack_masks": "masks", "unpack_mask": "masks",
    "DecodeWrapper": "decode", "VerifyWrapper": "verify", "PrefillWrapper": "prefill",
    "RaggedPrefillWrapper": "prefill",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagedinfer' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
