"""`lowbit auto`'s zero-cost candidates: other int8 parameters per layer (variants.py), tried first, kept only when
measured better."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import lowbit
from conftest import tiny_cnn
from lowbit.auto.assign import Builder, Layer, find_layers
from lowbit.auto.search import CostModel, chain, trim, trim_order
from lowbit.auto.variants import closer, differs, offer, tune
from lowbit.plan import TensorParams

# A base whose ranges clip hard (the 65th percentile): other methods' ranges differ on every tensor.
CLIPPED = lowbit.Recipe(default=lowbit.Scheme(calibration="percentile", percentile=65.0))


@pytest.fixture
def calib() -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (32, 3, 16, 16)).astype(np.float32)


def builder_for(calib: np.ndarray, recipe: lowbit.Recipe | None = None) -> Builder:
    model = tiny_cnn()
    base = lowbit.quantize(model, calib=calib, recipe=recipe, progress=False)
    builder = Builder(model, base.plan, find_layers(model, base.plan))
    offer(builder, calib, None)
    return builder


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_a_range_variant_moves_only_its_layers_outputs_and_stays_int8(calib: np.ndarray) -> None:
    b = builder_for(calib, CLIPPED)
    assert set(b.ranges) == {"int8_minmax", "int8_mse", "int8_entropy"}  # not the base's own method again
    assert "int8_minmax" in b.offered["gap"]
    gap = next(x for x in b.layers if x.node == "gap")
    # the pool's output and the Flatten that carries it on at the same scale change together
    assert b.written(gap) == ["g", "f"]
    int8 = b.build(b.everywhere("int8"))
    moved = b.build({**b.everywhere("int8"), "gap": "int8_minmax"})
    for t in ("g", "f"):
        assert moved[1].tensors[t] == b.ranges["int8_minmax"][t]
        assert differs(moved[1].tensors[t], int8[1].tensors[t])
    unchanged = [t for t, p in int8[1].tensors.items() if p.kind == "activation" and t not in ("g", "f")]
    assert unchanged and all(moved[1].tensors[t] == int8[1].tensors[t] for t in unchanged)
    assert op_types(moved[0]) == op_types(int8[0])  # the same int8 graph: the same kernels, the same latency
    # a range variant needs no rule: the plan's tensors carry it, and the plan rebuilds the same bytes
    assert moved[2] == int8[2]
    again = lowbit.quantize(tiny_cnn(), plan=moved[1], progress=False).model
    assert again.SerializeToString() == moved[0].SerializeToString()


def test_a_16_bit_reader_widens_the_range_its_writer_chose(calib: np.ndarray) -> None:
    b = builder_for(calib, CLIPPED)
    wide = b.tensors({**b.everywhere("int8"), "conv1": "int8_minmax", "conv2": "int16"})
    assert wide["r1"].dtype == "uint16" and wide["r1"].range == b.ranges["int8_minmax"]["r1"].range


def test_no_guard_is_offered_where_the_guard_changed_weights(calib: np.ndarray) -> None:
    b = builder_for(calib)
    guarded = set(b.plan.overflow_guard)
    assert guarded  # the tiny model's weights trip the guard: the test is not vacuous
    assert {n for n, vs in b.offered.items() if "int8_noguard" in vs} == guarded
    for node in guarded:
        plan = b.build({**b.everywhere("int8"), node: "int8_noguard"})[1]
        assert node not in plan.overflow_guard  # its weights keep their full range
        assert set(plan.overflow_guard) == guarded - {node}


def test_a_range_within_two_percent_of_the_span_is_the_same_range() -> None:
    def tp(lo: float, hi: float) -> TensorParams:
        return TensorParams("uint8", [(hi - lo) / 255], [0], None, "activation", [lo, hi])

    assert not differs(tp(0.0, 6.0), tp(0.0, 6.1))  # within 2% of the span: the same range
    assert differs(tp(0.0, 6.0), tp(0.0, 5.0))


def test_tune_keeps_a_move_only_when_measured_better() -> None:
    start: dict = {"a": "int8", "b": "int8", "c": "int8", "d": "int8"}
    candidates: list = [
        ("a", "int8_mse"),
        ("b", "int8_minmax"),
        ("c", "int8_noguard"),
        ("a", "int8_minmax"),
        ("d", "int8_mse"),
    ]
    # estimated gains: a/minmax 3, b 2, a/mse 1, d 0.5, c none (never tried)
    gain = {
        ("a", "int8_minmax"): 3.0,
        ("b", "int8_minmax"): 2.0,
        ("a", "int8_mse"): 1.0,
        ("d", "int8_mse"): 0.5,
        ("c", "int8_noguard"): -1.0,
    }

    def estimate(a: dict) -> float:
        return 10.0 - sum(gain.get((n, p), 0.0) for n, p in a.items())

    tried: list[dict] = []

    rows = np.random.default_rng(0).uniform(0.5, 1.5, 64)  # each sample's noise at the start

    def measured(a: dict) -> tuple[float, np.ndarray]:
        """a/minmax: much less noise but an answer lost; b: an answer won, less noise; a/mse: the same answers,
        less noise; d: an answer won, the noise lower on average but not beyond chance (up on half the samples)."""
        tried.append(dict(a))
        wrong = 3 + (a["a"] == "int8_minmax") - (a["b"] == "int8_minmax") - (a["d"] == "int8_mse")
        factor = 1.0 - 0.3 * (a["a"] == "int8_minmax") - 0.1 * (a["b"] == "int8_minmax") - 0.05 * (a["a"] == "int8_mse")
        shuffle = np.where(np.arange(64) % 2 == 0, 0.2, -0.21) * (a["d"] == "int8_mse")
        return (float(wrong), rows * factor + shuffle)

    got = tune(start, candidates, estimate, measured, steps=10)
    kept = {**start, "a": "int8_mse", "b": "int8_minmax"}
    assert tried == [
        start,
        {**start, "a": "int8_minmax"},
        {**start, "b": "int8_minmax"},
        kept,
        {**kept, "d": "int8_mse"},
    ]
    assert got == kept
    assert tune(start, candidates, estimate, measured, steps=1) == start  # one try, a loss: nothing kept


def test_closer_needs_a_decrease_beyond_chance() -> None:
    rng = np.random.default_rng(0)
    before = rng.uniform(0.5, 1.5, 128)
    assert closer(before, before * 0.99)  # every sample 1% closer: far beyond chance
    assert not closer(before, before)
    jitter = before + rng.normal(0, 0.05, 128)
    assert not closer(before, jitter - 0.001)  # 0.1% lower on average, 5% up or down per sample: chance
    assert closer(before, jitter - 0.05)


def test_the_search_returns_to_the_tuned_int8_form_not_plain_int8() -> None:
    layers = [Layer("a", "Conv", inputs=("x",), outputs=("t",)), Layer("b", "Conv", inputs=("t",), outputs=("y",))]
    latency = {"int8": {"a": 1.0, "b": 1.0, "other": 0.0}, "float": {"a": 2.0, "b": 2.0}}
    latency["int8_mse"] = latency["int8"]
    cost = CostModel(layers, latency, {})
    noise = {"a": {"int8": 0.5, "int8_mse": 0.2, "float": 0.0}, "b": {"int8": 0.1, "float": 0.0}}
    tuned: dict = {"a": "int8_mse", "b": "int8"}
    steps = chain(cost, noise, start=tuned)
    assert steps[0].assignment == tuned
    # no step takes a back to plain int8 (more noise at no cost would never win, but it is not even offered)
    assert all(s.assignment["a"] in ("int8_mse", "float") for s in steps)
    start: dict = {"a": "float", "b": "float"}
    order = trim_order(cost, noise, start, base=tuned)
    assert set(order) == {"a", "b"}
    assert trim(start, order, lambda a: True, tuned) == tuned


def test_auto_tries_zero_cost_candidates_first_and_keeps_only_measured_gains(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    model, calib, ev = tmp_path / "tiny.onnx", tmp_path / "calib.npy", tmp_path / "eval.npy"
    onnx.save(tiny_cnn(), str(model))
    np.save(calib, rng.normal(0, 1, (32, 3, 16, 16)).astype(np.float32))
    np.save(ev, rng.normal(0, 1, (64, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "out.onnx"
    r = lowbit.auto_quantize(model, calib, ev, out, recipe=CLIPPED, max_drop=1.0, progress=False)
    tuned = [p for p in r.points if p["stage"] == "tune"]
    assert len(tuned) >= 2  # the base, then at least one candidate
    base = tuned[0]
    assert base["changed"] == {}
    # each candidate is measured on top of the best so far and kept only when it loses nothing and lowers the noise
    # (beyond chance: not checked here); the best is what every later stage starts from
    chain_start = next(p for p in r.points if p["step"] == 0)
    kept = [p for p in tuned if p["changed"] == chain_start["changed"]]
    assert kept  # the chain starts from a tuned point that was measured
    # the clipped base loses answers that other ranges keep: the tune must have won some back
    assert chain_start["score"] > base["score"] and chain_start["noise"] < base["noise"]
    assert chain_start["latency_ratio"] > 0 and all(v.startswith("int8") for v in chain_start["changed"].values())
    # the written model is re-made from its plan and recipe
    again = lowbit.quantize(model, plan=out.with_name("out.plan.json"), progress=False).model
    assert again.SerializeToString() == out.read_bytes()
    off = lowbit.auto_quantize(model, calib, ev, recipe=CLIPPED, max_drop=1.0, tune_steps=0, progress=False)
    assert not any(p["stage"] == "tune" for p in off.points)
    assert all(p in ("int8", "int16", "int4", "float") for p in off.assignment.values())
