"""SGLang 0.5.16 attention backend: `python -m sglang.launch_server --model-path M --attention-backend
pagedinfer` runs attention on pagedinfer's kernels.

SGLang calls our `sglang.srt.plugins` entry point in every process (launcher and spawned schedulers);
`register()` adds "pagedinfer" to the --attention-backend choices and the backend class to SGLang's attention
registry. The scheduler builds the backend after the model and the KV pool exist; construction refuses,
with a ValueError, whatever the kernels do not cover (pool kind, KV dtype, head dim, GQA group, ...).

Per forward batch `init_forward_metadata` turns SGLang's `req_to_token` rows into a block table (slot s of the
pool is offset s % page_size of page s // page_size) and plans one wrapper per distinct layer configuration:
decode (one token per request), verify (TARGET_VERIFY: the draft tokens, causal or SGLang's tree mask) or
prefill (EXTEND, MIXED, DRAFT_EXTEND_V2: the new tokens after the cached prefix, causal). Each layer then
stores its new K/V with the pool's own `set_kv_buffer` and runs its planned kernel, with no host sync.

CUDA graphs: SGLang 0.5.16 captures decode and TARGET_VERIFY batches around `init_forward_metadata_out_graph`,
which it runs before each capture and each replay (the old *_capture_cuda_graph / *_replay_cuda_graph hooks
are gone); those plans go to wrappers with fixed buffers. Its prefill graphs ("breakable", the CUDA default,
and "tc_piecewise") run attention eagerly between graph segments on the metadata of `init_forward_metadata`,
so they need nothing more; the experimental "full" prefill graph is refused when it captures.

On CPU tensors (tests without a GPU) the same metadata drives pagedinfer's PyTorch reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention

from .. import decode, prefill, verify
from ..paged import BlockTable, block_page_table
from ..validate import HALF_DTYPES, check_group, check_head_dim, check_page_size, fail

NAME = "pagedinfer"
_POOL_LAYOUTS = {"nhd": "NHD", "hnd": "HND"}  # MHATokenToKVPool.kv_cache_layout -> ours
_WRAPPERS = {"decode": decode.DecodeWrapper, "verify": verify.VerifyWrapper, "prefill": prefill.PrefillWrapper}
_REFERENCES = {"decode": decode.decode, "verify": verify.verify, "prefill": prefill.prefill}


def register() -> None:
    """Makes "pagedinfer" a valid --attention-backend and registers the backend (idempotent; no CUDA)."""
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    if NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([NAME])
    register_attention_backend(NAME)(PagedInferAttnBackend)


class _Layer(NamedTuple):
    """What a plan depends on; layers with equal values share one plan per batch."""
    q_heads: int
    kv_heads: int
    head_dim: int
    sm_scale: float
    soft_cap: float
    window: int


@dataclass
class _Metadata:
    """One forward batch: its pages and query layout, and on the GPU the wrappers planned for it."""
    kind: str                   # "decode", "verify" or "prefill"
    table: BlockTable
    kv_lens_host: torch.Tensor
    qo_args: tuple              # () for decode, (qo_indptr on the host,) for verify and prefill
    mask_args: dict             # the packed tree mask for verify, causal=True for prefill
    wrappers: dict = field(default_factory=dict)  # _Layer -> planned wrapper


class PagedInferAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        self.dtype, self.kv_layout = _check_runner(model_runner)
        # Model code reaches the pools through the active backend (forward_context.get_token_to_kv_pool()).
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.page_size = model_runner.page_size
        self.device = torch.device(model_runner.device)
        self.layers = _layers(model_runner.model)
        self.num_draft_tokens = _check_server_args(model_runner.server_args, self.layers.values())
        self._configs = list(dict.fromkeys(self.layers.values()))
        self._pages_per_request = -(-self.req_to_token.shape[1] // self.page_size)
        self._wrappers: dict = {}   # (kind, _Layer, graph tier or None) -> wrapper
        self._views: dict = {}      # layer id -> (k buffer, v buffer, their paged views)
        self._graph_shape = None    # (largest captured batch, tokens per request)
        self._meta: _Metadata | None = None

    # ------------------------------------------------------------------------------ metadata

    def init_forward_metadata(self, forward_batch) -> None:
        self._meta = self._metadata(forward_batch)
        if self._meta is not None and self.device.type == "cuda":
            self._plan(self._meta, tier=None)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        tokens = max_num_tokens // max_bs
        if tokens > verify.MAX_DRAFTS:
            fail("captured tokens per request", f"1 to {verify.MAX_DRAFTS}", tokens)
        self._graph_shape = (max_bs, tokens)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        # Before each capture and each replay (outside the graph), on the padded batch: the graph's kernels
        # read the plan from the wrapper's fixed buffers.
        mode = forward_batch.forward_mode
        if not (mode.is_decode() or mode.is_target_verify()):
            fail("forward_mode", "DECODE or TARGET_VERIFY in a captured CUDA graph (prefill graphs: breakable, "
                 "tc_piecewise or disabled)", mode.name)
        self._meta = self._metadata(forward_batch)
        # One wrapper set per power-of-two batch tier, so a small batch's graph launches a small grid.
        self._plan(self._meta, tier=min(self._graph_shape[0], 1 << (forward_batch.batch_size - 1).bit_length()))

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def _metadata(self, fb) -> _Metadata | None:
        mode = fb.forward_mode
        if mode.is_idle() or fb.batch_size == 0:
            return None
        kv_lens = fb.seq_lens
        kv_lens_host = fb.seq_lens_cpu if fb.seq_lens_cpu is not None else kv_lens.cpu()
        if mode.is_decode():
            kind, qo_args, mask_args = "decode", (), {}
        elif mode.is_target_verify():
            # seq_lens count the committed tokens; the drafts' slots follow them in req_to_token.
            drafts = self.num_draft_tokens
            kind, qo_args = "verify", (_indptr([drafts] * fb.batch_size),)
            mask = getattr(fb.spec_info, "custom_mask", None)
            mask_args = {} if mask is None else _tree_mask(mask, kv_lens, drafts)
            kv_lens, kv_lens_host = kv_lens + drafts, kv_lens_host + drafts
        else:
            new = fb.extend_seq_lens_cpu if fb.extend_seq_lens_cpu is not None else fb.extend_seq_lens.tolist()
            kind, qo_args, mask_args = "prefill", (_indptr(new),), {"causal": True}
        table = self._block_table(fb.req_pool_indices, kv_lens, kv_lens_host)
        return _Metadata(kind, table, kv_lens_host, qo_args, mask_args)

    def _block_table(self, req_pool_indices, kv_lens, kv_lens_host) -> BlockTable:
        # SGLang's paged allocator keeps a page's slots together and aligned: the request's page ids are
        # every page_size-th slot of its row, divided by page_size.
        p = self.page_size
        width = -(-int(kv_lens_host.max()) // p)
        slots = self.req_to_token[:, :width * p:p].index_select(0, req_pool_indices)
        return block_page_table(slots // p if p > 1 else slots, kv_lens.to(torch.int32), p)

    def _plan(self, meta: _Metadata, tier: int | None) -> None:
        for config in self._configs:
            wrapper = self._wrapper(meta.kind, config, tier)
            wrapper.plan(*meta.qo_args, meta.table, config.q_heads, config.kv_heads, config.head_dim,
                         **meta.mask_args, q_dtype=self.dtype, kv_dtype=self.dtype, sm_scale=config.sm_scale,
                         logits_soft_cap=config.soft_cap, window_left=config.window,
                         kv_lens_host=meta.kv_lens_host)
            meta.wrappers[config] = wrapper

    def _wrapper(self, kind: str, config: _Layer, tier: int | None):
        key = (kind, config, tier)
        if key not in self._wrappers:
            graph = {} if tier is None else dict(
                use_cuda_graph=True, max_batch_size=tier, max_pages=tier * self._pages_per_request,
                max_qo_len=self._graph_shape[1])
            self._wrappers[key] = _WRAPPERS[kind](self.device, kv_layout=self.kv_layout, **graph)
        return self._wrappers[key]

    # ------------------------------------------------------------------------------ forward

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache, kwargs, out=None)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        # Under SGLang's prefill CUDA graphs the batch carries the layer's output rows.
        out = getattr(forward_batch, "_attn_output", None)
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache, kwargs, out=out)

    @torch.compiler.disable  # the kernels take raw pointers: keep them out of torch.compile's traces
    def _attend(self, q, k, v, layer, fb, save_kv_cache, extra: dict, out):
        unsupported = sorted(name for name, value in extra.items() if value is not None)
        if unsupported:
            fail("attention inputs", "q, k and v only (no sinks, fused rope or score modifiers)", unsupported)
        if save_kv_cache and k is not None:  # k is None where a layer reads another layer's cache
            self.token_to_kv_pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        config = self.layers[layer.layer_id]
        q = q.reshape(-1, config.q_heads, config.head_dim)
        out = q.new_empty(q.shape) if out is None else out.view(q.shape)
        cache = self._kv_cache(layer.layer_id)
        meta = self._meta
        if self.device.type == "cuda":
            meta.wrappers[config].run(q, cache, out=out)
        else:
            out.copy_(_REFERENCES[meta.kind](
                q, *meta.qo_args, cache, meta.table, **meta.mask_args, kv_layout=self.kv_layout,
                sm_scale=config.sm_scale, logits_soft_cap=config.soft_cap, window_left=config.window))
        return out.view(q.shape[0], -1)

    def _kv_cache(self, layer_id: int) -> tuple:
        """The layer's K and V as paged views. Views are kept while the pool keeps its buffers, so the
        kernels' per-cache argument memo hits at every step."""
        k, v = self.token_to_kv_pool.get_kv_buffer(layer_id)  # (waits for layer-wise KV loading, if any)
        hit = self._views.get(layer_id)
        if hit is None or hit[0] is not k or hit[1] is not v:
            hit = self._views[layer_id] = (k, v, (self._paged(k), self._paged(v)))
        return hit[2]

    def _paged(self, buffer: torch.Tensor) -> torch.Tensor:
        # NHD pool: [slots, heads, dim] -> [pages, page_size, heads, dim]; HND pool: already [pages, heads,
        # page_size, dim].
        return buffer.view(-1, self.page_size, *buffer.shape[1:]) if self.kv_layout == "NHD" else buffer


def _indptr(lengths) -> torch.Tensor:
    """int32 offsets [0, l0, l0 + l1, ...] on the host, where plans read them."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.as_tensor(lengths).cumsum(0)
    return out


def _tree_mask(custom_mask: torch.Tensor, seq_lens: torch.Tensor, drafts: int) -> dict:
    """SGLang's verify mask -> ours, on its device. SGLang: per request a bool [drafts, seq_len + drafts]
    row-major (row = the attending draft), requests back to back. Ours: the [drafts, drafts] block among the
    drafts, bit-packed (pagedinfer.masks), one byte-aligned segment per request. Requests past the end of
    `custom_mask` (CUDA-graph padding) get no draft bits."""
    seq = seq_lens.to(torch.int64)
    row = seq + drafts
    first = torch.cumsum(drafts * row, 0) - drafts * row + seq   # request's first draft column, row 0
    j = torch.arange(drafts, device=seq.device)
    index = first[:, None, None] + j[None, :, None] * row[:, None, None] + j[None, None, :]
    bits = custom_mask[index.clamp(max=custom_mask.numel() - 1)] & (index < custom_mask.numel())
    nbytes = -(-drafts * drafts // 8)
    bits = torch.nn.functional.pad(bits.reshape(len(seq), -1).to(torch.uint8), (0, nbytes * 8 - drafts * drafts))
    weights = 1 << torch.arange(8, device=seq.device)
    packed = (bits.view(len(seq), nbytes, 8) * weights).sum(-1).to(torch.uint8).reshape(-1)
    return {"tree_mask": packed, "tree_mask_indptr": torch.arange(len(seq) + 1, dtype=torch.int32) * nbytes}


def _check_runner(runner) -> tuple[torch.dtype, str]:
    """The KV pool must be SGLang's standard per-layer one; returns (dtype, our layout name)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # a heavy import: only once a backend is built
    pool = runner.token_to_kv_pool
    if type(pool) is not MHATokenToKVPool or pool.is_quantized_kv_cache or pool.kv_cache_layout not in _POOL_LAYOUTS:
        fail("token_to_kv_pool", "an unquantized MHATokenToKVPool in NHD or HND layout (dense MHA/GQA models, "
             "no hybrid SWA or linear-attention memory)", type(pool).__name__)
    if pool.dtype not in HALF_DTYPES:
        fail("kv cache dtype", "float16 or bfloat16 (fp8 KV is not supported)", pool.dtype)
    if runner.dtype != pool.dtype:
        fail("model dtype", f"the kv cache dtype {pool.dtype}", runner.dtype)
    check_page_size(runner.page_size)
    if getattr(runner.token_to_kv_pool_allocator, "translate_kv_loc", None) is not None:
        fail("token_to_kv_pool_allocator", "one whose req_to_token holds physical slots (not the unified pool)",
             type(runner.token_to_kv_pool_allocator).__name__)
    return pool.dtype, _POOL_LAYOUTS[pool.kv_cache_layout]


def _layers(model) -> dict[int, _Layer]:
    layers = {m.layer_id: _layer(m) for m in model.modules() if isinstance(m, RadixAttention)}
    if not layers:
        fail("model", "RadixAttention layers", "none")
    return layers


def _layer(m) -> _Layer:
    where = f"layer {m.layer_id}"
    if m.is_cross_attention or m.attn_type != AttentionType.DECODER:
        fail(f"{where} attention", "causal self-attention (AttentionType.DECODER)",
             "cross-attention" if m.is_cross_attention else m.attn_type)
    if (m.logit_cap or 0) > 0 and m.logit_capping_method != "tanh":
        fail(f"{where} logit_capping_method", "tanh", m.logit_capping_method)
    if m.xai_temperature_len > 0:
        fail(f"{where} xai_temperature_len", "-1 (off)", m.xai_temperature_len)
    check_head_dim(f"{where} head_dim", m.qk_head_dim)
    if m.v_head_dim != m.qk_head_dim:
        fail(f"{where} v_head_dim", f"the qk head dim {m.qk_head_dim}", m.v_head_dim)
    check_group(m.tp_q_head_num, m.tp_k_head_num)
    return _Layer(m.tp_q_head_num, m.tp_k_head_num, m.qk_head_dim, float(m.scaling), float(m.logit_cap or 0.0),
                  int(m.sliding_window_size))


def _check_server_args(args, layers) -> int | None:
    """Refuses settings whose batches the kernels cannot take; returns the draft tokens per request."""
    drafts = args.speculative_num_draft_tokens
    if drafts is not None and not 1 <= drafts <= verify.MAX_DRAFTS:
        fail("speculative_num_draft_tokens", f"1 to {verify.MAX_DRAFTS}", drafts)
    if (args.speculative_eagle_topk or 1) > 1 and any(layer.window >= 0 for layer in layers):
        # A draft tree's positions are depths, not row order, and the kernel's window follows row order.
        fail("speculative_eagle_topk", "1 (a draft chain) with sliding-window layers", args.speculative_eagle_topk)
    if args.chunked_prefill_size is None or not 0 < args.chunked_prefill_size <= prefill.MAX_QO_LEN:
        fail("chunked_prefill_size", f"1 to {prefill.MAX_QO_LEN} new tokens per request and step",
             args.chunked_prefill_size)
    if args.dcp_size > 1:
        fail("dcp_size", "1 (decode context parallelism shards the KV cache)", args.dcp_size)
    if args.dllm_algorithm is not None:
        fail("dllm_algorithm", "None (diffusion LLM blocks attend both ways; the kernels are causal)",
             args.dllm_algorithm)
    return drafts
