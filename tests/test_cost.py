"""What makes the default `lowbit quantize` cheaper (bench/RESULTS_COST.md) leaves its answers alone: extremes-only
histograms for min-max recipes give the same bytes, the check's simulation stops early only when its first samples
settle the question (and then says so), and the speed check stops early only when its first rounds agree."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import lowbit
import lowbit.calibrate as calibrate_mod
import lowbit.evaluate.speed as speed_mod
import lowbit.observe.runner as runner_mod
from conftest import run_cli, tiny_cnn
from lowbit.calibrate import EXTREMES_BINS, histogram_bins
from lowbit.evaluate.check import SIMULATE_FIRST, runtime_check, settled
from lowbit.evaluate.outputs import output_fidelity
from lowbit.evaluate.speed import BLOCK, clear_count, speed_check
from lowbit.recipe import Recipe, Rule, Scheme


def _calib(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 16, 16)).astype(np.float32)


def test_only_min_max_recipes_get_extremes_only_histograms() -> None:
    assert histogram_bins(Recipe()) == EXTREMES_BINS
    assert histogram_bins(Recipe(default=Scheme(calibration="percentile"))) is None
    # One rule asking for another method anywhere keeps every histogram full (settle may re-route sources).
    mixed = Recipe(rules=(Rule(names=("conv2",), scheme=Scheme(calibration="entropy")),))
    assert histogram_bins(mixed) is None
    assert histogram_bins(Recipe(rules=(Rule(names=("conv2",), scheme=None),))) == EXTREMES_BINS


@pytest.mark.parametrize("calibration", ["minmax", "percentile"])
def test_extremes_only_histograms_give_the_same_bytes(monkeypatch, calibration: str) -> None:
    recipe = Recipe(default=Scheme(calibration=calibration), batch_size=4)
    data = _calib(40)
    fast = lowbit.quantize(tiny_cnn(), calib=data, recipe=recipe, progress=False)
    seen: list[int | None] = []
    real = calibrate_mod.histogram_bins
    monkeypatch.setattr(calibrate_mod, "histogram_bins", lambda r: seen.append(real(r)) or None)  # always full
    full = lowbit.quantize(tiny_cnn(), calib=data, recipe=recipe, progress=False)
    assert seen == [EXTREMES_BINS if calibration == "minmax" else None]  # the fast path was really taken (or not)
    assert fast.model.SerializeToString() == full.model.SerializeToString()
    assert fast.plan.to_json() == full.plan.to_json()


def test_settled_needs_every_output_clearly_inside_the_threshold() -> None:
    rng = np.random.default_rng(0)
    k = rng.standard_normal((8, 10))
    assert settled([k], [k + 1e-6 * rng.standard_normal((8, 10))])
    assert not settled([k], [k + 0.3 * rng.standard_normal((8, 10))])  # cosine well below 0.999
    assert not settled([k, k], [k, k + 0.3 * rng.standard_normal((8, 10))])  # one output off is enough
    assert not settled([k[:1]], [k[:1]])  # one sample has no spread to judge
    assert not settled([np.zeros((8, 10))], [np.zeros((8, 10))])  # no direction, no cosine
    assert not settled([k], [k], threshold=1.0)  # nothing is clearly above a cosine of 1


def test_the_simulation_stops_early_only_when_settled() -> None:
    model = tiny_cnn()
    q = lowbit.quantize(model, calib=_calib(32), recipe=Recipe(batch_size=4), progress=False)
    x = _calib(24, seed=5)
    batches = [{"x": x[i : i + 4]} for i in range(0, 24, 4)]
    early = runtime_check(model, q.model, batches)
    full = runtime_check(model, q.model, batches, threshold=1.0)  # never settled: every sample simulated
    assert early["samples"] == full["samples"] == full["simulate_samples"] == 24
    assert early["simulate_samples"] == SIMULATE_FIRST  # two batches of 4
    # The kernels were measured on every sample either way; the simulation's numbers are those of its samples.
    assert early["kernels"] == full["kernels"]
    from lowbit.runtimes.ort import run_all, session

    n = SIMULATE_FIRST
    ref = run_all(session(model), batches)[0]
    sim = run_all(session(q.model, "simulate"), batches)[0]
    kern = run_all(session(q.model), batches)[0]
    assert early["simulate"] == output_fidelity(ref[:n], sim[:n], "y", early["outputs"][0]["kind"])
    assert early["kernels_vs_simulation"] == output_fidelity(sim[:n], kern[:n], "y", early["outputs"][0]["kind"])
    assert full["simulate"] == output_fidelity(ref, sim, "y", full["outputs"][0]["kind"])


def test_the_summary_says_how_many_samples_were_simulated(tmp_path: Path) -> None:
    model, data, out = tmp_path / "m.onnx", tmp_path / "c.npy", tmp_path / "q.onnx"
    onnx.save(tiny_cnn(), str(model))
    np.save(data, _calib(32))
    run = run_cli("quantize", str(model), "-o", str(out), "--calib", str(data), "--quiet", "--no-speed-check")
    assert run.returncode == 0, run.stderr
    assert f"float simulation on the first {SIMULATE_FIRST}, enough to show the kernels match it" in run.stdout


def _fake_latency(ratios: list[float]):
    """interleaved_latency stand-in: float takes 1 ms per round, quantized `ratio` ms, rounds taken in order."""
    calls: list[int] = []

    def fake(sessions, feeds, runs=50, warmup=5, budget_s=None, min_runs=5):
        start = sum(calls)
        part = ratios[start : start + runs]
        calls.append(len(part))
        return {"float": [1e-3] * len(part), "quantized": [r * 1e-3 for r in part]}

    return fake, calls


def test_clear_counts_are_a_sign_test() -> None:
    assert [clear_count(n) for n in (8, 16, 24)] == [7, 12, 17]
    assert clear_count(4) == 5  # 4 rounds can never be clear at 5%


@pytest.mark.parametrize(
    ("ratios", "rounds"),
    [
        ([0.5] * 7 + [1.2] + [0.5] * 22, BLOCK),  # 7 of 8 clearly faster: one slow spell is allowed
        ([1.3] * 30, BLOCK),  # clearly slower
        ([0.5] * 6 + [1.2] * 2 + [0.5] * 22, 2 * BLOCK),  # 6 of 8: not yet; 14 of 16 is
        ([0.5, 1.2] * 15, 30),  # half and half: every round runs
        ([1.0] * 30, 30),  # too close to call
    ],
)
def test_the_speed_check_stops_early_only_when_its_rounds_agree(monkeypatch, ratios, rounds) -> None:
    fake, calls = _fake_latency(ratios)
    monkeypatch.setattr(speed_mod, "interleaved_latency", fake)
    model = tiny_cnn()
    res = speed_check(model, model, {"x": _calib(1)}, max_rounds=30)
    assert res["rounds"] == rounds == sum(calls)
    assert res["ratio"] == pytest.approx(float(np.median(ratios[:rounds])))


def test_the_mmap_threshold_is_fixed_only_while_calibration_runs_whole_batches(monkeypatch) -> None:
    """Calibration fixes glibc's threshold at 128 KiB (the flat peak of whole batches) and sets 32 MiB once it runs
    a sample at a time (Runner) and again when it ends, so nothing after calibration keeps the fixed threshold.
    Without calibration data (dynamic mode) the process's allocator is left as it was."""
    calls: list[int] = []
    monkeypatch.setattr(runner_mod, "_mmap_threshold", lambda size: calls.append(size))
    lowbit.quantize(tiny_cnn(), calib=_calib(8), progress=False)
    # fixed, relaxed once the first batch shows samples may run alone, relaxed again as calibration ends
    # (and by the pipeline after deciding)
    assert calls[:3] == [128 * 1024, 32 * 1024 * 1024, 32 * 1024 * 1024]
    assert set(calls[3:]) <= {32 * 1024 * 1024}
    calls.clear()
    lowbit.quantize(tiny_cnn(), recipe=Recipe(default=Scheme(mode="dynamic")), progress=False)
    assert calls == []


def test_cost_bench_children_read_bytecode_compiled_before_the_runs(tmp_path: Path) -> None:
    """bench/cost.py compiles each measured checkout once before its timed runs, and its children read that
    bytecode: an installed lowbit, like ORT's tools in site-packages, does not compile its modules in every run."""
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import cost

    src = tmp_path / "checkout"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("VALUE = 41 + 1\n")
    cost.compile_sources([src])
    assert [p.name.split(".")[0] for p in src.rglob("*.pyc")] == ["__init__"]
    env = {**cost.os.environ, **cost.bytecode_env(), "PYTHONPATH": str(src), "PYTHONVERBOSE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", "import pkg; print(pkg.VALUE)"], env=env, capture_output=True, text=True
    )
    assert run.stdout.strip() == "42"
    assert f"matches {src / 'pkg' / '__init__.py'}" in run.stderr  # read from the bytecode, not compiled again


def test_cost_bench_children_import_the_checkout_named_relative_to_where_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`PYTHONPATH=src:examples bench/cost.py`: its children run in the work folder, and still import this
    checkout's lowbit (a relative path there named nothing, and they imported the installed one)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import cost

    repo = Path(__file__).resolve().parents[1]
    fake = tmp_path / "elsewhere" / "src" / "lowbit"  # what a relative `src` would name from the work folder
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["src", "examples"]))
    roots = cost.absolute_pythonpath()
    assert roots == [repo / "src", repo / "examples"]
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cost.which_lowbit("cli", None, True) == str(repo / "src" / "lowbit" / "__init__.py")
    base = tmp_path / "base"
    (base / "src" / "lowbit").mkdir(parents=True)
    (base / "src" / "lowbit" / "__init__.py").write_text("")
    assert cost.which_lowbit("cli-base", base, True) == str(base / "src" / "lowbit" / "__init__.py")
