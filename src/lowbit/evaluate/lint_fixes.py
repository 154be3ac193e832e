"""The performance lint's advice: why ORT left an op in float, and what fixes it, from what actually kept it
there (the recipe, the plan's reason, the Q/DQ form)."""

from __future__ import annotations

import onnx

from ..graph.index import GraphIndex
from ..ops import registered
from ..plan import Plan
from .lint_graph import four_bit_weight, zero_point_type


def four_bit_fix(nodes: list[onnx.NodeProto]) -> tuple[str, str]:
    why = "4-bit weights: ORT has no CPU integer kernel for static int4 weights and dequantizes them to float"
    fix = "use int8 weights where speed matters (--weights int8 or a recipe rule)"
    if all(n.op_type in ("MatMul", "Gemm") for n in nodes):
        fix += "; for a smaller file, weight-only int4 (--mode weight_only --weights int4) runs as MatMulNBits"
    return why, fix


def fusion_fix(orig: GraphIndex, i: int) -> tuple[str, str]:
    """Why ORT likely left a QDQ op unfused, and what to do."""
    n = orig.nodes[i]
    if four_bit_weight(orig, i):
        return four_bit_fix([n])
    relus = [r for r in orig.readers(i) if orig.nodes[r].op_type in ("Relu", "Clip")]
    if relus:
        return (
            "a Relu/Clip sits between the op and its QuantizeLinear",
            "fold the Relu/Clip into the output range: quantize the float model with lowbit",
        )
    zp = zero_point_type(orig, n.input[0])
    if zp == onnx.TensorProto.INT8:
        return "int8 activations", "use --activations uint8 (ORT fuses QDQ ops on x86 with uint8 activations)"
    if zp in (onnx.TensorProto.INT16, onnx.TensorProto.UINT16):
        return "16-bit activations", "give these ops 8-bit activations (--activations uint8 or a recipe rule)"
    return (
        "the Q/DQ pattern around it does not match ORT's fusion",
        "re-quantize it with lowbit (constant scales and zero points, per-tensor activations)",
    )


# ops/activation.py: the onnxruntime target runs these as a requantization (+ QLinearMul), no float island.
HARD_GATE_FIX = (
    'quantize for ONNX Runtime: `lowbit quantize --target onnxruntime` (Recipe(target="onnxruntime") in '
    "Python) runs it as a requantization and QLinearMul; the default (portable) target keeps the QDQ form that "
    "LiteRT runs as integer HARD_SWISH"
)
KEEP_AT_EDGE = (
    "keep the op float and move it to the edge of the model, or replace it with an op that has an integer kernel"
)


def island_fix(nodes: list[onnx.NodeProto], plan: Plan | None) -> tuple[str, str]:
    """(why, fix) for a float island, from what actually kept its ops float: advice to undo an exclusion only for
    nodes the recipe excluded, the plan's own reason otherwise."""
    decided = [(n, plan.nodes[n.name]) for n in nodes if plan is not None and n.name in plan.nodes]
    for by in ("exclude_names", "exclude_op_types"):
        hit = [n for n, d in decided if d.decided_by == by and not d.quantized]
        if hit:
            what = ", ".join(dict.fromkeys(n.name if by == "exclude_names" else n.op_type for n in hit))
            return f" ({by} in the recipe)", f"quantize it: remove {what} from {by}"
    ruled = [(n, d) for n, d in decided if d.decided_by == "rule" and not d.quantized]
    if ruled:
        n, d = ruled[0]
        return (
            f" (recipe rule {d.rule_index} keeps {n.name} float)",
            f"quantize it: give rule {d.rule_index} a scheme or narrow it so that it does not match {n.name}",
        )
    floats = [(n, d) for n, d in decided if not d.quantized]
    if floats:
        n, d = floats[0]
        return f" (lowbit kept {n.name} float: {d.reason})", KEEP_AT_EDGE
    quantizable = sorted({n.op_type for n in nodes if n.op_type in registered("static")})
    if plan is None and quantizable:
        return "", f"quantize the float model with lowbit, which has a quantized form for {', '.join(quantizable)}"
    return "", KEEP_AT_EDGE
