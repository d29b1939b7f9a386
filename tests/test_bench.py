"""The pure parts of `pagedinfer bench` (presets, records, tables, the results file) and its torch anchor
against the reference, all on the CPU."""
import json
import math

import pytest
import torch

from pagedinfer import bench, reference
from pagedinfer import bench_cases as bc
from pagedinfer.paged import csr_page_table
from pagedinfer.validate import check_group, check_head_dim
from pagedinfer.verify import MAX_DRAFTS

RESULT_KEYS = {"op", "batch", "q_heads", "kv_heads", "head_dim", "kv_len", "qo_len", "page_size", "mask", "dtype",
               "pagedinfer_us"}


def test_presets_are_the_benchmark_shapes_and_supported():
    assert bc.OPS == tuple(bc.PRESETS) == tuple(bc.MODEL_SIZES)
    assert [heads for heads, _ in bc.PRESETS["decode"]] == [(32, 8, 128), (9, 3, 64)]
    assert bc.PRESETS["decode"][0][1][:2] == [(1, 2048), (1, 32768)]  # `--quick` keeps these
    for op, width in (("decode", 2), ("prefill", 3), ("verify", 3)):
        for (q_heads, kv_heads, head_dim), sizes in bc.PRESETS[op]:
            check_head_dim("head_dim", head_dim)
            check_group(q_heads, kv_heads)
            assert sizes and all(len(s) == width for s in sizes + bc.MODEL_SIZES[op])
    assert all(1 <= drafts <= MAX_DRAFTS and drafts <= kv_len
               for _, sizes in bc.PRESETS["verify"] for _, drafts, kv_len in sizes + bc.MODEL_SIZES["verify"])


def decode_pair(anchor=("flashinfer-tensor-core", 20.0), batch=64, kv_len=8192):
    return bc.decode_records((32, 8, 128), batch, kv_len, {"eager": 10.0, "graph": 8.0}, 3000.0,
                             {"eager": anchor, "graph": anchor} if anchor else None, 0.002)


def test_decode_records():
    eager, graph = decode_pair()
    nbytes = 64 * 8192 * 8 * 128 * 2 * 2
    assert RESULT_KEYS <= set(eager) and eager["op"] == "decode" and eager["qo_len"] == 1
    assert (eager["graph"], graph["graph"]) == (False, True)
    assert eager["kv_bytes"] == nbytes and eager["gbps"] == pytest.approx(nbytes / 10e-6 / 1e9)
    assert eager["floor_us"] == pytest.approx(nbytes / 3000e9 * 1e6)
    assert eager["speedup"] == 2.0 and graph["speedup"] == 2.5
    assert eager["anchor_gbps"] == pytest.approx(nbytes / 20e-6 / 1e9)
    assert graph["label"] == "32/8/128 64x8192 graph"
    alone = decode_pair(anchor=None)[0]
    assert "anchor" not in alone and "speedup" not in alone


def test_verify_and_prefill_records():
    anchors = {"flashinfer-fa2": (30.0, 0.01), "flashinfer-auto": (60.0, 0.02)}
    fa2, auto = bc.verify_records((32, 8, 128), 64, 4, 2048, "tree", 20.0, 3000.0, anchors)
    assert RESULT_KEYS <= set(fa2) and (fa2["qo_len"], fa2["mask"]) == (4, "tree")
    assert (fa2["speedup"], auto["speedup"]) == (1.5, 3.0) and auto["max_abs_diff_vs_anchor"] == 0.02
    assert fa2["label"] == "32/8/128 64x4x2048 tree vs fa2"
    (alone,) = bc.verify_records((32, 8, 128), 64, 4, 2048, "causal", 20.0, 3000.0, {})
    assert "anchor" not in alone and alone["label"] == "32/8/128 64x4x2048 causal"

    (sdpa,) = bc.prefill_records((32, 8, 128), 8, 512, 4096, 100.0, 1e-3, {bc.TORCH_ANCHOR: 50.0})
    assert (sdpa["op"], sdpa["kv_len"], sdpa["qo_len"], sdpa["mask"]) == ("extend", 4608, 512, "causal")
    assert sdpa["speedup"] == 0.5 and "anchor_gbps" not in sdpa and sdpa["label"].endswith("8x512+4096 vs sdpa")
    flops = 4 * 8 * 32 * 128 * sum(4096 + i + 1 for i in range(512))
    assert bc.causal_flops(8, 32, 128, 512, 4096) == flops
    assert sdpa["tflops"] == pytest.approx(flops / 100e-6 / 1e12)
    assert bc.prefill_records((9, 3, 64), 8, 2048, 0, 1.0, 0.0, {bc.TORCH_ANCHOR: 1.0})[0]["op"] == "prefill"


def test_decode_table():
    records = decode_pair() + decode_pair(anchor=None, batch=1, kv_len=2048) + [bc.compile_record("k", 0.5, 0.002)]
    lines = bc.decode_table(records).splitlines()
    assert lines[0].split() == ["shape", "BxL", "FI", "us", "ours", "us", "x", "FI", "g", "ours", "g", "x", "GB/s",
                                "floor", "diff"]
    assert lines[1].split()[:8] == ["32/8/128", "64x8192", "20.0", "10.0", "2.00", "20.0", "8.0", "2.50"]
    assert lines[2].split()[:5] == ["32/8/128", "1x2048", "-", "10.0", "-"]
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert "SDPA us" in bc.decode_table(decode_pair(anchor=(bc.TORCH_ANCHOR, 20.0)))


def test_verify_and_prefill_tables():
    anchors = {"flashinfer-fa2": (30.0, 0.0), "flashinfer-auto": (60.0, 0.0)}
    records = [r for mask in ("causal", "tree")
               for r in bc.verify_records((32, 8, 128), 64, 4, 2048, mask, 20.0, 3000.0, anchors)]
    lines = bc.verify_table(records).splitlines()
    assert lines[0].split() == ["shape", "BxDxL", "mask", "fa2", "us", "auto", "us", "ours", "us", "x", "fa2", "x",
                                "auto", "GB/s"]
    assert lines[2].split()[:8] == ["32/8/128", "64x4x2048", "tree", "30.0", "60.0", "20.0", "1.50", "3.00"]

    records = bc.prefill_records((32, 8, 128), 1, 4096, 0, 100.0, 2e-3,
                                 {bc.TORCH_ANCHOR: 50.0, "flashinfer-auto": 40.0, "flashinfer-fa2": 45.0}, 110.0)
    lines = bc.prefill_table(records).splitlines()
    assert lines[1].split() == ["32/8/128", "1x4096+0", "40.0", "50.0", "100.0",
                                f"{records[0]['tflops']:.1f}", "0.40", "1.10", "2.0e-03"]
    assert bc.prefill_table(records[:1]).splitlines()[1].split()[2] == "-"  # no FlashInfer


def test_summary_and_plotted():
    records = decode_pair() + decode_pair(batch=4) + [bc.compile_record("k", 0.49, 0.0017)]
    assert bc.summary(records) == "read ceiling 3000 GB/s; first compile 0.49 s, cached load 0.002 s"
    assert bc.summary([]) == ""
    # decode: graph replay for batch <= 4, eager above; nothing without an anchor
    assert [(r["batch"], r["graph"]) for r in bc.plotted(records)] == [(64, False), (4, True)]
    assert bc.plotted(decode_pair(anchor=None)) == []
    assert bc.plot_title("decode", records, "GPU") == "decode vs tensor-core, GPU (graph for batch<=4, else eager)"


def test_report_writes_the_results_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Test GPU")
    records = decode_pair() + [bc.compile_record("k", 0.5, 0.002)]
    png = bench.report(str(tmp_path / "out"), "decode-x", "decode", records)
    doc = json.loads((tmp_path / "out" / "decode-x.json").read_text())
    assert set(doc) == {"card", "versions", "command", "date", "records"} and doc["card"] == "Test GPU"
    assert {"torch", "cupy", "flashinfer", "pagedinfer_git", "pagedinfer"} <= set(doc["versions"])
    assert doc["records"] == records
    assert png == (tmp_path / "out" / "decode.png").exists()
    out = capsys.readouterr().out
    assert f"read ceiling 3000 GB/s; first compile 0.50 s, cached load 0.002 s; results {tmp_path}" in out
    assert "64x8192" in out


def test_draft_tree_and_full_mask():
    tree = bench.draft_tree(7)
    assert tree[6].nonzero().flatten().tolist() == [0, 2, 6] and bool(tree.diagonal().all())
    full = bench.full_mask(tree, 10)
    assert full.shape == (7, 10) and bool(full[:, :3].all()) and torch.equal(full[:, 3:], tree)


def paged_case(batch=2, kv_len=37, heads=(8, 2, 64), seed=0):
    """A float32 CPU cache in the benchmarks' layout (every request on its own randomly ordered pages)."""
    torch.manual_seed(seed)
    _, kv_heads, head_dim = heads
    pages_per = math.ceil(kv_len / bc.PAGE)
    kv = torch.randn(batch * pages_per, 2, bc.PAGE, kv_heads, head_dim)
    ids = torch.randperm(batch * pages_per).int()
    indptr = torch.arange(batch + 1, dtype=torch.int32) * pages_per
    last = torch.full((batch,), kv_len - (pages_per - 1) * bc.PAGE, dtype=torch.int32)
    return kv, ids, csr_page_table(indptr, ids, last, bc.PAGE)


def test_torch_anchor_decode_matches_the_reference():
    kv, ids, table = paged_case()
    q = torch.randn(2, 8, 64)
    call, rows = bench.sdpa_call(q, kv, ids, 2, 37)
    torch.testing.assert_close(rows(call()), reference.decode(q, kv, table)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tree", [False, True])
def test_torch_anchor_verify_matches_the_reference(tree):
    from pagedinfer.masks import pack_masks
    kv, ids, table = paged_case()
    drafts = 5
    q = torch.randn(2 * drafts, 8, 64)
    qo_indptr = torch.arange(3, dtype=torch.int32) * drafts
    masks, mask = {}, None
    if tree:
        packed, mask_indptr = pack_masks([bench.draft_tree(drafts)] * 2)
        masks = dict(tree_mask=packed, tree_mask_indptr=mask_indptr)
        mask = bench.full_mask(bench.draft_tree(drafts), 37)
    call, rows = bench.sdpa_call(q, kv, ids, 2, 37, causal=not tree, mask=mask)
    expect = reference.verify(q, qo_indptr, kv, table, **masks)[0]
    torch.testing.assert_close(rows(call()), expect, atol=1e-5, rtol=1e-5)


def test_torch_anchor_prefill_matches_the_reference():
    kv, ids, table = paged_case(kv_len=32)
    q = torch.randn(2 * 32, 8, 64)  # the whole sequence is new: SDPA's own causal flag
    qo_indptr = torch.arange(3, dtype=torch.int32) * 32
    call, rows = bench.sdpa_call(q, kv, ids, 2, 32, causal=True)
    expect = reference.prefill(q, qo_indptr, kv, table, causal=True)[0]
    torch.testing.assert_close(rows(call()), expect, atol=1e-5, rtol=1e-5)
