"""The whole E2E plan of one engine on the GPU host: accuracy verdicts, an HTTP check and serving throughput.

    python benchmarks/e2e.py --engine vllm [--state DIR] [--only custom,triton_attn] [--skip-throughput]
                             [--budget 540]

Each run is `python -m pagedinfer.serving` in its own process (see that module for what a run does and how
decode latency is derived), writing <state>/<run>.json and <run>.log. Per model (SmolLM2-135M-Instruct, and
a Llama-3-8B-shaped model with random weights and 2 layers) the built-in reference runs first (vLLM
TRITON_ATTN, SGLang triton: its greedy continuations are what the others score), then the second built-in
(FLASH_ATTN, flashinfer: its disagreement with the reference is the floor), then ours: with n-gram
speculation, with CUDA graphs (also scoring the speculative run's continuations); without graphs the
reference, the second built-in and ours again (an eager model's numerics are not a compiled one's, so eager
is judged against eager); then the throughput-only built-ins (vLLM: FLASHINFER). Last, a `serve` check: an
OpenAI chat completion over HTTP on loopback from the engine's server with our backend.

Resumable: runs whose JSON is in --state are not run again (a failed run is). Before a run starts, its
estimated time must fit in what is left of --budget seconds, else the script stops with exit code 3 and
another call with the same --state carries on (the state in /tmp and the engines' compile caches survive
while the machine stays warm). Estimated from the anchors' start-up times (vLLM: ~150 s with a cold torch.compile cache, ~50 s
warm; FlashInfer JIT ~150 s per head dim): about 15-20 minutes for vLLM's plan and 12-17 for SGLang's on a
fresh H100 machine, so 2-3 calls of --budget 540; --skip-throughput saves the FlashInfer-only runs and the
timing. Finished: verdicts printed last, exit code 1 if any fails. Raw results are copied to
$OUT/e2e-<engine>-state.tar.gz, records (benchmarks/results format, op "e2e") and the speedup plot go to $OUT (else
benchmarks/results) as e2e-<engine>.json/.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pagedinfer import serving

MODELS = ("smollm2", "llama8b")
LLAMA8B_NAME = "llama3-8b-shape-2-layers"


@dataclass(frozen=True)
class EnginePlan:
    base: str       # the built-in reference backend
    floor: str      # the second built-in backend: its disagreement with base is the floor
    ours: str
    extra: tuple    # built-ins measured for throughput only


PLANS = {"vllm": EnginePlan("TRITON_ATTN", "FLASH_ATTN", "CUSTOM", ("FLASHINFER",)),
         "sglang": EnginePlan("triton", "flashinfer", "pagedinfer", ())}


@dataclass(frozen=True)
class Run:
    name: str
    model: str
    backend: str
    estimate_s: int             # start-up + work on the H100; first starts compile (see the report)
    eager: bool = False
    ngram: bool = False
    score: tuple = ()           # runs whose greedy continuations this one scores
    throughput: bool = True


def runs(engine: str, throughput: bool = True) -> list[Run]:
    """The plan's runs in order. Estimates: a model's first start compiles (torch.compile, Triton), FlashInfer
    JIT-compiles per head dim (SGLang's floor backend is FlashInfer), n-gram runs vLLM's V1 model runner."""
    p = PLANS[engine]
    floor_s = 150 if engine == "sglang" else 70
    out = []
    for model in MODELS:
        base, floor, ours = (f"{model}-{b}" for b in (p.base, p.floor, p.ours))
        out += [Run(base, model, p.base, 150), Run(floor, model, p.floor, floor_s, score=(base,))]
        if model == "smollm2":
            # without graphs the engine runs the model eagerly (unfused norms, rotary...): built-ins too
            out += [Run(f"{ours}-ngram", model, p.ours, 120, ngram=True, throughput=False),
                    Run(ours, model, p.ours, 80, score=(base, f"{ours}-ngram")),
                    Run(f"{base}-eager", model, p.base, 50, eager=True, throughput=False),
                    Run(f"{floor}-eager", model, p.floor, 50, eager=True, score=(f"{base}-eager",),
                        throughput=False),
                    Run(f"{ours}-eager", model, p.ours, 50, eager=True, score=(f"{base}-eager",),
                        throughput=False)]
        else:
            out.append(Run(ours, model, p.ours, 80, score=(base,)))
        if throughput:
            out += [Run(f"{model}-{b}", model, b, 150) for b in p.extra]
    return out


SERVE_ESTIMATE_S = 90


@dataclass(frozen=True)
class Check:
    label: str
    ours: str               # the judged run
    ref: str                # the run it is compared with: the built-in reference, or our non-speculative run
    model: str
    greedy: bool = True     # also judge (b): meaningless on random weights
    spec: bool = False
    mode: str = ""          # "-eager": reference and floor are the built-ins' runs without graphs


def checks(engine: str) -> list[Check]:
    p = PLANS[engine]
    s, l = "smollm2", "llama8b"
    return [Check(f"{s} {p.ours} graphs", f"{s}-{p.ours}", f"{s}-{p.base}", s),
            Check(f"{s} {p.ours} eager", f"{s}-{p.ours}-eager", f"{s}-{p.base}-eager", s, mode="-eager"),
            Check(f"{s} {p.ours} ngram", f"{s}-{p.ours}-ngram", f"{s}-{p.ours}", s, spec=True),
            Check(f"{l} {p.ours} graphs", f"{l}-{p.ours}", f"{l}-{p.base}", l, greedy=False)]


def _kinds(c: Check) -> list[str]:
    return (["(a) logprob delta", "(a) top-1 agreement"] + ["(b) identical greedy", "(b) reads as text"] * c.greedy
            + ["acceptance rate"] * c.spec)


SERVE_VERDICT = "serve: chat completion over HTTP"


def verdict_names(engine: str) -> list[str]:
    return [f"{c.label}: {k}" for c in checks(engine) for k in _kinds(c)] + [SERVE_VERDICT]


# ---------------------------------------------------------------------------------------------- verdicts

def _load(state: Path, name: str) -> dict | None:
    path = state / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _judge_check(engine: str, c: Check, state: Path) -> dict[str, tuple]:
    """{kind: (passed, detail)}; passed is None when an input run is not in the state yet."""
    p = PLANS[engine]
    names = {"ours": c.ours, "ref": c.ref, "base": f"{c.model}-{p.base}{c.mode}",
             "floor": f"{c.model}-{p.floor}{c.mode}"}
    docs = {k: _load(state, n) for k, n in names.items()}
    for key, doc in docs.items():
        if doc is None or "error" in doc:
            why = f"run {names[key]} " + ("is not in the state" if doc is None else f"failed: {doc['error']}")
            return dict.fromkeys(_kinds(c), (None if doc is None else False, why))
    ours, ref, base, floor = (docs[k] for k in ("ours", "ref", "base", "floor"))
    # spec: the speculative run's verify-path logprobs vs our plain run scoring the same tokens
    scored = ours["name"] if c.spec else ref["name"]
    if scored not in ref["scores"]:
        return dict.fromkeys(_kinds(c), (False, f"run {ref['name']} has no scores of {scored} (it ran first): "
                                                f"delete {ref['name']}.json from the state and call again"))
    greedy = (lambda d: d["greedy"]) if c.greedy else (lambda d: None)
    floor_ag = serving.agreement(base["scores"][base["name"]], floor["scores"][base["name"]],
                                 greedy(base), greedy(floor))
    ours_ag = serving.agreement(ref["scores"][scored], ours["greedy"] if c.spec else ours["scores"][scored],
                                greedy(ref), greedy(ours))
    out = serving.judge(ours_ag, floor_ag)
    if c.greedy:
        out["(b) reads as text"] = serving.reads_as_text(ours["greedy"])
    if c.spec:
        spec = ours["spec"]
        out["acceptance rate"] = (spec["accepted_tokens"] > 0,
                                  f"{spec['acceptance_rate']:.1%} ({spec['accepted_tokens']} of "
                                  f"{spec['draft_tokens']} draft tokens accepted)")
    return out


def evaluate(engine: str, state: Path) -> dict[str, tuple]:
    """Every verdict of `verdict_names(engine)`: name -> (passed: bool, or None when not run; detail)."""
    result = {}
    for c in checks(engine):
        for kind, verdict in _judge_check(engine, c, state).items():
            result[f"{c.label}: {kind}"] = verdict
    serve = _load(state, "serve")
    result[SERVE_VERDICT] = (None, "not run") if serve is None else (serve["ok"], serve["detail"])
    return result


# ---------------------------------------------------------------------------------------------- running

def model_paths() -> dict[str, Path]:
    from pagedinfer.models import random_llama_path, smollm2_path
    return {"smollm2": smollm2_path(), "llama8b": random_llama_path(LLAMA8B_NAME)}


def _done(state: Path, name: str) -> bool:
    doc = _load(state, name)
    return doc is not None and "error" not in doc


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine processes too), SIGKILL after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            return
        try:
            server.wait(30)
            return
        except subprocess.TimeoutExpired:
            continue


def run_one(engine: str, run: Run, model: Path, state: Path, *, throughput: bool, timeout_s: float | None) -> None:
    out, log = state / f"{run.name}.json", state / f"{run.name}.log"
    cmd = [sys.executable, "-m", "pagedinfer.serving", "--engine", engine, "--backend", run.backend,
           "--model", str(model), "--out", str(out)]
    cmd += ["--eager"] * run.eager + ["--ngram"] * run.ngram
    cmd += [] if throughput and run.throughput else ["--skip-throughput"]
    cmd += [a for s in run.score if _done(state, s) for a in ("--score", str(state / f"{s}.json"))]
    print(f"== {run.name}: {' '.join(cmd[2:])}", flush=True)
    start = time.time()
    with open(log, "w") as f:
        # own session: on a timeout, or a crash that leaves the engine's worker processes behind, they stop too
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            _stop(proc)
    if rc != 0:
        error = f"exit {rc} after {time.time() - start:.0f} s; log tail:\n{_tail(log)}"
        out.write_text(json.dumps({"name": run.name, "error": error}))
        print(f"   FAILED ({error})", flush=True)
    else:
        print(f"   done in {time.time() - start:.0f} s", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 10) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def serve_command(engine: str, model: Path, port: int) -> list[str]:
    """The server with our backend, without CUDA graphs (the HTTP path is what is checked; starts faster)."""
    if engine == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--attention-backend",
                "CUSTOM", "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", "0.3",
                "--max-model-len", "4096", "--enforce-eager"]
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--attention-backend",
            "pagedinfer", "--host", "127.0.0.1", "--port", str(port), "--mem-fraction-static", "0.3",
            "--context-length", "4096", "--grammar-backend", "none", "--disable-decode-cuda-graph",
            "--disable-prefill-cuda-graph"]


def serve_check(engine: str, model: Path, state: Path, timeout_s: float) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = state / "serve.log"
    print(f"== serve: {engine} server with our backend on {base}", flush=True)
    start = time.time()
    with open(log, "w") as f:
        # own session: the server's engine processes are stopped with it
        server = subprocess.Popen(serve_command(engine, model, port), stdout=f, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        result = _ask_server(base, server, start + timeout_s)
    except (OSError, ValueError, KeyError, IndexError) as e:  # HTTP error, bad JSON, unexpected reply
        result = {"ok": False, "detail": f"{type(e).__name__}: {e}"}
    finally:
        _stop(server)
    if not result["ok"]:
        result["detail"] += f"; log tail:\n{_tail(log)}"
    (state / "serve.json").write_text(json.dumps(result))
    print(f"   {'ok' if result['ok'] else 'FAILED'} after {time.time() - start:.0f} s: {result['detail']}",
          flush=True)


def _ask_server(base: str, server: subprocess.Popen, deadline: float) -> dict:
    while True:
        if server.poll() is not None:
            return {"ok": False, "detail": f"server exited with {server.returncode} before it was ready"}
        if time.time() > deadline:
            return {"ok": False, "detail": "server not ready before the time budget ran out"}
        try:
            model_id = _http(f"{base}/v1/models", timeout=5)["data"][0]["id"]
            break
        except OSError:  # not listening yet (URLError and timeouts are OSErrors)
            time.sleep(2)
    reply = _http(f"{base}/v1/chat/completions", {
        "model": model_id, "messages": [{"role": "user", "content": serving.PROMPTS[serving.FRANCE]}],
        "max_tokens": 32, "temperature": 0}, timeout=120)
    answer = reply["choices"][0]["message"]["content"] or ""
    return {"ok": bool(answer.strip()), "detail": f"answer {answer.strip()[:80]!r}", "answer": answer}


def run_plan(engine: str, state: Path, *, only=None, throughput=True, budget_s: float = 0) -> bool:
    """Runs what is missing from `state`; False when the budget stopped it before the end."""
    start = time.time()
    state.mkdir(parents=True, exist_ok=True)
    paths = model_paths()
    wanted = {w.lower() for w in only} if only else None
    todo = [r for r in runs(engine, throughput) if not _done(state, r.name)
            and (wanted is None or r.backend.lower() in wanted or r.name.lower() in wanted)]
    served = _load(state, "serve")
    serve = not (served and served["ok"]) and (wanted is None or "serve" in wanted)
    steps = [(r.estimate_s, r) for r in todo] + [(SERVE_ESTIMATE_S, None)] * serve
    for i, (estimate, run) in enumerate(steps):
        left = budget_s - (time.time() - start) if budget_s else None
        if left is not None and estimate > left:
            remaining = sum(e for e, _ in steps[i:])
            print(f"\nbudget: {len(steps) - i} steps left (about {remaining} s); call again with --state {state}")
            return False
        if run is None:
            serve_check(engine, paths["smollm2"], state, left or 600)
        else:
            run_one(engine, run, paths[run.model], state, throughput=throughput, timeout_s=left)
    return True


# ---------------------------------------------------------------------------------------------- reporting

def records(engine: str, state: Path) -> list[dict]:
    """One op "e2e" record per (run with throughput, batch)."""
    out = []
    for run in runs(engine):
        doc = _load(state, run.name)
        if doc is None or "error" in doc:
            continue
        shape = doc["shape"]
        for row in doc["throughput"]:
            out.append({"op": "e2e", "engine": engine, "engine_version": doc["engine_version"],
                        "backend": run.backend, "model": run.model, "batch": row["batch"],
                        "q_heads": shape["q_heads"], "kv_heads": shape["kv_heads"], "head_dim": shape["head_dim"],
                        "layers": shape["layers"], "dtype": "bfloat16", "output_tokens": serving.THROUGHPUT_TOKENS,
                        "tokens_per_s": round(row["tokens_per_s"], 1),
                        "decode_ms_per_token": round(row["decode_ms_per_token"], 3), "graph": not run.eager})
    return out


def speedups(engine: str, recs: list[dict]) -> list[dict]:
    """Our tokens/s over each built-in's, per model and batch (the plot's bars)."""
    ours = PLANS[engine].ours
    mine = {(r["model"], r["batch"]): r["tokens_per_s"] for r in recs if r["backend"] == ours}
    return [{"label": f"{r['model']} b{r['batch']} vs {r['backend']}",
             "speedup": mine[(r["model"], r["batch"])] / r["tokens_per_s"]}
            for r in recs if r["backend"] != ours and (r["model"], r["batch"]) in mine]


def throughput_table(recs: list[dict]) -> str:
    batches = sorted({r["batch"] for r in recs})
    lines = ["tokens/s (decode ms per token)",
             f"{'model':<9} {'backend':<12}" + "".join(f"{'batch ' + str(b):>20}" for b in batches)]
    cells = {(r["model"], r["backend"], r["batch"]): r for r in recs}
    for model, backend in dict.fromkeys((r["model"], r["backend"]) for r in recs):
        row = [cells.get((model, backend, b)) for b in batches]
        lines.append(f"{model:<9} {backend:<12}" + "".join(
            f"{c['tokens_per_s']:>11,.0f} ({c['decode_ms_per_token']:5.2f})" if c else f"{'-':>20}" for c in row))
    return "\n".join(lines)


def report(engine: str, state: Path) -> bool:
    """Writes records + plot, prints the throughput table and the verdicts; True when none failed."""
    recs = records(engine, state)
    if recs:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from common import plot_speedups, write_results
        path = write_results(f"e2e-{engine}", recs, {
            "engine": engine, "decode_ms_per_token": "(T(128 tokens) - T(1 token)) / 127 for the whole batch, "
                                                      "wall time of LLM/Engine.generate, best of two"})
        png = plot_speedups(f"e2e-{engine}", speedups(engine, recs),
                            f"{engine}: {PLANS[engine].ours} tokens/s over built-in backends")
        print("\n" + throughput_table(recs) + f"\nresults {path}" + (f" and {png}" if png else ""))
    verdicts = evaluate(engine, state)
    print("\nverdicts")
    for name, (passed, detail) in verdicts.items():
        mark = {True: "PASS", False: "FAIL", None: "skip"}[passed]
        print(f"{mark}  {name}: {detail.splitlines()[0] if detail else ''}")
    return all(passed is not False for passed, _ in verdicts.values())


def copy_raw(engine: str, state: Path) -> None:
    """The state folder as one tarball under $OUT (the device tool returns a limited number of files); a
    later call on a fresh machine can resume from it (benchmarks/e2e_gpu.sh unpacks a carried copy)."""
    if os.environ.get("OUT"):
        import tarfile
        with tarfile.open(Path(os.environ["OUT"]) / f"e2e-{engine}-state.tar.gz", "w:gz") as tar:
            for f in sorted(state.iterdir()):
                if f.suffix in (".json", ".log"):
                    tar.add(f, arcname=f.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=sorted(PLANS), required=True)
    parser.add_argument("--state", type=Path, help="run results (default /tmp/pagedinfer-e2e-<engine>)")
    parser.add_argument("--only", default="", help="comma-separated backends or run names, and/or 'serve'")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="no timing, and no throughput-only backends")
    parser.add_argument("--budget", type=float, default=540, help="seconds for this call (0: no limit)")
    args = parser.parse_args(argv)
    state = args.state or Path(f"/tmp/pagedinfer-e2e-{args.engine}")
    finished = run_plan(args.engine, state, only=[w for w in args.only.split(",") if w],
                        throughput=not args.skip_throughput, budget_s=args.budget)
    copy_raw(args.engine, state)
    if not finished:
        return 3
    return 0 if report(args.engine, state) else 1


if __name__ == "__main__":
    sys.exit(main())
