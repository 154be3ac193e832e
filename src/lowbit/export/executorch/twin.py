"""The `.pte` takes its numbers from lowbit's own int8 ONNX model of the same module and calibration data.

lowbit's ranges are chosen on an ONNX graph (the default, `layer_error_fast`, runs each tensor's readers to
measure a clipped range's error), its weights get the overflow guard and bias correction there, and its planner
decides which tensors stay float. Rather than repeat any of that inside PT2E, the module is exported to ONNX
(its "twin", the TorchScript exporter `lowbit quantize` uses for a module), quantized by `lowbit.quantize` with the
recipe and the calibration batches, and the numbers are carried over:
- each tensor of the captured PT2E graph is matched to the twin's tensor that holds the same float values on one
  calibration sample (names differ between the two exporters; values do not), and a tensor the twin quantizes
  gives the PT2E tensor its scale and zero point (uint8 shifted by 128 for XNNPACK's int8: the same grid);
- each conv/linear is matched by its output the same way and takes the twin's int8 weight, weight scales and
  int32 bias (as float: XNNPACK re-quantizes it with input scale x weight scale, the same integers).
A tensor XNNPACK would quantize but the twin keeps float (the logits of a final Gemm) stays float in PT2E too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ...numerics import dequantize
from ...pipeline import QuantizeResult, quantize
from ...recipe import Recipe

# Relative to a tensor's largest value. The same tensor of the two exports differs by float rounding
# (EfficientNet-Lite0: at most 3.2e-5 over the 62 matched tensors, measured); different tensors by far more.
MATCH_TOLERANCE = 1e-3


@dataclasses.dataclass
class TwinLayer:
    """A conv/linear of the twin's int8 ONNX: int8 weight and its scales (scale None: a float weight), float bias."""

    weight: np.ndarray
    scale: np.ndarray | None
    bias: np.ndarray | None


@dataclasses.dataclass
class Twin:
    """The quantized twin and what the PT2E graph needs from it, keyed by the twin's float tensor names."""

    result: QuantizeResult
    values: dict[str, np.ndarray]  # every float tensor of the float twin on `sample`, in graph order
    sample: tuple[torch.Tensor, ...]  # the first calibration sample(s), batch as the example's
    params: dict[str, tuple[float, int]]  # quantized activation -> (scale, int8 zero point)
    layers: dict[str, TwinLayer]  # conv/gemm output tensor -> its weights and bias

    def match(self, value: torch.Tensor, among: dict) -> str | None:
        """The tensor of `among` (twin names) holding `value` (the first of equals in graph order), or None."""
        x = value.detach().float().numpy().ravel()
        if not x.size:
            return None
        bound = MATCH_TOLERANCE * max(float(np.abs(x).max()), 1e-6)
        head = x[:4096]  # most candidates of the same size differ in their first elements already
        for name, v in self.values.items():
            if name in among and v.size == x.size:
                flat = v.ravel()
                if np.abs(flat[:4096] - head).max() <= bound and np.abs(flat - x).max() <= bound:
                    return name
        return None


def fx_values(model: torch.fx.GraphModule, sample: tuple) -> dict[str, torch.Tensor]:
    """Every tensor a captured graph computes on `sample`, by node name."""
    out: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            value = super().run_node(n)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                out[n.name] = value
            return value

    with torch.no_grad():
        Recorder(model).run(*sample)
    return out


def make_twin(
    module: torch.nn.Module, example: tuple, batches: list[tuple[torch.Tensor, ...]], recipe: Recipe | None
) -> Twin:
    """Export `module` to ONNX, quantize it with `recipe` on `batches`, and read its numbers."""
    from ...torch.onnx_export import module_to_onnx

    proto = module_to_onnx(module, example)
    names = [i.name for i in proto.graph.input]
    feeds = [{n: x.numpy() for n, x in zip(names, b)} for b in batches]
    result = quantize(proto, calib=feeds, recipe=recipe, progress=False)
    step = int(example[0].shape[0]) if example[0].dim() else 1
    sample = {n: v[:step] for n, v in feeds[0].items()}
    values = _float_values(proto, sample)
    return Twin(result, values, tuple(b[:step] for b in batches[0]), _activation_params(result), _layers(result, proto))


def _float_values(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every float tensor of the float twin on one sample, graph inputs first, then in node order."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    have = {o.name for o in m.graph.output}
    names = [i.name for i in m.graph.input] + [
        o for n in m.graph.node for o in n.output if o and n.op_type != "Constant"
    ]
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as exported
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in sess.get_outputs()]
    got = dict(zip(wanted, sess.run(wanted, feeds)))
    out = {n: feeds[n].astype(np.float32) for n in feeds}
    for n in names:
        v = got.get(n)
        if isinstance(v, np.ndarray) and v.dtype.kind == "f" and n not in out:
            out[n] = v.astype(np.float32)
    return out


def _activation_params(result: QuantizeResult) -> dict[str, tuple[float, int]]:
    out = {}
    for name, t in result.plan.tensors.items():
        if t.kind == "activation" and t.dtype in ("uint8", "int8") and len(t.scale) == 1:
            shift = 128 if t.dtype == "uint8" else 0
            out[name] = (float(np.float32(t.scale[0])), int(t.zero_point[0]) - shift)
    return out


def _layers(result: QuantizeResult, proto: onnx.ModelProto) -> dict[str, TwinLayer]:
    """Conv/Gemm nodes of the int8 ONNX by their output in the float twin (a folded Clip renames the int8 node's
    output; node names stay): their weight and bias as the ONNX model computes them."""
    float_out = {n.name: n.output[0] for n in proto.graph.node if n.name}
    g = result.model.graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}

    def read(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(integers, scales) behind a DequantizeLinear, or (float value, None)."""
        if name in dq and dq[name].input[0] in init:
            d = dq[name]
            return init[d.input[0]], init[d.input[1]].astype(np.float32)
        return init[name], None

    out = {}
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 2 or n.input[1] not in dq.keys() | init.keys():
            continue
        if n.op_type == "Gemm" and not _attr(n, "transB", 0):  # (K, N): torch's linear keeps (N, K)
            continue
        w, ws = read(n.input[1])
        bias = None
        if len(n.input) > 2 and n.input[2] in dq.keys() | init.keys():
            b, bs = read(n.input[2])
            bias = dequantize(b, bs, np.zeros(bs.shape, np.int32), 0 if bs.size > 1 else None) if bs is not None else b
        out[float_out.get(n.name, n.output[0])] = TwinLayer(w, ws, bias)
    return out


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)
