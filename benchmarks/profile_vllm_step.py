"""Where a vLLM decode step spends its time, per attention backend (issue 6: CUSTOM's batch-1 step is ~1.1 ms
longer than TRITON_ATTN's with the same CUDA graphs).

One process per backend, the engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the profiler
sees the model runner. Per batch size it times greedy generation of 1 and 65 tokens (decode step = difference / 64),
counts and times our metadata builder's build() and the eager per-layer attention calls (zero per decode
step when the full CUDA graph is replayed), and prints the CPU ops with the most self time during the decode
steps (syncs such as cudaStreamSynchronize stand out there).

    python benchmarks/profile_vllm_step.py --model DIR --backend CUSTOM [--fast] [--batches 1,64] --out X.json

--fast: no torch.compile (mode 0) and full CUDA graphs for decode only: a start-up of seconds instead of
minutes; the per-step host work of the attention backend is the same.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TOKENS = 65


def instrument(stats: dict) -> None:
    """Times our builder's build() and counts our per-layer runs (eager attention) by patching the classes."""
    from pagedinfer.adapters import vllm as ours

    def timed(cls, name, key):
        original = getattr(cls, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                stats[key].append(time.perf_counter() - start)
        setattr(cls, name, wrapper)
    timed(ours.PagedInferMetadataBuilder, "build", "build_s")
    timed(ours.PagedInferImpl, "forward", "forward_s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes, each timed and profiled")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    stats = defaultdict(list)
    instrument(stats)
    batches = [int(b) for b in args.batches.split(",")]
    kwargs = dict(model=args.model, attention_backend=args.backend, dtype="bfloat16", gpu_memory_utilization=0.3,
                  max_model_len=4096, seed=0, max_num_seqs=max(batches), cudagraph_capture_sizes=batches)
    if args.fast:
        kwargs["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    start = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - start
    result = dict(backend=args.backend, fast=args.fast, load_s=load_s, device=torch.cuda.get_device_name(0),
                  batches={})
    for batch in batches:
        prompts = [{"prompt_token_ids": list(range(100 + i, 164 + i))} for i in range(batch)]

        def generate(n):
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        for _ in range(2):
            generate(TOKENS)  # warm-up
        stats.clear()
        one = min(generate(1) for _ in range(3))
        stats.clear()
        full = min(generate(TOKENS) for _ in range(3))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(TOKENS)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        print(f"batch {batch}\n{table}")
        result["batches"][batch] = dict(
            step_ms=(full - one) / (TOKENS - 1) * 1e3, calls_per_generate={k: len(v) / 3 for k, v in stats.items()},
            mean_us={k: 1e6 * sum(v) / max(len(v), 1) for k, v in stats.items()}, profile=table)
    print(json.dumps({k: v for k, v in result.items() if k != "batches"} | {
        "batches": {b: {k: v for k, v in r.items() if k != "profile"} for b, r in result["batches"].items()}},
        indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
