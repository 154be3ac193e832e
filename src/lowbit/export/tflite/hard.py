"""Hard activations as TFLite computes them: HardSwish written out (x * HardSigmoid(x), or x * Clip(x + 3, 0, 6) / 6)
becomes one HardSwish (HARD_SWISH has an int8 kernel); HardSigmoid, which has no TFLite kernel, becomes Mul + Add
(+ Clip in float)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper

from .qdq import Graph
from .rewrite import Names, new_value


def hard_swish(g: Graph, graph_outputs: set[str]) -> None:
    """Mul(x, HardSigmoid(x)) with alpha 1/6, beta 1/2 -> HardSwish(x): one int8 kernel, no rounding between."""
    producer = {o: n for n in g.nodes for o in n.output}
    uses = Counter(i for n in g.nodes for i in n.input)
    drop: set[int] = set()
    for node in g.nodes:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        for h, x in (node.input, reversed(node.input)):
            hs = producer.get(h)
            if hs is None or hs.op_type != "HardSigmoid" or hs.input[0] != x or uses[h] != 1 or h in graph_outputs:
                continue
            attrs = {a.name: a.f for a in hs.attribute}
            if abs(attrs.get("alpha", 0.2) - 1 / 6) > 1e-6 or abs(attrs.get("beta", 0.5) - 0.5) > 1e-6:
                continue
            drop.add(id(hs))
            new = helper.make_node("HardSwish", [x], [node.output[0]], name=node.name or node.output[0])
            node.CopyFrom(new)
            break
    g.nodes = [n for n in g.nodes if id(n) not in drop]
    _written_out_hard_swish(g, graph_outputs)


def _written_out_hard_swish(g: Graph, graph_outputs: set[str]) -> None:
    """x * Clip(x + 3, 0, 6) / 6 (tf2onnx, paddle2onnx) -> HardSwish(x). In lowbit's int8 output the Clip is gone
    into the Add's output range [0, 6]; that range is the clip, so the pattern holds without it."""
    producer = {o: n for n in g.nodes for o in n.output}
    uses = Counter(i for n in g.nodes for i in n.input)

    def const(name: str, value: float) -> bool:
        v = g.consts.get(name)
        return v is not None and v.size == 1 and abs(float(v.ravel()[0]) - value) < 1e-6 * max(1.0, value)

    def only(name: str, op: str) -> onnx.NodeProto | None:
        n = producer.get(name)
        ok = n is not None and n.op_type == op and uses[name] == 1 and name not in graph_outputs
        return n if ok else None

    def six_clipped(k: str) -> str | None:
        """x where k = Clip(x + 3, 0, 6) (or x + 3 quantized to exactly [0, 6])."""
        a = k
        clip = only(k, "Clip")
        if clip is not None:
            attrs = {x.name: x.f for x in clip.attribute}
            bounds = list(clip.input[1:3]) + [""] * (3 - len(clip.input))
            lo_ok = const(bounds[0], 0.0) if bounds[0] else attrs.get("min") == 0.0
            hi_ok = const(bounds[1], 6.0) if bounds[1] else attrs.get("max") == 6.0
            if not (lo_ok and hi_ok):
                return None
            a = clip.input[0]
        elif k in g.quant:
            q = g.quant[k]
            s, z = float(q.scale[0]), int(q.zero_point[0])
            if z != -128 or abs(255 * s - 6.0) > 6e-3:  # [0, 6] to 0.1%: saturation is the clip
                return None
        else:
            return None
        add = only(a, "Add")
        if add is None:
            return None
        x = next((i for i, o in (add.input, reversed(add.input)) if const(o, 3.0)), None)
        return x

    drop: set[int] = set()
    for node in g.nodes:
        if node.op_type == "Div" and const(node.input[1], 6.0):
            m = node.input[0]
        elif node.op_type == "Mul" and any(const(i, 1 / 6) for i in node.input):
            m = next(i for i in node.input if not const(i, 1 / 6))
        else:
            continue
        mul = only(m, "Mul")
        if mul is None:
            continue
        for x, k in (mul.input, reversed(mul.input)):
            if six_clipped(k) == x:
                clip = only(k, "Clip")
                add = producer[clip.input[0] if clip is not None else k]
                drop |= {id(mul), id(add)} | ({id(clip)} if clip is not None else set())
                node.CopyFrom(helper.make_node("HardSwish", [x], [node.output[0]], name=node.name or node.output[0]))
                break
    g.nodes = [n for n in g.nodes if id(n) not in drop]


def hard_sigmoid(g: Graph, shapes: dict, dtypes: dict) -> None:
    """HardSigmoid(x) = clip(alpha * x + beta, 0, 1) -> Mul, Add, Clip in float. An int8 HardSigmoid runs as
    DEQUANTIZE -> those three -> QUANTIZE: the QDQ model computes it in float in ONNX Runtime, rounding once. An
    int8 MUL + ADD form rounds the ADD as XNNPACK does (ties up, 21-bit ratios) and put 2.6% of a
    MobileNetV3-Small gate's outputs one step away from ONNX Runtime's."""
    names = Names(g, shapes)
    out: list[onnx.NodeProto] = []
    for node in g.nodes:
        if node.op_type != "HardSigmoid":
            out.append(node)
            continue
        attrs = {a.name: a.f for a in node.attribute}
        alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
        label = node.name or node.output[0]
        x, y = node.input[0], node.output[0]
        k_alpha, k_beta = names(f"{label}_alpha"), names(f"{label}_beta")
        for k, v in ((k_alpha, alpha), (k_beta, beta)):
            g.consts[k] = np.full((1,) * len(shapes[x]), v, np.float32)
        t = new_value(g, shapes, dtypes, names(f"{label}_scaled"), x, shapes[x])
        s = new_value(g, shapes, dtypes, names(f"{label}_shifted"), x, shapes[x])
        g.quant.pop(t, None)  # float inside; y keeps its int8 parameters when it has them
        g.quant.pop(s, None)
        lo, hi = names(f"{label}_lo"), names(f"{label}_hi")
        g.consts[lo], g.consts[hi] = np.zeros((), np.float32), np.ones((), np.float32)
        out.append(helper.make_node("Mul", [x, k_alpha], [t], name=f"{label}_mul"))
        out.append(helper.make_node("Add", [t, k_beta], [s], name=f"{label}_add"))
        out.append(helper.make_node("Clip", [s, lo, hi], [y], name=label))
        if x in g.quant and y in g.quant:
            g.float_islands.update((f"{label}_mul", f"{label}_add", label))
    g.nodes = out
