"""What a float run costs: its layers' own kernel time, plus one price per tensor where it meets int8.

ONNX Runtime's cost of a float layer among int8 ones is mostly at the run's edges (a QuantizeLinear or
DequantizeLinear, the float Conv's per-channel DQ, NHWC <-> NCHW transposes, NCHWc reorders), not in its kernel:
measured on EfficientNet-Lite0, int8 depthwise and stem convs are no faster than float ones, and a float layer alone
among int8 ones cost 1.3-3.8x what it cost inside a contiguous float run (bench/RESULTS_AUTO.md, `grouping`). So
an assignment's time is modelled as

    constant + sum of each layer's kernel time in its precision + sum over edge tensors (alpha * elements + gamma)

where an edge tensor is one a float layer (or a graph input/output) and a quantized layer share. The three numbers
are fitted by least squares to whole profiles of assignments with known edges: all int8, all float, every other
layer float, float in long contiguous runs. Extending a run moves one edge (a small change); opening a run adds two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .assign import Precision
from .search import CostModel


@dataclass(frozen=True)
class EdgeFit:
    """The fitted model: ms = constant + kernels + sum over edges (per_element * elements + per_edge)."""

    constant: float
    per_element: float
    per_edge: float
    residual_ms: float  # root mean square of the fit over its profiles

    def price(self, elements: dict[str, float]) -> dict[str, float]:
        return {t: self.per_element * n + self.per_edge for t, n in elements.items()}


def elements(model: onnx.ModelProto, tensors: list[str], feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Elements per sample of each tensor, from one float run on `feeds` with the tensors as extra outputs (shape
    inference cannot size a tensor after a Pad whose pads are computed). A tensor the model does not have gets
    the median of the others, so it still pays an edge."""
    import onnxruntime as ort

    have = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    wanted = [t for t in tensors if t in have]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in wanted if t not in known)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    run = dict(zip(names, sess.run(None, feeds)))
    found = {t: float(run[t].size) / max(1, len(run[t])) for t in wanted if t in run}
    fill = float(np.median(list(found.values()))) if found else 1.0
    return {t: found.get(t, fill) for t in tensors}


def edges(cost: CostModel, now: dict[str, Precision], tensors: list[str]) -> list[str]:
    """The tensors where float (or a graph input/output) meets a quantized layer under `now`."""
    return [t for t in tensors if cost.meets_float(t, now)]


def fit(cost: CostModel, sizes: dict[str, float], profiles: list[tuple[dict[str, Precision], float]]) -> EdgeFit | None:
    """Least squares of each profile's total (ms) minus its layers' kernel times on [1, edge elements, edges];
    the two edge terms are kept >= 0 (a negative one is dropped and the rest refitted). None with fewer than three
    profiles (the fit has three unknowns)."""
    if len(profiles) < 3:
        return None
    tensors = sorted(sizes)
    rows, y = [], []
    for a, total in profiles:
        kernels = sum(cost.latency[a[x.node]][x.node] for x in cost.layers)
        met = edges(cost, a, tensors)
        rows.append([1.0, sum(sizes[t] for t in met), float(len(met))])
        y.append(total - kernels)
    x_all, y_all = np.array(rows), np.array(y)
    keep = [0, 1, 2]
    while True:
        coef = np.linalg.lstsq(x_all[:, keep], y_all, rcond=None)[0]
        negative = [k for k, c in zip(keep, coef) if k > 0 and c < 0]
        if not negative:
            break
        keep.remove(negative[0])
    full = dict.fromkeys((0, 1, 2), 0.0) | {k: float(c) for k, c in zip(keep, coef)}
    residual = y_all - x_all @ np.array([full[0], full[1], full[2]])
    return EdgeFit(full[0], full[1], full[2], float(np.sqrt(np.mean(residual**2))))


def fitting_assignments(
    floats: list[str], everywhere: Callable[[Precision], dict[str, Precision]]
) -> list[dict[str, Precision]]:
    """Assignments whose edges differ in number and size, to fit on: every other float-capable layer float (many
    edges, both halves), float in four contiguous chunks (chunks 1 and 3, then 2 and 4: few edges), and every
    other layer float in the first half only, then the second half only (many large edges vs many small)."""
    int8 = everywhere("int8")
    n = len(floats)
    quarter = max(1, n // 4)
    chunks = [floats[i : i + quarter] for i in range(0, n, quarter)]
    half = n // 2
    groups = [
        floats[0::2],
        floats[1::2],
        [f for c in chunks[0::2] for f in c],
        [f for c in chunks[1::2] for f in c],
        floats[:half][0::2],
        floats[half:][0::2],
    ]
    return [{**int8, **dict.fromkeys(g, "float")} for g in groups if g]
