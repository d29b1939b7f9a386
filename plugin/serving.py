"""End-to-end harness: one engine (vLLM or SGLang), one attention backend, one process.

`python -m pagedinfer.serving --engine vllm --backend CUSTOM --model DIR --out run.json` starts the engine
once and, in order: greedy-generates the chat prompts below (64 tokens, with the logprob and top-1 token
of every generated position), scores continuations teacher-forced (its own, and those of each `--score`
file: the logprob the engine gives each given token and its own top-1 token at that position), times
throughput, and reads the speculative acceptance rate when `--ngram` is on. Each backend gets its own
process because both engines keep GPU memory after an engine is shut down.

Decode latency: for a batch of B prompts, T(n) is the wall time of generating n tokens per prompt
(ignore_eos, best of two). decode_ms_per_token = (T(128) - T(1)) / 127: the time of one decode step of
the whole batch, which is the time between two tokens as each request sees it; prefill and start-up
cancel out. tokens_per_s = generated tokens / T(128).

The comparison functions at the top need no engine: `benchmarks/e2e.py`, the E2E tests and
`pagedinfer demo` judge runs with them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The first four make the demo; the self-repeating ones give n-gram speculation drafts to accept.
PROMPTS = (
    "What is the capital of France?",
    "Explain what a GPU is in one sentence.",
    "Write a haiku about the sea.",
    "What is 12 times 11?",
    "Name three primary colors.",
    "Who wrote Hamlet?",
    "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?",
    "What is the largest planet in the solar system?",
    'Translate "good morning" into Spanish.',
    "Repeat this sentence three times: The quick brown fox jumps over the lazy dog.",
    "Count from 1 to 40, separated by commas.",
    'Write the word "hello" twenty times, separated by spaces.',
    "Copy this list exactly: apple, banana, cherry, date, elderberry, fig, grape.",
    "Repeat after me twice: To be or not to be, that is the question.",
    "List the days of the week, then list them again in the same order.",
)
FRANCE = 0  # index of the prompt whose answer must name Paris
GREEDY_TOKENS = 64
THROUGHPUT_TOKENS = 128
BATCHES = (1, 16, 64, 128)

# Thresholds of the E2E issues: built-in backends already disagree in bf16, so ours is judged against
# the disagreement of two built-ins measured in the same run (the "floor").
DELTA_FACTOR = 1.5      # (a) mean |delta logprob| at most 1.5x the floor's
TOP1_SLACK = 0.01       # (a) top-1 agreement at least the floor's minus 1 %
IDENTICAL_SLACK = 2     # (b) identical greedy continuations at least the floor's minus 2


# ---------------------------------------------------------------- comparisons (no engine needed)

@dataclass(frozen=True)
class Agreement:
    """How closely one run follows a reference on the same teacher-forced tokens (and greedy prompts)."""
    mean_abs_delta: float
    top1: float
    positions: int
    identical: int | None = None
    prompts: int | None = None


def _paired_positions(ref: list[dict], other: list[dict], key: str):
    if len(ref) != len(other):
        raise ValueError(f"scores cover {len(ref)} and {len(other)} prompts; they must score the same ones")
    for i, (a, b) in enumerate(zip(ref, other)):
        if len(a[key]) != len(b[key]):
            raise ValueError(f"prompt {i}: {len(a[key])} vs {len(b[key])} scored positions")
        yield from zip(a[key], b[key])


def mean_abs_delta(ref: list[dict], other: list[dict]) -> float:
    """Mean |logprob difference| over every scored position (per prompt: {"logprobs": [...]})."""
    pairs = list(_paired_positions(ref, other, "logprobs"))
    return sum(abs(a - b) for a, b in pairs) / len(pairs) if pairs else 0.0


def top1_agreement(ref: list[dict], other: list[dict]) -> float:
    """Fraction of scored positions where both runs have the same top-1 token (per prompt: {"top1": [...]})."""
    pairs = list(_paired_positions(ref, other, "top1"))
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else 1.0


def identical_continuations(ref: list[dict], other: list[dict]) -> int:
    """Number of prompts whose greedy continuations are token-for-token identical."""
    if len(ref) != len(other):
        raise ValueError(f"{len(ref)} vs {len(other)} greedy continuations")
    return sum(a["token_ids"] == b["token_ids"] for a, b in zip(ref, other))


def agreement(ref_scores, other_scores, ref_greedy=None, other_greedy=None) -> Agreement:
    positions = sum(len(s["logprobs"]) for s in ref_scores)
    identical = None if ref_greedy is None else identical_continuations(ref_greedy, other_greedy)
    return Agreement(mean_abs_delta(ref_scores, other_scores), top1_agreement(ref_scores, other_scores),
                     positions, identical, None if ref_greedy is None else len(ref_greedy))


def judge(ours: Agreement, floor: Agreement) -> dict[str, tuple[bool, str]]:
    """Criteria (a) (teacher-forced) and, when greedy counts are present, (b) (free-running greedy)."""
    limit = DELTA_FACTOR * floor.mean_abs_delta
    out = {
        "(a) logprob delta": (ours.mean_abs_delta <= limit,
                              f"mean |delta logprob| {ours.mean_abs_delta:.4f} over {ours.positions} tokens; "
                              f"floor {floor.mean_abs_delta:.4f}, limit {limit:.4f}"),
        "(a) top-1 agreement": (ours.top1 >= floor.top1 - TOP1_SLACK,
                                f"{ours.top1:.1%} same next token; floor {floor.top1:.1%}, "
                                f"limit {floor.top1 - TOP1_SLACK:.1%}"),
    }
    if ours.identical is not None:
        out["(b) identical greedy"] = (ours.identical >= floor.identical - IDENTICAL_SLACK,
                                       f"{ours.identical}/{ours.prompts} identical; floor {floor.identical}, "
                                       f"limit {floor.identical - IDENTICAL_SLACK}")
    return out


def reads_as_text(greedy: list[dict]) -> tuple[bool, str]:
    """(b): every answer is non-empty text and the France prompt names Paris."""
    empty = [i for i, g in enumerate(greedy) if not g["text"].strip()]
    france = greedy[FRANCE]["text"].strip()
    ok = not empty and "Paris" in france
    return ok, f"France: {france[:80]!r}" + (f"; empty answers for prompts {empty}" if empty else "")


def throughput_row(batch: int, tokens: int, full_s: float, first_s: float, generated: int) -> dict:
    """One throughput record from the two timings described in the module docstring."""
    return {"batch": batch, "tokens_per_s": generated / full_s,
            "decode_ms_per_token": (full_s - first_s) / (tokens - 1) * 1e3,
            "seconds": full_s, "first_token_seconds": first_s}


# ---------------------------------------------------------------- engines

def _say(message: str) -> None:
    print(f"[pagedinfer.serving] {message}", file=sys.stderr, flush=True)


def _positions(tokens: list[int], dicts) -> dict:
    """vLLM logprob dicts ({token: Logprob}, the given token plus the top-1) -> logprobs and top-1 ids."""
    return {"logprobs": [d[t].logprob for t, d in zip(tokens, dicts)],
            "top1": [max(d.items(), key=lambda kv: kv[1].logprob)[0] for d in dicts]}


def _vllm_ngram_method() -> str:
    """vLLM's n-gram drafter "ngram" runs on numba, which refuses NumPy releases newer than it knows; its
    "ngram_gpu" twin drafts the same n-gram matches on the GPU without it."""
    try:
        import numba  # noqa: F401
        return "ngram"
    except ImportError as e:
        print(f"[pagedinfer.serving] vLLM's ngram drafter needs numba ({e}): using method ngram_gpu", flush=True)
        return "ngram_gpu"


class VllmEngine:
    def __init__(self, model: str, backend: str, *, eager: bool, ngram: bool):
        # vLLM's default process layout is kept (VLLM_ENABLE_V1_MULTIPROCESSING=1, engine core in a child
        # process): it is the layout `vllm serve` uses, and the child finds our backend only through the
        # entry point, which this then exercises. Every run is its own process, so nothing leaks across.
        from vllm import LLM
        kwargs = dict(model=model, attention_backend=backend, dtype="bfloat16", gpu_memory_utilization=0.3,
                      max_model_len=4096, seed=0, enforce_eager=eager, max_num_seqs=max(BATCHES),
                      # graphs for our batch sizes only: the default list (35 sizes here) costs start-up time
                      cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128],
                      disable_log_stats=not ngram)  # the spec-decode counters need stats on
        if ngram:
            kwargs["speculative_config"] = {"method": _vllm_ngram_method(), "num_speculative_tokens": 4,
                                            "prompt_lookup_min": 2, "prompt_lookup_max": 4}
        self.llm = LLM(**kwargs)

    def generate(self, prompt_ids, max_tokens: int, *, logprobs=False, ignore_eos=False) -> list[dict]:
        from vllm import SamplingParams
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos,
                                logprobs=1 if logprobs else None)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            row = {"token_ids": list(c.token_ids), "text": c.text}
            if logprobs:
                row.update(_positions(row["token_ids"], c.logprobs))
            result.append(row)
        return result

    def score(self, prompt_ids, continuations) -> list[dict]:
        from vllm import SamplingParams
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)  # also skips the prefix cache
        outs = self.llm.generate([{"prompt_token_ids": p + c} for p, c in zip(prompt_ids, continuations)],
                                 params, use_tqdm=False)
        return [_positions(c, o.prompt_logprobs[len(p):]) for p, c, o in zip(prompt_ids, continuations, outs)]

    def acceptance(self) -> dict:
        from vllm.v1.metrics.reader import Counter
        totals = {"vllm:spec_decode_num_draft_tokens": 0, "vllm:spec_decode_num_accepted_tokens": 0}
        for metric in self.llm.get_metrics():
            if isinstance(metric, Counter) and metric.name in totals:
                totals[metric.name] += metric.value
        return _acceptance(totals["vllm:spec_decode_num_draft_tokens"],
                           totals["vllm:spec_decode_num_accepted_tokens"])

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class SglangEngine:
    def __init__(self, model: str, backend: str, *, eager: bool, ngram: bool):
        import sglang
        kwargs = dict(model_path=model, attention_backend=backend, dtype="bfloat16", mem_fraction_static=0.3,
                      context_length=4096, grammar_backend="none", random_seed=0, log_level="warning",
                      cuda_graph_max_bs_decode=max(BATCHES))
        if eager:
            kwargs.update(disable_decode_cuda_graph=True, disable_prefill_cuda_graph=True)
        if ngram:
            kwargs["speculative_algorithm"] = "NGRAM"
        self.engine = sglang.Engine(**kwargs)
        self.drafts = self.accepted = 0

    def generate(self, prompt_ids, max_tokens: int, *, logprobs=False, ignore_eos=False) -> list[dict]:
        params = {"temperature": 0, "max_new_tokens": max_tokens, "ignore_eos": ignore_eos}
        extra = {"return_logprob": True, "top_logprobs_num": 1} if logprobs else {}
        outs = self.engine.generate(input_ids=list(prompt_ids), sampling_params=params, **extra)
        result = []
        for o in outs:
            meta = o["meta_info"]
            # per request, present once a verify step ran (spec_verify_ct > 0)
            self.drafts += meta.get("spec_num_proposed_drafts", 0)
            self.accepted += meta.get("spec_num_correct_drafts", 0)
            row = {"token_ids": list(o["output_ids"]), "text": o["text"]}
            if logprobs:  # entries are (logprob, token id, text)
                row["logprobs"] = [e[0] for e in meta["output_token_logprobs"]]
                row["top1"] = [top[0][1] for top in meta["output_top_logprobs"]]
            result.append(row)
        return result

    def score(self, prompt_ids, continuations) -> list[dict]:
        # Starting one token before the continuation: entry 0 is that token's (None) logprob, entries 1..
        # are the continuation's (SGLang shifts input logprobs by one and drops the sampled token's).
        outs = self.engine.generate(
            input_ids=[p + c for p, c in zip(prompt_ids, continuations)],
            sampling_params={"temperature": 0, "max_new_tokens": 1}, return_logprob=True,
            logprob_start_len=[len(p) - 1 for p in prompt_ids], top_logprobs_num=1)
        result = []
        for o in outs:
            meta = o["meta_info"]
            result.append({"logprobs": [e[0] for e in meta["input_token_logprobs"][1:]],
                           "top1": [top[0][1] for top in meta["input_top_logprobs"][1:]]})
        return result

    def acceptance(self) -> dict:
        return _acceptance(self.drafts, self.accepted)

    def close(self) -> None:
        self.engine.shutdown()


ENGINES = {"vllm": VllmEngine, "sglang": SglangEngine}


def _acceptance(drafts: int, accepted: int) -> dict:
    return {"draft_tokens": drafts, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else 0.0}


def chat_prompt_ids(model: str, questions) -> list[list[int]]:
    """Token ids of each question as a one-turn chat, tokenized here so every engine sees the same ids."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    if not tok.chat_template:  # a base model: the bare question after the tokenizer's BOS
        return [tok(q)["input_ids"] for q in questions]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     tokenize=False) for q in questions]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # the rendered template holds every special token


def model_shape(model: str) -> dict:
    cfg = json.loads((Path(model) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return {"q_heads": heads, "kv_heads": cfg.get("num_key_value_heads", heads),
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads, "layers": cfg["num_hidden_layers"]}


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def measure_throughput(engine, prompt_ids, batches, tokens: int = THROUGHPUT_TOKENS) -> list[dict]:
    rows = []
    for b in batches:
        batch = [prompt_ids[i % len(prompt_ids)] for i in range(b)]
        full = min((_timed(engine.generate, batch, tokens, ignore_eos=True) for _ in range(2)),
                   key=lambda r: r[0])
        first = min(_timed(engine.generate, batch, 1, ignore_eos=True)[0] for _ in range(2))
        generated = sum(len(r["token_ids"]) for r in full[1])
        rows.append(throughput_row(b, tokens, full[0], first, generated))
        _say(f"batch {b}: {rows[-1]['tokens_per_s']:,.0f} tokens/s, "
             f"{rows[-1]['decode_ms_per_token']:.2f} ms per decode step")
    return rows


def run(engine: str, model: str, backend: str, *, name: str, eager=False, ngram=False, score_files=(),
        prompts: int = len(PROMPTS), batches=BATCHES) -> dict:
    """Start one engine and do the whole sequence (see the module docstring); returns a JSON-able dict."""
    from importlib.metadata import version
    model = str(model)
    prompt_ids = chat_prompt_ids(model, PROMPTS[:prompts])
    _say(f"starting {engine} {version(engine)} with attention backend {backend} on {model} "
         f"({'eager' if eager else 'CUDA graphs'}{', n-gram speculation' if ngram else ''}); "
         "a first start compiles for minutes")
    load_s, eng = _timed(ENGINES[engine], model, backend, eager=eager, ngram=ngram)
    _say(f"engine ready in {load_s:.0f} s; generating {len(prompt_ids)} answers of up to {GREEDY_TOKENS} tokens")
    try:
        greedy_s, greedy = _timed(eng.generate, prompt_ids, GREEDY_TOKENS, logprobs=True)
        sources = [json.loads(Path(f).read_text()) for f in score_files]
        scores = {}
        for src in [{"name": name, "prompt_ids": prompt_ids, "greedy": greedy}] + sources:
            _say(f"scoring the continuations of {src['name']} teacher-forced")
            scores[src["name"]] = eng.score(src["prompt_ids"], [g["token_ids"] for g in src["greedy"]])
        throughput = measure_throughput(eng, prompt_ids, batches) if batches else []
        spec = eng.acceptance() if ngram else None
        if spec:
            _say(f"speculation: {spec['accepted_tokens']} of {spec['draft_tokens']} draft tokens accepted")
    finally:
        eng.close()
    import torch
    return {"name": name, "engine": engine, "engine_version": version(engine), "backend": backend,
            "model": model, "shape": model_shape(model), "eager": eager, "ngram": ngram,
            "device": torch.cuda.get_device_name(0), "load_s": load_s, "questions": list(PROMPTS[:prompts]),
            "prompt_ids": prompt_ids, "greedy": greedy, "greedy_s": greedy_s,
            "greedy_tokens": sum(len(g["token_ids"]) for g in greedy), "scores": scores,
            "throughput": throughput, "spec": spec}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pagedinfer.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--backend", required=True,
                        help="vLLM: CUSTOM, TRITON_ATTN, ...; SGLang: pagedinfer, triton, ...")
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--ngram", action="store_true", help="n-gram speculative decoding")
    parser.add_argument("--score", action="append", default=[], metavar="FILE",
                        help="an earlier run's JSON whose greedy continuations this engine scores (repeatable)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help="throughput batch sizes, comma-separated (empty: none)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", required=True, help="result JSON; its file name (no suffix) names the run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    batches = [] if args.skip_throughput else [int(b) for b in args.batches.split(",") if b]
    out = Path(args.out)
    result = run(args.engine, args.model, args.backend, name=out.stem, eager=args.eager, ngram=args.ngram,
                 score_files=args.score, prompts=args.prompts, batches=batches)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    _say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
