"""`pagedinfer bench`: the kernel benchmarks (decode, prefill, verify) on this GPU against FlashInfer when it is
installed, else against torch SDPA on contiguous K/V, in the same process on the same random paged caches.
Prints a table per op and writes <op>.json (the benchmarks/results format) and <op>.png to --out.
benchmarks/bench_*.py run the same code."""
from __future__ import annotations

import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from .bench_cases import (OPS, PAGE, PRESETS, TABLES, TORCH_ANCHOR, compile_record, decode_records, load_model_config,
                          model_cases, plot_title, plotted, prefill_records, summary, verify_records)

# ---------------------------------------------------------------------------------------------- timing

def median_us(fn, *, warmup_ms=25, rep_ms=200) -> float:
    """Median of many calls, L2 flushed between them (triton's do_bench)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def graph_us(fn, calls: int = 20) -> float:
    """Per-call time of `calls` launches captured in one CUDA graph and replayed (how engines run decode)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_us(graph.replay) / calls


def read_ceiling_gbps() -> float:
    """A streaming read of 2 GiB (fp32 sum), measured in the same run as the kernels."""
    x = torch.empty(2 * 2**30 // 4, dtype=torch.float32, device="cuda").normal_()
    t = median_us(x.sum)
    del x
    return 2 * 2**30 / (t * 1e-6) / 1e9


# ---------------------------------------------------------------------------------------------- environment

def missing_requirements() -> str | None:
    """Why this machine cannot run the benchmarks, or None."""
    import importlib.util
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU visible to torch (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"needs compute capability 8.0 or newer, this GPU has {major}.{minor}"
    if importlib.util.find_spec("cupy") is None:
        return "needs CuPy: pip install 'pagedinfer[cu13]' (or [cu12])"
    if importlib.util.find_spec("triton") is None:
        return "needs triton (its do_bench times the kernels; torch's CUDA wheels bring it)"
    return None


def flashinfer_installed() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "pagedinfer_git": os.environ.get("PAGEDINFER_GIT_SHA", "unknown")}
    for name in ("cupy", "flashinfer", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    import pagedinfer
    out["pagedinfer"] = pagedinfer.__version__
    return out


# ---------------------------------------------------------------------------------------------- results

def write_results(out_dir: str, name: str, records: list[dict], extra: dict | None = None) -> str:
    """<out_dir>/<name>.json in the benchmarks/results format; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    doc = {"card": torch.cuda.get_device_name(), "versions": versions(),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           **(extra or {}), "records": records}
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def plot_speedups(out_dir: str, name: str, records: list[dict], title: str) -> str | None:
    """One bar per record: anchor time / pagedinfer time (above 1 is faster than the anchor). Returns the PNG's
    path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    values = [r["speedup"] for r in records]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(records)), 4))
    ax.bar(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(values)), [r["label"] for r in records], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("speedup over anchor (x)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(out_dir: str, name: str, op: str, records: list[dict], extra: dict | None = None) -> bool:
    """Writes <name>.json and <op>.png and prints the summary line and the op's table; False when matplotlib
    is missing (no PNG)."""
    path = write_results(out_dir, name, records, extra)
    png = plot_speedups(out_dir, op, plotted(records), plot_title(op, records, torch.cuda.get_device_name()))
    results = f"results {path}" + (f" and {png}" if png else "")
    print("\n" + "; ".join(part for part in (summary(records), results) if part))
    print(TABLES[op](records))
    return png is not None


# ---------------------------------------------------------------------------------------------- cases

def make_inputs(heads, batch: int, kv_len: int):
    """A bf16 NHD cache holding kv_len tokens per request on randomly permuted pages, and its CSR page table
    (indptr, page ids, last page lengths), all on the GPU."""
    _, kv_heads, head_dim = heads
    pages_per = math.ceil(kv_len / PAGE)
    n = batch * pages_per
    kv = torch.randn(n, 2, PAGE, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    ids = torch.randperm(n, device="cuda").int()
    indptr = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * pages_per
    last = torch.full((batch,), kv_len - (pages_per - 1) * PAGE, dtype=torch.int32, device="cuda")
    return kv, ids, indptr, last


def sdpa_call(q, kv, ids, batch: int, kv_len: int, *, causal: bool = False, mask=None):
    """The torch anchor: SDPA over K/V gathered once (outside the timing) from the paged cache into contiguous
    [batch, kv heads, kv_len, dim]; queries sit at the end of the keys (causal is bottom-right aligned).
    Returns the call to time and a function turning its output into q's [tokens, heads, dim] rows."""
    q_heads, kv_heads, head_dim = q.shape[1], kv.shape[3], kv.shape[4]
    qo_len = q.shape[0] // batch
    pages = ids.view(batch, -1).long()
    k, v = (kv[pages, i].reshape(batch, -1, kv_heads, head_dim)[:, :kv_len].transpose(1, 2).contiguous()
            for i in (0, 1))
    qs = q.view(batch, qo_len, q_heads, head_dim).transpose(1, 2)
    if causal and qo_len < kv_len:  # SDPA's is_causal is top-left aligned
        mask, causal = torch.ones(qo_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - qo_len), False

    def call():
        return F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    return call, lambda o: o.transpose(1, 2).reshape(-1, q_heads, head_dim)


def _timed_run(wrapper, q, kv):
    """(output, median us) of a planned wrapper's run (ours and FlashInfer's take the same arguments)."""
    out = torch.empty_like(q)
    wrapper.run(q, kv, out=out)
    return out, median_us(lambda: wrapper.run(q, kv, out=out))


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _each_case(case, cases, *args) -> list[dict]:
    records = []
    for heads, sizes in cases:
        for size in sizes:
            records += case(heads, *size, *args)
            torch.cuda.empty_cache()  # the case's tensors are gone: hand their memory back before the next
    return records


def _workspace(anchor):
    return torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda") if anchor == "flashinfer" else None


# ---------------------------------------------------------------------------------------------- decode

def _decode_flashinfer(heads, kv, ids, indptr, last, q, workspace):
    """Best of FlashInfer's CUDA-core and tensor-core decode: ({"eager"|"graph": (name, us)}, an output)."""
    import flashinfer
    q_heads, kv_heads, head_dim = heads
    best, out = {}, None
    for tc in (False, True):
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=tc, use_cuda_graph=True, paged_kv_indptr_buffer=indptr.clone(),
            paged_kv_indices_buffer=ids.clone(), paged_kv_last_page_len_buffer=last.clone())
        w.plan(indptr, ids, last, q_heads, kv_heads, head_dim, PAGE, q_data_type=torch.bfloat16,
               kv_data_type=torch.bfloat16)
        o, eager = _timed_run(w, q, kv)
        name = "flashinfer-tensor-core" if tc else "flashinfer-cuda-core"
        for kind, t in (("eager", eager), ("graph", graph_us(lambda: w.run(q, kv, out=o)))):
            if kind not in best or t < best[kind][1]:
                best[kind] = (name, t)
        out = o if out is None else out
    return best, out


def _decode_case(heads, batch, kv_len, anchor, ceiling, workspace) -> list[dict]:
    from .decode import DecodeWrapper
    from .paged import csr_page_table
    q_heads, kv_heads, head_dim = heads
    kv, ids, indptr, last = make_inputs(heads, batch, kv_len)
    q = torch.randn(batch, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    wrapper = DecodeWrapper("cuda", use_cuda_graph=True, max_batch_size=batch, max_pages=ids.numel())
    table = csr_page_table(indptr, ids, last, PAGE)
    wrapper.plan(table, q_heads, kv_heads, head_dim, kv_lens_host=table.kv_lens().cpu(), indptr_host=indptr.cpu())
    out, eager = _timed_run(wrapper, q, kv)
    ours = {"eager": eager, "graph": graph_us(lambda: wrapper.run(q, kv, out=out))}
    theirs, ref = None, None
    if anchor == "flashinfer":
        theirs, ref = _decode_flashinfer(heads, kv, ids, indptr, last, q, workspace)
    elif anchor == "torch":
        call, rows = sdpa_call(q, kv, ids, batch, kv_len)
        theirs = {"eager": (TORCH_ANCHOR, median_us(call)), "graph": (TORCH_ANCHOR, graph_us(call))}
        ref = rows(call())
    diff = _max_diff(out, ref) if ref is not None else math.nan
    return decode_records(heads, batch, kv_len, ours, ceiling, theirs, diff)


def compile_times(name: str) -> tuple[float, float]:
    """Seconds for the first NVRTC compile + load of one decode kernel, then its load from the disk cache by
    a second process; both timed after imports and CUDA start-up, in a fresh cache directory."""
    import subprocess
    import tempfile
    code = ("import time, torch, cupy; torch.zeros(1, device='cuda'); from pagedinfer import kernels;"
            f"t = time.perf_counter(); kernels.get_kernel('decode.cu', {name!r}); print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, PAGEDINFER_CACHE_DIR=cache, PAGEDINFER_LOG_LEVEL="WARNING")
        return tuple(float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                          check=True).stdout) for _ in range(2))


def run_decode(cases, anchor: str | None) -> list[dict]:
    """Decode cases [(heads, [(batch, kv_len), ...]), ...], each timed eagerly and as 20 calls replayed from a
    CUDA graph, against `anchor` ("flashinfer", "torch" or None); then the compile time of the first shape."""
    from .decode import kernel_name
    ceiling = read_ceiling_gbps()
    records = _each_case(_decode_case, cases, anchor, ceiling, _workspace(anchor))
    q_heads, kv_heads, head_dim = cases[0][0]
    kernel = kernel_name("bf16", head_dim, q_heads // kv_heads, PAGE, False)
    return records + [compile_record(kernel, *compile_times(kernel))]


# ---------------------------------------------------------------------------------------------- prefill

def _prefill_case(heads, batch, qo_len, prefix, anchor, workspace) -> list[dict]:
    from .paged import csr_page_table
    from .prefill import PrefillWrapper
    q_heads, kv_heads, head_dim = heads
    kv_len = prefix + qo_len
    kv, ids, indptr, last = make_inputs(heads, batch, kv_len)
    q = torch.randn(batch * qo_len, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    qo_indptr = torch.arange(0, batch + 1, dtype=torch.int32) * qo_len
    table = csr_page_table(indptr, ids, last, PAGE)
    wrapper = PrefillWrapper("cuda")
    wrapper.plan(qo_indptr, table, q_heads, kv_heads, head_dim, causal=True, kv_lens_host=table.kv_lens().cpu(),
                 indptr_host=indptr.cpu())
    out, t = _timed_run(wrapper, q, kv)
    custom_us = _custom_mask_us(heads, batch, qo_len, kv_len, qo_indptr, table, q, kv)
    call, rows = sdpa_call(q, kv, ids, batch, kv_len, causal=True)  # always: the accuracy check
    anchors = {TORCH_ANCHOR: median_us(call)}
    ref = rows(call()).float()
    rel_err = ((out.float() - ref).norm() / ref.norm()).item()
    if anchor == "flashinfer":
        import flashinfer
        for backend in ("auto", "fa2"):
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
            w.plan(qo_indptr.cuda(), indptr, ids, last, q_heads, kv_heads, head_dim, PAGE, causal=True,
                   q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
            anchors[f"flashinfer-{backend}"] = _timed_run(w, q, kv)[1]
    return prefill_records(heads, batch, qo_len, prefix, t, rel_err, anchors, custom_us)


def planned_causal_as_custom(heads, batch, qo_len, kv_len, qo_indptr, table):
    """A PrefillWrapper planned with the causal pattern given as a packed custom mask (on the CPU, so plan()
    reads it without a sync), for `batch` requests of `qo_len` new tokens over `kv_len` keys."""
    from .masks import pack_masks
    from .prefill import PrefillWrapper
    causal = torch.ones(qo_len, kv_len, dtype=torch.bool).tril(kv_len - qo_len)
    packed, mask_indptr = pack_masks([causal] * batch)
    wrapper = PrefillWrapper("cuda")
    wrapper.plan(qo_indptr, table, *heads, custom_mask=packed, mask_indptr=mask_indptr,
                 kv_lens_host=table.kv_lens().cpu(), indptr_host=table.indptr.cpu())
    return wrapper


def _custom_mask_us(heads, batch, qo_len, kv_len, qo_indptr, table, q, kv) -> float:
    """Our time for the causal pattern given as a packed custom mask (what tree / custom masks cost)."""
    return _timed_run(planned_causal_as_custom(heads, batch, qo_len, kv_len, qo_indptr, table), q, kv)[1]


def run_prefill(cases, anchor: str | None) -> list[dict]:
    """Causal prefill / extend cases [(heads, [(batch, new tokens, cached prefix), ...]), ...] against torch
    SDPA, and against FlashInfer (backends auto and fa2) when `anchor` is "flashinfer"."""
    return _each_case(_prefill_case, cases, anchor, _workspace(anchor))


# ---------------------------------------------------------------------------------------------- verify

def draft_tree(n: int) -> torch.Tensor:
    """A fixed EAGLE-like tree: draft i hangs under draft (i - 1) // 2 (a binary tree), sees its ancestors."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for j in range(n):
        i = j
        while True:
            mask[j, i] = True
            if i == 0:
                break
            i = (i - 1) // 2
    return mask


def full_mask(tree: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[drafts, kv_len]: the cached prefix visible to every draft, then the tree over the drafts' own keys."""
    drafts = tree.shape[0]
    full = torch.ones(drafts, kv_len, dtype=torch.bool)
    full[:, kv_len - drafts:] = tree
    return full


def _verify_flashinfer(heads, kv, ids, indptr, last, q, drafts, kv_len, tree, backend, workspace):
    import flashinfer
    q_heads, kv_heads, head_dim = heads
    batch = last.numel()
    qo_indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * drafts
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
    extra = dict(causal=True) if tree is None else dict(
        custom_mask=full_mask(tree, kv_len).reshape(-1).repeat(batch).cuda())  # FlashInfer's spans the whole KV
    w.plan(qo_indptr, indptr, ids, last, q_heads, kv_heads, head_dim, PAGE, q_data_type=torch.bfloat16,
           kv_data_type=torch.bfloat16, **extra)
    return _timed_run(w, q, kv)


def _verify_case(heads, batch, drafts, kv_len, anchor, ceiling, workspace) -> list[dict]:
    from .masks import pack_masks
    from .paged import csr_page_table
    from .verify import VerifyWrapper
    q_heads, kv_heads, head_dim = heads
    kv, ids, indptr, last = make_inputs(heads, batch, kv_len)
    q = torch.randn(batch * drafts, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    table = csr_page_table(indptr, ids, last, PAGE)
    qo_indptr = torch.arange(0, batch + 1, dtype=torch.int32) * drafts
    records = []
    for mask in ("causal", "tree"):
        tree, masks = None, {}
        if mask == "tree":
            tree = draft_tree(drafts)
            packed, mask_indptr = pack_masks([tree] * batch)
            masks = dict(tree_mask=packed.cuda(), tree_mask_indptr=mask_indptr)
        wrapper = VerifyWrapper("cuda")
        wrapper.plan(qo_indptr, table, q_heads, kv_heads, head_dim, kv_lens_host=table.kv_lens().cpu(),
                     indptr_host=indptr.cpu(), **masks)
        out, t = _timed_run(wrapper, q, kv)
        anchors = {}
        if anchor == "flashinfer":
            for backend in ("fa2", "auto"):
                fo, ft = _verify_flashinfer(heads, kv, ids, indptr, last, q, drafts, kv_len, tree, backend, workspace)
                anchors[f"flashinfer-{backend}"] = (ft, _max_diff(out, fo))
        elif anchor == "torch":
            call, rows = sdpa_call(q, kv, ids, batch, kv_len, causal=tree is None,
                                   mask=None if tree is None else full_mask(tree, kv_len).cuda())
            anchors[TORCH_ANCHOR] = (median_us(call), _max_diff(out, rows(call())))
        records += verify_records(heads, batch, drafts, kv_len, mask, t, ceiling, anchors)
    return records


def run_verify(cases, anchor: str | None) -> list[dict]:
    """Speculative verify cases [(heads, [(batch, drafts, kv_len), ...]), ...], causal drafts and a binary tree,
    against `anchor`: FlashInfer's prefill wrapper (fa2, and auto = fa3 on Hopper), torch SDPA, or None."""
    return _each_case(_verify_case, cases, anchor, read_ceiling_gbps(), _workspace(anchor))


RUNNERS = {"decode": run_decode, "prefill": run_prefill, "verify": run_verify}


# ---------------------------------------------------------------------------------------------- command line

def add_arguments(parser) -> None:
    parser.add_argument("--preset", choices=("all",) + OPS, default="decode",
                        help="which benchmarks, on the shape lists of benchmarks/bench_<op>.py (default decode)")
    parser.add_argument("--model-config", metavar="CONFIG_JSON",
                        help="a Hugging Face config.json: measure its head shape (num_attention_heads, "
                             "num_key_value_heads, head_dim) at a few batch x kv_len points instead")
    parser.add_argument("--out", default="pagedinfer-bench", help="folder for <op>.json and <op>.png "
                                                                   "(default ./pagedinfer-bench)")


def _fail(message: str) -> int:
    print(f"pagedinfer bench: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    try:
        heads = load_model_config(args.model_config) if args.model_config else None
    except (OSError, ValueError) as e:
        return _fail(f"--model-config {args.model_config}: {e}")
    missing = missing_requirements()
    if missing:
        return _fail(missing)
    anchor = "flashinfer" if flashinfer_installed() else "torch"
    print(f"{torch.cuda.get_device_name()}: pagedinfer against "
          + ("FlashInfer" if anchor == "flashinfer" else "torch SDPA on contiguous K/V (FlashInfer is not installed)"))
    extra = {"model_config": os.path.abspath(args.model_config)} if heads else None
    plots = True
    for op in OPS if args.preset == "all" else (args.preset,):
        records = RUNNERS[op](model_cases(op, heads) if heads else PRESETS[op], anchor)
        plots = report(args.out, op, op, records, extra) and plots
    if not plots:
        print("no PNG: matplotlib is not installed (pip install 'pagedinfer[bench]')")
    return 0
