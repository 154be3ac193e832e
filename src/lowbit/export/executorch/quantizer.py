"""lowbit's numbers inside PyTorch's PT2E flow: an XNNPACK quantizer whose observers hold fixed parameters.

XNNPACK's own annotator decides which aten ops run as int8 and which share a scale (the integer kernels XNNPACK
has); lowbit decides every number:
- an activation's scale and zero point are those of lowbit's int8 ONNX model of the same module (`twin.py`: its
  recipe, calibration method and plan), or a QAT module's learned ones (`qat.py`); uint8 grids shifted by 128;
- a ReLU/ReLU6 (hardtanh, clamp) after a conv, linear or add is folded as lowbit folds Relu/Clip into its
  producer: one observer for both, holding the clamped tensor's parameters;
- a tensor lowbit keeps float stays float here, with the ops that share its scale;
- weights: int8 symmetric on the narrow range [-127, 127], per output channel (or per tensor), as lowbit's
  (replaced by the twin's own integers after convert, `weights.install`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver, UniformQuantizationObserverBase
from torchao.quantization.pt2e.quantizer import QuantizationSpec, SharedQuantizationSpec

from ...numerics import scale_zero_point

# The activation ops XNNPACK fuses into the op before them (clamping its output); relu6 has no XNNPACK
# annotation (lowbit folds it), lowbit.torch's QAT layers write ReLU6 as clamp(0, 6).
CLAMPS = {
    torch.ops.aten.relu.default,
    torch.ops.aten.relu_.default,
    torch.ops.aten.relu6.default,
    torch.ops.aten.relu6_.default,
    torch.ops.aten.hardtanh.default,
    torch.ops.aten.hardtanh_.default,
    torch.ops.aten.clamp.default,
}


class LowbitObserver(UniformQuantizationObserverBase):
    """Per-tensor activation observer with fixed parameters: the scale and int8 zero point of lowbit's int8 ONNX
    model (`twin.py`) or of a QAT module's quantizer. Calibration happens in lowbit's ONNX path, not here."""

    def __init__(
        self,
        dtype: torch.dtype = torch.int8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: int = -128,
        quant_max: int = 127,
        fixed: tuple[float, int] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("reduce_range", None)
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        self.fixed = fixed

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        return x_orig

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        # use_fixed leaves no observer without parameters: each tensor is either given them or made float
        assert self.fixed is not None, "an activation observer without lowbit's parameters"
        return torch.tensor([self.fixed[0]], dtype=torch.float32), torch.tensor([self.fixed[1]], dtype=torch.int32)

    def extra_repr(self) -> str:
        return f"fixed={self.fixed}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """What of lowbit's recipe the PT2E graph itself takes (the rest is in the twin's numbers)."""

    per_channel: bool = True


def activation_spec(fixed: tuple[float, int] | None = None) -> QuantizationSpec:
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=LowbitObserver.with_args(fixed=fixed),
    )


class LowbitWeightObserver(PerChannelMinMaxObserver):
    """Weight min/max per output channel (or per tensor), scales as lowbit's `weights.py` computes them:
    symmetric on the narrow int8 range, and scale 1 for an all-zero channel (a tiny scale there would make the
    int32 bias scale s_in * s_w subnormal, which XNNPACK refuses)."""

    def __init__(self, per_channel: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.per_channel = per_channel

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.min_val.detach().double().numpy(), self.max_val.detach().double().numpy()
        if not self.per_channel:  # one scale, repeated per channel: the same numbers as per-tensor
            lo, hi = np.full_like(lo, lo.min()), np.full_like(hi, hi.max())
        scale, _ = scale_zero_point(lo, hi, "int8", symmetric=True, narrow=True)
        s = torch.from_numpy(np.asarray(scale, np.float32).reshape(-1))
        return s, torch.zeros(s.shape, dtype=torch.int32)


def weight_spec(choice: Choice) -> QuantizationSpec:
    per_channel = choice.per_channel
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-127,
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=LowbitWeightObserver.with_args(
            per_channel=per_channel,
            qscheme=torch.per_channel_symmetric,
            dtype=torch.int8,
            quant_min=-127,
            quant_max=127,
        ),
    )


def make_quantizer(
    choice: Choice, fixed: Callable[[torch.fx.GraphModule], dict[str, tuple[float, int]]], qat: bool
) -> Any:
    """XNNPACKQuantizer's annotations (which ops run as int8), lowbit's folding of ReLU/ReLU6 into their producer,
    then fixed parameters: `fixed(model)` maps a captured tensor's node name to (scale, int8 zero point). A
    tensor XNNPACK quantizes without parameters stays float (`qat`: only a model output may; others are an error)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import QuantizationConfig

    act = activation_spec()
    config = QuantizationConfig(act, act, weight_spec(choice), None, False)

    class LowbitXNNPACKQuantizer(XNNPACKQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            fold_activations(model)
            use_fixed(model, fixed(model), qat)
            return model

    return LowbitXNNPACKQuantizer().set_global(config)


def _annotation(node: torch.fx.Node) -> Any:
    return node.meta.get("quantization_annotation")


def fold_activations(model: torch.fx.GraphModule) -> None:
    """A ReLU/ReLU6/hardtanh whose producer is quantized and read by it alone shares the producer's observer
    (lowbit's folding of Relu/Clip into the op before: one tensor, the clamped one, is quantized)."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in CLAMPS:
            continue
        src = node.args[0]
        src_ann = _annotation(src) if isinstance(src, torch.fx.Node) else None
        if src_ann is None or len(src.users) != 1 or not isinstance(src_ann.output_qspec, QuantizationSpec):
            continue
        if _annotation(node) is None:  # ReLU6: no XNNPACK annotation; it runs as a clamp on the shared int8 values
            shared = SharedQuantizationSpec(src)
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={src: shared}, output_qspec=shared, _annotated=True
            )


def share_edges(model: torch.fx.GraphModule) -> None:
    """An op reading a tensor that is already quantized reads those integers (lowbit's one scale per tensor),
    not a second quantization of its own: its input observer is the producer's."""
    for node in model.graph.nodes:
        ann = _annotation(node)
        if ann is None:
            continue
        for arg, spec in list(ann.input_qspec_map.items()):
            src_ann = _annotation(arg)
            if isinstance(spec, QuantizationSpec) and src_ann is not None and src_ann.output_qspec is not None:
                ann.input_qspec_map[arg] = SharedQuantizationSpec(arg)


def _is_fixed(spec: Any) -> bool:
    return isinstance(spec, QuantizationSpec) and spec.observer_or_fake_quant_ctr.p.keywords.get("fixed") is not None


def _folded(node: torch.fx.Node) -> bool:
    ann = _annotation(node)
    return node.target in CLAMPS and ann is not None and isinstance(ann.output_qspec, SharedQuantizationSpec)


def use_fixed(model: torch.fx.GraphModule, fixed: dict[str, tuple[float, int]], qat: bool) -> None:
    """The given parameters on the tensors they belong to: a folded activation's on its producer (they share one
    observer), the others on the tensor itself, or on an input edge (a model input, or a zero pad XNNPACK does
    not annotate: its values are its input's, on the same grid). Then every tensor XNNPACK quantizes without
    parameters becomes float, with the ops that share its scale (ONNX's DQ -> float op); for a QAT module only a
    model output may (`lowbit.torch.export_onnx` keeps those float), and a learned scale XNNPACK has no use for
    is an error: the program would not compute what the module trained."""
    unused = set(fixed)
    outputs = set(next(n for n in model.graph.nodes if n.op == "output").all_input_nodes)
    for node in model.graph.nodes:
        ann = _annotation(node)
        if ann is None:
            continue
        for arg, spec in list(ann.input_qspec_map.items()):
            if isinstance(spec, QuantizationSpec):
                src = _through_zero_pad(arg, fixed)
                if src.name in fixed:
                    ann.input_qspec_map[arg] = activation_spec(fixed[src.name])
                    unused.discard(src.name)
        if node.name not in fixed:
            continue
        owner = node.args[0] if _folded(node) and isinstance(node.args[0], torch.fx.Node) else node
        owner_ann = _annotation(owner)
        if owner_ann is not None and owner_ann.output_qspec is not None:
            owner_ann.output_qspec = activation_spec(fixed[node.name])
            unused.discard(node.name)
    share_edges(model)  # an edge from a quantized tensor reads its integers: it needs no parameters of its own
    for node in model.graph.nodes:
        ann = _annotation(node)
        if ann is None:
            continue
        if isinstance(ann.output_qspec, QuantizationSpec) and not _is_fixed(ann.output_qspec):
            if qat and node not in outputs:
                raise _no_scale(node)
            _make_float(node)
        for arg, spec in list(ann.input_qspec_map.items()):
            if isinstance(spec, QuantizationSpec) and not _is_fixed(spec) and spec.dtype == torch.int8:
                if qat and spec.quant_min == -128:
                    raise _no_scale(arg)
                if spec.quant_min == -128:  # an activation edge (weights are -127..127) without parameters
                    _make_float(node)
    if qat and unused:
        raise _no_scale(next(n for n in model.graph.nodes if n.name in unused), unused=True)


def _through_zero_pad(node: torch.fx.Node, fixed: dict) -> torch.fx.Node:
    from .weights import PADS, _zero_pad

    while (
        node.name not in fixed and node.target in PADS and _zero_pad(node) and isinstance(node.args[0], torch.fx.Node)
    ):
        node = node.args[0]
    return node


def _make_float(node: torch.fx.Node) -> None:
    """`node` computes in float on dequantized inputs (weights too: they are set from lowbit's int8 values after
    convert, `weights.install`), and so does every op that shares its output's scale."""
    ann = _annotation(node)
    if ann is None or (ann.output_qspec is None and not ann.input_qspec_map):
        return
    ann.output_qspec = None
    ann.input_qspec_map = {}
    for user in node.users:
        user_ann = _annotation(user)
        if user_ann is None:
            continue
        spec = user_ann.input_qspec_map.get(node)
        if isinstance(spec, SharedQuantizationSpec):
            del user_ann.input_qspec_map[node]
        if isinstance(user_ann.output_qspec, SharedQuantizationSpec) and _shares(user_ann.output_qspec, node):
            _make_float(user)


def _shares(spec: SharedQuantizationSpec, node: torch.fx.Node) -> bool:
    edge = spec.edge_or_node
    return edge is node or (isinstance(edge, tuple) and node in edge)


def _no_scale(node: torch.fx.Node, unused: bool = False) -> Exception:
    from ...errors import LowbitError

    if unused:
        return LowbitError(
            f"this QAT module fake-quantizes {node.name} ({node.target}), which XNNPACK runs in float; "
            "export it with lowbit.torch.export_onnx"
        )
    return LowbitError(
        f"XNNPACK quantizes {node.name} ({node.target}) but the QAT module has no fake quantizer on it; "
        "export it with lowbit.torch.export_onnx"
    )
