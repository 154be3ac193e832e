"""Zero-cost candidates: other int8 parameters for one layer, at int8 latency.

The base recipe makes each choice once for the whole model: one calibration method for every range, the overflow
guard on every weight. For one layer another choice can lose fewer answers, and it costs nothing: the layer still
runs the same int8 kernels. The candidates (assign.VARIANTS): the layer's output range by another calibration
method (min-max, percentile, MSE, entropy; one calibration pass each, up front), and its weights without the u8 x s8
overflow guard (which shrinks weight ranges so that CPUs without VNNI cannot saturate; where the kernels measured
do not saturate, it only adds rounding error). A candidate is offered only where it changes the layer.

`tune` then tries them on the whole model, measured, and keeps one only when the measured model is better (no
answer lost, and less output noise beyond chance, paired over the samples): these moves cost no latency, so the
search tries them before any that does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..data import ImagePreprocess
from ..pipeline import quantize
from ..plan import TensorParams
from ..recipe import Recipe
from .assign import RANGE_VARIANTS, Builder, Precision

# A range differing from the base's by less than this fraction of its span is the same range for the search.
SAME_RANGE = 0.02


def differs(a: TensorParams, b: TensorParams) -> bool:
    if a.range is None or b.range is None:
        return a.scale != b.scale or a.zero_point != b.zero_point
    span = max(a.range[1] - a.range[0], 1e-12)
    return max(abs(a.range[0] - b.range[0]), abs(a.range[1] - b.range[1])) > SAME_RANGE * span


def offer(
    builder: Builder,
    calib: Any,
    preprocess: ImagePreprocess | None,
    methods: Sequence[Precision] = tuple(RANGE_VARIANTS),
    tell: Callable[[str], None] = lambda _: None,
) -> None:
    """Fill `builder.ranges` (one calibration per method not the base's own) and `builder.offered`: per static
    layer, the range methods that move one of its output ranges (each distinct range once) and `int8_noguard` where
    the guard changed its weights (`Plan.overflow_guard`)."""
    default = builder.base.default
    static = [x for x in builder.layers if (builder.base.scheme_for(x.node, x.op_type)[0] or default).mode == "static"]
    if not static:
        return
    for v in methods:
        method = RANGE_VARIANTS[v]
        if method == default.calibration:
            continue
        tell(f"calibrating with {method} for per-layer range candidates ...")
        recipe: Recipe = replace(builder.base, default=replace(default, calibration=method))  # type: ignore[arg-type]
        plan = quantize(builder.float_model, calib=calib, recipe=recipe, preprocess=preprocess, progress=False).plan
        builder.ranges[v] = {t: p for t, p in plan.tensors.items() if p.kind == "activation"}
    for x in static:
        found: list[Precision] = []
        seen: list[list[TensorParams]] = [[builder.plan.tensors[t] for t in builder.written(x)]]
        for v in builder.ranges:
            params = [builder.ranges[v].get(t) for t in builder.written(x)]
            if not params or any(p is None for p in params):
                continue
            ps = [p for p in params if p is not None]
            if all(any(differs(a, b) for a, b in zip(ps, other)) for other in seen):
                found.append(v)
                seen.append(ps)
        if builder.plan.overflow_guard.get(x.node):
            found.append("int8_noguard")
        if found:
            builder.offered[x.node] = tuple(found)


def closer(before: np.ndarray, after: np.ndarray, sigmas: float = 2.0) -> bool:
    """Are the outputs `after` closer to float's than `before`, beyond chance? Paired over samples (per-sample
    noise): the mean decrease must exceed `sigmas` standard errors, so a decrease other samples would not show is
    not taken."""
    d = np.asarray(before, np.float64) - np.asarray(after, np.float64)
    if len(d) < 2:
        return bool(d.sum() > 0)
    return bool(d.mean() > sigmas * d.std(ddof=1) / np.sqrt(len(d)))


def tune(
    start: dict[str, Precision],
    candidates: list[tuple[str, Precision]],
    estimate: Callable[[dict[str, Precision]], float],
    measured: Callable[[dict[str, Precision]], tuple[float, np.ndarray]],
    steps: int,
) -> dict[str, Precision]:
    """Zero-cost moves, each measured: the candidates (layer, variant) the estimate says lower the error, most
    first, at most `steps` of them, each tried on the current assignment and kept only when `measured` (the
    metric's loss, lower is better, and each sample's output noise) says the model lost nothing and its outputs
    came closer to float's beyond chance (`closer`). Both, because top-1 answers near a tie flip either way
    under changes this small: on EfficientNet-Lite0, moves kept for fewer lost answers (7 -> 5 of 128) and 1.5%
    less noise lost answers on held-out photos (92.2% -> 91.0%, bench/RESULTS_AUTO.md)."""
    now = dict(start)
    here = estimate(now)
    gains = [(here - estimate({**now, n: v}), i, n, v) for i, (n, v) in enumerate(candidates)]
    order = [(n, v) for g, _, n, v in sorted(gains, key=lambda k: (-k[0], k[1])) if g > 0][:steps]
    best = measured(now)
    for node, v in order:
        trial = {**now, node: v}
        key = measured(trial)
        if key[0] <= best[0] and closer(best[1], key[1]):
            now, best = trial, key
    return now
