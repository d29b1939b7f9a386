"""The E2E comparison functions and verdict thresholds (no engine, no GPU)."""
import pytest

from pagedinfer import serving
from pagedinfer.serving import Agreement


def scores(*prompts):
    return [{"logprobs": [lp for lp, _ in p], "top1": [t for _, t in p]} for p in prompts]


def greedy(*token_lists, texts=None):
    texts = texts or ["x"] * len(token_lists)
    return [{"token_ids": list(t), "text": s} for t, s in zip(token_lists, texts)]


def test_mean_abs_delta_over_all_positions():
    ref = scores([(-1.0, 5), (-2.0, 6)], [(-0.5, 7)])
    other = scores([(-1.5, 5), (-2.0, 6)], [(-0.2, 7)])
    assert serving.mean_abs_delta(ref, other) == pytest.approx((0.5 + 0.0 + 0.3) / 3)


def test_top1_agreement_counts_positions():
    ref = scores([(-1.0, 5), (-2.0, 6)], [(-0.5, 7), (-0.1, 8)])
    other = scores([(-1.0, 5), (-2.0, 9)], [(-0.5, 7), (-0.1, 8)])
    assert serving.top1_agreement(ref, other) == 0.75


@pytest.mark.parametrize("other", [scores([(-1.0, 5)]), scores([(-1.0, 5)], [])])
def test_mismatched_scores_raise(other):
    with pytest.raises(ValueError):
        serving.mean_abs_delta(scores([(-1.0, 5), (-1.0, 5)]), other)


def test_identical_continuations_compares_whole_lists():
    assert serving.identical_continuations(greedy([1, 2, 3], [4, 5], [6]), greedy([1, 2, 3], [4], [7])) == 1


def test_agreement_with_and_without_greedy():
    ref, other = scores([(-1.0, 5), (-1.0, 6)]), scores([(-1.2, 5), (-1.0, 7)])
    ag = serving.agreement(ref, other, greedy([1]), greedy([1]))
    assert (ag.positions, ag.top1, ag.identical, ag.prompts) == (2, 0.5, 1, 1)
    assert ag.mean_abs_delta == pytest.approx(0.1)
    assert serving.agreement(ref, other).identical is None


FLOOR = Agreement(mean_abs_delta=0.02, top1=0.95, positions=1000, identical=4, prompts=16)


@pytest.mark.parametrize("delta, passed", [(0.03, True), (0.0301, False), (0.0, True)])
def test_a_delta_at_most_one_and_a_half_floor(delta, passed):
    ours = Agreement(delta, 0.95, 1000, 4, 16)
    assert serving.judge(ours, FLOOR)["(a) logprob delta"][0] is passed


@pytest.mark.parametrize("top1, passed", [(0.94, True), (0.9399, False), (1.0, True)])
def test_a_top1_no_lower_than_floor_minus_one_percent(top1, passed):
    ours = Agreement(0.01, top1, 1000, 4, 16)
    assert serving.judge(ours, FLOOR)["(a) top-1 agreement"][0] is passed


@pytest.mark.parametrize("identical, passed", [(2, True), (1, False), (16, True)])
def test_b_identical_at_least_floor_minus_two(identical, passed):
    ours = Agreement(0.01, 0.95, 1000, identical, 16)
    assert serving.judge(ours, FLOOR)["(b) identical greedy"][0] is passed


def test_b_left_out_without_greedy():
    assert "(b) identical greedy" not in serving.judge(Agreement(0.01, 0.95, 1000), Agreement(0.02, 0.95, 1000))


def test_reads_as_text_needs_paris_and_no_empty_answer():
    answers = ["The capital of France is Paris."] + ["ok"] * (len(serving.PROMPTS) - 1)
    assert serving.reads_as_text(greedy(*[[1]] * len(answers), texts=answers))[0]
    wrong = ["La la la"] + answers[1:]
    assert not serving.reads_as_text(greedy(*[[1]] * len(answers), texts=wrong))[0]
    empty = answers[:3] + ["  "] + answers[4:]
    ok, detail = serving.reads_as_text(greedy(*[[1]] * len(answers), texts=empty))
    assert not ok and "[3]" in detail


def test_throughput_row_decode_latency_is_the_time_per_step():
    row = serving.throughput_row(batch=16, tokens=128, full_s=1.27 + 0.2, first_s=0.2, generated=16 * 128)
    assert row["decode_ms_per_token"] == pytest.approx(10.0)
    assert row["tokens_per_s"] == pytest.approx(16 * 128 / 1.47)


def test_prompts_include_france_and_self_repeating_ones():
    assert "capital of France" in serving.PROMPTS[serving.FRANCE]
    assert len(serving.PROMPTS) == 16 and sum("epeat" in p or "Copy" in p for p in serving.PROMPTS) >= 3


def test_command_line():
    args = serving.build_parser().parse_args(
        ["--engine", "vllm", "--backend", "CUSTOM", "--model", "m", "--eager", "--ngram", "--score", "a.json",
         "--score", "b.json", "--out", "runs/x.json"])
    assert (args.eager, args.ngram, args.score, args.skip_throughput) == (True, True, ["a.json", "b.json"], False)


def _load_e2e():
    import importlib.util
    import sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("benchmarks_e2e", Path(__file__).parents[1] / "benchmarks" / "e2e.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def _fake_state(e2e, engine, state, ours_shift):
    """Every run of the plan as if it had run: the built-ins and ours differ from the reference by a shift."""
    import json
    plan = e2e.PLANS[engine]
    n = len(serving.PROMPTS)
    names = [r.name for r in e2e.runs(engine)]
    for r in e2e.runs(engine):
        shift = 0.0 if r.backend == plan.base else 0.02 if r.backend != plan.ours else ours_shift
        tokens = [[1, 2, 3]] * n if shift <= 0.02 else [[1, 2, 4]] * n
        text = "The capital of France is Paris."
        doc = {"name": r.name, "backend": r.backend, "engine_version": "x", "eager": r.eager,
               "shape": {"q_heads": 9, "kv_heads": 3, "head_dim": 64, "layers": 30},
               "greedy": [{"token_ids": t, "text": text, "logprobs": [-1.0 - shift] * 3, "top1": [1] * 3}
                          for t in tokens],
               "scores": {s: scores(*[[(-1.0 - shift, 1)] * 3] * n) for s in names},
               "throughput": [{"batch": 1, "tokens_per_s": 100.0 + shift, "decode_ms_per_token": 5.0}] * r.throughput,
               "spec": {"draft_tokens": 10, "accepted_tokens": 4, "acceptance_rate": 0.4} if r.ngram else None}
        (state / f"{r.name}.json").write_text(json.dumps(doc))
    (state / "serve.json").write_text(json.dumps({"ok": True, "detail": "answer 'Paris'"}))


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_e2e_plan_judges_every_verdict(tmp_path, engine):
    e2e = _load_e2e()
    _fake_state(e2e, engine, tmp_path, ours_shift=0.01)
    verdicts = e2e.evaluate(engine, tmp_path)
    assert list(verdicts) == e2e.verdict_names(engine)
    assert all(passed for passed, _ in verdicts.values()), verdicts
    recs = e2e.records(engine, tmp_path)
    assert {r["backend"] for r in recs} == {r.backend for r in e2e.runs(engine) if r.throughput}
    assert all(r["op"] == "e2e" and r["engine"] == engine for r in recs)


def test_e2e_plan_fails_a_backend_far_from_the_reference(tmp_path):
    e2e = _load_e2e()
    _fake_state(e2e, "vllm", tmp_path, ours_shift=0.5)
    verdicts = e2e.evaluate("vllm", tmp_path)
    assert verdicts["smollm2 CUSTOM graphs: (a) logprob delta"][0] is False
    assert verdicts["smollm2 CUSTOM graphs: (b) identical greedy"][0] is False


def test_e2e_plan_skips_verdicts_of_runs_not_made(tmp_path):
    e2e = _load_e2e()
    verdicts = e2e.evaluate("sglang", tmp_path)
    assert all(passed is None for passed, _ in verdicts.values())
