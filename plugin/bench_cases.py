"""What the kernel benchmarks measure and how they report it, without a GPU: the preset shape lists, the head
shape of a Hugging Face model config, the results records (DESIGN.md, Conventions) and the printed tables.
`pagedinfer.bench` does the measuring."""
from __future__ import annotations

import json
import math

from .validate import check_group, check_head_dim

PAGE = 16  # every benchmark cache: bf16, NHD, pages of 16 tokens in random order
OPS = ("decode", "prefill", "verify")
TORCH_ANCHOR = "torch-sdpa-contiguous"  # SDPA on K/V gathered once from the paged cache

# (q heads, kv heads, head dim) -> sizes. decode: (batch, kv_len); prefill: (batch, new tokens, cached
# prefix); verify: (batch, drafts, kv_len). 32/8/128 is Llama-3-8B's attention, 9/3/64 SmolLM-135M's.
PRESETS = {
    "decode": [((32, 8, 128), [(1, 2048), (1, 32768), (4, 8192), (16, 4096), (64, 2048), (64, 8192), (256, 1024),
                               (256, 4096), (128, 16384)]),
               ((9, 3, 64), [(1, 2048), (1, 32768), (4, 8192), (16, 4096), (64, 2048), (64, 8192), (256, 4096)])],
    "prefill": [((32, 8, 128), [(1, 4096, 0), (4, 2048, 0), (1, 16384, 0), (16, 1024, 0), (8, 512, 4096)]),
                ((9, 3, 64), [(8, 2048, 0)])],
    "verify": [((32, 8, 128), [(64, 4, 2048), (64, 8, 4096), (256, 4, 1024), (16, 16, 8192), (1, 8, 32768)]),
               ((9, 3, 64), [(64, 4, 2048)])],
}
# The sizes a model's own head shape is measured at (`pagedinfer bench --model-config`).
MODEL_SIZES = {"decode": [(1, 2048), (1, 32768), (16, 4096), (64, 2048), (64, 8192), (256, 1024)],
               "prefill": [(1, 4096, 0), (4, 2048, 0), (8, 512, 4096)],
               "verify": [(64, 4, 2048), (16, 16, 8192)]}


# ---------------------------------------------------------------------------------------------- model config

def model_heads(config: dict) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a Hugging Face config (a multimodal one's text_config), checked
    against what the kernels support."""
    if "num_attention_heads" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    if "num_attention_heads" not in config:
        raise ValueError("num_attention_heads: expected in the config (or its text_config), got none")
    q_heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or q_heads)  # absent: multi-head attention
    head_dim = config.get("head_dim") or (config["hidden_size"] // q_heads if "hidden_size" in config else None)
    if head_dim is None:
        raise ValueError("head_dim: expected head_dim or hidden_size in the config, got neither")
    check_head_dim("head_dim", int(head_dim))
    check_group(q_heads, kv_heads)
    return q_heads, kv_heads, int(head_dim)


def load_model_config(path: str) -> tuple[int, int, int]:
    with open(path) as f:
        return model_heads(json.load(f))


def model_cases(op: str, heads: tuple[int, int, int]) -> list:
    return [(heads, MODEL_SIZES[op])]


# ---------------------------------------------------------------------------------------------- records

def kv_bytes(batch: int, kv_len: int, kv_heads: int, head_dim: int) -> int:
    return batch * kv_len * kv_heads * head_dim * 2 * 2  # K and V, 2 bytes each


def gbps(nbytes: int, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e9


def causal_flops(batch: int, q_heads: int, head_dim: int, qo_len: int, prefix: int) -> int:
    """Multiply-adds x 2 of QK^T and PV over the keys each query sees (masked work not counted)."""
    keys = qo_len * prefix + qo_len * (qo_len + 1) // 2
    return 4 * batch * q_heads * head_dim * keys


def short(anchor: str) -> str:
    """The anchor's name in labels and table headers."""
    return "sdpa" if anchor == TORCH_ANCHOR else anchor.removeprefix("flashinfer-")


def record(op: str, heads, batch: int, kv_len: int, qo_len: int, mask: str, us: float, **fields) -> dict:
    q_heads, kv_heads, head_dim = heads
    return dict(op=op, batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, kv_len=kv_len,
                qo_len=qo_len, page_size=PAGE, mask=mask, dtype="bf16", pagedinfer_us=us, **fields)


def versus(rec: dict, anchor: str, anchor_us: float, **fields) -> dict:
    """`rec` against one anchor: its time, the speedup (anchor / pagedinfer) and, where bytes count, its GB/s."""
    out = dict(rec, anchor=anchor, anchor_us=anchor_us, speedup=anchor_us / rec["pagedinfer_us"])
    if "kv_bytes" in rec:
        out["anchor_gbps"] = gbps(rec["kv_bytes"], anchor_us)
    return dict(out, **fields)


def decode_records(heads, batch: int, kv_len: int, ours: dict, ceiling: float, anchor: dict | None = None,
                   diff: float = math.nan) -> list[dict]:
    """The eager and the CUDA-graph record of one case. ours: {"eager": us, "graph": us}; anchor: the same
    with (anchor name, us) values."""
    q_heads, kv_heads, head_dim = heads
    nbytes = kv_bytes(batch, kv_len, kv_heads, head_dim)
    out = []
    for kind in ("eager", "graph"):
        t = ours[kind]
        rec = record("decode", heads, batch, kv_len, 1, "none", t, gbps=gbps(nbytes, t), kv_bytes=nbytes,
                     read_ceiling_gbps=ceiling, floor_us=nbytes / (ceiling * 1e9) * 1e6, graph=kind == "graph",
                     max_abs_diff_vs_anchor=diff, label=f"{q_heads}/{kv_heads}/{head_dim} {batch}x{kv_len} {kind}")
        out.append(versus(rec, *anchor[kind]) if anchor else rec)
    return out


def verify_records(heads, batch: int, drafts: int, kv_len: int, mask: str, us: float, ceiling: float,
                   anchors: dict) -> list[dict]:
    """One record per anchor (or one without); anchors: {name: (us, max abs diff)}."""
    q_heads, kv_heads, head_dim = heads
    nbytes = kv_bytes(batch, kv_len, kv_heads, head_dim)
    base = record("verify", heads, batch, kv_len, drafts, mask, us, gbps=gbps(nbytes, us), kv_bytes=nbytes,
                  read_ceiling_gbps=ceiling)
    label = f"{q_heads}/{kv_heads}/{head_dim} {batch}x{drafts}x{kv_len} {mask}"
    if not anchors:
        return [dict(base, label=label)]
    return [versus(base, name, t, max_abs_diff_vs_anchor=diff, label=f"{label} vs {short(name)}")
            for name, (t, diff) in anchors.items()]


def prefill_records(heads, batch: int, qo_len: int, prefix: int, us: float, rel_err: float,
                    anchors: dict, custom_mask_us: float = math.nan) -> list[dict]:
    """Causal prefill (extend when there is a cached prefix); anchors: {name: us}, SDPA always among them.
    `custom_mask_us`: the same causal pattern given as a packed custom mask (the custom-mask path)."""
    q_heads, kv_heads, head_dim = heads
    tflops = causal_flops(batch, q_heads, head_dim, qo_len, prefix) / (us * 1e-6) / 1e12
    base = record("extend" if prefix else "prefill", heads, batch, prefix + qo_len, qo_len, "causal", us,
                  tflops=tflops, rel_err_vs_sdpa=rel_err, custom_mask_us=custom_mask_us,
                  custom_vs_causal=custom_mask_us / us)
    label = f"{q_heads}/{kv_heads}/{head_dim} {batch}x{qo_len}+{prefix}"
    return [versus(base, name, t, label=f"{label} vs {short(name)}") for name, t in anchors.items()]


def compile_record(kernel: str, first_s: float, cached_s: float) -> dict:
    return dict(op="compile", kernel=kernel, first_compile_s=first_s, cached_load_s=cached_s)


# ---------------------------------------------------------------------------------------------- report

def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(columns, rows) -> str:
    """columns: (header, width, format spec); the first column is left-aligned, the others right-aligned."""
    def line(cells):
        return "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w, _)) in enumerate(zip(cells, columns)))
    header = line(h for h, _, _ in columns)
    return "\n".join([header] + [line(fmt(v, spec) for v, (_, _, spec) in zip(row, columns)) for row in rows])


def _heads(r: dict) -> str:
    return f"{r['q_heads']}/{r['kv_heads']}/{r['head_dim']}"


def _group(records, key) -> dict:
    """Records grouped by key(record), in first-seen order."""
    groups = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    return groups


def decode_table(records) -> str:
    cases = _group([r for r in records if r["op"] == "decode"],
                   lambda r: (_heads(r), r["batch"], r["kv_len"])).values()
    tag = "SDPA" if any(r.get("anchor") == TORCH_ANCHOR for r in records) else "FI"
    columns = [("shape", 10, ""), ("BxL", 10, ""), (f"{tag} us", 9, ".1f"), ("ours us", 9, ".1f"), ("x", 6, ".2f"),
               (f"{tag} g", 8, ".1f"), ("ours g", 8, ".1f"), ("x", 6, ".2f"), ("GB/s", 7, ".0f"), ("floor", 7, ".1f"),
               ("diff", 8, ".3f")]
    rows = []
    for case in cases:
        eager, graph = sorted(case, key=lambda r: r["graph"])
        rows.append((_heads(eager), f"{eager['batch']}x{eager['kv_len']}", eager.get("anchor_us"),
                     eager["pagedinfer_us"], eager.get("speedup"), graph.get("anchor_us"), graph["pagedinfer_us"],
                     graph.get("speedup"), eager["gbps"], eager["floor_us"], eager["max_abs_diff_vs_anchor"]))
    return format_table(columns, rows)


def prefill_table(records) -> str:
    columns = [("shape", 10, ""), ("BxQ+P", 14, ""), ("FI us", 9, ".1f"), ("SDPA us", 9, ".1f"), ("ours us", 9, ".1f"),
               ("TFLOP/s", 9, ".1f"), ("x FI", 6, ".2f"), ("mask/c", 7, ".2f"), ("err", 9, ".1e")]
    rows = []
    for case in _group(records, lambda r: (_heads(r), r["batch"], r["qo_len"], r["kv_len"])).values():
        r = case[0]
        fi = min((x["anchor_us"] for x in case if x["anchor"].startswith("flashinfer")), default=None)
        sdpa = next(x["anchor_us"] for x in case if x["anchor"] == TORCH_ANCHOR)
        rows.append((_heads(r), f"{r['batch']}x{r['qo_len']}+{r['kv_len'] - r['qo_len']}", fi, sdpa,
                     r["pagedinfer_us"], r["tflops"], fi / r["pagedinfer_us"] if fi else None,
                     r.get("custom_vs_causal"), r["rel_err_vs_sdpa"]))
    return format_table(columns, rows)


def verify_table(records) -> str:
    tags = list(dict.fromkeys(short(r["anchor"]) for r in records if "anchor" in r))
    columns = ([("shape", 10, ""), ("BxDxL", 13, ""), ("mask", 7, "")] + [(f"{t} us", 9, ".1f") for t in tags]
               + [("ours us", 9, ".1f")] + [(f"x {t}", 7, ".2f") for t in tags] + [("GB/s", 7, ".0f")])
    rows = []
    for case in _group(records, lambda r: (_heads(r), r["batch"], r["qo_len"], r["kv_len"], r["mask"])).values():
        r = case[0]
        by_tag = {short(x["anchor"]): x for x in case if "anchor" in x}
        rows.append((_heads(r), f"{r['batch']}x{r['qo_len']}x{r['kv_len']}", r["mask"],
                     *(by_tag[t]["anchor_us"] if t in by_tag else None for t in tags), r["pagedinfer_us"],
                     *(by_tag[t]["speedup"] if t in by_tag else None for t in tags), r["gbps"]))
    return format_table(columns, rows)


TABLES = {"decode": decode_table, "prefill": prefill_table, "verify": verify_table}


def summary(records) -> str:
    """The run-wide numbers: the streaming-read ceiling and the compile times, where measured."""
    parts = []
    ceiling = next((r["read_ceiling_gbps"] for r in records if "read_ceiling_gbps" in r), None)
    if ceiling:
        parts.append(f"read ceiling {ceiling:.0f} GB/s")
    for r in records:
        if r["op"] == "compile":
            parts.append(f"first compile {r['first_compile_s']:.2f} s, cached load {r['cached_load_s']:.3f} s")
    return "; ".join(parts)


def plotted(records) -> list[dict]:
    """The records a speedup plot shows: those with an anchor; for decode, graph replay for batch <= 4 (where
    launch latency is the cost engines see) and eager above."""
    return [r for r in records if r.get("speedup") and (r["op"] != "decode" or r["graph"] == (r["batch"] <= 4))]


def plot_title(op: str, records, card: str) -> str:
    anchors = ", ".join(sorted({short(r["anchor"]) for r in records if "anchor" in r})) or "no anchor"
    note = " (graph for batch<=4, else eager)" if op == "decode" else ""
    return f"{op} vs {anchors}, {card}{note}"
