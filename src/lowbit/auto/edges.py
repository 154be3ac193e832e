"""Float runs from the model's edges: one contiguous float run that starts at the graph's input or ends at its
output, tried by measurement, cheapest first.

Why: a float run among int8 layers pays an edge (Q/DQ, the float conv's per-channel DQ, layout reorders) where it
starts and where it ends; a run that starts where the model is float anyway (the graph input, or a float stem the
target keeps) or ends at the float output pays one. On EfficientNet-Lite0 (bench/RESULTS_AUTO.md, sixth round)
the answers the int8 model loses are near-ties that single layers and single blocks move either way, while one
float prefix through block 5 kept all but one of them; the greedy searches, which add the layer with the most
estimated gain per ms, land on 15-25 float layers in several runs instead. So each prefix and suffix of the
float-capable layers (graph order) is a candidate, priced by the cost model, and they are measured from the
cheapest up: the first that meets the budget is the cheapest passing one by that price.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .assign import Precision
from .search import CostModel


def edge_runs(able: list[str], start: dict[str, Precision]) -> list[dict[str, Precision]]:
    """`start` with each proper prefix and suffix of `able` (float-capable layers, graph order) made float; runs
    that change nothing are left out, and so is the whole list (the float model: the chain's end, and on a small
    model often the fastest, which is no quantization)."""
    found: list[dict[str, Precision]] = []
    seen: set[tuple[str, ...]] = set()
    for k in range(1, len(able)):
        for part in (able[:k], able[len(able) - k :]):
            key = tuple(sorted(part))
            if key in seen or all(start[n] == "float" for n in part):
                continue
            seen.add(key)
            found.append({**start, **dict.fromkeys(part, "float")})
    return found


def cheapest_edge_run(
    cost: CostModel,
    able: list[str],
    start: dict[str, Precision],
    passes: Callable[[dict[str, Precision]], bool],
    steps: int,
    cap_ms: float = float("inf"),
) -> dict[str, Precision] | None:
    """The first of `edge_runs` to pass, measured in order of the cost model's estimate (ties: shorter run, then
    prefixes first), skipping those estimated at more than `cap_ms` (a passing point is known at that price
    already); None after `steps` measurements or when none passes. Passing is not monotone in the run's length
    (a longer run can lose an answer a shorter one kept), so the candidates are measured one by one, not
    bisected."""
    order = sorted(
        enumerate(edge_runs(able, start)),
        key=lambda ia: (cost.ms(ia[1]), sum(p == "float" for p in ia[1].values()), ia[0]),
    )
    tried = 0
    for _, a in order:
        if tried >= steps or cost.ms(a) > cap_ms:
            break
        tried += 1
        if passes(a):
            return a
    return None


def near_run(
    cost: CostModel,
    points: dict[int, dict[str, Any]],
    assignments: dict[int, dict[str, Precision]],
    wrongs: dict[int, frozenset[int]],
    passing: list[int],
) -> int | None:
    """Of the measured edge runs that fail but are estimated cheaper than every passing point, the one with fewest
    wrong answers (ties: the cheaper, then the earlier): a start for one more measured repair. A run that keeps all
    but two near-tie answers at +0.07x can be closer to a cheap passing point than the int8 model is."""
    cap = min((cost.ms(assignments[i]) for i in passing), default=float("inf"))
    found = [
        i
        for i, p in points.items()
        if p.get("stage") == "edge run" and i in wrongs and wrongs[i] and cost.ms(assignments[i]) < cap
    ]
    if not found:
        return None
    return min(found, key=lambda i: (len(wrongs[i]), cost.ms(assignments[i]), i))
