"""Empirical bias correction (recipe option `empirical_bias_correction`): after the rewrite, move each biased layer's
per-channel mean output in the quantized model back to the float model's, measured on the calibration data.

As NNCF's BiasCorrection and AIMET's empirical bias correction do, the layers are corrected one by one in graph
order, each seeing the corrections of the layers before it (the errors of earlier layers reach it through its
input). Running the model once per layer would cost one simulation per layer; here the QDQ model runs once in all,
a piece at a time (segments.py): the nodes up to a biased layer, then its correction is found and subtracted from
that output, and the next piece reads the corrected tensor. A first
version corrected every layer at once in a few whole-model passes (a Jacobi iteration): on EfficientNet-Lite0 its
shifts grew from pass to pass (the largest 1.6 -> 0.9 -> 4.3 -> 12.9 output spreads) and top-1 agreement fell to 10%:
in a deep network a correction reaches every later layer before their own corrections adapt.

What is matched: what the next layers read. A layer whose output is quantized (its fused Relu/Clip done by the
output's range) gets the delta whose quantized output has float's post-activation mean per channel (three Newton
steps on the pieces' arrays: the slope is the share of values inside the range); a layer with a float output (model
logits) gets its own mean matched. Matching the mean before the activation instead, as NNCF does, lowered
EfficientNet-Lite0's entropy-calibrated SQNR (13.3 -> 11.6 dB): a channel's values beyond the clipping range count
there, though nothing downstream sees them (bench/RESULTS_CORPUS.md).

Noise: a per-channel mean over N samples is known to about std(q - float) / sqrt(N). A conv channel averages over
its spatial positions first and is well estimated; a 1000-way classifier's logit shift on 32 samples is not (an
earlier last-layer-only try lowered MobileNetV3-Large's top-1 agreement from 0.531 to 0.320). So each layer's
corrections are shrunk toward zero by how well they are known (empirical Bayes with one normal prior per layer:
factor tau^2 / (tau^2 + se_c^2), tau^2 the layer's spread of shifts beyond its noise): a well-measured channel gets
its whole correction, a layer whose shifts are no larger than their noise gets almost none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from ..data import DataSource
from ..plan import Plan
from ..planner import Layout
from ..runtimes.ort import session
from .segments import Segments

# Calibration samples the correction measures on (the first ones): the pieces keep every live tensor for each of
# them in memory, e.g. 64 x 96 x 112 x 112 float32 = 308 MB at EfficientNet-Lite0's widest point.
SAMPLES = 64


@dataclass(frozen=True)
class Target:
    """One biased layer: its node, bias input, float output name (before Relu/Clip fusion renamed it), the rank of
    its output and its channel count."""

    node: str
    bias: int
    float_output: str
    rank: int
    channels: int
    float_post: str = ""  # the fused Relu/Clip's float output, when the layer has one

    @property
    def channel_axis(self) -> int:
        return 1 if self.rank > 2 else self.rank - 1


@dataclass
class FloatSide:
    """The float model and its layers' names, captured before the rewrite changes the graph in place."""

    proto: onnx.ModelProto
    targets: list[Target]


def capture(model: ir.Model, layout: Layout) -> FloatSide:
    """The float model as it is before `apply` (call it then), and the layers to correct: every static layer with a
    bias (Conv, ConvTranspose, Gemm)."""
    found = []
    for name, idx, _act, widx in layout.biases:
        node = model.graph.node(name)
        w, b = node.inputs[widx], node.inputs[idx]
        out = node.outputs[0]
        if w is None or b is None or b.const_value is None or w.const_value is None or out.name is None:
            continue
        rank = len(w.const_value.shape) if node.op_type in ("Conv", "ConvTranspose") else 2
        uses = list(out.uses())
        post = out.name
        if len(uses) == 1 and uses[0].node.name in layout.fused and uses[0].node.outputs[0].name:
            post = uses[0].node.outputs[0].name
        found.append(Target(name, idx, out.name, rank, int(b.const_value.size), post))
    return FloatSide(ir.to_proto(model), found)


def _reduce(graph: onnx.GraphProto, opset: int, src: str, dst: str, rank: int) -> None:
    """dst = per-sample, per-channel mean of a conv output (B, C, ...) -> (B, C)."""
    axes = list(range(2, rank))
    if opset >= 18:
        name = f"{dst}_axes"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), name))
        graph.node.append(onnx.helper.make_node("ReduceMean", [src, name], [dst], keepdims=0))
    else:
        graph.node.append(onnx.helper.make_node("ReduceMean", [src], [dst], axes=axes, keepdims=0))


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _mean_outputs(proto: onnx.ModelProto, outputs: list[tuple[str, Target]]) -> list[str]:
    """Add each (tensor, layer) as an output, conv outputs reduced to (B, C) inside the graph; returns the names."""
    names = []
    have = {o.name for o in proto.graph.output}
    for src, t in outputs:
        if t.rank > 2:
            dst = f"{src}__lowbit_mean"
            if dst not in have:
                _reduce(proto.graph, _opset(proto), src, dst, t.rank)
        else:
            dst = src
        if dst not in have:  # a classifier's logits may be a graph output already
            proto.graph.output.append(onnx.helper.make_tensor_value_info(dst, onnx.TensorProto.FLOAT, None))
            have.add(dst)
        names.append(dst)
    return names


def _per_sample(x: np.ndarray, t: Target) -> np.ndarray:
    """(rows, C): a conv's reduced output as it is; a Gemm's output with the channel axis last."""
    x = np.asarray(x, np.float64)
    if t.rank > 2:
        return x.reshape(x.shape[0], t.channels)
    return np.moveaxis(x, t.channel_axis, -1).reshape(-1, t.channels)


def _run(proto: onnx.ModelProto, names: list[str], batches: list[dict[str, np.ndarray]]) -> list:
    # The float model with ORT's optimizations: the same values as its plain run to float rounding, in a third of
    # the time (EfficientNet-Lite0: the plain run was 4.4 of the correction's 14.5 s).
    sess = session(proto, mode="kernels", spin=False)
    feeds = {i.name for i in sess.get_inputs()}
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for b in batches:
        got = sess.run(names, {k: v for k, v in b.items() if k in feeds})
        for i, g in enumerate(got):
            parts[i].append(g)
    return parts


def shrink(raw: np.ndarray, se2: np.ndarray) -> np.ndarray:
    """Each channel's shift, shrunk toward zero by how well it is known (one normal prior per layer)."""
    tau2 = max(0.0, float(np.mean(raw**2) - np.mean(se2)))
    if tau2 == 0.0:
        return np.zeros_like(raw)
    return raw * (tau2 / (tau2 + se2))


@dataclass
class Measured:
    """What the correction found: each layer's delta (subtracted from its bias) and the largest per-channel mean
    shift each layer's output had before its own correction, relative to the float output's spread."""

    deltas: dict[str, np.ndarray]
    shifts: dict[str, float]


def measure(side: FloatSide, model: ir.Model, batches: list[dict[str, np.ndarray]]) -> Measured:
    """Each layer's delta, layer by layer in graph order, every earlier layer already corrected; `model` is the
    rewritten QDQ model."""
    qproto = ir.to_proto(model)
    present = {n.name for n in qproto.graph.node}
    targets = [t for t in side.targets if t.node in present]
    if not targets or not batches:
        return Measured({}, {})
    fproto = onnx.ModelProto()
    fproto.CopyFrom(side.proto)
    wanted = [(t.float_output, t) for t in targets] + [(t.float_post or t.float_output, t) for t in targets]
    fparts = _run(fproto, _mean_outputs(fproto, wanted), batches)
    both = [np.concatenate([_per_sample(p, t) for p in ps]) for ps, (_, t) in zip(fparts, wanted)]
    floats = {t.node: both[i] for i, t in enumerate(targets)}
    posts = {t.node: both[len(targets) + i] for i, t in enumerate(targets)}
    quantizers = _output_quantizers(qproto)
    pieces = Segments(qproto, batches)
    order = {n.name: i for i, n in enumerate(qproto.graph.node)}
    deltas, shifts = {}, {}
    for t in sorted(targets, key=lambda t: order[t.node]):
        ys = pieces.run_to(t.node)
        f = floats[t.node]
        diff = np.concatenate([_per_sample(_channel_means(y, t), t) for y in ys]) - f
        mean = diff.mean(axis=0)
        se2 = diff.var(axis=0, ddof=1) / len(diff) if len(diff) > 1 else np.zeros_like(mean)
        y_name = qproto.graph.node[order[t.node]].output[0]
        if y_name in quantizers:
            delta = _achievable(model, t, _solve_post(ys, t, quantizers[y_name], posts[t.node]))
        else:
            delta = _achievable(model, t, shrink(mean, se2))
        shifts[t.node] = float(np.max(np.abs(mean))) / (float(np.std(f)) or 1.0)
        deltas[t.node] = delta
        d = _shaped(delta, t)
        for y in ys:
            y -= d.astype(y.dtype)  # in place: the pieces' own arrays, which the next piece reads
        pieces.replace(qproto.graph.node[order[t.node]].output[0], ys)
    return Measured(deltas, shifts)


def _output_quantizers(proto: onnx.ModelProto) -> dict[str, tuple[float, int, int, int]]:
    """Tensor -> (scale, zero point, qmin, qmax) of the per-tensor QuantizeLinear reading it."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    out = {}
    for n in proto.graph.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3 or n.input[1] not in inits or n.input[2] not in inits:
            continue
        sc, zp = inits[n.input[1]], inits[n.input[2]]
        if sc.size != 1:
            continue
        info = np.iinfo(zp.dtype)
        out[n.input[0]] = (float(sc.reshape(-1)[0]), int(zp.reshape(-1)[0]), int(info.min), int(info.max))
    return out


def _solve_post(ys: list[np.ndarray], t: Target, q: tuple[float, int, int, int], target: np.ndarray) -> np.ndarray:
    """The delta per channel whose quantized output (fused activation's clipping included) has float's
    post-activation mean, by three Newton steps; shrunk by its noise like the pre-activation shift."""
    s, z, qmin, qmax = q
    lo, hi = (qmin - z) * s, (qmax - z) * s
    d = np.zeros(t.channels)
    first = None
    for _ in range(3):
        sums, inside, rows = [], np.zeros(t.channels), 0
        for y in ys:
            v = y - _shaped(d, t)
            fq = (np.clip(np.rint(v / s) + z, qmin, qmax) - z) * s
            sums.append(_per_sample(_channel_means(fq, t), t))
            axes = tuple(i for i in range(v.ndim) if i != t.channel_axis)
            inside += ((v > lo) & (v < hi)).sum(axis=axes)
            rows += v.size // t.channels
        per = np.concatenate(sums) - target
        if first is None:
            first = per
        d = d + per.mean(axis=0) / np.maximum(inside / rows, 0.05)
    assert first is not None
    se2 = first.var(axis=0, ddof=1) / len(first) if len(first) > 1 else np.zeros(t.channels)
    raw = first.mean(axis=0)
    factor = shrink(raw, se2) / np.where(raw == 0, 1.0, raw)
    return np.asarray(d * factor, np.float64)


def _channel_means(y: np.ndarray, t: Target) -> np.ndarray:
    """A conv output (B, C, ...) reduced to (B, C), as the float model's ReduceMean does; others as they are."""
    return y.reshape(y.shape[0], y.shape[1], -1).mean(axis=2, dtype=np.float64) if t.rank > 2 else y


def _bias_grid(model: ir.Model, node: str, idx: int) -> tuple[ir.Node, ir.Value, np.ndarray, np.ndarray] | None:
    """A quantized layer's bias DequantizeLinear, its int32 constant, the integers and their scales."""
    value = model.graph.node(node).inputs[idx]
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    stored, scale = dq.inputs[0], dq.inputs[1]
    if stored is None or stored.const_value is None or scale is None or scale.const_value is None:
        return None
    q = stored.const_value.numpy().astype(np.int64)
    return dq, stored, q, np.broadcast_to(scale.const_value.numpy().astype(np.float64), q.shape)


def _steps(q: np.ndarray, scale: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """The int32 bias after subtracting `delta` in steps of its scale (clipped to int32, as a dead channel's large
    bias over a tiny weight scale already is)."""
    return np.clip(q - np.rint(np.asarray(delta, np.float64) / scale).astype(np.int64), -(2**31), 2**31 - 1)


def _achievable(model: ir.Model, t: Target, delta: np.ndarray) -> np.ndarray:
    """The part of `delta` the int32 bias can take: what the quantized model will really subtract."""
    found = _bias_grid(model, t.node, t.bias)
    if found is None:
        return np.zeros_like(delta)
    _, _, q, scale = found
    return np.asarray((q - _steps(q, scale, delta)) * scale, np.float64)


def _shaped(d: np.ndarray, t: Target) -> np.ndarray:
    """A delta shaped to broadcast over its layer's output (channels on axis 1 of a conv, last of a Gemm)."""
    return d.astype(np.float32).reshape([t.channels] + [1] * (t.rank - 2) if t.rank > 2 else [t.channels])


def apply_deltas(model: ir.Model, layout: Layout, deltas: dict[str, list[float]]) -> None:
    """Subtract each layer's delta from its int32 bias (in steps of the bias scale), in place."""
    from ..rewrite import add_initializer

    for name, idx, _act, _widx in layout.biases:
        found = _bias_grid(model, name, idx) if name in deltas else None
        if found is None:
            continue
        dq, stored, q, scale = found
        new = _steps(q, scale, np.asarray(deltas[name], np.float64)).astype(np.int32)
        dq.replace_input_with(0, add_initializer(model.graph, f"{name}_bias_empirical_q", new))
        if not stored.uses() and stored.name is not None and stored.name in model.graph.initializers:
            model.graph.initializers.pop(stored.name)


def _first(source: DataSource, samples: int) -> list[dict[str, np.ndarray]]:
    """The batches holding the first `samples` samples (whole batches; the last may reach past)."""
    out, seen = [], 0
    for batch in source:
        if seen >= samples:
            break
        out.append(batch)
        seen += source.count(batch)
    return out


def check_model(recipe: object, external: bool) -> None:
    """After loading, before calibrating: the correction holds the float and the quantized model in memory at once,
    which a model kept in external data (past protobuf's 2 GB) is kept out of memory to avoid."""
    from ..errors import LowbitError

    if getattr(recipe, "empirical_bias_correction", False) and external:
        raise LowbitError(
            "empirical_bias_correction needs the whole model in memory twice and this model keeps its weights in "
            "external data: drop empirical_bias_correction (--empirical-bias-correction)"
        )


def check_data(recipe: object, calib: object) -> None:
    """Before calibration: the correction reads the calibration data again, which a one-shot iterator cannot give."""
    from collections.abc import Iterator

    from ..errors import LowbitError

    if getattr(recipe, "empirical_bias_correction", False) and isinstance(calib, Iterator):
        raise LowbitError(
            "empirical_bias_correction reads the calibration data again after calibrating, and an iterator can be "
            "read once: pass a list of batches, an array or a path"
        )


def correct_biases(
    model: ir.Model,
    layout: Layout,
    plan: Plan,
    side: FloatSide | None,
    old_plan: Plan | None,
    data: Callable[[], DataSource],
) -> dict[str, float]:
    """Measure the deltas on the first `SAMPLES` calibration samples, `data()` (or take them from the plan being
    re-applied), subtract them from the biases and record them in `plan.bias_shifts`; returns each layer's largest
    mean shift before its correction, relative to its float output's spread (empty when read from a plan)."""
    if old_plan is not None:
        shifts = {k: [float(x) for x in v] for k, v in old_plan.bias_shifts.items()}
        record: dict[str, float] = {}
    else:
        if side is None or not side.targets:
            return {}
        found = measure(side, model, _first(data(), SAMPLES))
        shifts = {k: [float(x) for x in v] for k, v in sorted(found.deltas.items())}
        record = found.shifts
    apply_deltas(model, layout, shifts)
    plan.bias_shifts = shifts
    return record
