"""Performance lint: what makes an int8 model slow in ONNX Runtime on the CPU, found before it ships.

ORT decides what runs as an integer kernel, so the lint asks it: it optimizes the model as a deployment
session does (default optimizations), dumps the optimized graph, and reads what was left in float between
DequantizeLinear and QuantizeLinear. The QDQ model itself (and its lowbit plan, when there is one) says
whether such an op was meant to be quantized, which separates a float island from a missing integer kernel.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypedDict

import onnx

from ..errors import LowbitError
from ..graph.index import GraphIndex
from ..graph.io import load_proto, model_name
from ..plan import Plan, plan_path
from ..runtimes import ort as ort_runtime
from .jsonable import dumps, jsonable
from .lint_fixes import HARD_GATE_FIX, four_bit_fix, fusion_fix, island_fix
from .lint_graph import (
    FUSIBLE,
    INT_GEMM_ZP,
    MOVEMENT,
    dynamic_convs,
    four_bit_weight,
    island_nodes,
    meant_quantized,
    optimized,
    origin_node,
)

KINDS = ("dynamic-conv", "float-island", "no-integer-kernel", "missing-fusion", "int8-activations-x86")


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


def _display(n: onnx.NodeProto) -> str:
    return n.name or f"{n.op_type}->{n.output[0]}"


def _names(nodes: list[onnx.NodeProto]) -> str:
    shown = ", ".join(_display(n) for n in nodes[:3])
    return shown + (f", ... ({len(nodes)} in all)" if len(nodes) > 3 else "")


def _finding(kind: str, nodes: list[onnx.NodeProto], message: str, fix: str, level: str = "warning") -> Finding:
    return {"kind": kind, "level": level, "nodes": [_display(n) for n in nodes], "message": message, "fix": fix}


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
    orig, opt = GraphIndex(proto.graph), GraphIndex(optimized(model).graph)
    names = {n.name: i for i, n in enumerate(orig.nodes) if n.name}
    found: list[tuple[int, int, Finding]] = []  # (kind rank, first node index, finding) for a stable order
    taken: set[int] = set()

    def add(kind: str, idx: list[int], message: str, fix: str, level: str = "warning") -> None:
        idx = sorted(set(idx) - taken)
        if idx:
            taken.update(idx)
            found.append((KINDS.index(kind), idx[0], _finding(kind, [orig.nodes[i] for i in idx], message, fix, level)))

    dyn = dynamic_convs(orig)
    if dyn:
        add(
            "dynamic-conv",
            dyn,
            f"{_names([orig.nodes[i] for i in dyn])}: dynamically quantized convolution, several times slower "
            "than float Conv on x86",
            "use static quantization for convs (give --calib)",
        )

    # Float ops left between Q/DQ in the optimized graph, by the original node they come from.
    island = island_nodes(opt)
    origin = {j: origin_node(j, opt, orig, names) for j in island}
    meant = {i: meant_quantized(orig, i, plan) for i in set(origin.values()) if i is not None and i not in taken}
    trailing: dict[int, list[int]] = defaultdict(list)  # quantized op -> Relu/Clip left after it
    fusion: list[int] = []  # quantized ops ORT has integer kernels for but left unfused
    no_kernel: dict[str, list[int]] = defaultdict(list)
    islands: list[int] = []
    for i in sorted(meant):
        n = orig.nodes[i]
        prod = orig.producer.get(n.input[0]) if n.input else None
        if n.op_type in ("Relu", "Clip") and prod is not None and meant.get(prod):
            trailing[prod].append(i)  # reported with the op it follows
        elif meant[i] and n.op_type in FUSIBLE:
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
                elif c not in seen and orig.nodes[c].op_type in MOVEMENT:
                    seen.add(c)
                    stack.extend(orig.nodes[c].output)
    regions: dict[int, list[int]] = defaultdict(list)
    for i in islands:
        regions[root(i)].append(i)
    for members in regions.values():
        nodes = [orig.nodes[i] for i in members]
        ops = ", ".join(dict.fromkeys(n.op_type for n in nodes))
        why, fix = island_fix(nodes, plan)
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
            HARD_GATE_FIX
            if op in ("HardSwish", "HardSigmoid")
            else f"replace {op} with an op ORT runs on int8, or keep it float at the model's edge (--exclude-op-types "
            f"{op})",
        )
    unfused: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i in fusion:
        unfused[fusion_fix(orig, i)].append(i)
    # Ops with 4-bit weights whose output is not re-quantized (the model's last layer) are no Q/DQ island but
    # run in float all the same, as long as ORT kept the weight's DequantizeLinear.
    kept_dq = {n.input[0] for n in opt.nodes if n.op_type == "DequantizeLinear"}
    four = [
        i
        for i in range(len(orig.nodes))
        if i not in fusion and i not in taken and (four_bit_weight(orig, i) or "") in kept_dq
    ]
    if four:
        unfused[four_bit_fix([orig.nodes[i] for i in four])].extend(four)
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
        k = INT_GEMM_ZP.get(n.op_type)
        zp = opt.inits.get(n.input[k]) if k is not None and len(n.input) > k else None
        if zp is not None and zp.data_type == onnx.TensorProto.INT8:
            orig_i = origin_node(j, opt, orig, names)
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
