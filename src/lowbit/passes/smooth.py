"""SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models"): move activation outliers into the weights before static int8 MatMul/Gemm, leaving the float function as is.

A few channels of a transformer's activations are tens of times wider than the rest (MiniLM: one channel of the
GELU output reaches 25 where the median channel stays near 1.3), and one per-tensor activation scale wastes almost
all its levels on them. Per input channel j of the MatMuls reading activation X, s_j = max|X_j|^alpha /
max|W_j|^(1 - alpha); X is divided by s (folded into its producer) and row j of every weight multiplied by s_j, so
X W = (X / s)(s W) and the per-channel weights absorb the wide channels.

The division is folded only where it is exact:
- a LayerNormalization over the last axis (scale and bias divided by s);
- a Mul by a constant (the constant divided by s: GELU's final `* 0.5` in BERT exports).
When the producer's output has other readers too (BERT's LayerNorm output also feeds the residual Add), the
producer is duplicated: the copy with the divided constants feeds the MatMuls, the original everything else. No Mul
is ever inserted (its input would be quantized per tensor with the outliers still in it). MatMuls reading anything
else (a Reshape of the attention heads, two activations) are left alone.

Output side (not in the paper; what MiniLM needs most): lowbit quantizes a MatMul's output per tensor, and BERT's
FFN output has one channel at ~195 where the median is ~1. When a MatMul's output flows only into a residual sum
(bias Add, residual Add, LayerNorm: all kept float), output channel k with |y_k| above OUTLIER_RATIO x the median is
divided by t_k in the weights and a float Mul by t restores it right after: exact, one float Mul per such MatMul.
On MiniLM (bench/RESULTS_RECOVER.md) this side alone took the mean cosine from 0.93 to 0.98; with inputs at alpha 0.7
to 0.99.

Needs each X's per-channel abs-max on calibration data: one float pass over it (`calibrate.calibrate`) before the
layout is made. The scales are recorded in the plan, so re-applying a plan repeats the same smoothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from ..errors import LowbitError

SCALE_LIMITS = (1e-4, 1e4)  # a scale outside would turn a near-dead channel into float32 noise
# Output side: a MatMul output channel wider than this many times the median channel is divided down to it in the
# weights and multiplied back by a float Mul right after (MiniLM's FFN output: one channel at 195, median 1).
OUTLIER_RATIO = 2.0
OUTPUT_KEY = " (output)"  # plan keys of output-side scales: the MatMul output's name and this suffix


@dataclass
class Target:
    """One activation to smooth: its producer, the MatMul/Gemm nodes reading it, their weights as [K, N]."""

    x: ir.Value
    producer: ir.Node
    readers: list[ir.Node]
    weights: list[np.ndarray]


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.const_value is None or v.is_graph_input():
        return None
    arr = v.const_value.numpy()
    return arr if arr.dtype == np.float32 else None


def _weight(node: ir.Node, x: ir.Value) -> np.ndarray | None:
    """The node's constant weight as [K, N] if it reads `x` as its left operand, else None."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 or node.inputs[0] is not x or node.inputs[1] is x:
        return None
    w = _const(node.inputs[1])
    if w is None or w.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return w
    if node.op_type == "Gemm" and not bool(node.attributes.get_int("transA")):
        return w.T if bool(node.attributes.get_int("transB")) else w
    return None


def _foldable(producer: ir.Node, channels: int) -> bool:
    if producer.domain not in ("", "ai.onnx") or len(producer.outputs) != 1:
        return False
    if producer.op_type == "LayerNormalization":
        scale = _const(producer.inputs[1])
        rank = producer.inputs[0].shape.rank() if producer.inputs[0] and producer.inputs[0].shape else None
        axis = producer.attributes.get_int("axis", -1)
        last = axis == -1 or (rank is not None and axis == rank - 1)
        bias = producer.inputs[2] if len(producer.inputs) > 2 else None
        return last and scale is not None and scale.size == channels and (bias is None or _const(bias) is not None)
    if producer.op_type == "Mul":
        consts = [i for i in (0, 1) if _const(producer.inputs[i]) is not None]
        return len(consts) == 1 and np.asarray(_const(producer.inputs[consts[0]])).shape[-1:] in ((), (1,), (channels,))
    return False


def find_targets(model: ir.Model) -> list[Target]:
    """Every activation read by MatMul/Gemm with constant weights whose producer can absorb a per-channel division."""
    found = []
    for node in model.graph:
        if len(node.outputs) != 1:
            continue
        x = node.outputs[0]
        readers, weights = [], []
        for use in x.uses():
            w = _weight(use.node, x) if use.node.op_type in ("MatMul", "Gemm") else None
            if w is not None and use.node.graph is model.graph:
                readers.append(use.node)
                weights.append(w)
        if readers and len({w.shape[0] for w in weights}) == 1 and _foldable(node, weights[0].shape[0]):
            found.append(Target(x, node, readers, weights))
    return found


def scales(target: Target, x_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), 1 where either side is zero, clipped to SCALE_LIMITS."""
    w_absmax = np.max([np.abs(w).max(axis=1) for w in target.weights], axis=0).astype(np.float64)
    x = np.asarray(x_absmax, np.float64)
    s = np.ones_like(w_absmax)
    ok = (x > 0) & (w_absmax > 0)
    s[ok] = x[ok] ** alpha / w_absmax[ok] ** (1.0 - alpha)
    return np.clip(s, *SCALE_LIMITS)


def _new_const(graph: ir.Graph, arr: np.ndarray, stem: str) -> ir.Value:
    name, n = f"{stem}_smooth", 1
    while name in graph.initializers:
        name, n = f"{stem}_smooth_{n}", n + 1
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(arr, dtype=np.float32), name=name))
    value.shape = ir.Shape(arr.shape)
    value.dtype = ir.DataType.FLOAT
    graph.register_initializer(value)
    return value


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    if value is None or value.name is None or value.name not in graph.initializers:
        return
    if not value.uses() and not value.is_graph_output():
        graph.initializers.pop(value.name)


def _array(v: ir.Value | None) -> np.ndarray:
    """A constant the target search already checked is there."""
    arr = _const(v)
    assert arr is not None
    return arr


def apply_scales(model: ir.Model, target: Target, s: np.ndarray) -> None:
    """X / s folded into (a copy of, when others read X) its producer; each reader's weight rows times s."""
    graph, p = model.graph, target.producer
    inv = (1.0 / s).astype(np.float64)
    stem = target.x.name or p.name or "smooth"
    if p.op_type == "LayerNormalization":
        new_inputs = [p.inputs[0], _new_const(graph, _array(p.inputs[1]).reshape(-1) * inv, f"{stem}_scale")]
        if len(p.inputs) > 2 and p.inputs[2] is not None:
            new_inputs.append(_new_const(graph, _array(p.inputs[2]).reshape(-1) * inv, f"{stem}_bias"))
    else:
        i = 0 if _const(p.inputs[0]) is not None else 1
        c = _array(p.inputs[i])
        new_inputs = list(p.inputs)
        new_inputs[i] = _new_const(graph, c.astype(np.float64) / s, f"{stem}_factor")
    old_inputs = list(p.inputs)
    others = [u for u in target.x.uses() if u.node not in target.readers] or target.x.is_graph_output()
    if others:  # others read X as it is: a twin of the producer feeds the readers
        twin = ir.Node(
            p.domain,
            p.op_type,
            new_inputs,
            attributes=list(p.attributes.values()),
            num_outputs=1,
            name=f"{p.name or stem}_smooth",
        )
        twin.outputs[0].name = f"{stem}_smooth"
        twin.outputs[0].type, twin.outputs[0].shape = target.x.type, target.x.shape
        graph.insert_after(p, twin)
        for reader in target.readers:
            reader.replace_input_with(0, twin.outputs[0])
    else:
        for i, v in enumerate(new_inputs):
            p.replace_input_with(i, v)
    for v in old_inputs[1:]:
        _drop_if_unused(graph, v)
    for reader, w in zip(target.readers, target.weights):
        scaled = w.astype(np.float64) * s[:, None]
        if reader.op_type == "Gemm" and bool(reader.attributes.get_int("transB")):
            scaled = scaled.T
        old = reader.inputs[1]
        reader.replace_input_with(1, _new_const(graph, scaled, old.name if old and old.name else "w"))
        _drop_if_unused(graph, old)


@dataclass
class OutputTarget:
    """A MatMul/Gemm with a constant weight whose output channels may be rescaled (weights as [K, N])."""

    node: ir.Node
    weight: np.ndarray


def _uses(node: ir.Node, i: int) -> list:
    v = node.inputs[i]
    return [] if v is None else list(v.uses())


def _into_residual(v: ir.Value, depth: int = 3) -> bool:
    """Whether `v` only flows, through Adds, into LayerNormalization: a bias Add and a residual Add, which lowbit
    keeps float (only float ops read them), so the restoring Mul stays float too and costs no extra rounding."""
    uses = list(v.uses())
    if not uses or v.is_graph_output() or depth == 0:
        return False
    for use in uses:
        op = use.node.op_type
        if op == "LayerNormalization":
            continue
        if op != "Add" or not _into_residual(use.node.outputs[0], depth - 1):
            return False
    return True


def find_output_targets(model: ir.Model) -> list[OutputTarget]:
    """MatMul/Gemm with a constant weight (read by it alone) whose output flows only into a residual sum."""
    found = []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.outputs) != 1 or not node.outputs[0].name:
            continue
        x = node.inputs[0]
        w = _weight(node, x) if x is not None else None
        if w is None or node.outputs[0].is_graph_output() or len(node.inputs) > 2 or len(_uses(node, 1)) != 1:
            continue  # a Gemm bias would need rescaling too; a shared weight would change its other readers
        if not _into_residual(node.outputs[0]):
            continue
        found.append(OutputTarget(node, w))
    return found


def output_scales(y_absmax: np.ndarray) -> np.ndarray | None:
    """t_k = max(1, |y_k| / (OUTLIER_RATIO * median)): only outlier channels shrink; None when there is none."""
    y = np.asarray(y_absmax, np.float64)
    limit = OUTLIER_RATIO * float(np.median(y))
    if limit <= 0 or y.max() <= limit:
        return None
    return np.clip(np.maximum(1.0, y / limit), *SCALE_LIMITS)


def apply_output_scales(model: ir.Model, target: OutputTarget, t: np.ndarray) -> None:
    """Output channel k of the weight divided by t_k; a float Mul by t right after restores the output exactly
    (lowbit keeps it float when only float ops read it: a bias and residual Add before a LayerNorm)."""
    graph, node = model.graph, target.node
    out = node.outputs[0]
    scaled = target.weight.astype(np.float64) / t[None, :]
    if node.op_type == "Gemm" and bool(node.attributes.get_int("transB")):
        scaled = scaled.T
    old = node.inputs[1]
    node.replace_input_with(1, _new_const(graph, scaled, old.name if old and old.name else "w"))
    _drop_if_unused(graph, old)
    uses = list(out.uses())
    mul = ir.Node(
        "",
        "Mul",
        [out, _new_const(graph, t, f"{out.name}_restore")],
        num_outputs=1,
        name=f"{node.name or out.name}_restore",
    )
    mul.outputs[0].name = f"{out.name}_restored"
    mul.outputs[0].type, mul.outputs[0].shape = out.type, out.shape
    graph.insert_after(node, mul)
    for use in uses:
        use.node.replace_input_with(use.idx, mul.outputs[0])


def observe_absmax(model: ir.Model, names: Iterable[str], batches: Iterable[dict[str, np.ndarray]]) -> dict:
    """Each tensor's per-channel (last axis) abs-max over `batches`, from one float pass."""
    from ..calibrate import calibrate

    stats = calibrate(model, [], {n: -1 for n in names}, batches, progress=False)
    out = {}
    for name, obs in stats.channels.items():
        assert obs.min is not None and obs.max is not None
        out[name] = np.maximum(-obs.min, obs.max)
    return out


def smooth(
    model: ir.Model, alpha: float, batches: Iterable[dict[str, np.ndarray]] | None, given: dict[str, Any] | None = None
) -> dict[str, list[float]]:
    """Smooth every target; scales from `given` (a plan's record) or else measured on `batches`. Returns the scales
    applied, by activation name, for the plan."""
    targets = [t for t in find_targets(model) if t.x.name]
    outputs = {str(o.node.outputs[0].name): o for o in find_output_targets(model)}
    if not targets and not outputs:
        return {}
    if given is None:
        if batches is None:
            raise LowbitError("smooth_quant needs calibration data (--calib) to measure activation outliers")
        absmax = observe_absmax(model, [str(t.x.name) for t in targets] + sorted(outputs), batches)
        chosen = {str(t.x.name): scales(t, absmax[str(t.x.name)], alpha) for t in targets}
        out_chosen = {k: output_scales(absmax[k]) for k in sorted(outputs)}
        out_scales = {k: v for k, v in out_chosen.items() if v is not None}
    else:
        chosen = {str(t.x.name): _floats(given, str(t.x.name)) for t in targets if t.x.name in given}
        out_scales = {k: _floats(given, k + OUTPUT_KEY) for k in outputs if k + OUTPUT_KEY in given}
        bad = [k for k, v in {**chosen, **out_scales}.items() if v.ndim != 1 or not np.all(np.isfinite(v) & (v > 0))]
        if bad:
            raise LowbitError(f"the plan's SmoothQuant scales for '{bad[0]}' must be positive numbers; re-run --calib")
        missing = sorted(str(t.x.name) for t in targets if t.x.name not in given)
        if missing:
            raise LowbitError(
                f"the plan has no SmoothQuant scales for '{missing[0]}'; re-run calibration with --calib "
                "to make a new plan"
            )
    for t in targets:
        s = chosen[str(t.x.name)]
        if s.shape != (t.weights[0].shape[0],):
            raise LowbitError(f"the plan's SmoothQuant scales for '{t.x.name}' do not fit the model; re-run --calib")
        apply_scales(model, t, s)
    # After the input side (which rescales weight rows): output channels are the weights' columns.
    for k, t_out in sorted(out_scales.items()):
        target = find_output_targets_by_name(model, k)
        if target is None or t_out.shape != (target.weight.shape[1],):
            raise LowbitError(f"the plan's SmoothQuant output scales for '{k}' do not fit the model; re-run --calib")
        apply_output_scales(model, target, t_out)
    record = {k: [float(v) for v in s] for k, s in chosen.items()}
    record.update({k + OUTPUT_KEY: [float(v) for v in t] for k, t in out_scales.items()})
    return dict(sorted(record.items()))


def _floats(given: dict[str, Any], key: str) -> np.ndarray:
    try:
        return np.asarray(given[key], np.float64)
    except (TypeError, ValueError):
        raise LowbitError(f"the plan's SmoothQuant scales for '{key}' must be numbers; re-run --calib") from None


def find_output_targets_by_name(model: ir.Model, name: str) -> OutputTarget | None:
    """The output target producing `name`, with its weight as it is now (after input-side smoothing)."""
    return next((o for o in find_output_targets(model) if o.node.outputs[0].name == name), None)


__all__ = ["smooth", "find_targets", "scales", "apply_scales", "observe_absmax"]
