"""Float runs from the model's edges (edges.py), and moves offered once."""

from __future__ import annotations

import numpy as np

import lowbit
from conftest import tiny_cnn
from lowbit.auto.assign import Layer, Precision
from lowbit.auto.edges import cheapest_edge_run, edge_runs
from lowbit.auto.search import CostModel, moves, options_of

NAMES = [f"l{i}" for i in range(6)]


def line(edge: float = 0.3) -> CostModel:
    """x -> l0 -> t0 -> ... -> l5 -> t5 (= y), each float layer 1 ms dearer than int8 except l0 (a stem: no
    dearer); `edge` ms per tensor where float meets int8."""
    layers = [
        Layer(n, "Conv", inputs=("x" if i == 0 else f"t{i - 1}",), outputs=(f"t{i}",)) for i, n in enumerate(NAMES)
    ]
    int8 = {n: 1.0 for n in NAMES}
    flt = {n: (1.0 if i == 0 else 2.0) for i, n in enumerate(NAMES)}
    cost = CostModel(layers, {"int8": {**int8, "other": 0.0}, "float": flt}, {}, frozenset({"x"}), frozenset({"t5"}))
    cost.edge, cost.constant = {t: edge for t in ["x", *[f"t{i}" for i in range(6)]]}, 0.0
    return cost


def test_edge_runs_are_the_prefixes_and_suffixes() -> None:
    start: dict[str, Precision] = dict.fromkeys(NAMES, "int8")
    found = edge_runs(NAMES, start)
    assert len(found) == 2 * (len(NAMES) - 1)  # not the whole list: that is the float model
    assert dict.fromkeys(NAMES, "float") not in found
    for a in found:
        floats = [n for n in NAMES if a[n] == "float"]
        k = len(floats)
        assert floats in (NAMES[:k], NAMES[len(NAMES) - k :]), floats  # one contiguous run touching an end
    assert len({tuple(sorted(a.items())) for a in found}) == len(found)
    # a layer float already: a prefix that only covers it changes nothing and is left out
    found = edge_runs(NAMES, {**start, "l0": "float"})
    assert all(any(a[n] != ("float" if n == "l0" else "int8") for n in NAMES) for a in found)
    assert {"l0": "float", **dict.fromkeys(NAMES[1:], "int8")} not in found


def test_the_cheapest_passing_edge_run_is_found_without_bisection() -> None:
    """Passing is not monotone: the prefix through l2 passes, through l3 fails, through l4 passes again, and the
    suffixes never pass. The search measures in price order and returns the cheapest passing candidate: the one a
    brute force over all candidates finds."""
    cost = line()
    start: dict[str, Precision] = dict.fromkeys(NAMES, "int8")

    def ok(a: dict[str, Precision]) -> bool:
        floats = tuple(n for n in NAMES if a[n] == "float")
        return floats in (tuple(NAMES[:3]), tuple(NAMES[:5]))

    measured: list[dict[str, Precision]] = []

    def passes(a: dict[str, Precision]) -> bool:
        measured.append(a)
        return ok(a)

    got = cheapest_edge_run(cost, NAMES, start, passes, steps=50)
    best = min((a for a in edge_runs(NAMES, start) if ok(a)), key=cost.ms)
    assert got == best == {**start, **dict.fromkeys(NAMES[:3], "float")}
    prices = [cost.ms(a) for a in measured]
    assert prices == sorted(prices)  # cheapest first
    assert measured[-1] == got  # and it stopped at the first that passed
    assert cost.ms(dict.fromkeys(NAMES[:3], "float") | dict.fromkeys(NAMES[3:], "int8")) < cost.ms(
        dict.fromkeys(NAMES[3:], "float") | dict.fromkeys(NAMES[:3], "int8")
    )  # (the stem's float kernel is no dearer: a prefix costs less than a suffix of the same length)


def test_the_edge_search_keeps_to_its_cap_and_steps() -> None:
    cost = line()
    start: dict[str, Precision] = dict.fromkeys(NAMES, "int8")
    measured: list[dict[str, Precision]] = []

    def never(a: dict[str, Precision]) -> bool:
        measured.append(a)
        return False

    assert cheapest_edge_run(cost, NAMES, start, never, steps=4) is None
    assert len(measured) == 4
    measured.clear()
    cap = cost.ms({**start, **dict.fromkeys(NAMES[:2], "float")})
    assert cheapest_edge_run(cost, NAMES, start, never, steps=50, cap_ms=cap) is None
    assert measured and all(cost.ms(a) <= cap for a in measured)
    assert len(measured) < len(edge_runs(NAMES, start))  # the dearer ones were never built


def test_moves_are_distinct() -> None:
    """A layer's group with its neighbour is the neighbour's with it: offered once, so no search measures the
    same move twice."""
    cost = line()
    cost.runs = 3
    noise = {n: {"int8": 0.1, "float": 0.0} for n in NAMES}
    now: dict[str, Precision] = dict.fromkeys(NAMES, "int8")
    found = moves(cost, options_of(cost, noise, now), now)
    keys = [tuple(sorted(m.items())) for m in found]
    assert len(set(keys)) == len(keys)
    assert {"l0": "float", "l1": "float"} in found


def test_auto_measures_edge_runs_only_below_a_passing_point() -> None:
    """End to end on a small CNN with a zero cosine budget: any edge run measured is a single float run from the
    input or the output, estimated no dearer than the chain's passing point, and never the float model itself;
    `edge_steps=0` measures none. (On this CNN float kernels are about as fast as int8 ones, so there may be no
    edge run cheaper than the passing point: the unit tests above check the search itself.)"""
    rng = np.random.default_rng(0)
    calib = rng.normal(0, 1, (16, 3, 16, 16)).astype(np.float32)
    ev = rng.normal(0, 1, (24, 3, 16, 16)).astype(np.float32)
    kw: dict = {"max_drop": 0.0, "metric": "cosine", "repair_steps": 0, "progress": False}
    r = lowbit.auto_quantize(tiny_cnn(), calib, ev, **kw)
    assert r.met
    chain_passing = min(p["estimated_ms"] for p in r.points if p["stage"] == "chain" and p["drop"] <= 0)
    order = list(r.assignment)  # graph order of the layers; every layer here can be float
    for p in (p for p in r.points if p["stage"] == "edge run"):
        assert p["estimated_ms"] <= chain_passing + 1e-9
        floats = [n for n in order if p["changed"].get(n) == "float"]
        k = len(floats)
        assert 0 < k < len(order) and floats in (order[:k], order[len(order) - k :]), floats
    off = lowbit.auto_quantize(tiny_cnn(), calib, ev, edge_steps=0, **kw)
    assert not [p for p in off.points if p["stage"] == "edge run"]
