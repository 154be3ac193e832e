"""Merge parallel convolutions of one input that are summed into one convolution (structural reparameterization).

RepVGG, MobileOne and ACNet-style blocks train as several branches read from the same tensor and added: a kxk conv,
a 1x1 conv, often an identity BatchNormalization. Exported in that training form, each
branch quantizes on its own, the identity BatchNorm has no quantized form and stays float between Q/DQ pairs, and the
sum of separately rounded branches loses what the deployed single conv would keep (timm's repvgg_a0: held-out cosine
0.80). The sum of convolutions of one input is one convolution: smaller kernels are zero-padded to the largest
(centred, which their own padding must agree with), the identity is a kernel with one tap, and the biases add.
Exact in real arithmetic; in float32 the merged conv sums in another order.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..graph.edit import new_constant
from .fold_batchnorm import _affine, _const


def _conv_form(node: ir.Node, x: ir.Value) -> tuple[np.ndarray, np.ndarray, list[int], list[int]] | None:
    """(weights, bias, strides, pads) of a plain Conv reading `x`: constant float32 weights, no auto_pad,
    no dilation."""
    if node.op_type != "Conv" or node.inputs[0] is not x or len(node.outputs) != 1:
        return None
    w = _const(node.inputs[1])
    if w is None or w.dtype != np.float32 or w.ndim < 3:
        return None
    b = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(w.shape[0])
    if b is None or b.shape != (w.shape[0],):
        return None
    dims = w.ndim - 2
    if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return None
    if any(d != 1 for d in node.attributes.get_ints("dilations", [1] * dims)):
        return None
    strides = list(node.attributes.get_ints("strides", [1] * dims))
    pads = list(node.attributes.get_ints("pads", [0] * (2 * dims)))
    return w, b.astype(np.float32), strides, pads


def _term(v: ir.Value) -> tuple[str, ir.Node, ir.Value] | None:
    """What one input of the Add is: ("conv", node, its input) for a Conv whose only reader is the Add,
    ("identity", node, its input) for an inference BatchNorm of a tensor. A bare tensor (x + conv(x)) is not merged:
    its Add quantizes as it is, and a unit tap in the merged kernel would set the per-channel weight scale, rounding
    the conv's own (often much smaller) weights coarsely."""
    node = v.producer()
    sole = node is not None and len(v.uses()) == 1 and not v.is_graph_output()
    if sole and node is not None and node.op_type == "Conv" and node.inputs[0] is not None:
        return "conv", node, node.inputs[0]
    # A BatchNorm read elsewhere too stays for those readers (FastViT reads BN(x) in mixer(x) and in mixer - BN).
    if node is not None and node.op_type == "BatchNormalization" and _affine(node) is not None:
        assert node.inputs[0] is not None  # BatchNormalization's input X is required
        return "identity", node, node.inputs[0]
    return None


def _merge(graph: ir.Graph, add: ir.Node) -> bool:
    a, b = add.inputs[0], add.inputs[1]
    if a is None or b is None or a is b:
        return False
    first, second = _term(a), _term(b)
    if first is None or second is None or first[2] is not second[2]:
        return False
    x, terms = first[2], (first, second)
    if any(t[1].graph is not graph for t in terms):
        return False
    convs = [t[1] for t in terms if t[0] == "conv"]
    maybe = [_conv_form(c, x) for c in convs]
    forms = [f for f in maybe if f is not None]
    if not convs or len(forms) != len(convs):
        return False
    ws = [f[0] for f in forms]
    if len({(w.shape[0], w.shape[1], w.ndim) for w in ws}) != 1:
        return False
    groups = {c.attributes.get_int("group", 1) for c in convs}
    strides = {tuple(f[2]) for f in forms}
    if len(groups) != 1 or len(strides) != 1:
        return False
    dims = ws[0].ndim - 2
    kernel = [max(w.shape[2 + d] for w in ws) for d in range(dims)]
    big = max(range(len(ws)), key=lambda i: int(np.prod(ws[i].shape[2:])))
    pads = forms[big][3]
    if any(ws[big].shape[2 + d] != kernel[d] for d in range(dims)):
        return False  # no single conv has the largest kernel in every dimension
    total = np.zeros((ws[0].shape[0], ws[0].shape[1], *kernel), np.float32)
    bias = np.zeros(ws[0].shape[0], np.float32)
    # Sub(a, b): the second term enters negated (FastViT's RepMixer: mixer(x) - BatchNorm(x)).
    signs = {id(t[1]): (-1.0 if add.op_type == "Sub" and i == 1 else 1.0) for i, t in enumerate(terms)}
    for c, (w, bb, _, p) in zip(convs, forms):
        w, bb = w * np.float32(signs[id(c)]), bb * np.float32(signs[id(c)])
        off = [(kernel[d] - w.shape[2 + d]) // 2 for d in range(dims)]
        # Centred in the large kernel, the small one reads the same window only if its padding is the large one's
        # less the offset on both sides.
        if any(
            (kernel[d] - w.shape[2 + d]) % 2 or p[d] + off[d] != pads[d] or p[dims + d] + off[d] != pads[dims + d]
            for d in range(dims)
        ):
            return False
        total[(slice(None), slice(None), *(slice(o, o + w.shape[2 + i]) for i, o in enumerate(off)))] += w
        bias += bb
    for kind, bn, _ in terms:
        found = _affine(bn)
        if kind != "identity" or found is None:
            continue
        scale, shift = (v * np.float32(signs[id(bn)]) for v in found)
        group, (c_out, per_in) = next(iter(groups)), ws[0].shape[:2]
        # The identity is one tap: stride 1, the output the input's size, as many outputs as inputs.
        if strides != {(1,) * dims} or per_in * group != c_out or scale.size not in (1, c_out):
            return False
        if any(pads[d] + pads[dims + d] != kernel[d] - 1 for d in range(dims)):
            return False
        rows = np.arange(c_out)
        total[(rows, rows % per_in, *pads[:dims])] += np.broadcast_to(scale, (c_out,))
        bias += np.broadcast_to(shift, (c_out,))
    keep = convs[big]
    stem = f"{keep.name or 'conv'}_merged"
    keep.replace_input_with(1, new_constant(graph, f"{stem}_weight", total))
    if len(keep.inputs) < 3:
        keep.resize_inputs(3)
    keep.replace_input_with(2, new_constant(graph, f"{stem}_bias", bias))
    out, name = add.outputs[0], add.outputs[0].name
    if keep.outputs[0].type is None:
        keep.outputs[0].type = out.type
    keep.outputs[0].shape = out.shape or keep.outputs[0].shape
    out.replace_all_uses_with(keep.outputs[0], replace_graph_outputs=True)
    out.name = None
    keep.outputs[0].name = name
    graph.remove(add, safe=True)
    for _, node, _ in terms:
        if node is not keep and not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
            graph.remove(node, safe=True)
    return True


def merge_parallel_convs(model: ir.Model) -> bool:
    """Each Add (or Sub) of two convolutions of one tensor, or of one and the tensor's BatchNorm, becomes one conv;
    in graph order, so a three-branch sum (conv + conv, then + BatchNorm) merges in two steps."""
    graph = model.graph
    changed = False
    for node in list(graph):
        if node.op_type in ("Add", "Sub") and node.graph is graph and len(node.inputs) == 2 and _merge(graph, node):
            changed = True
    return changed
