"""Verify (causal) on the same K/V stored NHD and HND, ours and FlashInfer's fa2, one process: whether a KV
head's rows being contiguous (HND: a page holds each head's tokens together) changes how fast the cache
streams, where NHD gives a CTA of one KV head head_dim * 2 bytes of every token row (128 of 384 bytes at
9/3/64). Prints one table; writes layout_check.json to $OUT.
    python3 benchmarks/layout_check.py [64x4x2048 ...]   # batch x drafts x kv len, for 9/3/64 and 32/8/128"""
import sys

from common import case_inputs, flashinfer_prefill, planned_verify, save_and_print

from pagedinfer import bench
from pagedinfer.verify import VerifyWrapper


def flashinfer_fa2(case, layout: str):
    return flashinfer_prefill(case, "fa2", layout)


def ours(case, layout: str):
    return planned_verify(lambda device: VerifyWrapper(device, kv_layout=layout), case)


def main():
    rows = []
    for shape in sys.argv[1:] or ["64x4x2048"]:
        batch, drafts, kv_len = map(int, shape.split("x"))
        for heads in ((9, 3, 64), (32, 8, 128)):
            case = case_inputs(heads, batch, kv_len, drafts)
            caches = {"NHD": case.kv, "HND": case.kv.transpose(2, 3).contiguous()}  # [pages, 2, heads, slots, dim]
            times = {}
            for layout, kv in caches.items():
                for name, make in (("ours", ours), ("fa2", flashinfer_fa2)):
                    times[f"{name} {layout}"] = bench._timed_run(make(case, layout), case.q, kv)[1]
            rows.append([f"verify {'/'.join(map(str, heads))} {shape}", times])
    save_and_print("layout_check", rows, ["ours NHD", "ours HND", "fa2 NHD", "fa2 HND"])


if __name__ == "__main__":
    main()
