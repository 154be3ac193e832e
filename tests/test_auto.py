"""`lowbit auto` on a small graph, end to end, and its parts (chain, bisection, front, profiler names)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import lowbit
from conftest import run_cli, tiny_cnn
from lowbit.auto.assign import Layer
from lowbit.auto.flips import Flips, expected_lost, fragile, gap_error, top_two
from lowbit.auto.profile import layer_of
from lowbit.auto.score import Scorer
from lowbit.auto.search import (
    CostModel,
    chain,
    contradicted,
    longest_within,
    measured_mixed,
    most_accurate_within,
    pareto,
    repair,
    shortest_passing,
    trim,
    trim_order,
)
from lowbit.runtimes.ort import run_all, session


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(1)
    model, calib, ev = tmp_path / "tiny.onnx", tmp_path / "calib.npy", tmp_path / "eval.npy"
    onnx.save(tiny_cnn(), str(model))
    np.save(calib, rng.normal(0, 1, (32, 3, 16, 16)).astype(np.float32))
    np.save(ev, rng.normal(0, 1, (48, 3, 16, 16)).astype(np.float32))
    return model, calib, ev


def test_auto_writes_a_model_its_plan_reproduces(data: tuple[Path, Path, Path], tmp_path: Path) -> None:
    model, calib, ev = data
    out = tmp_path / "out.onnx"
    r = lowbit.auto_quantize(model, calib, ev, out, max_drop=1.0, progress=False)
    assert r.met and r.reference - r.score <= 1.0
    # the score it reports is the written model's, measured again here with integer kernels
    x = np.load(ev)
    ref = run_all(session(str(model)), [{"x": x}])[0]
    got = run_all(session(str(out), "kernels"), [{"x": x}])[0]
    assert r.score == pytest.approx(100 * np.mean(ref.argmax(1) == got.argmax(1)))
    # the plan (its recipe holds the per-layer rules) re-applied to the float model gives the same bytes
    again = lowbit.quantize(model, plan=out.with_name("out.plan.json"), progress=False).model
    assert again.SerializeToString() == out.read_bytes()
    recipe = lowbit.Recipe.load(out.with_name("out.recipe.json"))
    assert recipe == r.recipe
    report = json.loads(out.with_name("out.auto.json").read_text())
    assert report["front"] and {"score", "latency_ratio", "size_bytes"} <= set(report["front"][0])
    assert set(r.assignment) == {"conv1", "conv2", "add", "gap", "fc"}
    assert set(r.latency_ms) == {"int8", "int16", "int4", "float"}  # int4: the Gemm only
    assert set(r.latency_ms["int4"]) == {"fc", "other"}


def test_a_zero_budget_on_cosine_ends_at_float_outputs(data: tuple[Path, Path, Path]) -> None:
    model, calib, ev = data
    r = lowbit.auto_quantize(model, calib, ev, max_drop=0.0, metric="cosine", progress=False)
    assert r.met and r.score == pytest.approx(r.reference, abs=1e-9)
    # every point measured before the chosen one lost cosine: the search took the first that did not
    assert all(p["drop"] > 0 for p in r.points if p["step"] < min(q["step"] for q in r.points if q["drop"] <= 0))


def test_the_scorer_keeps_the_answers_it_counts_wrong(data: tuple[Path, Path, Path]) -> None:
    """The repair targets the samples the measured model gets wrong: they must be the ones the score counts."""
    model, calib, ev = data
    clipped = lowbit.Recipe(default=lowbit.Scheme(calibration="percentile", percentile=65.0))  # loses answers
    x = np.load(ev)
    scorer = Scorer(onnx.load(str(model)), [{"x": x[:20]}, {"x": x[20:]}], "top1")
    int8 = lowbit.quantize(model, calib=calib, recipe=clipped, progress=False).model
    score = scorer.score(int8)
    ref = run_all(session(str(model)), [{"x": x}])[0].argmax(1)
    got = run_all(session(int8, "kernels"), [{"x": x}])[0].argmax(1)
    assert 0 < score < 100 and scorer.last_wrong == frozenset(np.flatnonzero(ref != got).tolist())
    with pytest.raises(lowbit.LowbitError, match="repair_steps"):
        lowbit.auto_quantize(model, calib, ev, repair_steps=-1, progress=False)


def test_latency_budget(data: tuple[Path, Path, Path]) -> None:
    model, calib, ev = data
    loose = lowbit.auto_quantize(model, calib, ev, latency_budget=1000.0, progress=False)
    assert loose.met and loose.points[-1]["step"] == max(p["step"] for p in loose.points)
    assert loose.score == max(p["score"] for p in loose.points)  # every point is within: the most accurate wins
    tight = lowbit.auto_quantize(model, calib, ev, latency_budget=1e-6, progress=False)
    assert not tight.met  # nothing runs in a millionth of float's time: said, not hidden


def test_cli_end_to_end(data: tuple[Path, Path, Path], tmp_path: Path) -> None:
    model, calib, ev = data
    out = tmp_path / "cli.onnx"
    res = run_cli("auto", str(model), "--calib", str(calib), "--eval", str(ev), "-o", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "explored front" in res.stdout and "latency" in res.stdout
    # class scores: the summary and the front give the score expected on new samples beside the counted one
    assert "expected on new samples like these:" in res.stdout and "  expected  " in res.stdout
    assert out.is_file() and out.with_name("cli.recipe.json").is_file()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--max-drop", "-1"], "--max-drop must be"),
        (["--latency-budget", "0"], "--latency-budget must be"),
        (["--metric", "accuracy"], "needs --labels"),
        (["--labels", "LABELS3"], "the labels number 3"),
        (["--metric", "top1", "--labels", "LABELS48"], "--labels measures accuracy"),
        (["--eval", "MISSING.npy"], "not found"),
        (["--preset", "default", "--recipe", "r.json"], "not both"),
        (["--tune-steps", "-1"], "tune_steps must be a whole number >= 0"),
        (["--runs", "-2"], "runs must be a whole number >= 0"),
        (["--edge-steps", "-1"], "edge_steps must be a whole number >= 0"),
    ],
)
def test_bad_input_is_one_line(data: tuple[Path, Path, Path], tmp_path: Path, extra: list[str], words: str) -> None:
    model, calib, ev = data
    np.save(tmp_path / "l3.npy", np.array([1, 2, 3]))
    np.save(tmp_path / "l48.npy", np.zeros(48, np.int64))
    subs = {
        "LABELS3": str(tmp_path / "l3.npy"),
        "LABELS48": str(tmp_path / "l48.npy"),
        "MISSING.npy": str(tmp_path / "no.npy"),
    }
    extra = [subs.get(e, e) for e in extra]
    args = ["auto", str(model), "--calib", str(calib), "--eval", str(ev), "-o", str(tmp_path / "o.onnx"), "--quiet"]
    if "--eval" in extra:
        args = args[:4] + args[6:]
    res = run_cli(*args, *extra)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:") and words in lines[0], res.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_writing_over_the_model_is_refused(data: tuple[Path, Path, Path]) -> None:
    model, calib, ev = data
    res = run_cli("auto", str(model), "--calib", str(calib), "--eval", str(ev), "-o", str(model), "--quiet")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


def test_writing_over_a_recipe_the_flags_change_is_refused(data: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """With --target or --no-overflow-guard the CLI reads --recipe itself; OUT.recipe.json may still not be it."""
    model, calib, ev = data
    out = tmp_path / "o.onnx"
    recipe = out.with_name("o.recipe.json")
    recipe.write_text(lowbit.Recipe().to_json())
    before = recipe.read_bytes()
    args = ["auto", str(model), "--calib", str(calib), "--eval", str(ev), "-o", str(out), "--quiet"]
    res = run_cli(*args, "--recipe", str(recipe), "--no-overflow-guard")
    assert res.returncode == 2 and "which this run reads" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert recipe.read_bytes() == before and not out.exists()


def test_cli_target_and_guard_flags_reach_the_base_recipe(data: tuple[Path, Path, Path], tmp_path: Path) -> None:
    model, calib, ev = data
    out = tmp_path / "o.onnx"
    args = ["auto", str(model), "--calib", str(calib), "--eval", str(ev), "-o", str(out), "--quiet", "--json"]
    res = run_cli(*args, "--target", "onnxruntime", "--no-overflow-guard", "--tune-steps", "0")
    assert res.returncode == 0, res.stderr
    written = lowbit.Recipe.load(out.with_name("o.recipe.json"))
    assert written.target == "onnxruntime" and written.default.avoid_overflow is False
    r = json.loads(res.stdout)
    # top-1 agreement on 48 samples: a count, so its interval is given and holds the score
    assert r["samples"] == 48 and r["score_interval"][0] <= r["score"] <= r["score_interval"][1]
    # and every point carries its expected drop on new samples; the written one's is reported
    assert all(p["expected_drop"] >= 0.0 for p in r["points"]) and r["expected_drop"] is not None
    assert any(p["expected_drop"] == r["expected_drop"] and p["score"] == r["score"] for p in r["points"])


@pytest.mark.parametrize("vnni", [True, False])
def test_a_vnni_cpu_hears_what_the_guard_costs(
    data: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], vnni: bool
) -> None:
    import lowbit.auto.run as auto_run

    model, calib, ev = data
    monkeypatch.setattr(auto_run, "cpu_has_vnni", lambda: vnni)
    assert lowbit.quantize(model, calib=calib, progress=False).plan.overflow_guard  # the base's guard acts here
    lowbit.auto_quantize(model, calib, ev, tune_steps=0, edge_steps=0, progress=True)
    said = "--no-overflow-guard if the model will not run on such CPUs" in capsys.readouterr().err
    assert said == vnni
    unguarded = lowbit.Recipe(default=lowbit.Scheme(avoid_overflow=False))
    lowbit.auto_quantize(model, calib, ev, recipe=unguarded, tune_steps=0, edge_steps=0, progress=True)
    assert "--no-overflow-guard" not in capsys.readouterr().err


def test_the_interval_of_a_count_narrows_with_samples() -> None:
    scorer = Scorer.__new__(Scorer)
    scorer.metric, scorer.refs = "top1_agreement", [np.zeros((128, 10))]
    lo, hi = scorer.interval(100 * 127 / 128)
    assert 95.0 < lo < 96.0 and 99.8 < hi < 100.0  # one answer lost of 128: anywhere from ~0.1 to ~4.3 points
    scorer.refs = [np.zeros((1280, 10))]
    lo10, hi10 = scorer.interval(100 * 1270 / 1280)
    assert lo < lo10 < 100 * 1270 / 1280 < hi10 < 100.0
    scorer.metric = "cosine"
    assert scorer.interval(99.0) is None and not scorer.counted  # a mean of cosines is no count


def test_chain_takes_the_most_noise_per_ms_first() -> None:
    # x -> a -> b -> c (-> y): t1 between a and b, t2 between b and c
    layers = [
        Layer("a", "Conv", inputs=("x",), outputs=("t1",)),
        Layer("b", "Conv", inputs=("t1",), outputs=("t2",)),
        Layer("c", "Gemm", inputs=("t2",), outputs=("y",)),
    ]
    latency = {
        "int8": {"a": 1.0, "b": 1.0, "c": 0.2, "other": 0.5},
        "int16": {"a": 3.0, "b": 3.0, "c": 0.5},
        "int4": {"c": 0.1},
        "float": {"a": 2.0, "b": 1.5, "c": 0.3},
    }
    boundary = {"x": 0.05, "t1": 0.2, "t2": 0.1, "y": 0.01}
    cost = CostModel(layers, latency, boundary, frozenset({"x"}), frozenset({"y"}))
    base = {"a": "int8", "b": "int8", "c": "int8"}
    assert cost.ms(base) == pytest.approx(0.5 + 2.2 + 0.05 + 0.01)  # input Q and output DQ only
    # b float between int8 a and c: its input and output tensors are converted
    assert cost.ms({**base, "b": "float"}) == pytest.approx(0.5 + 2.7 + 0.05 + 0.2 + 0.1 + 0.01)
    noise = {
        "a": {"int8": 0.10, "float": 0.0},
        "b": {"int8": 0.01, "float": 0.0},
        "c": {"int8": 0.001, "int4": 0.05, "int16": 0.0005, "float": 0.0},
    }
    steps = chain(cost, noise)
    assert steps[0].assignment == base and steps[0].ms == pytest.approx(cost.ms(base))
    # a to float: 0.1 for 1.0 + 0.05 (x no longer quantized) ... a's noise per ms wins first
    assert steps[1].changed == ("a",) and steps[1].assignment["a"] == "float"
    assert steps[-1].assignment == {"a": "float", "b": "float", "c": "float"}
    assert all(x.noise >= y.noise for x, y in zip(steps, steps[1:]))
    assert all(p != "int4" for s in steps for p in s.assignment.values())  # int4 adds noise: never a step
    assert steps[-1].noise == 0


def test_float_among_int8_pays_the_measured_mixed_cost() -> None:
    # x -> a -> t1 -> b -> t2 -> c -> y
    layers = [
        Layer("a", "Conv", inputs=("x",), outputs=("t1",)),
        Layer("b", "Conv", inputs=("t1",), outputs=("t2",)),
        Layer("c", "Gemm", inputs=("t2",), outputs=("y",)),
    ]
    latency = {"int8": {"a": 1.0, "b": 1.0, "c": 1.0, "other": 0.1}, "float": {"a": 2.0, "b": 2.0, "c": 2.0}}
    cost = CostModel(layers, latency, {"t1": 0.2, "t2": 0.4}, frozenset({"x"}), frozenset({"y"}))
    only_b: dict = {"a": "int8", "b": "float", "c": "int8"}
    assert cost.mixed_tensors(only_b) == ["t1", "t2"]
    assert cost.mixed_tensors({"a": "float", "b": "float", "c": "int8"}) == ["t2"]
    # profiled: b float among int8 -> t1's per-channel DQ 0.3, and 0.9 ms more unattributed (reorders) than int8's
    # 0.1, spread over t1 and t2 by their Q+DQ time (0.6 in all): factor 1.5
    mixed = measured_mixed(cost, [(only_b, 1.0, {"t1": 0.2, "t2": 0.4, "t1_axis": 0.3})], 0.1)
    assert mixed == pytest.approx({"t1": 0.3 + 1.5 * 0.2, "t2": 0.4 + 1.5 * 0.4})  # t2's DQ unmeasured: its Q+DQ
    before = cost.ms(only_b)
    cost.mixed = mixed
    assert cost.ms(only_b) == pytest.approx(before + 0.6 + 1.0)
    every = {"a": "int8", "b": "int8", "c": "int8"}
    assert cost.ms(every) == pytest.approx(0.1 + 3.0)  # nothing float meets int8: no extra
    assert cost.ms(dict.fromkeys(every, "float")) == pytest.approx(0.1 + 6.0)


def test_bisection_measures_few_points() -> None:
    seen: list[int] = []

    def passes(k: int) -> bool:
        seen.append(k)
        return k >= 37

    assert shortest_passing(100, passes) == 37 and len(seen) <= 9
    assert longest_within(100, lambda k: k <= 12) == 12
    assert longest_within(100, lambda k: False) is None
    assert shortest_passing(5, lambda k: True) == 0


def test_the_latency_budget_takes_the_least_noise_of_counts_and_the_best_mean() -> None:
    def pt(score: float, noise: float, ratio: float) -> dict:
        return {"score": score, "noise": noise, "latency_ratio": ratio}

    points = {0: pt(98.4, 3e-3, 0.45), 1: pt(99.2, 2.3e-3, 0.55), 2: pt(98.4, 1.6e-3, 0.61), 3: pt(100.0, 1e-3, 0.7)}
    # a count (top-1 answers): the least noise, though 1 counts one answer more
    assert most_accurate_within(points, 0.62, counted=True) == 2
    assert most_accurate_within(points, 0.8, counted=True) == 3
    # a mean (cosine): the best score first
    assert most_accurate_within(points, 0.62, counted=False) == 1
    points[4] = pt(98.4, 1.6e-3, 0.58)
    assert most_accurate_within(points, 0.62, counted=True) == 4  # equal in both: the faster
    points[5] = pt(99.2, 2.3e-3, 0.5)
    assert most_accurate_within(points, 0.62, counted=False) == 5


def test_pareto_drops_dominated_points() -> None:
    pts = [
        {"step": 0, "latency_ratio": 0.5, "score": 90.0, "size_bytes": 10},
        {"step": 1, "latency_ratio": 0.6, "score": 95.0, "size_bytes": 10},
        {"step": 2, "latency_ratio": 0.7, "score": 94.0, "size_bytes": 10},  # slower and worse than step 1
    ]
    front = pareto(pts, (("latency_ratio", -1), ("score", 1), ("size_bytes", -1)))
    assert [p["step"] for p in front] == [0, 1]


def test_a_pass_a_faster_quieter_failure_contradicts_is_not_taken() -> None:
    def pt(step: int, drop: float, noise: float, ms: float, ratio: float) -> dict:
        return {"step": step, "drop": drop, "noise": noise, "estimated_ms": ms, "latency_ratio": ratio}

    lucky = pt(5, 0.8, 2.2e-3, 5.6, 0.60)
    assert contradicted(lucky, [pt(7, 3.1, 2.3e-3, 5.0, 0.55), pt(3, 3.1, 1.9e-3, 5.5, 0.58)]) == 3
    # no contradiction: the failure is noisier, or slower by either measure
    assert contradicted(lucky, [pt(3, 3.1, 2.3e-3, 5.5, 0.58)]) is None
    assert contradicted(lucky, [pt(3, 3.1, 1.9e-3, 5.7, 0.58)]) is None
    assert contradicted(lucky, [pt(3, 3.1, 1.9e-3, 5.5, 0.61)]) is None
    assert contradicted(lucky, []) is None


def test_profiler_names_map_back_to_layers() -> None:
    by_node = {"/b/Conv": "/b/Conv", "/b/Clip": "/b/Conv", "fc": "fc"}
    by_tensor = {"/b/Clip_output_0": "/b/Conv"}
    assert layer_of("/b/Conv_token_12", by_node, by_tensor) == "/b/Conv"  # QLinearConv fused from QDQ
    assert layer_of("/b/Clip_output_0_nchwc", by_node, by_tensor) == "/b/Conv"  # NCHWc Conv+Clip
    assert layer_of("fc_MatMulNBits", by_node, by_tensor) == "fc"  # lowbit's int4 rewrite
    assert layer_of("fc_out_Q", by_node, by_tensor) is None  # a precision boundary
    assert layer_of("Transpose", by_node, by_tensor) is None


@pytest.mark.browser
def test_report_plots_the_explored_points(data: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from browser import external_references, render

    model, calib, ev = data
    out = tmp_path / "auto.onnx"
    r = lowbit.auto_quantize(model, calib, ev, out, max_drop=1.0, progress=False)
    assert any(p != "float" for p in r.assignment.values())  # the report diagnoses a quantized model
    html = tmp_path / "report.html"
    res = run_cli("report", str(model), str(out), "--data", str(ev), "-o", str(html), "--quiet")
    assert res.returncode == 0, res.stderr
    page = render(html)
    assert page.console == [] and external_references(page.root) == []
    points = page.root.find("svg", id="auto-front-chart").find_all("circle", cls="point")
    assert sorted(int(p.attrs["data-step"]) for p in points) == sorted(p["step"] for p in r.points)
    chosen = [p for p in points if "chosen" in p.classes]
    assert [int(p.attrs["data-step"]) for p in chosen] == [r.step]
    assert {int(p.attrs["data-step"]) for p in points if "front" in p.classes} == {p["step"] for p in r.front}
    # a higher score is drawn higher
    by_step = {int(p.attrs["data-step"]): float(p.attrs["cy"]) for p in points}
    best, worst = max(r.points, key=lambda p: p["score"]), min(r.points, key=lambda p: p["score"])
    if best["score"] > worst["score"]:
        assert by_step[best["step"]] < by_step[worst["step"]]
    assert len(page.root.find("table", id="auto-table").find("tbody").find_all("tr")) == len(r.front)


def test_a_dynamic_base_recipe_gets_no_16_bit_candidates(data: tuple[Path, Path, Path]) -> None:
    model, calib, ev = data
    r = lowbit.auto_quantize(model, calib, ev, recipe=lowbit.recipe.preset("dynamic"), progress=False)
    assert r.met
    # the recipe's scheme is dynamic everywhere (16-bit activations would be a conflicting scheme): none measured
    assert "int16" not in r.latency_ms and set(r.latency_ms) == {"int8", "int4", "float"}


def test_trim_keeps_only_returns_to_int8_that_still_pass() -> None:
    layers = [
        Layer("a", "Conv", inputs=("x",), outputs=("t1",)),
        Layer("b", "Conv", inputs=("t1",), outputs=("t2",)),
        Layer("c", "Gemm", inputs=("t2",), outputs=("y",)),
    ]
    latency = {"int8": {"a": 1.0, "b": 1.0, "c": 0.2, "other": 0.0}, "float": {"a": 2.0, "b": 3.0, "c": 0.3}}
    cost = CostModel(layers, latency, {})
    noise = {n: {"int8": e, "float": 0.0} for n, e in (("a", 0.5), ("b", 0.1), ("c", 0.1))}
    start: dict = {"a": "float", "b": "float", "c": "float"}
    # b saves 2 ms for 0.1 of noise, c 0.1 ms for 0.1, a 1 ms for 0.5: b first, then c, then a
    order = trim_order(cost, noise, start)
    assert order == ["b", "a", "c"]
    tried: list[dict] = []

    def passes(assignment: dict) -> bool:  # a stands in for a layer that must stay float
        tried.append(dict(assignment))
        return assignment["a"] == "float"

    got = trim(start, order, passes)
    assert got == {"a": "float", "b": "int8", "c": "int8"}
    assert [t for t in tried] == [
        {"a": "float", "b": "int8", "c": "float"},
        {"a": "int8", "b": "int8", "c": "float"},
        {"a": "float", "b": "int8", "c": "int8"},
    ]


def test_expected_flips_follow_the_margins() -> None:
    ref = np.array([[5.0, 4.9, 0.0], [0.0, 9.0, 1.0], [2.0, 0.0, 1.0]])
    first, second, margin = top_two(ref)
    assert first.tolist() == [0, 1, 0] and second.tolist() == [1, 2, 2]
    assert margin == pytest.approx([0.1, 8.0, 1.0])
    assert fragile(ref, 2).tolist() == [0, 2]  # the two smallest gaps, in sample order
    out = ref.copy()
    out[0, 0] -= 0.3  # sample 0's answer flips: its gap moved by -0.3
    assert gap_error(ref, out, first, second) == pytest.approx([-0.3, 0.0, 0.0])
    layers = [Layer("a", "Conv"), Layer("b", "Conv")]
    errors = {"a": {"int8": np.array([0.3, 0.3, 0.3])}, "b": {"int8": np.array([0.0, 0.0, 0.01])}}
    flips = Flips(layers, margin, errors)
    assert flips({"a": "float", "b": "float"}) == 0.0
    both, only_b = flips({"a": "int8", "b": "int8"}), flips({"a": "float", "b": "int8"})
    # a's error is three times sample 0's gap: P(flip) = Phi(-1/3) = 0.37 (zero-mean errors push either way);
    # sample 2 (gap 1): Phi(-3.3) = 4e-4; sample 1 (gap 8): nil
    assert flips({"a": "int8", "b": "float"}) == pytest.approx(0.3694 + 0.0004, abs=1e-4)
    assert both > only_b >= 0.0
    assert only_b == pytest.approx(0.0, abs=1e-12)  # 0.01 against a gap of 1: a 100-sigma event


def test_the_expected_lost_of_a_model_do_not_depend_on_which_sample_drew_which_error() -> None:
    """Half the samples are close calls (margin 0.1), half are not (margin 3); half the errors are large (one std
    of the scores against the runner-up), half nil. Which half drew the large errors decides the count (0 or 16
    flips of 32); the estimate pairs every margin with every error and reads a quarter of the answers either way."""
    rng = np.random.default_rng(0)
    background = rng.normal(0.0, 1.0, 100)
    background[:3] = -10.0, -10.0, 5.0  # classes 0 and 1 are the top two, below; 2 the third
    ref = np.tile(background, (32, 1))
    ref[:, 0], ref[:, 1] = 8.0, 8.0 - np.where(np.arange(32) < 16, 0.1, 3.0)
    big = np.where(np.arange(32) < 16, 0.0, 1.0)  # the large errors miss the close calls: a lucky draw
    lucky, unlucky = ref.copy(), ref.copy()
    lucky[:, 1] += big * ref.std(axis=1)
    unlucky[:, 1] += big[::-1] * ref.std(axis=1)
    assert int(np.sum(lucky.argmax(1) != 0)) == 0 and int(np.sum(unlucky.argmax(1) != 0)) == 16
    assert expected_lost(ref, lucky) == pytest.approx(8.0, abs=0.2)
    assert expected_lost(ref, unlucky) == pytest.approx(expected_lost(ref, lucky), rel=0.02)
    assert expected_lost(ref, ref) == 0.0
    everyone = ref.copy()
    everyone[:, 1] += 5.0 * ref.std(axis=1)  # every runner-up overtakes, for every pairing
    assert expected_lost(ref, everyone) == pytest.approx(32.0)
    third = ref.copy()
    third[:, 2] = 20.0  # the third class overtakes both: a flip all the same
    assert expected_lost(ref, third) == pytest.approx(32.0)


def test_with_labels_the_expected_loss_counts_right_answers_lost_less_wrong_ones_put_right() -> None:
    """Four samples, classes 0 and 1 close (margin 0.1); every error pushes class 1 up past class 0. Where the label
    is 0 a right answer is lost, where it is 1 a wrong one is put right, where it is 2 (neither) nothing changes."""
    ref = np.tile([5.0, 4.9, 0.0, -1.0], (4, 1))
    out = ref.copy()
    out[:, 1] += 1.0
    assert expected_lost(ref, out) == pytest.approx(4.0)  # against float's answers: all four flip
    assert expected_lost(ref, out, np.array([0, 0, 0, 0])) == pytest.approx(4.0)
    assert expected_lost(ref, out, np.array([0, 0, 1, 1])) == pytest.approx(0.0)  # two lost, two put right
    assert expected_lost(ref, out, np.array([0, 1, 1, 2])) == pytest.approx(-1.0)  # one lost, two put right
    assert expected_lost(ref, ref, np.array([0, 1, 2, 3])) == 0.0
    noisy = ref + np.random.default_rng(0).normal(0.0, 0.3, ref.shape)
    assert expected_lost(ref, noisy, ref.argmax(1)) == pytest.approx(expected_lost(ref, noisy))  # float's answers


def test_repair_targets_the_answers_still_wrong() -> None:
    """Layer a is cheap to make float and errs a little on every sample; b is dear and alone pushes sample 1 over.
    The all-sample estimate prefers a (fewer flips per ms overall); the measured repair sees sample 1 still wrong
    after that and takes b, then stops at the first passing assignment."""
    layers = [Layer("a", "Conv", inputs=("x",), outputs=("t",)), Layer("b", "Conv", inputs=("t",), outputs=("y",))]
    cost = CostModel(layers, {"int8": {"a": 1.0, "b": 1.0, "other": 0.0}, "float": {"a": 1.5, "b": 3.0}}, {})
    noise = {n: {"int8": 0.1, "float": 0.0} for n in ("a", "b")}
    margin = np.array([0.2, 0.2, 0.2, 0.2])
    errors = {"a": {"int8": np.array([0.3, 0.3, 0.3, 0.0])}, "b": {"int8": np.array([0.0, 0.5, 0.0, 0.0])}}
    flips = Flips(layers, margin, errors)
    base: dict = {"a": "int8", "b": "int8"}
    assert flips.only([1])({"a": "int8", "b": "float"}) < flips.only([1])({"a": "float", "b": "int8"})
    assert flips.only([0, 2])({"a": "float", "b": "int8"}) == 0.0  # b never reaches samples 0 and 2
    measured: list[dict] = []

    def wrong(a: dict) -> frozenset[int] | None:  # the "measured" answers: a int8 flips 0 and 2, b int8 flips 1
        measured.append(dict(a))
        bad = ({0, 2} if a["a"] == "int8" else set()) | ({1} if a["b"] == "int8" else set())
        return frozenset(bad) or None

    got = repair(cost, noise, base, wrong, lambda bad: flips.only(sorted(bad)), steps=5)
    assert got == {"a": "float", "b": "float"}
    assert measured == [base, {"a": "float", "b": "int8"}, {"a": "float", "b": "float"}]
    assert repair(cost, noise, base, wrong, lambda bad: flips.only(sorted(bad)), steps=2) is None  # out of steps


@pytest.mark.parametrize("excluded", ["conv2", "fc"])
def test_a_layer_left_float_stays_float_in_onnx_runtime(tmp_path: Path, excluded: str) -> None:
    """ONNX Runtime quantizes (per tensor, int8) the float weights of a Conv/Gemm that reads a per-tensor DQ; the
    layer must reach its kernels float, as the plan says, so what runs is what simulation measured."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float32)
    recipe = lowbit.Recipe(exclude_names=(excluded,))
    model = lowbit.quantize(tiny_cnn(), calib=x, recipe=recipe, progress=False).model
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ran = {n.name: n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert ran.get(excluded) in ("Conv", "Gemm", "FusedConv", "FusedGemm"), ran
    assert "QLinearConv" in ran.values() or excluded == "conv2"  # the other layers still run integer kernels
    kern = run_all(session(model, "kernels"), [{"x": x}])[0]
    sim = run_all(session(model, "simulate"), [{"x": x}])[0]
    assert np.abs(kern - sim).max() <= 1e-3 * np.abs(sim).max()


def test_the_summary_says_when_the_expected_drop_is_above_the_budget() -> None:
    from lowbit.auto.run import AutoResult
    from lowbit.cli.auto_cmd import auto_text

    point = {"step": 3, "score": 99.2, "expected_drop": 2.7, "latency_ratio": 0.6, "size_bytes": 5, "precisions": {}}
    r = AutoResult(
        None, None, lowbit.Recipe(), "top-1 agreement", 100.0, 99.2, 0.6, 5, 20, {"kind": "accuracy", "max_drop": 1.0},
        True, {}, front=[point], samples=128, score_interval=[95.7, 99.9], expected_drop=2.7,
    )  # fmt: skip
    text = auto_text(r)
    assert "expected on new samples like these: 2.7 points below float" in text
    assert "that is above the budget: on 128 samples" in text
    assert "   97.30    0.600x" in text  # the front's expected score: float's 100 less 2.7
    r.expected_drop = point["expected_drop"] = 0.5
    assert "above the budget" not in auto_text(r)
