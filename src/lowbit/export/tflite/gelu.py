"""GELU as exporters spell it, x * 0.5 * (1 + erf(x / sqrt 2)) in any order of its factors, as one Gelu node (TFLite
GELU), or a table lookup where the int8 ONNX model rounds inside the chain (table.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .qdq import Graph
from .table import chain_table, rounded_inside


def fuse_gelu(g: Graph) -> None:
    """x * 0.5 * (1 + erf(x / sqrt 2)), as PyTorch exports nn.GELU, becomes one Gelu node (TFLite GELU)."""
    producer = {o: n for n in g.nodes for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)
    uses = Counter(i for n in g.nodes for i in n.input)

    def const(name: str, value: float) -> bool:
        return (
            name in g.consts
            and g.consts[name].size == 1
            and bool(np.isclose(float(g.consts[name].ravel()[0]), value, rtol=1e-4))
        )

    def other(node: onnx.NodeProto, name: str) -> str:
        return node.input[1] if node.input[0] == name else node.input[0]

    drop: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    for erf in g.nodes:
        if erf.op_type != "Erf":
            continue
        scale = producer.get(erf.input[0])
        if scale is None or not (
            (scale.op_type == "Div" and const(scale.input[1], np.sqrt(2)))
            or (scale.op_type == "Mul" and const(other(scale, scale.input[0]), 1 / np.sqrt(2)))
        ):
            continue
        x = scale.input[0] if scale.op_type == "Div" or scale.input[1] in g.consts else scale.input[1]
        chain = [scale, erf]
        add = users.get(erf.output[0], [None])[0]
        if add is None or add.op_type != "Add" or not const(other(add, erf.output[0]), 1.0):
            continue
        chain.append(add)
        mul = users.get(add.output[0], [None])[0]
        if mul is None or mul.op_type != "Mul":
            continue
        factor = other(mul, add.output[0])
        halved = producer.get(factor)
        chain.append(mul)
        folded = False  # x * (1 + erf(x / sqrt 2)): the `* 0.5` went into the next layer's weights
        if factor != x:
            # The other orders of the three factors: x * ((1 + erf) * 0.5) (PyTorch's dynamo exporter) and
            # (x * 0.5) * (1 + erf) (BERT-style code). Both end in one Mul whose output is GELU's.
            outer = users.get(mul.output[0], [None])[0] if const(factor, 0.5) else None
            if outer is not None and outer.op_type == "Mul" and other(outer, mul.output[0]) == x:
                chain.append(outer)
            elif halved is not None and halved.op_type == "Mul" and x in halved.input and const(other(halved, x), 0.5):
                chain.insert(0, halved)
            else:
                continue
        else:
            half = users.get(mul.output[0], [None])[0]
            if half is not None and half.op_type == "Mul" and const(other(half, mul.output[0]), 0.5):
                chain.append(half)
            elif x in g.quant and mul.output[0] in g.quant:
                # Twice GELU (paddle2onnx's GELU before a 1x1 conv, after lowbit's folding). Between int8 values
                # that is still a function of one int8 input: the table below gives it exactly; one GELU op would
                # be off by 2.
                folded = True
            else:
                continue
        if any(uses[n.output[0]] != 1 for n in chain[:-1]):
            continue
        for n in chain[:-1]:
            drop.add(id(n))
        last = chain[-1]
        gelu = helper.make_node("Gelu", [x], [last.output[0]], name=erf.name or last.name)
        if folded or rounded_inside(g, chain, x):  # rounded between the steps: look its integers up (table.py)
            gelu.attribute.append(helper.make_attribute("table", numpy_helper.from_array(chain_table(g, chain, x))))
        replace[id(last)] = gelu
    g.nodes = [replace.get(id(n), n) for n in g.nodes if id(n) not in drop]
