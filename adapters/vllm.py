"""vLLM 0.26 attention backend: `vllm serve MODEL --attention-backend CUSTOM` (or
`LLM(model, attention_backend="CUSTOM")`) runs attention on pagedinfer's kernels.

vLLM finds us through the `vllm.general_plugins` entry point, which calls `register()` in every vLLM
process; it fills the `CUSTOM` slot of vLLM's backend registry with a class path, so nothing here touches
CUDA until a model is built with this backend.

Per step the metadata builder splits the batch (vLLM puts decodes first: requests of at most
`reorder_batch_threshold` query tokens, i.e. 1 + the speculative tokens), and plans once: decodes on the
decode kernel (one token each) or the verify kernel (up to 16 tokens each, causal), the rest on the prefill
kernel. Every layer's `forward` then runs the planned kernels into vLLM's output tensor; `do_kv_cache_update`
writes the new K/V with our `append_kv` before it. Uniform decode batches (also with speculative tokens)
use a wrapper whose buffers have fixed addresses, so vLLM can capture them in full CUDA graphs.

The KV cache has vLLM's standard shape `[blocks, kv_heads, block_size, 2 * head_size]` (K and V side by
side in the last dim), stored NHD unless vLLM's KV layout says HND. On CPU tensors (vLLM's engine classes
in tests without a GPU) the same metadata drives pagedinfer's PyTorch reference instead of the kernels.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata)
from vllm.v1.attention.backends.utils import get_kv_cache_layout

from ..cache import append_kv
from ..decode import DecodeWrapper
from ..paged import PagedKVCache, as_paged_kv_cache, block_page_table
from ..prefill import PrefillWrapper
from ..validate import HEAD_DIMS, MAX_GROUP
from ..verify import MAX_DRAFTS, VerifyWrapper

BACKEND_PATH = "pagedinfer.adapters.vllm.PagedInferBackend"
PAGE_SIZES = [1 << i for i in range(9)]  # 1..256


def register() -> None:
    """Fills vLLM's CUSTOM backend slot with our class path (idempotent; imports no kernels)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)


class PagedInferBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]
    forward_includes_kv_cache_update: bool = False  # vLLM calls do_kv_cache_update first

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM maps the layer's backend back to this enum member by name

    @staticmethod
    def get_impl_cls() -> type["PagedInferImpl"]:
        return PagedInferImpl

    @staticmethod
    def get_builder_cls() -> type["PagedInferMetadataBuilder"]:
        return PagedInferMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        if block_size not in PAGE_SIZES:
            raise ValueError(f"block_size: pagedinfer accepts powers of two from 1 to 256, got {block_size}")
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # The logical shape is [blocks, heads, block_size, 2 * head_size]; NHD stores tokens before heads.
        nhd = get_kv_cache_layout() == "NHD"
        if include_num_layers_dimension:
            return (1, 0, 3, 2, 4) if nhd else (1, 2, 0, 3, 4)
        return (0, 2, 1, 3) if nhd else (0, 1, 2, 3)

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int]:
        return PAGE_SIZES

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(HEAD_DIMS)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability.major >= 8  # mma.sync bf16 and cp.async: Ampere and newer


@dataclass
class _Part:
    """One kernel launch per layer over query rows [start, stop) of the batch."""

    start: int
    stop: int
    run: Callable  # (q rows, PagedKVCache, out rows) -> None


@dataclass
class PagedInferMetadata:
    parts: list[_Part]  # empty for a batch of padding only


def _kernel_runner(wrapper: DecodeWrapper) -> Callable:
    plan = wrapper._plan

    def run(q, cache, out):
        if wrapper._plan is not plan:  # never expected: vLLM runs a step's layers before planning the next
            raise RuntimeError("pagedinfer: attention metadata used after the next step was planned")
        wrapper.run(q, cache, out=out)
    return run


def _reference_runner(qo_indptr, table, causal: bool, params: dict) -> Callable:
    """CPU tensors: pagedinfer's PyTorch reference on the same page table."""
    from .. import reference

    def run(q, cache, out):
        o, _ = reference.prefill(q, qo_indptr, cache, table, causal=causal, **params)
        out.copy_(o)
    return run


class PagedInferMetadataBuilder(AttentionMetadataBuilder[PagedInferMetadata]):
    # Full CUDA graphs for uniform decode batches, speculative ones included (query length 1 + k).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        model = vllm_config.model_config
        self.page_size = kv_cache_spec.block_size
        self.num_qo_heads = model.get_num_attention_heads(vllm_config.parallel_config)
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.head_dim = kv_cache_spec.head_size
        self.dtype = model.dtype
        self.params = _shared_layer_params(vllm_config, layer_names)
        spec = vllm_config.speculative_config
        self.exact_host_lens = spec is None  # with async speculation the host lengths are upper bounds
        # Verify requests (1 + k tokens) count as decodes: vLLM orders them before the prefills.
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        self.reorder_batch_threshold = min(self.reorder_batch_threshold, MAX_DRAFTS)
        self.decode_len = 1 if spec is None or not spec.num_speculative_tokens else 1 + spec.num_speculative_tokens
        compilation = vllm_config.compilation_config
        self.graph_batch = 0  # largest uniform decode batch served by the fixed-buffer wrapper
        if compilation.cudagraph_mode.has_full_cudagraphs() and self.decode_len <= MAX_DRAFTS:
            self.graph_batch = min(vllm_config.scheduler_config.max_num_seqs,
                                   compilation.max_cudagraph_capture_size // self.decode_len)
        self._wrappers: dict = {}

    def _wrapper(self, kind: str, block_table: torch.Tensor) -> DecodeWrapper:
        w = self._wrappers.get(kind)
        if w is None:
            if kind == "graph":  # vLLM's block table has a fixed width: a row per request fits the buffers
                cls = DecodeWrapper if self.decode_len == 1 else VerifyWrapper
                w = cls(self.device, use_cuda_graph=True, max_batch_size=self.graph_batch,
                        max_pages=self.graph_batch * block_table.stride(0), max_qo_len=self.decode_len)
            else:
                w = {"decode": DecodeWrapper, "verify": VerifyWrapper, "prefill": PrefillWrapper}[kind](self.device)
            self._wrappers[kind] = w
        return w

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> PagedInferMetadata:
        m = common_attn_metadata
        if m.causal is not True:
            raise ValueError("pagedinfer: causal decoder attention only (CommonAttentionMetadata.causal is "
                             f"{m.causal!r})")
        starts = m.query_start_loc_cpu[: m.num_reqs + 1].numpy().astype(np.int64)
        qo_lens = np.diff(starts)
        reqs = int(np.count_nonzero(qo_lens))  # full-graph padding appends requests with no query tokens
        if reqs and (qo_lens[:reqs] == 0).any():
            raise ValueError("pagedinfer: requests without query tokens must come last (padding)")
        if reqs == 0:
            return PagedInferMetadata([])
        long = qo_lens[:reqs] > self.reorder_batch_threshold
        decodes = int(np.argmax(long)) if long.any() else reqs
        if not long[decodes:].all():
            decodes = 0  # not ordered decodes-first: the prefill kernel takes every request
        return PagedInferMetadata([self._plan_part(m, starts, qo_lens, lo, hi, prefill=lo == decodes)
                                   for lo, hi in ((0, decodes), (decodes, reqs)) if lo < hi])

    def _host_seq_lens(self, m: CommonAttentionMetadata, lo: int, hi: int) -> torch.Tensor:
        bound = m.seq_lens_cpu_upper_bound
        if self.exact_host_lens and bound is not None:
            return bound[lo:hi].to(torch.int32)
        return m.seq_lens[lo:hi].to("cpu", torch.int32)  # one sync: the device lengths are the exact ones

    def _plan_part(self, m, starts, qo_lens, lo: int, hi: int, prefill: bool) -> _Part:
        qo_indptr = torch.from_numpy((starts[lo:hi + 1] - starts[lo]).astype(np.int32))
        table = block_page_table(m.block_table_tensor[lo:hi], m.seq_lens[lo:hi], self.page_size)
        if self.device.type == "cpu" or m.block_table_tensor.device.type == "cpu":
            return _Part(int(starts[lo]), int(starts[hi]), _reference_runner(qo_indptr, table, True, self.params))
        longest = int(qo_lens[lo:hi].max())
        if prefill:
            kind = "prefill"
        elif hi - lo <= self.graph_batch and (qo_lens[lo:hi] == self.decode_len).all():
            kind = "graph"  # what vLLM captures: uniform decode batches
        else:
            kind = "decode" if longest == 1 else "verify"
        wrapper = self._wrapper(kind, m.block_table_tensor)
        # The graph wrapper plans on the device, from the exact lengths there (vLLM's; not checked again).
        lens = None if kind == "graph" else self._host_seq_lens(m, lo, hi)
        args = dict(q_dtype=self.dtype, kv_dtype=self.dtype, kv_lens_host=lens,
                    sm_scale=self.params["sm_scale"], logits_soft_cap=self.params["logits_soft_cap"],
                    window_left=self.params["window_left"])
        heads = (self.num_qo_heads, self.num_kv_heads, self.head_dim)
        if isinstance(wrapper, PrefillWrapper):
            wrapper.plan(qo_indptr, table, *heads, causal=True, **args)
        elif isinstance(wrapper, VerifyWrapper):
            wrapper.plan(qo_indptr, table, *heads, **args)
        else:
            wrapper.plan(table, *heads, **args)
        return _Part(int(starts[lo]), int(starts[hi]), _kernel_runner(wrapper))


def _shared_layer_params(vllm_config: VllmConfig, layer_names: list[str]) -> dict:
    """sm_scale, soft cap and window of the layers this builder plans for: one plan serves every layer, so
    they must agree (vLLM gives sliding-window layers a KV-cache group, hence a builder, of their own)."""
    layers = get_layers_from_vllm_config(vllm_config, torch.nn.Module, layer_names)
    found = {name: layer.impl.plan_params() for name, layer in layers.items()
             if isinstance(getattr(layer, "impl", None), PagedInferImpl)}
    if not found:
        raise ValueError(f"pagedinfer: no attention layer of this backend among {layer_names[:4]}")
    first = next(iter(found.values()))
    for name, params in found.items():
        if params != first:
            raise ValueError(f"pagedinfer: layers of one KV-cache group must share sm_scale, soft cap and "
                             f"sliding window; {name} has {params}, another {first}")
    return first


class PagedInferImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **extra) -> None:
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        problems = []
        if head_size not in HEAD_DIMS:
            problems.append(f"head_size {head_size} (accepted: {', '.join(map(str, HEAD_DIMS))})")
        if num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
            problems.append(f"{num_heads} query heads over {num_kv_heads} KV heads (a whole group of 1 to "
                            f"{MAX_GROUP} query heads per KV head)")
        if kv_cache_dtype not in PagedInferBackend.supported_kv_cache_dtypes:
            problems.append(f"kv_cache_dtype {kv_cache_dtype!r} (accepted: auto, float16, bfloat16)")
        if alibi_slopes is not None:
            problems.append("ALiBi slopes")
        if extra.get("sinks") is not None:
            problems.append("attention sinks")
        if attn_type != AttentionType.DECODER:
            problems.append(f"attention type {attn_type} (decoder self-attention only)")
        if problems:
            raise ValueError("pagedinfer backend cannot run this layer: " + "; ".join(problems))
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.window_left = -1 if sliding_window is None else sliding_window - 1  # vLLM's window counts the token
        self.logits_soft_cap = logits_soft_cap or 0.0
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self._cache_view: tuple | None = None  # (weakref to vLLM's tensor, our view of it)

    def plan_params(self) -> dict:
        return dict(sm_scale=self.scale, logits_soft_cap=self.logits_soft_cap, window_left=self.window_left)

    def _paged(self, kv_cache: torch.Tensor) -> PagedKVCache:
        """K and V views of vLLM's `[blocks, heads, block_size, 2 * head_size]` cache, built once per tensor
        (the kernels' argument memo keys on the view object)."""
        hit = self._cache_view
        if hit is not None and hit[0]() is kv_cache:
            return hit[1]
        k, v = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        view = as_paged_kv_cache((k, v), "NHD")
        self._cache_view = (weakref.ref(kv_cache), view)
        return view

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        n = slot_mapping.shape[0]  # key/value may carry CUDA-graph padding rows past the mapped tokens
        append_kv(key[:n], value[:n], self._paged(kv_cache), slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: PagedInferMetadata, output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("pagedinfer: fused output quantization is not supported")
        if attn_metadata is None:  # vLLM's profiling run
            return output.fill_(0)
        cache = self._paged(kv_cache)
        for part in attn_metadata.parts:
            part.run(query[part.start:part.stop], cache, output[part.start:part.stop])
        return output
