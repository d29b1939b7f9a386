"""Does the page order cap the read rate? The same caches read with their pages in the benchmarks' random
order and in storage order: a plain streaming sum of whole pages (Triton, one program per page: every head's
K and V, contiguous), our verify kernel, and FlashInfer fa2 (when installed), eager, L2 flushed between calls.
    python3 benchmarks/page_order.py      # prints one table, writes page-order.json to $OUT"""
import torch
import triton
import triton.language as tl
from common import case_inputs, flashinfer_prefill, planned_verify, save_and_print

from pagedinfer import bench
from pagedinfer.paged import csr_page_table
from pagedinfer.verify import VerifyWrapper

CASES = [((9, 3, 64), 64, 4, 2048), ((32, 8, 128), 64, 4, 2048), ((32, 8, 128), 1, 8, 32768)]


@triton.jit
def page_sums(kv, ids, out, PAGE_ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    page = tl.load(ids + tl.program_id(0)).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, PAGE_ELEMS, BLOCK):
        acc += tl.load(kv + page * PAGE_ELEMS + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out + tl.program_id(0), tl.sum(acc))


def in_storage_order(case):
    """The case with its page table rewritten to read the pages in the order they are stored."""
    ids = torch.sort(case.ids).values
    return type(case)(**{**vars(case), "ids": ids, "table": csr_page_table(case.indptr, ids, case.last, bench.PAGE)})


def main():
    rows = []
    for heads, batch, drafts, kv_len in CASES:
        random = case_inputs(heads, batch, kv_len, drafts)
        nbytes = random.kv.numel() * random.kv.element_size()
        page_elems = random.kv[0].numel()
        for order, case in (("random", random), ("storage", in_storage_order(random))):
            sums = torch.empty(case.ids.numel(), device="cuda")
            times = {"page sum": bench.median_us(
                lambda: page_sums[(case.ids.numel(),)](case.kv, case.ids, sums, page_elems, 2048))}
            w = planned_verify(VerifyWrapper, case)
            out = torch.empty_like(case.q)
            times["ours"] = bench.median_us(lambda: w.run(case.q, case.kv, out=out))
            if bench.flashinfer_installed():
                fa2 = flashinfer_prefill(case, "fa2")
                times["fa2"] = bench.median_us(lambda: fa2.run(case.q, case.kv))
            times["page sum GB/s"] = nbytes / times["page sum"] / 1e3
            rows.append((f"{'/'.join(map(str, heads))} {batch}x{drafts}x{kv_len} {order}", times))
    columns = ["page sum", "page sum GB/s", "ours"] + (["fa2"] if bench.flashinfer_installed() else [])
    ceiling = bench.read_ceiling_gbps()
    save_and_print("page-order", rows, columns, ceiling_gbps=ceiling)
    print(f"streaming-read ceiling (2 GiB fp32 sum): {ceiling:.0f} GB/s")


if __name__ == "__main__":
    main()
