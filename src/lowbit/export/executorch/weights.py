"""lowbit's two weight steps in the PT2E graph: the u8 x s8 overflow guard and bias correction.

lowbit's ONNX path changes weights and biases after choosing their scales (`apply._quantize_weight`): the guard
rescales or trims the output channels whose neighbouring products could saturate an int16 on x86 CPUs without
VNNI, and bias correction subtracts from each bias the mean output shift that the rounded weights cause, using
the calibration data's per-channel means of the layer's float input. Without them the `.pte` agreed 91.5% top-1
with lowbit's default int8 ONNX of EfficientNet-Lite0 (99.5% with both off in the ONNX recipe).

Here the same functions (`ops.weighted.guard`, `ops.weighted.output_shift`) run on the same numbers:
- `watch_inputs`, after prepare_pt2e: a `ChannelMean` module before every conv/linear records the mean of its
  float input per channel during calibration, and the float (BatchNorm-folded) weight is kept;
- `unwatch_inputs`, before convert_pt2e: those modules leave the graph;
- `correct_weights`, after convert_pt2e: each conv/linear gets its guarded int8 weight and scales, and its
  corrected float bias (XNNPACK quantizes that bias to int32 with input scale x weight scale, as lowbit does).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import torch

from ...numerics import dequantize
from ...observe import ChannelMinMax
from ...ops.weighted import guard, output_shift
from ...weights import QuantizedWeight

CONV = torch.ops.aten.conv2d.default
LINEAR = torch.ops.aten.linear.default
DEQUANT_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
PREFIX = "lowbit_mean_"
PADS = (torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default)


class ChannelMean(torch.nn.Module):
    """Identity that keeps the per-channel mean of what passes (lowbit's channel statistics)."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.stats = ChannelMinMax(axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stats.update(x.detach().float().cpu().numpy())
        return x


@dataclasses.dataclass
class Layer:
    """One conv/linear of the prepared graph: its float weight, groups and (after calibration) input means."""

    weight: np.ndarray
    group: int
    module: str  # the ChannelMean that watches its input
    mean: np.ndarray | None = None


def _attr(model: torch.fx.GraphModule, target: str) -> torch.Tensor:
    obj: object = model
    for part in target.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor)
    return obj


def _unpadded(model: torch.fx.GraphModule, x: torch.fx.Node) -> torch.fx.Node:
    """The tensor before zero padding and observers: lowbit folds a zero Pad into the conv after it, so its
    channel means are those of the unpadded input (EfficientNet pads before every strided depthwise conv)."""
    while True:
        if x.op == "call_module" and isinstance(x.args[0], torch.fx.Node):  # an observer: identity
            x = x.args[0]
        elif x.target in PADS and isinstance(x.args[0], torch.fx.Node) and _zero_pad(x):
            x = x.args[0]
        else:
            return x


def _zero_pad(node: torch.fx.Node) -> bool:
    if node.target == torch.ops.aten.constant_pad_nd.default:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        return not value
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    return mode == "constant" and not value


def watch_inputs(model: torch.fx.GraphModule) -> dict[str, Layer]:
    """Before calibration: a ChannelMean on the (unpadded) input of every conv/linear with a quantized weight;
    returns node name -> Layer."""
    layers: dict[str, Layer] = {}
    for node in list(model.graph.nodes):
        if node.op != "call_function" or node.target not in (CONV, LINEAR):
            continue
        w = node.args[1]
        if not (isinstance(w, torch.fx.Node) and w.op == "call_module" and isinstance(w.args[0], torch.fx.Node)):
            continue  # a weight PT2E does not quantize: nothing to correct
        src = w.args[0]
        assert isinstance(src.target, str) and isinstance(node.args[0], torch.fx.Node)
        group = int(str(node.args[6])) if node.target == CONV and len(node.args) > 6 else 1
        name = f"{PREFIX}{len(layers)}"
        layers[node.name] = Layer(_attr(model, src.target).detach().float().numpy().copy(), group, name)
        model.add_submodule(name, ChannelMean(1 if node.target == CONV else -1))
        x = _unpadded(model, node.args[0])
        with model.graph.inserting_after(x):
            model.graph.call_module(name, (x,))  # a side observer: nothing reads its output
    model.recompile()
    return layers


def unwatch_inputs(model: torch.fx.GraphModule, layers: dict[str, Layer]) -> None:
    """After calibration: record each layer's input means and take the ChannelMean modules out of the graph."""
    for layer in layers.values():
        m = model.get_submodule(layer.module)
        layer.mean = m.stats.mean if isinstance(m, ChannelMean) else None
    for node in list(model.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(PREFIX):
            model.graph.erase_node(node)
            model.delete_submodule(str(node.target))
    model.recompile()


def _ir_node(layer: Layer, target: object) -> ir.Node:
    """The ONNX node lowbit's weight functions expect: a Conv with its groups, or a Gemm with (N, K) weights."""
    if target == CONV:
        return ir.Node("", "Conv", inputs=(), attributes=[ir.AttrInt64("group", layer.group)])
    return ir.Node("", "Gemm", inputs=(), attributes=[ir.AttrInt64("transB", 1)])


def correct_weights(
    model: torch.fx.GraphModule,
    layers: dict[str, Layer],
    per_channel: bool,
    avoid_overflow: bool,
    bias_correction: bool,
) -> dict[str, int]:
    """After convert_pt2e: the overflow guard on each int8 weight, then bias correction from the input means.
    Returns {"guarded_channels": n, "corrected_biases": n}."""
    guarded = corrected = 0
    for node in list(model.graph.nodes):
        layer = layers.get(node.name)
        if layer is None or node.op != "call_function" or node.target not in (CONV, LINEAR):
            continue
        dq = node.args[1]
        if not (isinstance(dq, torch.fx.Node) and dq.target == DEQUANT_CHANNEL):
            continue
        q_node, s_node = dq.args[0], dq.args[1]
        assert isinstance(q_node, torch.fx.Node) and isinstance(s_node, torch.fx.Node)
        q = _attr(model, str(q_node.target)).detach().numpy()
        scale = _attr(model, str(s_node.target)).detach().numpy().astype(np.float32)
        w = layer.weight
        # per-tensor weights carry one scale repeated per channel (quantizer.LowbitWeightObserver)
        qw = QuantizedWeight(q, scale, np.zeros(scale.shape, np.int32), 0)
        if not per_channel:
            qw = QuantizedWeight(q, np.asarray(scale[0], np.float32), np.asarray(0, np.int32), None)
        onnx_node = _ir_node(layer, node.target)
        if avoid_overflow:
            qw = guard(onnx_node, w, qw)
            if qw.guarded_channels:
                guarded += qw.guarded_channels
                _set(model, dq, 0, torch.from_numpy(np.ascontiguousarray(qw.q.astype(np.int8))))
                s = np.broadcast_to(np.asarray(qw.scale, np.float32), scale.shape)
                _set(model, dq, 1, torch.from_numpy(np.array(s, np.float32)))
        bias = node.args[2] if len(node.args) > 2 else None
        if not bias_correction or layer.mean is None or not isinstance(bias, torch.fx.Node):
            continue
        error = dequantize(qw.q, qw.scale, qw.zero_point, qw.axis) - w
        shift = output_shift(onnx_node, error, np.asarray(layer.mean, np.float64))
        if shift is None:
            continue
        b = _attr(model, str(bias.target)).detach().double().numpy()
        _set(model, node, 2, torch.from_numpy((b - shift).astype(np.float32)))
        corrected += 1
    model.recompile()
    return {"guarded_channels": guarded, "corrected_biases": corrected}


def _set(model: torch.fx.GraphModule, node: torch.fx.Node, index: int, value: torch.Tensor) -> None:
    """Point input `index` of `node` at a new constant of its own (a weight shared by two layers stays intact)."""
    name = f"lowbit_const_{len([n for n in model.graph.nodes if n.op == 'get_attr'])}"
    while hasattr(model, name):
        name += "_"
    model.register_buffer(name, value)
    with model.graph.inserting_before(node):
        new = model.graph.get_attr(name)
    args = list(node.args)
    old, args[index] = args[index], new
    node.args = tuple(args)
    # The replaced constant leaves the module too, or the program would carry both (measured: 9.4 MB vs 5.0).
    if isinstance(old, torch.fx.Node) and old.op == "get_attr" and not old.users:
        target = str(old.target)
        model.graph.erase_node(old)
        if not any(n.op == "get_attr" and n.target == target for n in model.graph.nodes):
            parent, _, leaf = target.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, leaf)
