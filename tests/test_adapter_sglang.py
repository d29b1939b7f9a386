"""The SGLang 0.5.16 adapter in SGLang's own environment (nox session `sglang`; skipped where SGLang is absent).

SGLang's plugin loader registers the backend and its CLI parser accepts it. The backend then runs extend with a
cached prefix, DRAFT_EXTEND_V2, decode and tree verification on SGLang's real MHATokenToKVPool and
ReqToTokenPool, called the way SGLang calls it (RadixAttention.forward inside a ForwardContext, on ForwardBatch
objects filled like SGLang's graph runners fill them), and matches attention computed directly with
pagedinfer.reference from the K/V the test wrote. On CPU tensors that exercises the adapter over pagedinfer's
reference path; the `gpu` variants run the kernels, and a decode CUDA graph captured and replayed the way
SGLang's decode graph runner does it.

SGLang's ModelRunner needs a GPU and a loaded model, so the backend gets a stand-in runner with just the
attributes a backend reads: the real pools, a module of real RadixAttention layers, the page size, dtype and
device, and a real ServerArgs holding its field defaults (its __post_init__ would load a model config).
"""
import argparse
import dataclasses
import types

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode  # noqa: E402
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context  # noqa: E402
from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, ServerArgs  # noqa: E402
from sglang.srt.speculative.eagle_info import EagleVerifyInput  # noqa: E402

from pagedinfer import reference  # noqa: E402
from pagedinfer.adapters import sglang as adapter  # noqa: E402

DTYPE = torch.bfloat16
Q_HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module", autouse=True)
def plugins_loaded():
    """SGLang's own loader finds our entry point and runs it (as in every SGLang process)."""
    from sglang.srt import plugins
    mp = pytest.MonkeyPatch()
    mp.setattr(plugins, "_plugins_loaded", False)
    mp.delenv("SGLANG_PLUGINS", raising=False)
    plugins.load_plugins()
    yield
    mp.undo()


def test_loader_registers_backend_once():
    adapter.register()  # a second call (SGLang's loader made the first) changes nothing
    assert ATTENTION_BACKEND_CHOICES.count("pagedinfer") == 1
    assert ATTENTION_BACKENDS["pagedinfer"] is adapter.PagedInferAttnBackend


def test_cli_parser_accepts_backend():
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    flags = ["--attention-backend", "--decode-attention-backend", "--prefill-attention-backend"]
    args = parser.parse_args(["--model-path", "m"] + [arg for flag in flags for arg in (flag, "pagedinfer")])
    assert {args.attention_backend, args.decode_attention_backend, args.prefill_attention_backend} == {"pagedinfer"}


def server_args(**values) -> ServerArgs:
    """A ServerArgs with its declared defaults (None where it has none, e.g. model_path) and `values`."""
    args = object.__new__(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        default = factory() if factory else None if f.default is dataclasses.MISSING else f.default
        setattr(args, f.name, values.pop(f.name, default))
    assert not values, values
    return args


class Engine:
    """SGLang's memory state for a few requests, and the backend built from it through SGLang's registry.

    Pages are handed out as SGLang's paged allocator does (whole pages in any order, page 0 reserved for
    padding; token t of a request sits at slot page * page_size + t % page_size), and `kv` keeps the K/V
    every layer stored per request, to compute the expected attention directly."""

    def __init__(self, page_size, layers, *, device="cpu", num_pages=48, dtype=DTYPE, head_dim=HEAD_DIM,
                 kv_heads=KV_HEADS, **args):
        self.page_size, self.layers, self.device = page_size, torch.nn.ModuleList(layers), device
        self.pool = MHATokenToKVPool(size=num_pages * page_size, page_size=page_size, dtype=dtype,
                                     head_num=kv_heads, head_dim=head_dim, layer_num=len(layers), device=device,
                                     enable_memory_saver=False, enable_alt_stream=False)
        self.req_pool = ReqToTokenPool(size=4, max_context_len=96, device=device, enable_memory_saver=False)
        self.free_pages = torch.randperm(num_pages).add(1).tolist()
        self.slots = {}  # req_to_token row -> the request's slots
        self.kv = {}     # (layer id, row) -> (k, v) of every token of the request
        runner = types.SimpleNamespace(
            token_to_kv_pool=self.pool, req_to_token_pool=self.req_pool, token_to_kv_pool_allocator=None,
            page_size=page_size, device=device, dtype=DTYPE, model=self.layers,
            server_args=server_args(**{"chunked_prefill_size": 8192, **args}))
        self.backend = ATTENTION_BACKENDS["pagedinfer"](runner)

    def tensor(self, values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=self.device)

    def randn(self, *shape):
        return torch.randn(*shape, dtype=DTYPE, device=self.device)

    def allocate(self, row, n):
        slots = self.slots.setdefault(row, [])
        for _ in range(n):
            t = len(slots)
            page = self.free_pages.pop() if t % self.page_size == 0 else slots[-1] // self.page_size
            slots.append(page * self.page_size + t % self.page_size)
        self.req_pool.write((row, slice(0, len(slots))), self.tensor(slots, torch.int32))
        return slots[-n:]

    def record(self, layer, row, k, v):
        old = self.kv.get((layer.layer_id, row), (k[:0], v[:0]))
        self.kv[layer.layer_id, row] = (torch.cat([old[0], k]), torch.cat([old[1], v]))

    def store(self, layer, row, slots, k, v):
        """K/V written the way a previous forward (or a model's fused RoPE + KV store) leaves them. (Never
        with no tokens: SGLang does not, and its CUDA store kernel refuses an empty launch.)"""
        if slots:
            self.pool.set_kv_buffer(layer, self.tensor(slots), k, v)
        self.record(layer, row, k, v)

    def history(self, rows, lens):
        """Requests that already hold `lens` tokens of K/V in every layer."""
        for row, n in zip(rows, lens):
            slots = self.allocate(row, n)
            for layer in self.layers:
                self.store(layer, row, slots, self.randn(n, KV_HEADS, HEAD_DIM), self.randn(n, KV_HEADS, HEAD_DIM))

    def forward(self, fb, qkv, save_kv_cache=True):
        with forward_context(ForwardContext(attn_backend=self.backend)):
            return [(layer, qkv[i][0], layer(*qkv[i], fb, save_kv_cache=save_kv_cache))
                    for i, layer in enumerate(self.layers)]

    def run(self, fb, rows, qo_lens, save_kv_cache=True):
        """Every layer's forward through RadixAttention, as SGLang's models call it; returns the outputs."""
        self.backend.init_forward_metadata(fb)
        n = sum(qo_lens)
        qkv = []
        for layer in self.layers:
            q, k, v = (self.randn(n, heads * HEAD_DIM) for heads in (Q_HEADS, KV_HEADS, KV_HEADS))
            self.record_rows(layer, rows, qo_lens, k, v, None if save_kv_cache else fb.out_cache_loc)
            if not save_kv_cache:  # what the layer hands over then must not reach the pool
                k, v = torch.zeros_like(k), torch.zeros_like(v)
            qkv.append((q, k, v))
        return self.forward(fb, qkv, save_kv_cache)

    def record_rows(self, layer, rows, qo_lens, k, v, store_at=None):
        """Records the new K/V of each request (rows of k, v in batch order); stores them too at `store_at`."""
        at = 0
        for row, m in zip(rows, qo_lens):
            kr, vr = (t[at:at + m].view(m, KV_HEADS, HEAD_DIM) for t in (k, v))
            if store_at is None:
                self.record(layer, row, kr, vr)
            else:
                self.store(layer, row, store_at[at:at + m].tolist(), kr, vr)
            at += m

    def check(self, outs, rows, qo_lens, masks):
        """Each output against reference.attention on the K/V the test recorded, and the pool against them."""
        for layer, q, out in outs:
            assert out.shape == q.shape and out.dtype == DTYPE
            q3 = q.view(-1, Q_HEADS, HEAD_DIM)
            at = 0
            for row, m, mask in zip(rows, qo_lens, masks):
                k, v = self.kv[layer.layer_id, row]
                visible = (mask & window_mask(m, k.shape[0], layer.sliding_window_size)).to(self.device)
                want, _ = reference.attention(q3[at:at + m], k, v, visible, sm_scale=layer.scaling,
                                              logits_soft_cap=layer.logit_cap)
                torch.testing.assert_close(out[at:at + m].view(want.shape), want, atol=2e-2, rtol=2e-2)
                slots = self.tensor(self.slots[row][:k.shape[0]])
                pool_k, pool_v = self.pool.get_kv_buffer(layer.layer_id)
                assert torch.equal(pool_k[slots], k) and torch.equal(pool_v[slots], v)
                at += m


def window_mask(qo_len, kv_len, window):
    positions = torch.arange(kv_len - qo_len, kv_len)[:, None]
    keys = torch.arange(kv_len)[None, :]
    return keys >= positions - window if window >= 0 else torch.ones(qo_len, kv_len, dtype=torch.bool)


def causal(qo_len, kv_len):
    return torch.ones(qo_len, kv_len, dtype=torch.bool).tril(kv_len - qo_len)


def attention_layers(window=-1):
    """Two layer configurations, so the backend plans twice per batch: plain, and scaled + soft cap (+ window)."""
    return [RadixAttention(Q_HEADS, HEAD_DIM, HEAD_DIM ** -0.5, KV_HEADS, layer_id=0),
            RadixAttention(Q_HEADS, HEAD_DIM, 0.2, KV_HEADS, layer_id=1, logit_cap=20.0, sliding_window_size=window)]


def forward_batch(engine, mode, rows, seq_lens, out_cache_loc, *, prefix=None, new=None, spec_info=None):
    seq = engine.tensor(seq_lens)
    fields = dict(forward_mode=mode, batch_size=len(rows), input_ids=engine.tensor([0] * len(out_cache_loc)),
                  req_pool_indices=engine.tensor(rows), seq_lens=seq, out_cache_loc=engine.tensor(out_cache_loc),
                  seq_lens_sum=sum(seq_lens), seq_lens_cpu=seq.cpu(), spec_info=spec_info)
    if new is not None:
        fields.update(extend_num_tokens=sum(new), extend_seq_lens=engine.tensor(new, torch.int32),
                      extend_prefix_lens=engine.tensor(prefix, torch.int32),
                      extend_start_loc=engine.tensor([0] + new[:-1]).cumsum(0),
                      extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=new)
    return ForwardBatch(**fields)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size,mode", [(1, ForwardMode.EXTEND), (4, ForwardMode.EXTEND),
                                            (4, ForwardMode.DRAFT_EXTEND_V2)], ids=["p1", "p4", "p4-draft"])
def test_extend_with_prefix_then_decode(page_size, mode, device):
    torch.manual_seed(page_size)
    engine = Engine(page_size, attention_layers(window=6), device=device)
    rows, prefix, new = [1, 2, 3], [0, 5, 11], [3, 1, 9]   # prefixes cut pages; one request starts fresh
    engine.history(rows, prefix)
    loc = [s for row, n in zip(rows, new) for s in engine.allocate(row, n)]
    lens = [p + n for p, n in zip(prefix, new)]
    fb = forward_batch(engine, mode, rows, lens, loc, prefix=prefix, new=new)
    engine.check(engine.run(fb, rows, new), rows, new, [causal(n, p + n) for p, n in zip(prefix, new)])

    # Decode: one token each; SGLang has already written its slot into req_to_token and counted it.
    loc = [engine.allocate(row, 1)[0] for row in rows]
    lens = [n + 1 for n in lens]
    fb = forward_batch(engine, ForwardMode.DECODE, rows, lens, loc)
    outs = engine.run(fb, rows, [1] * 3, save_kv_cache=False)  # K/V already stored, as with fused RoPE + store
    engine.check(outs, rows, [1] * 3, [torch.ones(1, n, dtype=torch.bool) for n in lens])


def draft_tree(parents):
    """[d, d] bool: draft j sees itself and its ancestors."""
    d = len(parents)
    tree = torch.eye(d, dtype=torch.bool)
    for j, parent in enumerate(parents):
        if parent >= 0:
            tree[j] |= tree[parent]
    return tree


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 4])
def test_target_verify_with_tree_mask(page_size, device):
    torch.manual_seed(10 + page_size)
    drafts = 5
    engine = Engine(page_size, attention_layers(), device=device, speculative_num_draft_tokens=drafts,
                    speculative_eagle_topk=2)
    rows, committed = [1, 3], [7, 12]
    trees = [draft_tree([-1, 0, 0, 1, 2]), draft_tree([-1, 0, 1, 1, 3])]
    engine.history(rows, committed)
    loc = [s for row in rows for s in engine.allocate(row, drafts)]
    # SGLang's FULL_MASK verify mask: per request [drafts, seq_len + drafts] row-major, requests back to back.
    masks = [torch.cat([torch.ones(drafts, n, dtype=torch.bool), tree], 1) for n, tree in zip(committed, trees)]
    seq = torch.tensor(committed)
    spec = EagleVerifyInput(draft_token=engine.tensor([0] * len(loc)),
                            custom_mask=torch.cat([m.reshape(-1) for m in masks]).to(device), positions=None,
                            retrieve_index=None, retrieve_next_token=None, retrieve_next_sibling=None,
                            retrieve_cum_len=None, spec_steps=3, topk=2, draft_token_num=drafts,
                            capture_hidden_mode=CaptureHiddenMode.FULL, seq_lens_sum=int(seq.sum()), seq_lens_cpu=seq)
    fb = forward_batch(engine, ForwardMode.TARGET_VERIFY, rows, committed, loc, spec_info=spec)
    engine.check(engine.run(fb, rows, [drafts] * 2), rows, [drafts] * 2, masks)


@pytest.mark.gpu
def test_decode_cuda_graph_captured_then_replayed_on_new_batches():
    """SGLang's decode graph runner: init_cuda_graph_state; per captured size, out_graph(in_capture=True) on a
    batch padded with req_to_token row 0 and seq_len = the fill value, a warm-up forward, the capture; per step,
    the new inputs copied into the static tensors, out_graph on the replay view, and the replay."""
    torch.manual_seed(0)
    engine = Engine(16, attention_layers(window=6), device="cuda")
    rows, bs = [1, 2, 3], 4
    engine.history(rows, [20, 3, 40])
    backend = engine.backend
    backend.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
    fill = backend.get_cuda_graph_seq_len_fill_value()
    static_rows, seq_lens = engine.tensor(rows + [0]), engine.tensor([fill] * bs)
    loc = engine.tensor([0] * bs)
    qkv = [tuple(engine.randn(bs, heads * HEAD_DIM) for heads in (Q_HEADS, KV_HEADS, KV_HEADS)) for _ in engine.layers]

    def next_step():
        """The next token of every request into the static tensors; the replay view SGLang builds."""
        loc[:len(rows)] = engine.tensor([engine.allocate(row, 1)[0] for row in rows])
        seq_lens[:len(rows)] = engine.tensor([len(engine.slots[row]) for row in rows])
        for layer, (q, k, v) in zip(engine.layers, qkv):
            for t in (q, k, v):
                t.normal_()
            engine.record_rows(layer, rows, [1] * len(rows), k, v)
        return types.SimpleNamespace(batch_size=bs, forward_mode=ForwardMode.DECODE, req_pool_indices=static_rows,
                                     seq_lens=seq_lens, seq_lens_cpu=seq_lens.cpu(), spec_info=None)

    def check(outs):
        lens = [len(engine.slots[row]) for row in rows]
        engine.check(outs, rows, [1] * len(rows), [torch.ones(1, n, dtype=torch.bool) for n in lens])

    next_step()
    fb = ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=engine.tensor([0] * bs),
                      req_pool_indices=static_rows, seq_lens=seq_lens, out_cache_loc=loc,
                      seq_lens_sum=int(seq_lens.sum()), seq_lens_cpu=seq_lens.cpu())
    backend.init_forward_metadata_out_graph(fb, in_capture=True)
    check(engine.forward(fb, qkv))  # the warm-up run is a plain run of the plan
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = engine.forward(fb, qkv)
    for _ in range(3):
        backend.init_forward_metadata_out_graph(next_step())
        graph.replay()
        check(outs)


@pytest.mark.parametrize("change,match", [
    (dict(head_dim=72), "head_dim"),
    (dict(q_heads=64, kv_heads=2), "group"),
    (dict(dtype=torch.float8_e4m3fn), "kv cache dtype"),
    (dict(page_size=3), "page_size"),
    (dict(speculative_num_draft_tokens=17), "speculative_num_draft_tokens"),
    (dict(speculative_eagle_topk=4, window=8), "speculative_eagle_topk"),
    (dict(chunked_prefill_size=-1), "chunked_prefill_size"),
])
def test_unsupported_configurations_fail_at_construction(change, match):
    shape = dict(head_dim=HEAD_DIM, q_heads=Q_HEADS, kv_heads=KV_HEADS)
    shape.update((key, change.pop(key)) for key in list(change) if key in shape)
    layer = RadixAttention(shape["q_heads"], shape["head_dim"], 0.1, shape["kv_heads"], layer_id=0,
                           sliding_window_size=change.pop("window", -1))
    with pytest.raises(ValueError, match=match):
        Engine(change.pop("page_size", 4), [layer], head_dim=shape["head_dim"], kv_heads=shape["kv_heads"], **change)
