"""The run cost (runcost.py): a price per edge where float meets int8, fitted to whole profiles, and the moves
that float contiguous runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lowbit.auto.assign import Layer, Precision
from lowbit.auto.runcost import EdgeFit, elements, fit, fitting_assignments
from lowbit.auto.search import CostModel, chain, moves, trim, trim_order

NAMES = [f"l{i}" for i in range(8)]
# x -> l0 -> t0 -> l1 -> t1 ... -> l7 -> t7 (= y); early tensors large, late ones small (as in a CNN)
SIZES = {"x": 3000.0, **{f"t{i}": 4000.0 / (1 + i) for i in range(8)}}


def line() -> CostModel:
    layers = [
        Layer(n, "Conv", inputs=("x" if i == 0 else f"t{i - 1}",), outputs=(f"t{i}",)) for i, n in enumerate(NAMES)
    ]
    int8 = {n: 0.5 for n in NAMES}
    # float kernels: some no dearer than int8 (a stem, a depthwise conv), the rest 2x
    flt = {n: (0.45 if i in (0, 2) else 1.0) for i, n in enumerate(NAMES)}
    return CostModel(layers, {"int8": {**int8, "other": 0.0}, "float": flt}, {}, frozenset({"x"}), frozenset({"t7"}))


TRUE = EdgeFit(constant=0.3, per_element=1e-4, per_edge=0.2, residual_ms=0.0)


def measured(cost: CostModel, a: dict[str, Precision], rng: np.random.Generator | None = None) -> float:
    """A synthetic profile's total: the true constant, the kernels, the true edge prices (+ optional noise)."""
    probe = CostModel(cost.layers, cost.latency, {}, cost.sources, cost.sinks)
    probe.edge, probe.constant = TRUE.price(SIZES), TRUE.constant
    return probe.ms(a) + (float(rng.normal(0, 0.01)) if rng is not None else 0.0)


def fitted(noisy: bool) -> tuple[CostModel, EdgeFit]:
    cost = line()
    rng = np.random.default_rng(0) if noisy else None
    everywhere = lambda p: dict.fromkeys(NAMES, p)  # noqa: E731
    shapes = [everywhere("int8"), everywhere("float"), *fitting_assignments(NAMES, everywhere)]
    found = fit(cost, SIZES, [(a, measured(cost, a, rng)) for a in shapes])
    assert found is not None
    cost.edge, cost.constant = found.price(SIZES), found.constant
    return cost, found


def test_the_fit_recovers_the_edge_price_from_whole_profiles() -> None:
    _, found = fitted(noisy=False)
    assert found.constant == pytest.approx(TRUE.constant, abs=1e-9)
    assert found.per_element == pytest.approx(TRUE.per_element, rel=1e-6)
    assert found.per_edge == pytest.approx(TRUE.per_edge, rel=1e-6)
    assert found.residual_ms < 1e-9
    _, rough = fitted(noisy=True)  # 0.01 ms of noise per profile: the edge price is still about right
    assert rough.per_edge == pytest.approx(TRUE.per_edge, abs=0.05)


def test_extending_a_run_costs_less_than_opening_one() -> None:
    cost, _ = fitted(noisy=True)
    base: dict[str, Precision] = dict.fromkeys(NAMES, "int8")
    run = {**base, "l3": "float", "l4": "float"}
    here = cost.ms(run)
    extend = cost.ms({**run, "l5": "float"}) - here
    alone = cost.ms({**run, "l6": "float"}) - here  # l6 has the same kernels as l5 and smaller tensors
    assert 0 < extend < alone
    # filling the gap between two runs removes two edges: cheaper than the layer alone among int8 ones
    two = {**base, "l1": "float", "l3": "float"}
    assert cost.ms({**two, "l2": "float"}) - cost.ms(two) < cost.ms({**base, "l2": "float"}) - cost.ms(base)
    # a float layer among int8 ones costs more than its kernel delta; at the graph input, floating the first
    # layer (float no dearer than int8) moves the input's edge onto a smaller tensor
    assert cost.ms({**base, "l6": "float"}) - cost.ms(base) > 1.0 - 0.5
    assert cost.ms({**base, "l0": "float"}) < cost.ms(base) + 0.2


def test_the_fit_keeps_edge_prices_non_negative() -> None:
    cost = line()
    everywhere = lambda p: dict.fromkeys(NAMES, p)  # noqa: E731
    shapes = [everywhere("int8"), everywhere("float"), *fitting_assignments(NAMES, everywhere)]
    # edges that cost nothing but the kernels, and one profile measured low: no negative price comes out
    totals = [(a, sum(cost.latency[a[n]][n] for n in NAMES) + 0.1) for a in shapes]
    totals[2] = (totals[2][0], totals[2][1] - 0.05)
    found = fit(cost, SIZES, totals)
    assert found is not None and found.per_edge >= 0 and found.per_element >= 0
    assert fit(cost, SIZES, totals[:2]) is None  # three unknowns need three profiles


def test_run_moves_float_contiguous_layers_and_the_chain_grows_runs() -> None:
    cost, _ = fitted(noisy=False)
    options: dict[str, list[Precision]] = {n: ["int8", "float"] for n in NAMES}
    base: dict[str, Precision] = dict.fromkeys(NAMES, "int8")
    assert not any(len(m) > 3 for m in moves(cost, options, base))  # runs off: single layers and neighbours
    cost.runs = 4
    found = moves(cost, options, base)
    assert {"l2": "float", "l3": "float", "l4": "float", "l5": "float"} in found
    assert not any(len(m) > 4 for m in found)
    # every layer errs alike: the chain's first steps float one contiguous run, not scattered layers
    noise = {n: {"int8": 0.01, "float": 0.0} for n in NAMES}
    steps = chain(cost, noise)
    firsts = [n for s in steps[:3] for n in s.changed]
    idx = sorted(NAMES.index(n) for n in set(firsts))
    assert idx == list(range(idx[0], idx[0] + len(idx)))


def test_trim_never_tries_splitting_a_run_that_would_cost_more() -> None:
    cost, _ = fitted(noisy=False)
    run: dict[str, Precision] = {**dict.fromkeys(NAMES, "int8"), **dict.fromkeys(NAMES[3:6], "float")}
    noise = {n: {"int8": 0.01, "float": 0.0} for n in NAMES}
    order = trim_order(cost, noise, run)
    assert "l4" not in order  # the middle back at int8 opens two edges: it saves no time
    assert set(order) <= {"l3", "l5"}


def test_elements_per_sample_from_one_float_run() -> None:
    # a Pad whose pads are computed: shape inference cannot size what follows it, one run can
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "one", "two"], ["c"]),  # the channel count, 3
        helper.make_node("Sub", ["c", "c"], ["z"]),
        helper.make_node("Concat", ["z", "z", "one", "one", "z", "z", "one", "one"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    ints = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("one", 1), ("two", 2))]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=ints)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.zeros((2, 3, 8, 8), np.float32)}
    got = elements(model, ["x", "h", "y", "nowhere"], feeds)
    assert got == {"x": 192.0, "h": 300.0, "y": 300.0, "nowhere": 300.0}  # 3 x 10 x 10; unknown: the median


def test_a_conv_after_a_folded_pad_reads_the_pads_input() -> None:
    """`prepare` folds a zero Pad into the conv after it (static padding, as in EfficientNet's exports), so that
    conv reads the tensor before the Pad: the layer must say so, or the edge between it and its writer is never
    priced (and its 16-bit form would not widen it)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    init = [
        onnx.numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32), "w1"),
        onnx.numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), "w2"),
        onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Pad", ["r1", "pads"], ["p1"], name="pad1"),
        helper.make_node("Conv", ["p1", "w2"], ["y"], name="conv2"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], initializer=init), opset_imports=[helper.make_opsetid("", 17)]
    )
    import lowbit
    from lowbit.auto.assign import find_layers

    result = lowbit.quantize(model, calib=rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32), progress=False)
    layers = {x.node: x for x in find_layers(model, result.plan)}
    assert layers["conv1"].outputs == ("r1",)
    assert layers["conv2"].inputs == ("r1",)


def test_trim_peels_a_run_from_its_ends_when_reordered() -> None:
    """With a run cost, only a run's end layers save time back at int8; once one is back, its neighbour is the
    new end. Re-ordering after each kept layer lets the measured trim peel a run it does not need."""
    cost, _ = fitted(noisy=False)
    run: dict[str, Precision] = {**dict.fromkeys(NAMES, "int8"), **dict.fromkeys(NAMES[3:7], "float")}
    noise = {n: {"int8": 0.01, "float": 0.0} for n in NAMES}
    measured: list[dict] = []

    def passes(a: dict) -> bool:  # only l3 is needed float
        measured.append(a)
        return a["l3"] == "float"

    once = trim(run, trim_order(cost, noise, run), passes)
    assert once != {**dict.fromkeys(NAMES, "int8"), "l3": "float"}  # one pass over the first order: stuck
    again = trim(run, trim_order(cost, noise, run), passes, reorder=lambda a: trim_order(cost, noise, a))
    assert again == {**dict.fromkeys(NAMES, "int8"), "l3": "float"}
    measured.clear()
    capped = trim(run, trim_order(cost, noise, run), passes, reorder=lambda a: trim_order(cost, noise, a), steps=2)
    assert len(measured) == 2 and capped != again


def test_auto_with_runs_fits_the_edge_price_and_writes_it(tmp_path) -> None:
    """End to end on a small CNN: `runs` fits the run cost from its profiles and the report carries it; the chosen
    model is the one its plan reproduces."""
    import lowbit
    from conftest import tiny_cnn

    rng = np.random.default_rng(1)
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), str(model))
    calib = rng.normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
    ev = rng.normal(0, 1, (48, 3, 16, 16)).astype(np.float32)
    out = tmp_path / "out.onnx"
    r = lowbit.auto_quantize(model, calib, ev, out, max_drop=1.0, runs=3, progress=False)
    assert r.met and set(r.run_cost) == {"constant", "per_element", "per_edge", "residual_ms"}
    assert r.run_cost["per_edge"] >= 0 and r.run_cost["per_element"] >= 0
    again = lowbit.quantize(model, plan=out.with_name("out.plan.json"), progress=False).model
    assert again.SerializeToString() == out.read_bytes()
    off = lowbit.auto_quantize(model, calib, ev, max_drop=1.0, runs=0, progress=False)
    assert off.run_cost == {}


def test_the_trim_with_spans_takes_back_the_middle_of_a_run() -> None:
    """A layer inside a float run saves nothing back at int8 alone (two new edges cost more than its kernel), but
    two together can: their kernels save 1.0 ms, the two edges cost ~0.6 ms. Singles only, the trim can peel a
    run from its ends, never open it; with spans it finds the cheaper assignment that keeps both ends float."""
    cost, _ = fitted(noisy=False)
    run: dict[str, Precision] = {**dict.fromkeys(NAMES, "int8"), **dict.fromkeys(NAMES[1:7], "float")}
    noise = {n: {"int8": 0.01, "float": 0.0} for n in NAMES}
    singles = trim_order(cost, noise, run)
    assert all(isinstance(n, str) for n in singles) and "l3" not in singles and "l4" not in singles
    spans = trim_order(cost, noise, run, spans=True)
    assert ("l3", "l4") in spans
    for part in spans:  # each is contiguous, inside the run, and estimated to save time
        names = (part,) if isinstance(part, str) else part
        idx = [NAMES.index(n) for n in names]
        assert idx == list(range(idx[0], idx[0] + len(idx))) and all(run[n] == "float" for n in names)
        assert cost.ms({**run, **dict.fromkeys(names, "int8")}) < cost.ms(run)

    def passes(a: dict) -> bool:  # both ends of the run are needed float
        return all(a[n] == "float" for n in ("l1", "l2", "l5", "l6"))

    want = {**dict.fromkeys(NAMES, "int8"), **dict.fromkeys(("l1", "l2", "l5", "l6"), "float")}
    stuck = trim(run, singles, passes, reorder=lambda a: trim_order(cost, noise, a))
    assert stuck == run
    found = trim(run, spans, passes, reorder=lambda a: trim_order(cost, noise, a, spans=True))
    assert found == want and cost.ms(found) < cost.ms(run)
