"""Performance lint: what makes an int8 model slow in ONNX Runtime on the CPU, found before it ships.

ORT decides what runs as an integer kernel, so the lint asks it: it optimizes the model as a deployment
session does (default optimizations), dumps the optimized graph, and reads what was left in float between
DequantizeLinear and QuantizeLinear. The QDQ model itself (and its lowbit plan, when there is one) says
whether such an op was meant to be quantized, which separates a float island from a missing integer kernel.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypedDict

import onnx
import onnxruntime as ort

from ..errors import LowbitError
from ..graph.index import GraphIndex
from ..graph.io import load_proto, model_name
from ..ops import registered
from ..plan import Plan, plan_path
from ..runtimes import ort as ort_runtime
from .jsonable import dumps, jsonable

KINDS = ("dynamic-conv", "float-island", "no-integer-kernel", "missing-fusion", "int8-activations-x86")

# Ops ORT runs on integers (or that convert between int and float): they end a float region.
_INTEGER = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QAttention",
    "QEmbedLayerNormalization",
}
# Data movement: cheap in float and run on int8 by ORT when its Q/DQ neighbours allow; never reported,
# but float regions are followed through them.
_MOVEMENT = {
    "Transpose",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Slice",
    "Split",
    "Concat",
    "Gather",
    "GatherElements",
    "Expand",
    "Tile",
    "Pad",
    "DepthToSpace",
    "SpaceToDepth",
    "MaxPool",
    "Resize",
    "ReorderInput",
    "ReorderOutput",
    "Cast",
}
# Shape arithmetic: integer outputs, nothing to run on int8.
_SHAPE = {"Shape", "Size", "ConstantOfShape", "Range", "NonZero", "Constant"}
# Ops ORT fuses into integer kernels when they sit in QDQ form (QLinearConv, QGemm, QLinearAdd, ...).
_FUSIBLE = {
    "Conv",
    "MatMul",
    "Gemm",
    "Add",
    "Mul",
    "AveragePool",
    "GlobalAveragePool",
    "Sigmoid",
    "LeakyRelu",
    "Softmax",
}
# Ops other quantizers (ORT's) put in QDQ form that lowbit does not.
_OTHER_QUANTIZED = {
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "CumSum",
    "TopK",
    "Where",
    "ArgMax",
}
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# ORT's integer GEMM-based kernels and the input index of the activation's zero point.
_INT_GEMM_ZP = {"QLinearConv": 2, "QGemm": 2, "QLinearMatMul": 2}


class Finding(TypedDict):
    kind: str  # one of KINDS
    level: str  # "warning" or "info"
    nodes: list[str]
    message: str
    fix: str


class LintResult(list):
    """The findings of `lint` in order. It stays a list of Finding dicts (not a dataclass) so that it embeds in
    other commands' JSON as it is (`lowbit quantize --json`, diagnose); `to_dict()`/`to_json()` as the others."""

    def __init__(self, findings: Iterable[Finding] = (), model: str = "") -> None:
        super().__init__(findings)
        self.model = model

    @property
    def findings(self) -> list[Finding]:
        return list(self)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"model": self.model, "findings": list(self)})

    def to_json(self, indent: int | None = 1) -> str:
        return dumps(self.to_dict(), indent=indent)


def _is_integer(n: onnx.NodeProto) -> bool:
    return n.op_type in _INTEGER or n.op_type.startswith("QLinear")


def _is_float_compute(n: onnx.NodeProto) -> bool:
    return not (_is_integer(n) or n.op_type in _MOVEMENT or n.op_type in _SHAPE)


def _optimized(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """The graph ORT runs on the CPU after its default optimizations."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "optimized.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = out
        opts.log_severity_level = 3
        try:
            if isinstance(model, onnx.ModelProto):
                ort_runtime.from_proto(model, opts)  # a large model by a temporary file: no serialized copy
            else:
                ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for models it cannot load
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LowbitError(f"ONNX Runtime cannot load the model to lint it: {first}") from None
        # ORT's dump, not user input: no loader checks; only its graph is read (its external data may refer to
        # the folder of the model it was made from)
        return onnx.load(out, load_external_data=False)


def _display(n: onnx.NodeProto) -> str:
    return n.name or f"{n.op_type}->{n.output[0]}"


def _island_nodes(opt: GraphIndex) -> list[int]:
    """Float compute ops of the optimized graph fed (through float ops/data movement) by a DequantizeLinear
    and feeding a QuantizeLinear: ORT converts int8 -> float -> int8 around them on every run."""
    passable = {i for i, n in enumerate(opt.nodes) if _is_float_compute(n) or n.op_type in _MOVEMENT}
    down: set[int] = set()
    stack = [o for n in opt.nodes if n.op_type == "DequantizeLinear" for o in n.output]
    while stack:
        for c in opt.consumers.get(stack.pop(), []):
            if c in passable and c not in down:
                down.add(c)
                stack.extend(opt.nodes[c].output)
    up: set[int] = set()
    stack = [n.input[0] for n in opt.nodes if n.op_type == "QuantizeLinear"]
    while stack:
        p = opt.producer.get(stack.pop())
        if p is not None and p in passable and p not in up:
            up.add(p)
            stack.extend(t for t in opt.nodes[p].input if t)
    return sorted(i for i in down & up if _is_float_compute(opt.nodes[i]))


def _by_name(n: onnx.NodeProto, names: dict[str, int]) -> int | None:
    for cand in (n.name, re.sub(r"(_token_\d+)+$", "", n.name), n.name.split("/")[0]):
        if cand and cand in names:
            return names[cand]
    return None


def _origin(j: int, opt: GraphIndex, orig: GraphIndex, names: dict[str, int], depth: int = 0) -> int | None:
    """The original node optimized-graph node j comes from: same name, ORT's suffixed name, the node that made
    the same output tensor, or (for nodes ORT made when inlining a function such as HardSwish) the original
    producer of what its first named reader reads."""
    n = opt.nodes[j]
    i = _by_name(n, names)
    if i is not None:
        return i
    for o in n.output:
        if o in orig.producer:
            return orig.producer[o]
    for o in n.output:
        for c in opt.consumers.get(o, []):
            oc = _by_name(opt.nodes[c], names)
            if oc is not None:
                k = list(opt.nodes[c].input).index(o)
                if k < len(orig.nodes[oc].input) and orig.nodes[oc].input[k] in orig.producer:
                    return orig.producer[orig.nodes[oc].input[k]]
            elif depth < 8 and _is_float_compute(opt.nodes[c]):
                found = _origin(c, opt, orig, names, depth + 1)
                if found is not None:
                    return found
    return None


def _qdq_form(orig: GraphIndex, i: int) -> bool:
    """All computed inputs come from DequantizeLinear (weights too) and every reader of the output is a
    QuantizeLinear (or a Relu/Clip in front of one)."""
    n = orig.nodes[i]
    computed = [t for t in n.input if t and t in orig.producer]
    if not computed or any(orig.op_of(t) != "DequantizeLinear" for t in computed):
        return False
    if n.op_type in _WEIGHTED and (len(n.input) < 2 or orig.op_of(n.input[1]) != "DequantizeLinear"):
        return False

    def to_quantize(j: int) -> bool:
        return orig.nodes[j].op_type == "QuantizeLinear"

    readers = orig.readers(i)
    return bool(readers) and all(
        to_quantize(r) or (orig.nodes[r].op_type in ("Relu", "Clip") and all(map(to_quantize, orig.readers(r))))
        for r in readers
    )


def _meant_quantized(orig: GraphIndex, i: int, plan: Plan | None) -> bool:
    n = orig.nodes[i]
    if plan is not None and n.name in plan.nodes:
        return plan.nodes[n.name].quantized and _qdq_form(orig, i)
    # Without a plan, Q/DQ around an op no quantizer handles (Sin, Erf, ...) belong to its neighbours.
    return _qdq_form(orig, i) and (n.op_type in registered("static") or n.op_type in _OTHER_QUANTIZED)


def _zero_point_type(g: GraphIndex, dq_output: str) -> int | None:
    p = g.producer.get(dq_output)
    if p is None or len(g.nodes[p].input) < 3:
        return None
    zp = g.inits.get(g.nodes[p].input[2])
    return zp.data_type if zp is not None else None


def _names(nodes: list[onnx.NodeProto]) -> str:
    shown = ", ".join(_display(n) for n in nodes[:3])
    return shown + (f", ... ({len(nodes)} in all)" if len(nodes) > 3 else "")


def _finding(kind: str, nodes: list[onnx.NodeProto], message: str, fix: str, level: str = "warning") -> Finding:
    return {"kind": kind, "level": level, "nodes": [_display(n) for n in nodes], "message": message, "fix": fix}


def _dynamic_convs(orig: GraphIndex) -> list[int]:
    out = []
    for i, n in enumerate(orig.nodes):
        if n.op_type == "ConvInteger":
            out.append(i)
        elif n.op_type == "Conv" and n.input:
            t, seen = n.input[0], 0
            while t in orig.producer and seen < 50:  # through DQ and data movement to a DynamicQuantizeLinear
                p = orig.nodes[orig.producer[t]]
                if p.op_type == "DynamicQuantizeLinear":
                    out.append(i)
                    break
                if p.op_type != "DequantizeLinear" and p.op_type not in _MOVEMENT:
                    break
                t, seen = p.input[0], seen + 1
    return out


_FOUR_BIT = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def _four_bit_weight(g: GraphIndex, i: int) -> str | None:
    """The 4-bit initializer behind node i's weight DequantizeLinear, if any."""
    n = g.nodes[i]
    if n.op_type not in _WEIGHTED or len(n.input) < 2 or g.op_of(n.input[1]) != "DequantizeLinear":
        return None
    w = g.inits.get(g.nodes[g.producer[n.input[1]]].input[0])
    return w.name if w is not None and w.data_type in _FOUR_BIT else None


def _four_bit_fix(nodes: list[onnx.NodeProto]) -> tuple[str, str]:
    why = "4-bit weights: ORT has no CPU integer kernel for static int4 weights and dequantizes them to float"
    fix = "use int8 weights where speed matters (--weights int8 or a recipe rule)"
    if all(n.op_type in ("MatMul", "Gemm") for n in nodes):
        fix += "; for a smaller file, weight-only int4 (--mode weight_only --weights int4) runs as MatMulNBits"
    return why, fix


def _fusion_fix(orig: GraphIndex, i: int) -> tuple[str, str]:
    """Why ORT likely left a QDQ op unfused, and what to do."""
    n = orig.nodes[i]
    if _four_bit_weight(orig, i):
        return _four_bit_fix([n])
    relus = [r for r in orig.readers(i) if orig.nodes[r].op_type in ("Relu", "Clip")]
    if relus:
        return (
            "a Relu/Clip sits between the op and its QuantizeLinear",
            "fold the Relu/Clip into the output range: quantize the float model with lowbit",
        )
    zp = _zero_point_type(orig, n.input[0])
    if zp == onnx.TensorProto.INT8:
        return "int8 activations", "use --activations uint8 (ORT fuses QDQ ops on x86 with uint8 activations)"
    if zp in (onnx.TensorProto.INT16, onnx.TensorProto.UINT16):
        return "16-bit activations", "give these ops 8-bit activations (--activations uint8 or a recipe rule)"
    return (
        "the Q/DQ pattern around it does not match ORT's fusion",
        "re-quantize it with lowbit (constant scales and zero points, per-tensor activations)",
    )


# ops/activation.py: the onnxruntime target runs these as a requantization (+ QLinearMul), no float island.
_HARD_GATE_FIX = (
    'quantize for ONNX Runtime: recipe target "onnxruntime" (Recipe(target="onnxruntime"), or "target": '
    '"onnxruntime" in --recipe FILE) runs it as a requantization and QLinearMul; the default target keeps the QDQ '
    "form that LiteRT runs as integer HARD_SWISH"
)
_KEEP_AT_EDGE = (
    "keep the op float and move it to the edge of the model, or replace it with an op that has an integer kernel"
)


def _island_fix(nodes: list[onnx.NodeProto], plan: Plan | None) -> tuple[str, str]:
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
        return f" (lowbit kept {n.name} float: {d.reason})", _KEEP_AT_EDGE
    quantizable = sorted({n.op_type for n in nodes if n.op_type in registered("static")})
    if plan is None and quantizable:
        return "", f"quantize the float model with lowbit, which has a quantized form for {', '.join(quantizable)}"
    return "", _KEEP_AT_EDGE


def lint(model: onnx.ModelProto | str | Path, runtime: str = "ort", plan: Plan | None = None) -> LintResult:
    """Findings {"kind", "level", "nodes", "message", "fix"} about what runs slowly in ORT on the CPU.

    kind is one of KINDS, level "warning" or "info" (int8 activations on a CPU with VNNI); nodes are the
    model's node names, each in one finding at most; findings come in KINDS order, then graph order.
    `plan` (found beside a model path when not given) tells which ops lowbit meant to quantize.
    """
    if runtime != "ort":
        raise LowbitError(f"lint knows the runtime 'ort' only, not {runtime!r}; use runtime='ort'")
    proto = load_proto(model)
    if plan is None and not isinstance(model, onnx.ModelProto) and plan_path(model).is_file():
        plan = Plan.load(plan_path(model))
    orig, opt = GraphIndex(proto.graph), GraphIndex(_optimized(model).graph)
    names = {n.name: i for i, n in enumerate(orig.nodes) if n.name}
    found: list[tuple[int, int, Finding]] = []  # (kind rank, first node index, finding) for a stable order
    taken: set[int] = set()

    def add(kind: str, idx: list[int], message: str, fix: str, level: str = "warning") -> None:
        idx = sorted(set(idx) - taken)
        if idx:
            taken.update(idx)
            found.append((KINDS.index(kind), idx[0], _finding(kind, [orig.nodes[i] for i in idx], message, fix, level)))

    dyn = _dynamic_convs(orig)
    if dyn:
        add(
            "dynamic-conv",
            dyn,
            f"{_names([orig.nodes[i] for i in dyn])}: dynamically quantized convolution, several times slower "
            "than float Conv on x86",
            "use static quantization for convs (give --calib)",
        )

    # Float ops left between Q/DQ in the optimized graph, by the original node they come from.
    island = _island_nodes(opt)
    origin = {j: _origin(j, opt, orig, names) for j in island}
    meant = {i: _meant_quantized(orig, i, plan) for i in set(origin.values()) if i is not None and i not in taken}
    trailing: dict[int, list[int]] = defaultdict(list)  # quantized op -> Relu/Clip left after it
    fusion: list[int] = []  # quantized ops ORT has integer kernels for but left unfused
    no_kernel: dict[str, list[int]] = defaultdict(list)
    islands: list[int] = []
    for i in sorted(meant):
        n = orig.nodes[i]
        prod = orig.producer.get(n.input[0]) if n.input else None
        if n.op_type in ("Relu", "Clip") and prod is not None and meant.get(prod):
            trailing[prod].append(i)  # reported with the op it follows
        elif meant[i] and n.op_type in _FUSIBLE:
            fusion.append(i)
        elif meant[i]:
            no_kernel[n.op_type].append(i)
        else:
            islands.append(i)
    for i in fusion:  # ORT may have fused the Relu/Clip into a float FusedConv: name it from the QDQ model
        trailing[i] += [r for r in orig.readers(i) if orig.nodes[r].op_type in ("Relu", "Clip")]

    # One float-island finding per connected region (ops joined directly or through data movement).
    group = {i: i for i in islands}

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in islands:
        stack, seen = list(orig.nodes[i].output), set()
        while stack:
            for c in orig.consumers.get(stack.pop(), []):
                if c in group:
                    group[root(c)] = root(i)
                elif c not in seen and orig.nodes[c].op_type in _MOVEMENT:
                    seen.add(c)
                    stack.extend(orig.nodes[c].output)
    regions: dict[int, list[int]] = defaultdict(list)
    for i in islands:
        regions[root(i)].append(i)
    for members in regions.values():
        nodes = [orig.nodes[i] for i in members]
        ops = ", ".join(dict.fromkeys(n.op_type for n in nodes))
        why, fix = _island_fix(nodes, plan)
        add(
            "float-island",
            members,
            f"{_names(nodes)} ({ops}) run in float between quantized ops: ORT dequantizes before and quantizes "
            f"after them on every run{why}",
            fix,
        )
    for op, members in no_kernel.items():
        add(
            "no-integer-kernel",
            members + [r for i in members for r in trailing[i]],
            f"{_names([orig.nodes[i] for i in members])}: quantized {op} but ORT has no integer {op} kernel on "
            "the CPU, so it runs in float between DequantizeLinear and QuantizeLinear",
            _HARD_GATE_FIX
            if op in ("HardSwish", "HardSigmoid")
            else f"replace {op} with an op ORT runs on int8, or keep it float at the model's edge (--exclude-op-types "
            f"{op})",
        )
    unfused: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i in fusion:
        unfused[_fusion_fix(orig, i)].append(i)
    # Ops with 4-bit weights whose output is not re-quantized (the model's last layer) are no Q/DQ island but
    # run in float all the same, as long as ORT kept the weight's DequantizeLinear.
    kept_dq = {n.input[0] for n in opt.nodes if n.op_type == "DequantizeLinear"}
    four = [
        i
        for i in range(len(orig.nodes))
        if i not in fusion and i not in taken and (_four_bit_weight(orig, i) or "") in kept_dq
    ]
    if four:
        unfused[_four_bit_fix([orig.nodes[i] for i in four])].extend(four)
    for (why, fix), members in unfused.items():
        nodes = [orig.nodes[i] for i in members]
        ops = ", ".join(dict.fromkeys(n.op_type for n in nodes))
        add(
            "missing-fusion",
            members + [r for i in members for r in trailing[i]],
            f"{_names(nodes)} ({ops}): DequantizeLinear inputs left after ORT's optimizations, so they run in "
            f"float, not as integer kernels ({why})",
            fix,
        )

    # Signed activations into ORT's integer GEMM kernels (after ORT's own s8 -> u8 conversion).
    signed = []
    for j, n in enumerate(opt.nodes):
        k = _INT_GEMM_ZP.get(n.op_type)
        zp = opt.inits.get(n.input[k]) if k is not None and len(n.input) > k else None
        if zp is not None and zp.data_type == onnx.TensorProto.INT8:
            orig_i = _origin(j, opt, orig, names)
            if orig_i is not None and orig_i not in taken:
                signed.append(orig_i)
    if signed:
        shown = _names([orig.nodes[i] for i in sorted(set(signed))])
        if ort_runtime.cpu_has_vnni():
            add(
                "int8-activations-x86",
                signed,
                f"info: {shown} take int8 (signed) activations; this CPU has VNNI so they cost little here, "
                "but x86 CPUs without VNNI run them on a slower path than uint8",
                "use --activations uint8 if the model ships to x86 CPUs without VNNI",
                level="info",
            )
        else:
            add(
                "int8-activations-x86",
                signed,
                f"{shown} take int8 (signed) activations: ORT's fast x86 path without VNNI is uint8 activations x "
                "int8 weights",
                "use --activations uint8",
            )
    return LintResult((f for _, _, f in sorted(found, key=lambda t: (t[0], t[1]))), model_name(model))
