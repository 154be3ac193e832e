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
