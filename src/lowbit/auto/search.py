"""The search: a greedy order of precision changes, then the shortest prefix of it that meets the budget.

Start from every layer's fastest measured form. Each step makes the one change (a layer to a more accurate
precision) that removes the most noise-alone per millisecond it adds (a change that adds no time goes first).
That gives a chain of assignments, from fastest to float, whose estimated noise falls and estimated latency
rises. The chain is searched by bisection on what is actually measured: the metric on the evaluation data with
integer kernels (accuracy budget), or the paired latency ratio against float (latency budget). Each assignment
measured is a point of the explored front.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .assign import Layer, Precision


@dataclass(frozen=True)
class Step:
    """One assignment of the chain, with what the measurements before any model was built predict for it."""

    assignment: dict[str, Precision]
    noise: float  # sum of the layers' noise alone
    ms: float  # sum of the layers' profiled times plus the rest of the int8 model's
    changed: str | None = None  # the layer this step moved (None: the start; "": every layer to float)


def chain(layers: list[Layer], latency: dict[str, dict[str, float]], noise: dict[str, dict[str, float]]) -> list[Step]:
    """The greedy chain. `latency[precision][layer]` in ms (and ["int8"]["other"]); `noise[layer][precision]`."""

    def cost(x: Layer, p: Precision) -> float:
        return latency[p][x.node]

    options = {x.node: [p for p in x.precisions() if p in noise[x.node] and x.node in latency[p]] for x in layers}
    now: dict[str, Precision] = {}
    for x in layers:  # the fastest form of each layer; of equal times, the more accurate
        now[x.node] = min(options[x.node], key=lambda p: (cost(x, p), noise[x.node][p]))  # noqa: B023
    other = latency["int8"].get("other", 0.0)

    def step(changed: str | None) -> Step:
        return Step(
            dict(now),
            sum(noise[x.node][now[x.node]] for x in layers),
            other + sum(cost(x, now[x.node]) for x in layers),
            changed,
        )

    steps = [step(None)]
    while True:
        best: tuple[float, float, str, Precision] | None = None
        for x in layers:
            here = now[x.node]
            for p in options[x.node]:
                gain = noise[x.node][here] - noise[x.node][p]
                if gain <= 0:
                    continue
                added = cost(x, p) - cost(x, here)
                ratio = float("inf") if added <= 0 else gain / added
                # ties (free changes) broken by the larger gain, then by graph order: deterministic
                key = (ratio, gain)
                if best is None or key > best[:2]:
                    best = (ratio, gain, x.node, p)
        if best is None:
            # A layer whose error alone is nil (an Add kept float when its neighbours are) still errs among
            # quantized neighbours: the chain ends at all-float, which every budget on agreement with float meets.
            if any(p != "float" and "float" in options[n] for n, p in now.items()):
                now.update({n: "float" for n in now if "float" in options[n]})
                steps.append(step(""))
            return steps
        now[best[2]] = best[3]
        steps.append(step(best[2]))


def shortest_passing(n: int, passes: Callable[[int], bool]) -> int:
    """The smallest k in [0, n) with passes(k), assuming passing is monotone along the chain; n - 1 (the chain's
    end, the most accurate) when none of the others passes. Bisection: about log2(n) measurements."""
    if passes(0):
        return 0
    lo, hi = 0, n - 1  # lo fails; hi is taken to pass (the most accurate assignment)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


def longest_within(n: int, within: Callable[[int], bool]) -> int | None:
    """The largest k in [0, n) with within(k) (monotone: once over, over for larger k); None if k = 0 is over."""
    if within(n - 1):
        return n - 1
    if not within(0):
        return None
    lo, hi = 0, n - 1  # lo within, hi over
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if within(mid):
            lo = mid
        else:
            hi = mid
    return lo


def pareto(points: list[dict], keys: tuple[tuple[str, int], ...]) -> list[dict]:
    """Points not dominated on `keys` ((name, +1 to maximize or -1 to minimize)), by the first key ascending."""

    def dominates(a: dict, b: dict) -> bool:
        ge = all(s * a[k] >= s * b[k] for k, s in keys)
        return ge and any(s * a[k] > s * b[k] for k, s in keys)

    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: p[keys[0][0]])
