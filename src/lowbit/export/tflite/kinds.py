"""Which number kind each node runs in (int8 "q" or float "f"), and activations fused into their producers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper

from ...errors import LowbitError
from .context import Context
from .ops import FIXED_OUTPUT, FLOAT_ONLY, FUSES, NONE, SAME_PARAMS, clip_bounds, fused_code
from .qdq import Graph
from .writer import QuantParams


def fuse_activations(g: Graph, ctx: Context, graph_outputs: set[str]) -> dict[str, int]:
    """Relu / Clip(0, 6) right after an op that can absorb it become that op's fused_activation_function."""
    producer = {o: n for n in g.nodes for o in n.output}
    uses = Counter(i for n in g.nodes for i in n.input)
    acts: dict[str, int] = {}
    kept = []
    for node in g.nodes:
        if node.op_type in ("Relu", "Clip"):
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            code = fused_code(clip_bounds(ctx, node, a))
            x, y = node.input[0], node.output[0]
            p = producer.get(x)
            qx, qy = g.quant.get(x), g.quant.get(y)
            same_q = (qx is None and qy is None) or (
                qx is not None
                and qy is not None
                and np.array_equal(qx.scale, qy.scale)
                and np.array_equal(qx.zero_point, qy.zero_point)
            )
            fusable = (
                p is not None and p.op_type in FUSES and not (p.op_type == "MatMul" and p.input[1] not in g.consts)
            )
            if (
                code is not None
                and p is not None
                and fusable
                and uses[x] == 1
                and x not in graph_outputs
                and acts.get(p.name or p.output[0], NONE) == NONE
                and same_q
            ):
                p.name = p.name or p.output[0]  # the key must outlive the output's renaming below
                acts[p.name] = code
                p.output[0] = y
                continue
        kept.append(node)
    g.nodes = kept
    return acts


def _scale_ratio(a: QuantParams, b: QuantParams) -> float:
    sa, sb = float(a.scale[0]), float(b.scale[0])
    return min(sa, sb) / max(sa, sb)


def decide(ctx: Context, node: onnx.NodeProto, allow_fallback: bool, fallbacks: list[str]) -> str:
    g = ctx.g
    ins = [i for i in node.input if i and i not in g.consts]
    if not (all(o in g.quant for o in node.output) and all(i in g.quant for i in ins)):
        return "f"
    op = node.op_type
    out_q = g.quant[node.output[0]]
    reason = None
    if op in FLOAT_ONLY:
        reason = "TFLite has no int8 kernel for it"
    elif op in SAME_PARAMS and any(
        not (
            np.allclose(g.quant[i].scale, out_q.scale, rtol=1e-6)
            and np.array_equal(g.quant[i].zero_point, out_q.zero_point)
        )
        for i in ins
    ):
        reason = "TFLite's int8 kernel needs the same scale and zero point on input and output"
    elif op in FIXED_OUTPUT and not (
        np.isclose(out_q.scale[0], FIXED_OUTPUT[op][0], rtol=1e-6) and int(out_q.zero_point[0]) == FIXED_OUTPUT[op][1]
    ):
        s, z = FIXED_OUTPUT[op]
        reason = f"TFLite's int8 kernel needs output scale {s:g} and zero point {z}"
    elif op in ("Conv", "Gemm", "MatMul") and node.input[1] in g.consts and node.input[1] not in g.qconsts:
        reason = "its weights are float"
    elif op in ("Add", "Sub", "Mul") and any(i in g.consts and i not in g.qconsts for i in node.input):
        reason = "a float constant operand"
    elif op in ("Add", "Sub") and len(ins) == 2 and _scale_ratio(g.quant[ins[0]], g.quant[ins[1]]) < 2.0**-30:
        # TFLite rescales both inputs by s_i / (2 max s): below 2**-31 its fixed-point multiplier check aborts
        reason = (
            f"input scales {float(g.quant[ins[0]].scale[0]):.3g} and {float(g.quant[ins[1]].scale[0]):.3g} "
            "are too far apart for TFLite's int8 kernel"
        )
    if reason is None:
        return "q"
    if not allow_fallback:
        raise LowbitError(
            f"node {node.name or node.output[0]} ({op}): {reason}; pass --allow-float-fallback to run it in float"
        )
    fallbacks.append(f"{node.name or node.output[0]} ({op}): {reason}")
    return "f"


def checkpoint(ctx: Context):
    """A function that puts the conversion state back as it is now (drops a failed converter's tensors/ops)."""
    n_tensors, n_ops = len(ctx.fm.tensors), len(ctx.fm.operators)
    reps = {k: dict(v) for k, v in ctx.reps.items()}
    nhwc, n_transposes = dict(ctx.nhwc), len(ctx.transposes)

    def undo() -> None:
        del ctx.fm.tensors[n_tensors:], ctx.fm.operators[n_ops:], ctx.transposes[n_transposes:]
        ctx.reps, ctx.nhwc = {k: dict(v) for k, v in reps.items()}, dict(nhwc)

    return undo
