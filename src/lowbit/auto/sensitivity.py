"""Each layer's error alone: the model with only that layer quantized (in a given precision), the rest float.

The measure is the noise the layer adds to the final outputs, as a fraction of their energy (1 / linear SQNR),
summed over outputs. Noise from different layers adds roughly, so the search can rank layers by the noise they
remove per millisecond they cost. It is measured with ONNX Runtime's kernels (what ships; the rest of the model runs
its fast float kernels) on a few samples: a continuous measure needs far fewer samples than top-1 agreement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..evaluate.layerwise import escape
from ..pipeline import quantize
from ..plan import Plan
from ..recipe import Rule
from ..runtimes.ort import run_all, session
from .assign import Builder, Layer, Precision
from .flips import gap_error

Batches = list[dict[str, np.ndarray]]


def noise_fraction(refs: list[np.ndarray], outs: list[np.ndarray]) -> float:
    """Sum over outputs of sum (ref - out)^2 / sum ref^2 (0: identical)."""
    total = 0.0
    for r, o in zip(refs, outs):
        r64 = r.astype(np.float64)
        signal = float(np.vdot(r64, r64))
        d = r64 - o
        total += float(np.vdot(d, d)) / signal if signal > 0 else float(np.vdot(d, d) > 0)
    return total


def noise_per_sample(refs: list[np.ndarray], outs: list[np.ndarray]) -> np.ndarray:
    """Per sample (axis 0 of every output), the sum over outputs of |ref - out|^2 / |ref|^2."""
    total = np.zeros(len(refs[0]))
    for r, o in zip(refs, outs):
        r64 = r.reshape(len(r), -1).astype(np.float64)
        d = r64 - o.reshape(len(o), -1)
        signal = np.einsum("ij,ij->i", r64, r64)
        total += np.einsum("ij,ij->i", d, d) / np.where(signal > 0, signal, 1.0)
    return total


def alone(builder: Builder, layer: Layer, precision: Precision, batches: Batches) -> list[np.ndarray]:
    """The model's outputs when only `layer` is quantized, in `precision`."""
    scheme = builder.scheme(layer, precision)
    names = tuple(escape(n) for n in (layer.node, *layer.folded))
    recipe = replace(builder.base, rules=(Rule(names=names, scheme=scheme), Rule(names=("*",), scheme=None)))
    plan: Plan = replace(builder.plan, tensors=builder.tensors({layer.node: precision}))
    model = quantize(builder.float_model, recipe=recipe, plan=plan, progress=False).model
    return run_all(session(model, "kernels"), batches)


def sensitivities(
    builder: Builder,
    wanted: dict[str, list[Precision]],
    batches: Batches,
    refs: list[np.ndarray],
    tell: Callable[[str], None] = lambda _: None,
    top: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """layer -> precision -> noise alone, for the precisions `wanted` per layer (float is 0 by definition); with
    `top` (each sample's float first and second class), also layer -> precision -> per-sample top-two gap error."""
    out: dict[str, dict[str, float]] = {}
    gaps: dict[str, dict[str, np.ndarray]] = {}
    total = sum(len(v) for v in wanted.values())
    done = 0
    for layer in builder.layers:
        row: dict[str, float] = {"float": 0.0}
        gaps[layer.node] = {}
        for p in wanted.get(layer.node, []):
            outs = alone(builder, layer, p, batches)
            row[p] = noise_fraction(refs, outs)
            if top is not None:
                gaps[layer.node][p] = gap_error(refs[0], outs[0], *top)
            done += 1
            if done % 10 == 0 or done == total:
                tell(f"sensitivity: {done}/{total} layer-precision pairs measured")
        out[layer.node] = row
    return out, gaps
