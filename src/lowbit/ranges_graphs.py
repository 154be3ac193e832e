"""The graphs that measure candidate ranges (ranges_by_error.py): every reader of a tensor copied once per
candidate, fed the tensor quantized at that candidate, with each copy's squared error summed inside the graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .numerics import qrange, scale_zero_point
from .recipe import Scheme

Batch = dict[str, np.ndarray]


def _params(r: tuple[float, float], scheme: Scheme) -> tuple[float, int]:
    s, z = scale_zero_point(r[0], r[1], scheme.activations, scheme.symmetric_activations)
    return float(s), int(z)


@dataclass
class _Unit:
    """One place a group's error is measured: a node reading its tensors (`node`), or, when no reader can be
    copied (a subgraph, another domain), one of the group's tensors itself (`node` None)."""

    node: onnx.NodeProto | None
    inputs: set[str] = field(default_factory=set)  # the group tensors it reads
    outputs: list[str] = field(default_factory=list)  # its float outputs (the tensor itself when node is None)


@dataclass
class _Group:
    """A source tensor and every tensor sharing its parameters, with the places its error is measured."""

    source: str
    members: list[str]
    scheme: Scheme
    options: list[tuple[str, tuple[float, float]]]
    readers: list[_Unit]


def readers_model(proto: onnx.ModelProto, groups: list[_Group], held: list[Batch]) -> onnx.ModelProto | None:
    """The groups' readers alone, in graph order, their inputs the held float tensors (None if one is not held in
    every batch): the float model need not run again, its values on the kept samples are at hand."""
    chosen = {u.node.name for g in groups for u in g.readers if u.node is not None}
    nodes = [n for n in proto.graph.node if n.name in chosen]
    made = {o for n in nodes for o in n.output if o}
    init = {t.name: t for t in proto.graph.initializer}
    reads = [i for n in nodes for i in n.input if i] + [m for g in groups for m in g.members]
    inputs = [i for i in dict.fromkeys(reads) if i not in made and i not in init]
    if not held or any(i not in b for b in held for i in inputs):
        return None
    graph = onnx.helper.make_graph(
        nodes,
        "lowbit_readers",
        [_value_info(i, [b[i] for b in held]) for i in inputs],
        [],
        [init[i] for i in dict.fromkeys(reads) if i in init],
    )
    out = onnx.helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    out.functions.extend(proto.functions)
    return out


def _value_info(name: str, values: list[np.ndarray]) -> onnx.ValueInfoProto:
    """Its type, and the sizes all batches agree on (others symbolic): ONNX Runtime plans the copies' convolutions
    ~25% faster (CPU) knowing them than with no shape at all (EfficientNet-Lite0)."""
    ranks = {v.ndim for v in values}
    dims: list[int | str] | None = None
    if len(ranks) == 1:
        dims = [s.pop() if len(s := {v.shape[k] for v in values}) == 1 else f"d{k}" for k in range(ranks.pop())]
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(values[0].dtype), dims)


def error_model(proto: onnx.ModelProto, groups: list[_Group]) -> tuple[onnx.ModelProto, list[str]]:
    """The float model plus, for every group, candidate and reader, a copy of the reader fed the group's tensors
    quantized at the candidate, and scalar outputs: each copy's summed squared error against the reader's float
    output (`err/g/r/c/k`) and each float output's summed squared deviation from its batch mean (`var/g/r/k`).
    One run per batch measures every candidate of every tensor, inside ONNX Runtime."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g_ = out.graph
    names: list[str] = []
    nodes: list[onnx.NodeProto] = []

    def node(op: str, ins: list[str], outs: list[str], **attrs: Any) -> str:
        nodes.append(onnx.helper.make_node(op, ins, outs, name=f"lowbit_le/n/{len(nodes)}", **attrs))
        return outs[0]

    def const(name: str, value: float) -> str:
        g_.initializer.append(onnx.numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    def sum_sq(x: str, tag: str) -> str:
        return node("ReduceSumSquare", [x], [tag], keepdims=0)

    for gi, g in enumerate(groups):
        qmin, qmax = qrange(g.scheme.activations)
        for ri, r in enumerate(g.readers):
            for k, y in enumerate(r.outputs):
                mean = node("ReduceMean", [y], [f"lowbit_le/m/{gi}/{ri}/{k}/mean"], keepdims=1)
                dev = node("Sub", [y, mean], [f"lowbit_le/m/{gi}/{ri}/{k}/dev"])
                names.append(sum_sq(dev, f"var/{gi}/{ri}/{k}"))
        for c, (_, rng) in enumerate(g.options):
            s, z = _params(rng, g.scheme)
            pre = f"lowbit_le/k/{gi}/{c}"
            sc, lo, hi = const(pre + "/s", s), const(pre + "/lo", qmin - z), const(pre + "/hi", qmax - z)
            quantized = {}
            for m in g.members:
                # QuantizeLinear then DequantizeLinear (float32 divide, round half to even), with the zero point
                # folded into the clip bounds: clip(round(x/s) + z, qmin, qmax) - z is clip(round(x/s), qmin - z,
                # qmax - z) exactly (integers below 2**24, or clipped either way), in 4 passes over x instead of 6.
                t = f"lowbit_le/q/{gi}/{c}/{m}"
                q = node("Round", [node("Div", [m, sc], [t + "/div"])], [t + "/round"])
                quantized[m] = node("Mul", [node("Clip", [q, lo, hi], [t + "/int"]), sc], [t])
            for ri, r in enumerate(g.readers):
                tag = f"lowbit_le/r/{gi}/{ri}/{c}"
                if r.node is None:
                    (m,) = r.inputs
                    copies = [quantized[m]]
                else:
                    copy = onnx.NodeProto()
                    copy.CopyFrom(r.node)
                    copy.name = f"{tag}/{r.node.name}"
                    copy.input[:] = [quantized[n] if n in r.inputs else n for n in r.node.input]
                    copy.output[:] = [f"{tag}/out{k}" if o else "" for k, o in enumerate(r.node.output)]
                    nodes.append(copy)
                    copies = [copy.output[list(r.node.output).index(y)] for y in r.outputs]
                for k, (y, y_c) in enumerate(zip(r.outputs, copies)):
                    names.append(sum_sq(node("Sub", [y_c, y], [f"{tag}/{k}/d"]), f"err/{gi}/{ri}/{c}/{k}"))
    g_.node.extend(nodes)
    del g_.output[:]
    g_.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, []) for n in names)
    return out, names
