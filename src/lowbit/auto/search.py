"""The search: a greedy order of precision changes, then the shortest prefix of it that meets the budget.

Start from the base int8 model. Each step makes the one change (a layer to a more accurate precision, or a layer
and its neighbours to float) that removes the most noise-alone per millisecond the cost model says it adds (a
change that saves time goes first).
That gives a chain of assignments, from fastest to float, whose estimated noise falls and estimated latency
rises. The chain is searched by bisection on what is actually measured: the metric on the evaluation data with
integer kernels (accuracy budget), or the paired latency ratio against float (latency budget). Each assignment
measured is a point of the explored front.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .assign import VARIANTS, Layer, Precision

# What a layer's tensors are between layers: fused int8 kernels read and write uint8; 16-bit Q/DQ never fuse in
# ONNX Runtime; int4 weight-only and float layers read and write float. The zero-cost variants are int8.
KIND = {"int8": "q8", "int16": "q16", "int4": "f", "float": "f", **dict.fromkeys(VARIANTS, "q8")}


@dataclass(frozen=True)
class Step:
    """One assignment of the chain, with what the measurements before any model was built predict for it."""

    assignment: dict[str, Precision]
    noise: float  # the estimated error: sum of the layers' noise alone, or the chain's objective
    ms: float  # the cost model's estimate (CostModel.ms)
    changed: tuple[str, ...] = ()  # the layers this step moved (none: the start)


@dataclass
class CostModel:
    """Estimated latency of an assignment: each layer's profiled time in its precision, the rest of the int8
    model's ("other"), and the QuantizeLinear + DequantizeLinear of every tensor where precisions meet (profiled
    on the all-16-bit model, where every tensor has them unfused)."""

    layers: list[Layer]
    latency: dict[str, dict[str, float]]
    boundary: dict[str, float]
    sources: frozenset[str] = frozenset()  # graph inputs: written by float
    sinks: frozenset[str] = frozenset()  # graph outputs: read as float
    # Where a float layer meets a quantized one, what ONNX Runtime adds besides the Q/DQ: the float Conv's own
    # per-channel DequantizeLinear and its NCHWc layout reorders (measured_mixed, on models with float layers
    # among int8 ones). Per tensor; added to `boundary` where "f" meets "q8"/"q16".
    mixed: dict[str, float] = field(default_factory=dict)
    # With a fitted run cost (runcost.fit): where float meets a quantized layer, the tensor's fitted edge price
    # instead of boundary + mixed, and `constant` instead of the int8 model's "other" time.
    edge: dict[str, float] = field(default_factory=dict)
    constant: float | None = None
    runs: int = 0  # moves also float contiguous runs of 2..runs layers (graph order) at once
    producer: dict[str, str] = field(init=False)
    consumers: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.producer, self.consumers = {}, {}
        for x in self.layers:
            for t in x.outputs:
                self.producer[t] = x.node
            for t in x.inputs:
                self.consumers.setdefault(t, []).append(x.node)

    def kinds(self, t: str, now: dict[str, Precision]) -> set[str]:
        """What tensor `t`'s writer and readers hold it as under `now` (graph inputs and outputs: float)."""
        kinds = {KIND[now[c]] for c in self.consumers.get(t, [])}
        if t in self.producer:
            kinds.add(KIND[now[self.producer[t]]])
        elif t in self.sources:
            kinds.add("f")
        if t in self.sinks:
            kinds.add("f")
        return kinds

    def meets_float(self, tensor: str, now: dict[str, Precision]) -> bool:
        """Whether `tensor` is an edge under `now`: float (or the graph's edge) on one side, quantized on another."""
        kinds = self.kinds(tensor, now)
        return "f" in kinds and len(kinds) > 1

    def ms(self, now: dict[str, Precision]) -> float:
        kernels = sum(self.latency[now[x.node]][x.node] for x in self.layers)
        if self.edge:
            total = (self.constant or 0.0) + kernels + sum(p for t, p in self.edge.items() if self.meets_float(t, now))
            return total + sum(c for t, c in self.boundary.items() if "q16" in self.kinds(t, now))
        total = self.latency["int8"].get("other", 0.0) + kernels
        for t, cost in self.boundary.items():
            kinds = self.kinds(t, now)
            if len(kinds) > 1 or "q16" in kinds:
                total += cost
            if "f" in kinds and len(kinds) > 1:
                total += self.mixed.get(t, 0.0)
        return total

    def mixed_tensors(self, now: dict[str, Precision]) -> list[str]:
        """The tensors where a float (or int4 weight-only) layer meets a quantized one in `now`."""
        return [t for t in self.boundary if "f" in (k := self.kinds(t, now)) and len(k) > 1]

    def neighbours(self, node: str) -> set[str]:
        x = next(y for y in self.layers if y.node == node)
        found = {self.producer[t] for t in x.inputs if t in self.producer}
        return found | {c for t in x.outputs for c in self.consumers.get(t, [])}


Objective = Callable[[dict[str, Precision]], float]


def measured_mixed(
    cost: CostModel, profiles: list[tuple[dict[str, Precision], float, dict[str, float]]], base_other: float
) -> dict[str, float]:
    """Per tensor, the extra time where float meets int8, from profiles of assignments with float layers among int8
    ones: (assignment, its unattributed "other" time, its conversions by tensor). A float Conv reading an int8
    tensor has its own per-channel DQ (profiled as `<tensor>_axis`); ONNX Runtime's NCHWc reorders are not
    named after a tensor, so their time (other minus the int8 model's) is spread over the mixed tensors in
    proportion to their Q+DQ time (both pass over the same tensor once). Unmeasured per-channel DQs: Q+DQ's time."""
    axis: dict[str, float] = {}
    factors = []
    for assignment, other, conversions in profiles:
        axis.update({t[: -len("_axis")]: v for t, v in conversions.items() if t.endswith("_axis")})
        spread = sum(cost.boundary[t] for t in cost.mixed_tensors(assignment))
        if spread > 0:
            factors.append(max(other - base_other, 0.0) / spread)
    factor = float(sum(factors) / len(factors)) if factors else 0.0
    return {t: axis.get(t, b) + factor * b for t, b in cost.boundary.items()}


def options_of(
    cost: CostModel, noise: dict[str, dict[str, float]], base: dict[str, Precision] | None = None
) -> dict[str, list[Precision]]:
    """Each layer's precisions that were both measured alone and profiled; its int8 form is the one in `base`
    (a zero-cost variant `tune` kept), so no estimate takes back what was measured better."""
    out: dict[str, list[Precision]] = {}
    for x in cost.layers:
        own = (base or {}).get(x.node, "int8")
        found = [own if p == "int8" else p for p in x.precisions()]
        out[x.node] = [p for p in found if p in noise[x.node] and x.node in cost.latency.get(p, {})]
    return out


def moves(
    cost: CostModel, options: dict[str, list[Precision]], now: dict[str, Precision]
) -> list[dict[str, Precision]]:
    """One layer to another precision, or a layer with its neighbours to float (one float layer between int8 ones
    pays two conversions; a float run of three pays them once), or (`cost.runs`) a contiguous run of layers in
    graph order to float at once: a whole block, or the gap between two float runs, priced as one run."""
    found: list[dict[str, Precision]] = []
    seen: set[tuple[str, ...]] = set()
    for x in cost.layers:
        found += [{x.node: p} for p in options[x.node] if p != now[x.node]]
        group = {n for n in {x.node} | cost.neighbours(x.node) if now[n] != "float" and "float" in options[n]}
        if len(group) > 1 and (key := tuple(sorted(group))) not in seen:  # b's group with a is a's with b
            seen.add(key)
            found.append(dict.fromkeys(key, "float"))
    able = [x.node for x in cost.layers if "float" in options[x.node]]
    for i in range(len(able)):
        for n in range(2, min(cost.runs, len(able) - i) + 1):
            part = tuple(sorted(m for m in able[i : i + n] if now[m] != "float"))
            if len(part) > 1 and part not in seen:
                seen.add(part)
                found.append(dict.fromkeys(part, "float"))
    return found


def best_move(
    cost: CostModel, options: dict[str, list[Precision]], now: dict[str, Precision], total: Objective
) -> dict[str, Precision] | None:
    """The move that lowers `total` the most per estimated millisecond it adds (moves that cost no time first, by
    the time they save; ties: graph order); None when no move lowers it."""
    here_noise, here_ms = total(now), cost.ms(now)
    best: tuple[float, float, float, int] | None = None
    chosen: dict[str, Precision] | None = None
    for i, move in enumerate(moves(cost, options, now)):
        trial = {**now, **move}
        gain, added = here_noise - total(trial), cost.ms(trial) - here_ms
        if gain < 0 or (gain == 0 and added >= 0):
            continue
        key = (float("inf"), -added, gain, -i) if added <= 0 else (gain / added, gain, 0.0, -i)
        if best is None or key > best:
            best, chosen = key, move
    return chosen


def chain(
    cost: CostModel,
    noise: dict[str, dict[str, float]],
    objective: Objective | None = None,
    start: dict[str, Precision] | None = None,
) -> list[Step]:
    """The greedy chain from the base int8 model (or `start`, its tuned form) to float. `noise[layer][precision]`:
    error alone; `objective`: the estimate of an assignment's error the steps lower (default: the sum of its
    layers' noise alone). Each step takes `best_move`: the most noise removed per estimated millisecond; moves that
    cost no time first."""
    layers = cost.layers
    options = options_of(cost, noise, start)
    now: dict[str, Precision] = dict(start) if start is not None else {x.node: "int8" for x in layers}

    def total(a: dict[str, Precision]) -> float:
        return objective(a) if objective is not None else sum(noise[x.node][a[x.node]] for x in layers)

    steps = [Step(dict(now), total(now), cost.ms(now))]
    while (move := best_move(cost, options, now, total)) is not None:
        now.update(move)
        steps.append(Step(dict(now), total(now), cost.ms(now), tuple(move)))
    # A layer whose error alone is nil (an Add kept float when its neighbours are) still errs among quantized
    # neighbours: the chain ends at all-float, which every budget on agreement with float meets.
    if any(p != "float" and "float" in options[n] for n, p in now.items()):
        now.update({n: "float" for n in now if "float" in options[n]})
        steps.append(Step(dict(now), total(now), cost.ms(now), tuple(now)))
    return steps


def repair(
    cost: CostModel,
    noise: dict[str, dict[str, float]],
    start: dict[str, Precision],
    wrong: Callable[[dict[str, Precision]], frozenset[int] | None],
    target: Callable[[frozenset[int]], Objective],
    steps: int,
) -> dict[str, Precision] | None:
    """A measured greedy search for a passing assignment: measure, then take the move that most lowers the
    estimated error *of the samples the measured model gets wrong* per estimated ms, and measure again.

    `wrong(a)` measures `a`: None when it meets the budget, else the samples it gets wrong; `target(samples)`: an
    estimate of the error on those samples (expected flips of just those answers). The chain ranks layers by their
    estimate on all samples; near the budget what matters is the one or two answers still wrong, and which
    layers push them over. Returns the first passing assignment, or None after `steps` measurements."""
    options = options_of(cost, noise, start)
    now = dict(start)
    for _ in range(steps):
        bad = wrong(now)
        if bad is None:
            return now
        move = best_move(cost, options, now, target(bad))
        if move is None:
            return None
        now = {**now, **move}
    return None


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


def trim_order(
    cost: CostModel,
    noise: dict[str, dict[str, float]],
    start: dict[str, Precision],
    objective: Objective | None = None,
    base: dict[str, Precision] | None = None,
    spans: bool = False,
) -> list[str | tuple[str, ...]]:
    """The layers of a passing assignment not at their int8 form (in `base`, default plain int8), in the order a
    measured trim tries them back at it: the most estimated milliseconds saved per noise alone added first (the
    chain's own criterion, backwards); layers whose return saves no time are left out.

    With `spans`, also every contiguous span of 2 or more such layers (graph order), all back at once. Why: with a
    run cost, a layer inside a float run saves nothing alone (its return opens two edges), but a whole stretch of
    a run's middle can save more kernel time than its two new edges cost (measured on EfficientNet-Lite0: the float
    prefix through block 5 without blocks 3-4, bench/RESULTS_AUTO.md, seventh round)."""
    here = cost.ms(start)
    home = base or {}

    def total(a: dict[str, Precision]) -> float:
        return objective(a) if objective is not None else sum(noise[x.node][a[x.node]] for x in cost.layers)

    away = [
        x.node
        for x in cost.layers
        if start[x.node] != home.get(x.node, "int8") and home.get(x.node, "int8") in noise[x.node]
    ]
    parts: list[tuple[str, ...]] = [(n,) for n in away]
    if spans:
        order = {x.node: i for i, x in enumerate(cost.layers)}
        for i in range(len(away)):
            j = i
            while j + 1 < len(away) and order[away[j + 1]] == order[away[j]] + 1:
                j += 1
                parts.append(tuple(away[i : j + 1]))
    here_total = total(start)
    keyed = []
    for i, part in enumerate(parts):
        trial = {**start, **{n: home.get(n, "int8") for n in part}}
        saved, added = here - cost.ms(trial), total(trial) - here_total
        if saved > 0:
            keyed.append((saved / max(added, 1e-12), i, part[0] if len(part) == 1 else part))
    return [n for *_, n in sorted(keyed, key=lambda k: (-k[0], k[1]))]


def trim(
    start: dict[str, Precision],
    order: Sequence[str | tuple[str, ...]],
    passes: Callable[[dict[str, Precision]], bool],
    base: dict[str, Precision] | None = None,
    reorder: Callable[[dict[str, Precision]], Sequence[str | tuple[str, ...]]] | None = None,
    steps: int | None = None,
) -> dict[str, Precision]:
    """A measured refinement of an assignment that meets the budget: each layer of `order` (or span of layers, a
    tuple) goes back to its int8 form (in `base`, default plain int8) when the assignment still passes, measured
    (not estimated); otherwise it stays. The chain overshoots where its estimate ranks layers wrongly; this undoes
    the overshoot one measured layer at a time. With `reorder`, the order is computed again after each layer that
    went back (layers not tried yet only): with a run cost, the layer inside a float run saves nothing until its
    neighbour at the run's end has gone back. At most `steps` measurements (default: no limit)."""
    now = dict(start)
    queue, tried = list(order), set[str | tuple[str, ...]]()
    while queue and (steps is None or len(tried) < steps):
        item = queue.pop(0)
        tried.add(item)
        part = (item,) if isinstance(item, str) else item
        trial: dict[str, Precision] = {**now, **{n: (base or {}).get(n, "int8") for n in part}}
        if passes(trial):
            now = trial
            if reorder is not None:
                queue = [n for n in reorder(now) if n not in tried]
    return now


def contradicted(point: dict, failing: Sequence[dict]) -> int | None:
    """The step of a point of `failing` (measured, over the budget) no slower than `point` (by the cost model's
    estimate and by its paired measurement) and less noisy, if any: then `point`'s pass is luck of the samples.

    Why: a budget counted on a few hundred samples is a noisy test, and the trim and repair try dozens of
    assignments, so some pass by the chance of which answers flip. The output noise is measured on the same
    samples but is continuous: the rate of flips rises with it. A point that passes while a faster point with
    less noise fails is one the count favoured, not one that errs less (EfficientNet-Lite0, bench/RESULTS_AUTO.md,
    ninth round: the point written without this rule is contradicted so; on 1024 held-out crops it lost 33 answers
    at output noise 2.75e-3, the point written with it 29 at 2.08e-3)."""
    for q in failing:
        if (
            q["noise"] < point["noise"]
            and q["estimated_ms"] <= point["estimated_ms"]
            and q["latency_ratio"] <= point["latency_ratio"]
        ):
            return int(q["step"])
    return None


def most_accurate_within(points: dict[int, dict], ratio: float, counted: bool) -> int:
    """The latency budget's choice among the points measured within `ratio` (the chain's accuracy is not
    monotone: a layer float between int8 ones can lose more than it wins, so every measured point competes).

    `counted` (top-1 agreement, accuracy: a count of answers): the least output noise, then the best score, then
    the fastest. Not the best count: the zero-cost candidates alone measure some twenty near-int8 models, and the
    best of their counts is chance (EfficientNet-Lite0, bench/RESULTS_AUTO.md, tenth round: with a 0.62x budget it
    took a point at 0.47x keeping 97.7% of the search crops at noise 2.78e-3 over one at 0.59x keeping 96.9% at
    1.79e-3; on held-out crops the noise decides). Otherwise (cosine and other means): the best score, then the
    least noise, then the fastest."""
    within = [i for i, pt in points.items() if pt["latency_ratio"] <= ratio]

    def key(i: int) -> tuple[float, ...]:
        pt = points[i]
        if counted:
            return (-pt["noise"], pt["score"], -pt["latency_ratio"], -i)
        return (pt["score"], -pt["noise"], -pt["latency_ratio"], -i)

    return max(within, key=key)


def pareto(points: list[dict], keys: tuple[tuple[str, int], ...]) -> list[dict]:
    """Points not dominated on `keys` ((name, +1 to maximize or -1 to minimize)), by the first key ascending."""

    def dominates(a: dict, b: dict) -> bool:
        ge = all(s * a[k] >= s * b[k] for k, s in keys)
        return ge and any(s * a[k] > s * b[k] for k, s in keys)

    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: p[keys[0][0]])
