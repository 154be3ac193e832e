"""Float islands (DequantizeLinear -> HardSigmoid / HardSwish -> QuantizeLinear) round the same in ONNX Runtime and
LiteRT.

Both runtimes compute such an op in float and then quantize, but not the same way: ONNX Runtime's QuantizeLinear
divides by the scale, LiteRT's QUANTIZE (XNNPACK) multiplies by float32(1 / scale), and the float op itself is
evaluated in another order. The results are a few float32 ulps apart, which changes the integer only where the
value sits at a half step. On MobileNetV3-Small that happened to one input value of one squeeze-excite gate: the
gate broadcasts over the feature map, so 229 of the block's Mul outputs came out one step apart and the error
spread to the logits (docs/tflite.md).

The input is one int8 tensor, so the op can give at most 256 outputs, all known here. `snap_island_scales`
nudges the output scale (by a few float32 ulps) until none of them lies within MARGIN of a half step; a scale
that is clear already is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.index import GraphIndex

# Distance from a half step (in steps) that float32 differences cannot cross: values up to 255 steps, a few ulps
# of op order and one of division vs reciprocal multiply are below 1e-4 steps.
MARGIN = 2.5e-4
f32 = np.float32


def _attrs(node: onnx.NodeProto) -> dict[str, float]:
    return {a.name: a.f for a in node.attribute}


def _hard_sigmoid(x: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    a = _attrs(node)
    return np.clip(x * f32(a.get("alpha", 0.2)) + f32(a.get("beta", 0.5)), f32(0), f32(1))


def _hard_swish(x: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    return x * np.clip(x * f32(1 / 6) + f32(0.5), f32(0), f32(1))


# op -> its float32 function (ONNX's definition): what both runtimes compute, up to rounding order
ISLAND_OPS: dict[str, Callable[[np.ndarray, onnx.NodeProto], np.ndarray]] = {
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
}


def clear_of_half_steps(y: np.ndarray, scale: np.float32) -> bool:
    """No value of y / scale lies within MARGIN of a half step (float64, so the test itself does not round)."""
    v = y.astype(np.float64) / float(scale)
    return bool(np.all(np.abs(v - np.floor(v) - 0.5) >= MARGIN))


def pick_scale(y: np.ndarray, scale: np.float32, window: int = 1 << 12) -> np.float32 | None:
    """The float32 nearest `scale` (in ulps) for which y is clear of half steps, or None within `window` ulps."""
    bits = int(np.array(scale, f32).view(np.int32))
    for step in range(window):
        for b in (bits + step, bits - step) if step else (bits,):
            s = f32(np.array(b, np.int32).view(f32)[()])
            if np.isfinite(s) and s > 0 and clear_of_half_steps(y, s):
                return s
    return None


def snap_island_scales(model: onnx.ModelProto, frozen: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Nudge the output scale of each HardSigmoid / HardSwish between a one-value DequantizeLinear and a
    QuantizeLinear (8-bit) so that no output it can give sits within MARGIN of a half step. Skips an output whose
    scale initializer is in `frozen` (another rule tuned it) or is used by other tensors. Changes `model` in
    place; returns the nodes whose output scale changed."""
    g = GraphIndex(model.graph)
    inits = g.inits
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input[1:]:
            users[i] = users.get(i, 0) + 1

    def one(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    changed = []
    for node in model.graph.node:
        fn = ISLAND_OPS.get(node.op_type)
        dq = g.producer_node(node.input[0]) if fn else None
        readers = g.reader_nodes(node.output[0]) if fn else []
        if fn is None or dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or len(readers) != 1:
            continue
        q = readers[0]
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[1] in frozen:
            continue
        s_in, z_in, s_out, z_out = (one(n) for n in (*dq.input[1:3], *q.input[1:3]))
        if any(v is None or v.size != 1 for v in (s_in, z_in, s_out, z_out)):
            continue
        assert s_in is not None and z_in is not None and s_out is not None  # for mypy: checked just above
        if z_in.dtype not in (np.int8, np.uint8):
            continue
        # the integers' readers are DequantizeLinear nodes sharing the scale initializer, and nothing else uses it
        dqs = g.reader_nodes(q.output[0])
        if not dqs or any(r.op_type != "DequantizeLinear" or r.input[1] != q.input[1] for r in dqs):
            continue
        if users.get(q.input[1], 0) != 1 + len(dqs):
            continue
        info = np.iinfo(z_in.dtype)
        x = (np.arange(info.min, info.max + 1) - int(z_in)).astype(f32) * f32(s_in.reshape(()))
        y = fn(x, node)
        old = f32(s_out.reshape(()))
        new = pick_scale(y, old)
        if new is None or new == old:
            continue
        inits[q.input[1]].CopyFrom(numpy_helper.from_array(np.array(new, f32), q.input[1]))
        changed.append(node.name or node.output[0])
    return changed
