"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction"): make the per-channel weight ranges of two consecutive layers match, leaving the float function as it is.

For a pair `layer1 -> [activation] -> layer2` joined through one channel axis, output channel i of layer1 (its weights
and bias) is divided by s_i and input channel i of layer2 multiplied by s_i, with s_i = sqrt(r1_i * r2_i) / r2_i (r1_i,
r2_i: the largest |weight| of that channel in each layer), so both become sqrt(r1_i * r2_i). This is exact when the
activation between them is positively homogeneous: f(x / s) = f(x) / s for s > 0. Relu, LeakyRelu, PRelu, MaxPool,
AveragePool and no activation are; Relu6/Clip/HardSwish/Sigmoid are not (min(x / s, 6) != min(x, 6) / s), so a pair
joined through them is left alone: making the clip exact would need one bound per channel, a Clip no quantized kernel
folds. Chains (conv1 -> conv2 -> conv3) are balanced by iterating over all pairs until the scales settle.

It matters most with per-tensor weights, where one wide channel sets the step of all of them (MobileNet-style
depthwise convs); per-channel weights already give each channel its own scale. Bias absorption (the paper's second
step) is not done: lowbit's bias correction already removes the mean shift rounding causes.

Skipped, with the float function untouched: a tensor between the two layers that another node also reads or that is
a graph output (branches), weights or biases shared with other nodes or overridable as graph inputs, non-float32
weights, ConvTranspose, Gemm with transA or a bias that is not one value per output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

# f(x / s) = f(x) / s for every s > 0, per channel: the ops that may sit between the two layers of a pair.
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool")
MAX_ITERATIONS = 50
TOLERANCE = 1e-4  # stop when no scale moves by more than this (relative)


def _own_const(v: ir.Value | None) -> np.ndarray | None:
    """A float32 initializer read by one node only (so rescaling it changes nothing else), else None."""
    if v is None or v.const_value is None or v.is_graph_input() or len(v.uses()) != 1:
        return None
    arr = v.const_value.numpy()
    return arr if arr.dtype == np.float32 else None


@dataclass
class Layer:
    """A Conv or Gemm's weights and bias in float64 while scales are applied, written back once at the end."""

    node: ir.Node
    w: np.ndarray  # Conv: [O, I/g, ...]; Gemm: [K, N] (transposed to this layout when transB=1)
    b: np.ndarray | None
    groups: int = 1
    trans_b: bool = False
    changed: bool = False

    @property
    def outputs(self) -> int:
        return self.w.shape[1] if self.node.op_type == "Gemm" else self.w.shape[0]

    @property
    def inputs(self) -> int:
        return self.w.shape[0] if self.node.op_type == "Gemm" else self.w.shape[1] * self.groups

    def out_ranges(self) -> np.ndarray:
        if self.node.op_type == "Gemm":
            return np.abs(self.w).max(axis=0)
        return np.abs(self.w.reshape(self.outputs, -1)).max(axis=1)

    def _grouped(self) -> np.ndarray:
        """Conv weights as [groups, out per group, in per group, kernel]: input channel c is (c // cpg, c % cpg)."""
        g = self.groups
        return self.w.reshape(g, self.w.shape[0] // g, self.w.shape[1], -1)

    def in_ranges(self) -> np.ndarray:
        if self.node.op_type == "Gemm":
            return np.abs(self.w).max(axis=1)
        return np.abs(self._grouped()).max(axis=(1, 3)).reshape(-1)

    def scale_outputs(self, f: np.ndarray) -> None:
        if self.node.op_type == "Gemm":
            self.w = self.w * f[None, :]
        else:
            self.w = self.w * f.reshape((-1,) + (1,) * (self.w.ndim - 1))
        if self.b is not None:
            self.b = self.b * f
        self.changed = True

    def scale_inputs(self, f: np.ndarray) -> None:
        if self.node.op_type == "Gemm":
            self.w = self.w * f[:, None]
        else:
            g = self._grouped()
            self.w = (g * f.reshape(self.groups, 1, -1, 1)).reshape(self.w.shape)
        self.changed = True

    def write_back(self) -> None:
        if not self.changed:
            return
        w = self.w.T if self.trans_b else self.w
        _replace(self.node.inputs[1], w)
        if self.b is not None:
            _replace(self.node.inputs[2], self.b.reshape(_shape(self.node.inputs[2])))


def _shape(v: ir.Value | None) -> tuple[int, ...]:
    assert v is not None and v.const_value is not None
    return tuple(v.const_value.shape.numpy())


def _replace(v: ir.Value | None, arr: np.ndarray) -> None:
    assert v is not None
    v.const_value = ir.tensor(np.ascontiguousarray(arr, dtype=np.float32), name=v.name)


def _layer(node: ir.Node) -> Layer | None:
    """The node as a Layer if its weights (and bias) can be rescaled without touching anything else."""
    if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if len(node.inputs) < 2:
        return None
    w = _own_const(node.inputs[1])
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    b = _own_const(node.inputs[2]) if has_bias else None
    if w is None or (has_bias and b is None):
        return None
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        if w.ndim < 3 or w.shape[0] % groups or (b is not None and b.size != w.shape[0]):
            return None
        return Layer(node, w.astype(np.float64), None if b is None else b.reshape(-1).astype(np.float64), groups)
    if node.attributes.get_int("transA", 0) or w.ndim != 2:
        return None
    trans_b = bool(node.attributes.get_int("transB", 0))
    kn = w.T if trans_b else w
    if b is not None and (b.size != kn.shape[1] or b.ndim > 2 or (b.ndim == 2 and b.shape[0] != 1)):
        return None  # a scalar or row-wise bias does not follow output channels
    return Layer(node, kn.astype(np.float64), None if b is None else b.reshape(-1).astype(np.float64), 1, trans_b)


def _next_layer(node: ir.Node) -> ir.Node | None:
    """The layer that alone reads `node`'s output, through homogeneous activations read by nothing else."""
    v = node.outputs[0]
    while True:
        uses = list(v.uses())
        if v.is_graph_output() or len(uses) != 1:
            return None
        user, index = uses[0].node, uses[0].idx
        if index != 0 or user.graph is not node.graph:
            return None
        if user.op_type in ("Conv", "Gemm"):
            return user
        if user.op_type not in HOMOGENEOUS or user.domain not in ("", "ai.onnx") or len(user.outputs) != 1:
            return None
        v = user.outputs[0]


def find_pairs(model: ir.Model) -> list[tuple[Layer, Layer]]:
    """Every (layer1, layer2) pair CLE may rescale, in graph order; a layer in two pairs is one shared object."""
    layers: dict[int, Layer] = {}

    def get(node: ir.Node) -> Layer | None:
        if id(node) not in layers:
            found = _layer(node)
            if found is None:
                return None
            layers[id(node)] = found
        return layers[id(node)]

    pairs = []
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        second = _next_layer(node)
        if second is None:
            continue
        a, b = get(node), get(second)
        if a is not None and b is not None and a.outputs == b.inputs:
            pairs.append((a, b))
    return pairs


def equalize(model: ir.Model) -> bool:
    """Cross-layer equalization of every eligible pair in the main graph; whether anything changed."""
    pairs = find_pairs(model)
    for _ in range(MAX_ITERATIONS):
        moved = 0.0
        for first, second in pairs:
            r1, r2 = first.out_ranges(), second.in_ranges()
            ok = (r1 > 0) & (r2 > 0)  # a dead channel on either side has nothing to balance
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
            first.scale_outputs(1.0 / s)
            second.scale_inputs(s)
            moved = max(moved, float(np.abs(s - 1.0).max(initial=0.0)))
        if moved < TOLERANCE:
            break
    done: set[int] = set()
    for pair in pairs:
        for layer in pair:
            if id(layer) not in done:
                layer.write_back()
                done.add(id(layer))
    return bool(pairs)


__all__ = ["equalize", "find_pairs", "HOMOGENEOUS"]
