"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"): each weight of a
Conv/Gemm/MatMul is rounded down or up to the grid of its (per-channel) scale, whichever set of choices best
reproduces the layer's float output on calibration data, instead of to the nearest value.

Per layer, in graph order: the rounding offset of each weight is h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
(the rectified sigmoid), so w~ = s (clip(floor(w / s) + z + h(V), qmin, qmax) - z). V starts where h(V) equals the
fractional part of w / s (the float weight itself), and Adam minimizes

    || X_float W - X_quant W~ ||^2 (summed over output channels, averaged over rows) + lambda sum(1 - |2 h(V) - 1|^beta)

with beta annealed from 20 to 2 after a warm-up of 20% of the iterations, during which the regularizer is off. The
regularizer drives every h(V) to 0 or 1; the final choice is "up" where h(V) >= 0.5. X_float is the layer's input in
the float model; X_quant its input in the quantized model in which every earlier layer already has its learned
rounding (the paper's asymmetric reconstruction: a layer corrects part of the error the layers before it made),
measured with ONNX Runtime's float simulation of the QDQ graph. Rows are sampled output positions (a conv's input
patches), so the layer is a matrix product and any conv becomes a batched MatMul (grouped and depthwise too).

Invariant: a learned weight is floor(w / s) or floor(w / s) + 1 before clipping (a weight exactly on the grid is
never moved), and a layer whose learned rounding does worse than round-to-nearest on its objective over all the
sampled rows keeps round-to-nearest. The pre-activation output is reconstructed (a folded ReLU is not modelled).

The plan records, per weight, the up/down bits (packed, base64) and the sha256 of the float weight they were learned
on: re-applying the plan needs no data and gives the same bytes; a weight that changed since (a retrained model)
gets round-to-nearest and a warning. Determinism: a fixed seed per layer and one torch thread while learning.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from .numerics import qrange
from .ops.base import const, weight_of
from .plan import Plan, TensorParams
from .planner import Layout
from .recipe import Scheme

ITERATIONS = 1000
LAMBDA = 0.01
BETA = (20.0, 2.0)
WARMUP = 0.2
GAMMA, ZETA = -0.1, 1.1
LEARNING_RATE = 1e-2
ROWS = 4096  # sampled output positions per layer
ROW_FLOATS = 1 << 23  # at most this many floats in one layer's sampled inputs (a wide depthwise conv gets fewer rows)
BATCH_ROWS = 1024  # rows per Adam step
# ... but at most this many input values per step: a wide depthwise conv (1152 groups of 5x5) has few weights per
# group and needs fewer rows, and a step then costs as much as a 1x1 conv's (EfficientNet-Lite0: 5x less time).
BATCH_FLOATS = 1 << 21
SEED = 0
# Where X_quant comes from: "quantized" (the paper's asymmetric reconstruction) or "float" (the float model's inputs,
# no simulation runs); bench/adaround.py measures both.
INPUTS = "quantized"

Batch = dict[str, np.ndarray]


@dataclass
class Layer:
    """One weight to round: its node, its float input's name, and how its input becomes rows."""

    node: ir.Node
    key: str  # "node:1", the plan's name of the weight
    x_name: str  # the input's name in the float model
    w: np.ndarray
    axis: int | None
    scheme: Scheme


def eligible(node: ir.Node, idx: int) -> bool:
    """Conv (1-D/2-D) and Gemm/MatMul weights on input 1: the forms `rows` can cut into patches."""
    if idx != 1:
        return False
    w = const(node, 1)
    if w is None or w.dtype != np.float32:
        return False
    if node.op_type == "Conv":
        return w.ndim in (3, 4) and node.attributes.get_string("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    if node.op_type == "Gemm":
        return w.ndim == 2 and not node.attributes.get_int("transA", 0)
    return node.op_type == "MatMul" and w.ndim == 2


def layers(model: ir.Model, layout: Layout) -> list[Layer]:
    """The weights whose scheme asks for AdaRound, in graph order."""
    wanted = {n: (i, a) for n, i, a in layout.weights}
    found = []
    for node in model.graph:
        name = node.name or ""
        d = layout.nodes.get(name)
        if name not in wanted or d is None or d.scheme is None or not d.scheme.adaround:
            continue
        idx, axis = wanted[name]
        if eligible(node, idx) and node.inputs[0] is not None and node.inputs[0].name:
            found.append(Layer(node, f"{name}:{idx}", node.inputs[0].name, weight_of(node, idx), axis, d.scheme))
    return found


# --- the rounding grid of one weight ---


@dataclass
class Grid:
    """w / s as ONNX QuantizeLinear computes it (float32 division), split into floor and remainder."""

    floor: np.ndarray  # float64
    rest: np.ndarray  # in [0, 1)
    scale: np.ndarray  # broadcast to w's rank
    zero_point: np.ndarray
    qmin: int
    qmax: int

    def integers(self, up: np.ndarray) -> np.ndarray:
        """The quantized weight for up/down bits; a weight on the grid stays there."""
        step = np.where(self.rest > 0, up.astype(np.float64), 0.0)
        return np.clip(self.floor + self.zero_point + step, self.qmin, self.qmax)

    def nearest(self) -> np.ndarray:
        """Round-to-nearest (half to even) as bits: the rounding `quantize` does."""
        return np.rint(self.floor + self.rest) > self.floor

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((q - self.zero_point) * self.scale).astype(np.float32)


def grid(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None, scheme: Scheme) -> Grid:
    narrow = scheme.symmetric_weights and scheme.weights.startswith("int")
    qmin, qmax = qrange(scheme.weights, narrow)
    shape = [1] * w.ndim
    if axis is not None and np.size(scale) > 1:
        shape[axis % w.ndim] = np.size(scale)
    s = np.asarray(scale, np.float32).reshape(shape if np.size(scale) > 1 else ())
    z = np.asarray(zero_point).astype(np.float64).reshape(s.shape)
    x = (np.asarray(w, np.float32) / s).astype(np.float64)
    fl = np.floor(x)
    return Grid(fl, x - fl, s, z, qmin, qmax)


# --- plan record ---


def weight_hash(w: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(w, np.float32).tobytes()).hexdigest()


def encode(up: np.ndarray, w: np.ndarray, stats: dict[str, Any]) -> dict[str, Any]:
    bits = base64.b64encode(np.packbits(up.reshape(-1).astype(np.uint8)).tobytes()).decode()
    return {"up": bits, "shape": list(up.shape), "weight_sha256": weight_hash(w), **stats}


def decode(entry: dict[str, Any], w: np.ndarray) -> np.ndarray | None:
    """The bits of a plan entry, or None when the weight is not the one they were learned on."""
    if entry.get("weight_sha256") != weight_hash(w) or list(entry.get("shape", [])) != list(w.shape):
        return None
    raw = np.frombuffer(base64.b64decode(entry["up"]), np.uint8)
    return np.unpackbits(raw)[: w.size].reshape(w.shape).astype(bool)


def from_plan(model: ir.Model, layout: Layout, plan: Plan) -> tuple[dict[str, np.ndarray], list[str]]:
    """The recorded bits of every AdaRound weight, and a warning naming weights that changed since."""
    ups, stale = {}, []
    for layer in layers(model, layout):
        entry = plan.adaround.get(layer.key)
        if entry is None:
            continue
        up = decode(entry, layer.w)
        if up is None:
            stale.append(layer.key)
        else:
            ups[layer.key] = up
    warn = []
    if stale:
        warn.append(
            f"AdaRound: {len(stale)} weight(s) differ from those the plan's rounding was learned on "
            f"(first: {stale[0]}); they were rounded to nearest: re-run with --calib to learn it again"
        )
    return ups, warn


# --- learning ---


def learn(
    model: ir.Model,
    layout: Layout,
    tensors: dict[str, TensorParams],
    channel_means: dict[str, list[float]],
    recipe_dict: dict[str, Any],
    batches: list[Batch],
    progress: bool = True,
    inputs: str = "quantized",
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Learn the rounding of every AdaRound weight, layer by layer; returns the bits and the plan's record."""
    import torch

    from .adaround_data import FloatInputs, QuantizedInputs

    todo = layers(model, layout)
    if not todo:
        return {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in the same order on every machine and run
    try:
        grids = [grid(layer.w, *quant_params(layer), layer.axis, layer.scheme) for layer in todo]
        floats = FloatInputs(model, todo, batches)
        quant = None if inputs == "float" else QuantizedInputs(model, layout, tensors, channel_means, recipe_dict, todo)
        if quant is not None:  # later layers start at round-to-nearest
            for i, g in enumerate(grids):
                quant.set_weight(i, g.dequantize(g.integers(g.nearest())))
        ups: dict[str, np.ndarray] = {}
        record: dict[str, dict[str, Any]] = {}
        start = time.perf_counter()
        for i, layer in enumerate(todo):
            t = time.perf_counter()
            g = grids[i]
            xf = floats.rows(i)
            xq = xf if quant is None else quant.rows(i, floats.positions[i], batches)
            up, stats = round_layer(layer, g, xf, xq, seed=SEED + i)
            ups[layer.key] = up
            record[layer.key] = encode(up, layer.w, stats)
            if quant is not None:
                quant.set_weight(i, g.dequantize(g.integers(up)))
            if progress:
                print(
                    f"adaround {i + 1}/{len(todo)} {layer.node.name}: layer loss {stats['loss_nearest']:.4g} "
                    f"(nearest) -> {stats['loss']:.4g} ({time.perf_counter() - t:.1f} s, "
                    f"{time.perf_counter() - start:.0f} s so far)",
                    file=sys.stderr,
                    flush=True,
                )
        return ups, record
    finally:
        torch.set_num_threads(threads)


def quant_params(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """The scale and zero point round-to-nearest would use (the overflow guard may still change a channel)."""
    from .weights import quantize_weight

    s = layer.scheme
    qw = quantize_weight(layer.w, layer.axis, s.weights, s.symmetric_weights, s.reduce_range)
    return np.asarray(qw.scale), np.asarray(qw.zero_point)


def to_matrix(node: ir.Node, w: Any) -> Any:
    """A weight (numpy or torch) as the (groups, K per group, outputs per group) matrix its rows multiply."""
    if node.op_type == "Conv":
        g = node.attributes.get_int("group", 1)
        m = w.shape[0]
        return w.reshape(g, m // g, -1).transpose(1, 2)  # rows ordered (channel, kernel position)
    if node.op_type == "Gemm":
        alpha = node.attributes.get_float("alpha", 1.0)
        mat = w.T if node.attributes.get_int("transB", 0) else w
        return (mat * alpha)[None]
    return w[None]


def round_layer(layer: Layer, g: Grid, xf: np.ndarray, xq: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
    """Learned up/down bits for one weight, from rows xf / xq (groups, rows, K); round-to-nearest if not better."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in the same order every run (and, on a shared machine, far faster)
    try:
        return _round_layer(layer, g, xf, xq, seed)
    finally:
        torch.set_num_threads(threads)


def _round_layer(layer: Layer, g: Grid, xf: np.ndarray, xq: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    node = layer.node
    xf_t, xq_t = torch.from_numpy(xf), torch.from_numpy(xq)
    target = torch.bmm(xf_t, to_matrix(node, torch.from_numpy(layer.w)))
    floor = torch.from_numpy(g.floor + g.zero_point).float()
    scale = torch.from_numpy(np.asarray(g.scale, np.float32))
    zp = torch.from_numpy(np.asarray(g.zero_point, np.float32))
    movable = torch.from_numpy(g.rest > 0)
    rest = np.clip(g.rest, 0.01, 0.99)  # sigmoid's inverse is finite inside (gamma, zeta)
    v0 = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
    v = torch.nn.Parameter(torch.from_numpy(v0.astype(np.float32)))
    opt = torch.optim.Adam([v], lr=LEARNING_RATE)
    n = xf.shape[1]
    batch = min(BATCH_ROWS, n, max(32, BATCH_FLOATS // (xf.shape[0] * xf.shape[2])))
    warm = int(WARMUP * ITERATIONS)

    def weight(h: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(floor + h * movable, g.qmin, g.qmax)
        return to_matrix(node, (q - zp) * scale)

    for it in range(ITERATIONS):
        idx = torch.randint(0, n, (batch,), generator=gen)
        h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
        # index_select, not x[:, idx]: torch's advanced indexing on a middle axis is many times slower
        err = torch.bmm(xq_t.index_select(1, idx), weight(h)) - target.index_select(1, idx)
        loss = err.pow(2).sum(dim=(0, 2)).mean()
        if it >= warm:
            frac = (it - warm) / max(ITERATIONS - warm, 1)
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - frac)
            loss = loss + LAMBDA * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    up = (v.detach() >= 0).numpy() & (g.rest > 0)
    nearest = g.nearest()
    loss_up = layer_loss(node, layer.w, g, up, xf, xq)
    loss_nearest = layer_loss(node, layer.w, g, nearest, xf, xq)
    kept = loss_up > loss_nearest
    chosen = nearest if kept else up
    flipped = float(np.mean(chosen != nearest))
    stats = {
        "loss": min(loss_up, loss_nearest),
        "loss_nearest": loss_nearest,
        "flipped": round(flipped, 6),
        "kept_nearest": bool(kept),
    }
    return chosen, stats


def layer_loss(node: ir.Node, w: np.ndarray, g: Grid, up: np.ndarray, xf: np.ndarray, xq: np.ndarray) -> float:
    """The objective on every sampled row: mean over rows of the summed squared output error (float64)."""
    wq = g.dequantize(g.integers(up)).astype(np.float64)
    target = np.matmul(xf.astype(np.float64), to_matrix_np(node, w.astype(np.float64)))
    err = np.matmul(xq.astype(np.float64), to_matrix_np(node, wq)) - target
    return float(np.mean(np.sum(err * err, axis=(0, 2))))


def to_matrix_np(node: ir.Node, w: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        g = node.attributes.get_int("group", 1)
        return w.reshape(g, w.shape[0] // g, -1).transpose(0, 2, 1)
    return np.asarray(to_matrix(node, w))


def rows_budget(k: int) -> int:
    """Rows sampled for a layer whose input rows hold k values (all groups)."""
    return max(64, min(ROWS, ROW_FLOATS // max(k, 1)))


__all__ = ["learn", "from_plan", "layers", "grid", "Grid", "round_layer", "layer_loss", "ITERATIONS"]


# --- the pipeline's entry ---


def wanted(recipe: Any) -> bool:
    """Whether any scheme of the recipe asks for AdaRound."""
    schemes = [recipe.default, *(r.scheme for r in recipe.rules)]
    return any(s is not None and s.adaround for s in schemes)


def check_data(recipe: Any, calib: Any) -> None:
    """Before calibration: AdaRound reads the calibration data a second time, which a one-shot iterator cannot give."""
    from collections.abc import Iterator

    from .errors import LowbitError

    if wanted(recipe) and isinstance(calib, Iterator):
        raise LowbitError(
            "adaround reads the calibration data again after calibrating, and an iterator can be read once: "
            "pass a list of batches, an array or a path"
        )


def round_weights(
    loaded: Any,
    decided: Any,
    recipe: Any,
    calib: Any,
    plan: Plan | None,
    preprocess: Any,
    batch_axes: Any,
    progress: bool,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]], list[str]]:
    """The rounding bits (learned now, or from the plan being re-applied), the plan's record, and warnings."""
    if not wanted(recipe):
        return {}, {}, []
    model, layout = loaded.model, decided.layout
    if plan is not None:
        ups, notes = from_plan(model, layout, plan)
        return ups, {k: v for k, v in plan.adaround.items() if k in ups}, notes
    from .calibrate import open_calibration

    batches = list(open_calibration(calib, loaded.inputs, recipe, preprocess, batch_axes))
    ups, record = learn(
        model, layout, decided.tensors, decided.channel_means, recipe.to_dict(), batches, progress, INPUTS
    )
    return ups, record, []
