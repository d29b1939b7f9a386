"""The vLLM adapter inside vLLM 0.26.0's own classes (nox session `vllm`; skipped where vLLM is absent).

Without a GPU the attention layers run on CPU tensors: vLLM's Attention layer, forward context and custom
ops call our builder and impl, which run pagedinfer's PyTorch reference; the result is compared with plain
per-request softmax attention over the same cache contents.
"""
import math

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.config import (CacheConfig, DeviceConfig, ModelConfig, ParallelConfig,  # noqa: E402
                         SpeculativeConfig, VllmConfig, set_current_vllm_config)
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.model_executor.layers.attention import Attention  # noqa: E402
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

from pagedinfer.adapters import vllm as adapter  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE, LAYERS, SPEC = 9, 3, 64, 16, 2, 3
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A vLLM config for a SmolLM2-shaped model with n-gram speculation (3 tokens), and its attention layers
    built with our backend the way vLLM's model code builds them."""
    from transformers import LlamaConfig
    folder = tmp_path_factory.mktemp("model")
    LlamaConfig(hidden_size=Q_HEADS * HEAD_DIM, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
                head_dim=HEAD_DIM, num_hidden_layers=LAYERS, intermediate_size=64, vocab_size=128,
                max_position_embeddings=512, torch_dtype="bfloat16").save_pretrained(folder)
    model = ModelConfig(model=str(folder), dtype="bfloat16", skip_tokenizer_init=True, max_model_len=512)
    parallel = ParallelConfig()
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=SPEC, prompt_lookup_min=1, prompt_lookup_max=3,
                             target_model_config=model, target_parallel_config=parallel)
    config = VllmConfig(model_config=model, cache_config=CacheConfig(block_size=PAGE), parallel_config=parallel,
                        device_config=DeviceConfig(device="cpu"), speculative_config=spec)
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    backend = AttentionBackendEnum.CUSTOM.get_class()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # vLLM builds layers under the model dtype
    try:
        with set_current_vllm_config(config):
            layers = [Attention(Q_HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, cache_config=config.cache_config,
                                prefix=name, attn_backend=backend) for name in NAMES]
    finally:
        torch.set_default_dtype(default)
    return config, backend, layers


def test_plugin_fills_the_custom_slot(engine):
    _, backend, layers = engine
    assert backend is adapter.PagedInferBackend
    assert backend.get_name() == "CUSTOM"
    assert layers[0].backend is AttentionBackendEnum.CUSTOM
    adapter.register()  # idempotent
    assert AttentionBackendEnum.CUSTOM.get_path() == adapter.BACKEND_PATH


def _reasons(**overrides):
    args = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False,
                has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
                device_capability=DeviceCapability(9, 0), attn_type=AttentionType.DECODER)
    args.update(overrides)
    return adapter.PagedInferBackend.validate_configuration(**args)


@pytest.mark.parametrize("overrides", [{}, {"head_size": 64}, {"head_size": 80}, {"head_size": 256},
                                       {"dtype": torch.float16}, {"kv_cache_dtype": "bfloat16"},
                                       {"block_size": 1}, {"block_size": 256}, {"block_size": None},
                                       {"block_size": 24},  # vLLM splits it into kernel blocks of 8
                                       {"has_sliding_window": True}, {"device_capability": DeviceCapability(8, 0)}])
def test_validation_accepts_what_the_kernels_run(overrides):
    assert _reasons(**overrides) == []


@pytest.mark.parametrize("overrides,reason", [
    ({"head_size": 72}, "head_size"), ({"dtype": torch.float32}, "dtype"), ({"kv_cache_dtype": "fp8"}, "kv_cache"),
    ({"use_mla": True}, "MLA"), ({"has_sink": True}, "sinks"),
    ({"attn_type": AttentionType.ENCODER_ONLY}, "attention type"), ({"use_non_causal": True}, "non-causal"),
    ({"device_capability": DeviceCapability(7, 5)}, "compute capability")])
def test_validation_names_what_it_cannot_do(overrides, reason):
    reasons = _reasons(**overrides)
    assert reasons and any(reason in r for r in reasons), reasons


@pytest.mark.parametrize("kwargs,word", [({"alibi_slopes": [1.0] * 8}, "ALiBi"), ({"head_size": 72}, "head_size 72"),
                                         ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
                                         ({"num_kv_heads": 3}, "whole group"), ({"num_kv_heads": 1, "num_heads": 32},
                                                                                "whole group")])
def test_impl_refuses_layers_it_cannot_run(kwargs, word):
    args = dict(num_heads=8, head_size=128, scale=0.1, num_kv_heads=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        adapter.PagedInferImpl(**args)


def _kv_cache(backend, num_blocks: int, device) -> torch.Tensor:
    """Allocated as vLLM's worker does: physical order from the stride order, logical view handed out."""
    shape = backend.get_kv_cache_shape(num_blocks, PAGE, KV_HEADS, HEAD_DIM)
    order = backend.get_kv_cache_stride_order()
    physical = torch.randn([shape[i] for i in order], dtype=torch.bfloat16, device=device)
    return physical.permute(*[order.index(i) for i in range(len(order))])


def _expected(q, k_all, v_all, qo_len: int):
    """Plain causal GQA softmax attention: the queries are the last qo_len of the keys."""
    kv_len = k_all.shape[0]
    group = Q_HEADS // KV_HEADS
    k = k_all.float().repeat_interleave(group, dim=1)
    v = v_all.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) / math.sqrt(HEAD_DIM)
    pos = torch.arange(kv_len - qo_len, kv_len)[:, None]
    scores = scores.masked_fill(torch.arange(kv_len)[None, :] > pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


# (query tokens, kv length) per request, ordered as vLLM orders them: decodes and verifies (<= 1 + SPEC
# tokens) first, then chunked prefill with a cached prefix, then a fresh prompt.
MIXED = [(1, 37), (1, 16), (4, 50), (2, 2), (20, 70), (33, 33)]
BLOCKS_PER_REQ = 8
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class Batch:
    """A step's inputs as vLLM's model runner prepares them, with full-graph padding: `pad_reqs` requests
    without query tokens and `pad_tokens` rows with slot -1."""

    def __init__(self, requests, device, gen, num_blocks, pad_reqs=1, pad_tokens=3):
        qo_lens = [n for n, _ in requests] + [0] * pad_reqs
        seq_lens = [kv for _, kv in requests] + [0] * pad_reqs
        self.requests, self.tokens = requests, sum(qo_lens)
        self.starts = torch.tensor([0] + qo_lens).cumsum(0).to(torch.int32)
        ids = torch.randperm(num_blocks, generator=gen)[: len(qo_lens) * BLOCKS_PER_REQ]
        self.block_table = ids.view(-1, BLOCKS_PER_REQ).to(torch.int32)
        slots = []
        for r, (n, kv) in enumerate(requests):
            pos = torch.arange(kv - n, kv)
            slots.append(self.block_table[r, pos // PAGE].long() * PAGE + pos % PAGE)
        self.slot_mapping = torch.cat(slots + [torch.full((pad_tokens,), -1)]).to(device)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.meta = CommonAttentionMetadata(
            query_start_loc=self.starts.to(device), query_start_loc_cpu=self.starts, seq_lens=lens.to(device),
            num_reqs=len(qo_lens), num_actual_tokens=self.tokens + pad_tokens, max_query_len=max(qo_lens),
            max_seq_len=max(seq_lens), block_table_tensor=self.block_table.to(device), slot_mapping=self.slot_mapping,
            seq_lens_cpu_upper_bound=lens)
        rows = self.tokens + pad_tokens
        self.qkv = [torch.randn(rows, heads * HEAD_DIM, generator=gen).bfloat16().to(device)
                    for heads in (Q_HEADS, KV_HEADS, KV_HEADS)]

    def check(self, cache, out):
        """The new K/V landed in their slots and each request's output is causal attention over its keys."""
        q, k, v = self.qkv
        view = cache.transpose(1, 2).cpu()  # [blocks, block_size, heads, 2 * head_dim]
        for r, (n, kv) in enumerate(self.requests):
            ids = self.block_table[r, : -(-kv // PAGE)].long()
            stored = view[ids].reshape(-1, KV_HEADS, 2 * HEAD_DIM)[:kv]
            rows = slice(int(self.starts[r]), int(self.starts[r + 1]))
            assert torch.equal(stored[kv - n:, :, :HEAD_DIM], k[rows].cpu().view(n, KV_HEADS, HEAD_DIM))
            assert torch.equal(stored[kv - n:, :, HEAD_DIM:], v[rows].cpu().view(n, KV_HEADS, HEAD_DIM))
            want = _expected(q[rows].cpu().view(n, Q_HEADS, HEAD_DIM), stored[..., :HEAD_DIM],
                             stored[..., HEAD_DIM:], n)
            got = out[rows].cpu().view(n, Q_HEADS, HEAD_DIM).float()
            assert (got - want).abs().max() < 2e-2 * want.abs().max(), f"request {r}"


def _builder(config, backend, device):
    return backend.get_builder_cls()(_spec(config), NAMES, config, torch.device(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_mixed_batch_through_vllm_layers_matches_attention(engine, layout, device, monkeypatch):
    config, backend, layers = engine
    monkeypatch.setattr(adapter, "get_kv_cache_layout", lambda: layout)
    gen = torch.Generator().manual_seed(7)
    num_blocks = (len(MIXED) + 1) * BLOCKS_PER_REQ + 3
    batch = Batch(MIXED, device, gen, num_blocks)
    builder = _builder(config, backend, device)
    assert builder.reorder_batch_threshold == 1 + SPEC
    metadata = builder.build(0, batch.meta)
    assert [(p.start, p.stop) for p in metadata.parts] == [(0, 8), (8, batch.tokens)]  # decodes | prefills

    for layer in layers:
        cache = layer.kv_cache = _kv_cache(backend, num_blocks, device)
        before = cache.clone()
        with set_forward_context({name: metadata for name in NAMES}, config,
                                 slot_mapping={name: batch.slot_mapping for name in NAMES}):
            out = layer(*batch.qkv)
        batch.check(cache, out)
        untouched = torch.ones(num_blocks, dtype=torch.bool)
        untouched[batch.block_table[: len(MIXED)].reshape(-1).long()] = False
        assert torch.equal(cache[untouched.to(device)], before[untouched.to(device)])  # slot -1 writes nothing


@pytest.mark.gpu
def test_uniform_decode_replays_in_a_cuda_graph_after_a_new_plan(engine):
    """vLLM's full-graph decode: capture one layer's forward on one batch, plan the next step's batch (other
    lengths, pages and size, padded), refill the static inputs, replay."""
    config, backend, layers = engine
    layer, num_blocks = layers[0], 64
    gen = torch.Generator().manual_seed(3)
    builder = _builder(config, backend, "cuda")
    builder.graph_batch = 8  # what vLLM's capture sizes give when full CUDA graphs are on
    first = Batch([(1 + SPEC, 40 + 9 * i) for i in range(6)], "cuda", gen, num_blocks, pad_reqs=2)
    with set_current_vllm_config(config):  # the KV-cache layout is read from it
        layer.kv_cache = cache = _kv_cache(backend, num_blocks, "cuda")
    contexts = lambda batch, metadata: set_forward_context(  # noqa: E731
        {name: metadata for name in NAMES}, config, slot_mapping={name: batch.slot_mapping for name in NAMES})
    metadata = builder.build(0, first.meta)
    assert list(builder._wrappers) == ["graph"] and len(metadata.parts) == 1
    static, slots = first.qkv, first.slot_mapping  # the graph's input buffers
    with set_current_vllm_config(config), contexts(first, metadata):  # capture consults the config
        layer(*static)  # warm-up compiles the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(*static)
    second = Batch([(1 + SPEC, 120 - 7 * i) for i in range(4)], "cuda", gen, num_blocks, pad_reqs=4,
                   pad_tokens=first.tokens + 3 - 4 * (1 + SPEC))
    builder.build(0, second.meta)
    for s, t in zip(static, second.qkv):
        s.copy_(t)
    slots.copy_(second.slot_mapping)
    second.slot_mapping = slots
    graph.replay()
    torch.cuda.synchronize()
    second.check(cache, out)


def _spec(config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    return FullAttentionSpec(block_size=PAGE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.bfloat16)


def test_profiling_run_without_metadata_gives_zeros(engine):
    _, _, layers = engine
    out = torch.ones(4, Q_HEADS, HEAD_DIM)
    layers[0].impl.forward(layers[0], out, None, None, torch.empty(0), None, out)
    assert not out.any()


def test_padding_only_batch_plans_nothing(engine):
    config, backend, _ = engine
    zeros = torch.zeros(3, dtype=torch.int32)
    meta = CommonAttentionMetadata(query_start_loc=zeros, query_start_loc_cpu=zeros, seq_lens=zeros[:2],
                                   num_reqs=2, num_actual_tokens=0, max_query_len=0, max_seq_len=0,
                                   block_table_tensor=torch.zeros(2, 4, dtype=torch.int32),
                                   slot_mapping=torch.zeros(0, dtype=torch.int64))
    builder = backend.get_builder_cls()(_spec(config), NAMES, config, torch.device("cpu"))
    assert builder.build(0, meta).parts == []


def test_batch_not_ordered_decodes_first_goes_to_the_prefill_kernel(engine):
    config, backend, _ = engine
    batch = Batch([(20, 70), (1, 37)], "cpu", torch.Generator().manual_seed(5), 40, pad_reqs=0, pad_tokens=0)
    assert [(p.start, p.stop) for p in _builder(config, backend, "cpu").build(0, batch.meta).parts] == [(0, 21)]
