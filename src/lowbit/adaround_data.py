"""The rows AdaRound learns from: each layer's input on the calibration data, in the float model and in the quantized
model (ONNX Runtime's float simulation of the QDQ graph), cut at the same sampled output positions.

A row is what one output position of the layer multiplies by the weight: for a Conv, the input patch under the kernel
at that position (all channels, padding included), grouped as (groups, rows, channels per group x kernel size); for
Gemm/MatMul, one row of the input. Positions are drawn per layer and per batch from a seeded generator, so the float
and the quantized rows line up, and every run draws the same ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from .ops.base import const
from .ops.weighted import output_shift
from .plan import Plan, TensorParams
from .planner import Layout
from .runtimes.ort import session, with_outputs

if TYPE_CHECKING:
    from .adaround import Batch, Layer

SEED = 0


def _conv_geometry(node: ir.Node, w_shape: tuple[int, ...]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Kernel, strides, dilations and pads (begin..., end...) of a 1-D or 2-D Conv, as 2-D."""
    nd = len(w_shape) - 2
    kernel = list(w_shape[2:])
    strides = list(node.attributes.get_ints("strides", [1] * nd))
    dil = list(node.attributes.get_ints("dilations", [1] * nd))
    pads = list(node.attributes.get_ints("pads", [0] * 2 * nd))
    if node.attributes.get_string("auto_pad", "NOTSET") == "VALID":
        pads = [0] * 2 * nd
    if nd == 1:
        return [1, *kernel], [1, *strides], [1, *dil], [0, pads[0], 0, pads[1]]
    return kernel, strides, dil, pads


def _out_shape(node: ir.Node, w_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> tuple[int, int, int]:
    k, s, d, p = _conv_geometry(node, w_shape)
    h, w = (1, x_shape[2]) if len(x_shape) == 3 else x_shape[2:4]
    oh = (h + p[0] + p[2] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (w + p[1] + p[3] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    return x_shape[0], oh, ow


def row_count(layer: Layer, x_shape: tuple[int, ...]) -> int:
    """How many output positions (rows) the input batch has."""
    if layer.node.op_type == "Conv":
        b, oh, ow = _out_shape(layer.node, layer.w.shape, x_shape)
        return b * oh * ow
    return int(np.prod(x_shape[:-1]))


def row_width(layer: Layer) -> int:
    """Values in one row, all groups together."""
    if layer.node.op_type == "Conv":
        g = layer.node.attributes.get_int("group", 1)
        return int(np.prod(layer.w.shape[1:])) * g
    stored_nk = layer.node.op_type == "Gemm" and bool(layer.node.attributes.get_int("transB", 0))
    return int(layer.w.shape[1] if stored_nk else layer.w.shape[0])


def rows(layer: Layer, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The rows at flat output positions `pos`, as float32 (groups, len(pos), K per group)."""
    node = layer.node
    if node.op_type != "Conv":
        flat = x.reshape(-1, x.shape[-1])
        return np.ascontiguousarray(flat[pos][None], np.float32)
    k, s, d, p = _conv_geometry(node, layer.w.shape)
    x4 = x[:, :, None, :] if x.ndim == 3 else x
    xp = np.pad(x4, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
    _, oh, ow = _out_shape(node, layer.w.shape, x.shape)
    b, rest = np.divmod(pos, oh * ow)
    oy, ox = np.divmod(rest, ow)
    iy = oy[:, None] * s[0] + np.arange(k[0])[None, :] * d[0]  # (n, kh)
    ix = ox[:, None] * s[1] + np.arange(k[1])[None, :] * d[1]  # (n, kw)
    patch = xp[b[:, None, None], :, iy[:, :, None], ix[:, None, :]]  # (n, kh, kw, C)
    n = len(pos)
    g = node.attributes.get_int("group", 1)
    patch = patch.transpose(0, 3, 1, 2).reshape(n, g, -1)  # (n, groups, channels per group x kh x kw)
    return np.ascontiguousarray(patch.transpose(1, 0, 2), np.float32)


class FloatInputs:
    """Every AdaRound layer's float input rows, from one pass of the float model over the batches."""

    def __init__(self, model: ir.Model, todo: list[Layer], batches: list[Batch]) -> None:
        from .adaround import rows_budget

        self.todo = todo
        graph_inputs = {v.name for v in model.graph.inputs}
        names = sorted({layer.x_name for layer in todo} - graph_inputs)
        sess = session(with_outputs(ir.to_proto(model), names), mode="simulate", threads=1, spin=False)
        feeds = {i.name for i in sess.get_inputs()}
        self.positions: list[list[np.ndarray]] = [[] for _ in todo]
        parts: list[list[np.ndarray]] = [[] for _ in todo]
        for j, batch in enumerate(batches):
            got = dict(zip(names, sess.run(names, {k: v for k, v in batch.items() if k in feeds}))) if names else {}
            for i, layer in enumerate(todo):
                x = batch[layer.x_name] if layer.x_name in graph_inputs else got[layer.x_name]
                total = row_count(layer, x.shape)
                want = -(-rows_budget(row_width(layer)) // len(batches))
                rng = np.random.default_rng([SEED, i, j])
                pos = np.sort(rng.choice(total, min(want, total), replace=False))
                self.positions[i].append(pos)
                parts[i].append(rows(layer, x, pos))
        self.parts = [np.concatenate(p, axis=1) for p in parts]

    def rows(self, i: int) -> np.ndarray:
        return self.parts[i]


class QuantizedInputs:
    """Each layer's input in the quantized model (float simulation), where the weights of the AdaRound layers are
    inputs of the graph: a layer's rows are taken after every earlier layer got its learned rounding."""

    def __init__(
        self,
        model: ir.Model,
        layout: Layout,
        tensors: dict[str, TensorParams],
        channel_means: dict[str, list[float]],
        recipe: dict,
        todo: list[Layer],
    ) -> None:
        from .apply import apply

        self.todo = todo
        self.means = channel_means
        copy = ir.from_proto(ir.to_proto(model))
        apply(copy, layout, Plan(recipe=recipe, tensors=dict(tensors), channel_means=dict(channel_means)))
        bias_at = {name: idx for name, idx, _, _ in layout.biases}
        self.feeds: dict[str, np.ndarray] = {}
        self.bias_names: list[tuple[str, int] | None] = []
        self.x_names: list[str] = []
        graph = copy.graph
        for i, layer in enumerate(todo):
            name = layer.key.rsplit(":", 1)[0]
            node = graph.node(name)
            w_in = self._input(graph, f"adaround_w{i}", layer.w)
            node.replace_input_with(1, w_in)
            self.feeds[f"adaround_w{i}"] = layer.w  # learn() sets round-to-nearest, then the learned rounding
            b = bias_at.get(name)
            bias = const(layer.node, b) if b is not None else None
            if bias is not None and b is not None:
                b_in = self._input(graph, f"adaround_b{i}", bias.astype(np.float32))
                node.replace_input_with(b, b_in)
                self.bias_names.append((b_in.name or "", b))
            else:
                self.bias_names.append(None)
            x = node.inputs[0]
            assert x is not None and x.name is not None
            self.x_names.append(x.name)
        common.RemoveUnusedNodesPass()(copy)
        self.graph_inputs = {v.name for v in graph.inputs}
        names = sorted(set(self.x_names) - self.graph_inputs)
        self.sess = session(with_outputs(ir.to_proto(copy), names), mode="simulate", threads=1, spin=False)
        self.inputs = {v.name for v in self.sess.get_inputs()}

    @staticmethod
    def _input(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
        v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT))
        graph.inputs.append(v)
        return v

    def set_weight(self, i: int, wq: np.ndarray) -> None:
        """Layer i's weight as quantized (dequantized to float), and its bias corrected as `apply` will."""
        layer = self.todo[i]
        self.feeds[f"adaround_w{i}"] = wq.astype(np.float32)
        found = self.bias_names[i]
        if found is None:
            return
        name, b = found
        bias = const(layer.node, b)
        assert bias is not None
        bias = bias.astype(np.float64)
        mean = self.means.get(layer.x_name)
        if layer.scheme.bias_correction and mean is not None:
            shift = output_shift(layer.node, wq.astype(np.float64) - layer.w, np.asarray(mean, np.float64))
            if shift is not None:
                bias = bias - shift
        self.feeds[name] = bias.astype(np.float32)

    def rows(self, i: int, positions: list[np.ndarray], batches: list[Batch]) -> np.ndarray:
        name, layer = self.x_names[i], self.todo[i]
        parts = []
        for j, batch in enumerate(batches):
            feeds = {k: v for k, v in batch.items() if k in self.inputs}
            if name in self.graph_inputs:
                x = batch[name]
            else:
                x = self.sess.run([name], {**feeds, **{k: v for k, v in self.feeds.items() if k in self.inputs}})[0]
            parts.append(rows(layer, x, positions[j]))
        return np.concatenate(parts, axis=1)
