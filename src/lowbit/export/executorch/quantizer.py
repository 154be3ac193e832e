"""lowbit's ranges inside PyTorch's PT2E flow: an observer that keeps lowbit's streaming histogram and picks the
range with lowbit's method, and an XNNPACK quantizer whose annotations take lowbit's recipe.

XNNPACK's own annotator decides which aten ops are quantized and which share a scale (the integer kernels
XNNPACK has); lowbit decides every range, as its ONNX planner and `decide.py` do:
- an activation's range is `select_range(histogram, recipe.calibration)` over the same power-of-two-bin
  `Histogram` lowbit's calibration keeps, and its scale and zero point are `numerics.scale_zero_point`
  (so int8 activations sit on the grid of lowbit's uint8 ones, shifted by 128);
- a model output keeps its exact min/max (clipping an output clips the logits that decide the answer);
- a ReLU/ReLU6 (hardtanh) after a conv, linear or add is folded as lowbit folds Relu/Clip into its producer:
  XNNPACK shares one observer across the activation, and that observer sees the values clamped to the
  activation's bounds, so the range is the activation output's range, not the wider pre-activation one;
- weights: int8 symmetric on the narrow range [-127, 127], per output channel (or per tensor), as lowbit's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver, UniformQuantizationObserverBase
from torchao.quantization.pt2e.quantizer import QuantizationSpec, SharedQuantizationSpec

from ...numerics import scale_zero_point
from ...observe import Histogram, select_range

# The activation ops XNNPACK fuses into the op before them (clamping its output).
CLAMPS = {
    torch.ops.aten.relu.default: (0.0, None),
    torch.ops.aten.relu_.default: (0.0, None),
    torch.ops.aten.relu6.default: (0.0, 6.0),  # XNNPACK's annotator leaves it float: lowbit folds it
    torch.ops.aten.relu6_.default: (0.0, 6.0),
    torch.ops.aten.hardtanh.default: None,  # bounds from the node's arguments (default -1, 1)
    torch.ops.aten.hardtanh_.default: None,
    torch.ops.aten.clamp.default: None,  # lowbit.torch's QAT layers write ReLU6 as clamp(0, 6)
}


class LowbitObserver(UniformQuantizationObserverBase):
    """Per-tensor activation observer: lowbit's Histogram, range method and scale/zero-point arithmetic."""

    def __init__(
        self,
        dtype: torch.dtype = torch.int8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: int = -128,
        quant_max: int = 127,
        method: str = "minmax",
        percentile: float = 99.99,
        clamp: tuple[float | None, float | None] = (None, None),
        fixed: tuple[float, int] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("reduce_range", None)
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        self.method, self.percentile, self.clamp = method, percentile, clamp
        self.fixed = fixed  # a QAT module's learned (scale, int8 zero point): no range to choose
        self.hist = Histogram()

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel():
            lo, hi = self.clamp
            x = x_orig.detach().float().clamp(lo, hi) if lo is not None or hi is not None else x_orig.detach()
            self.hist.update(x.float().cpu().numpy())
        return x_orig

    def range(self) -> tuple[float, float]:
        kw = {"p": self.percentile} if self.method == "percentile" else {}
        return select_range(self.hist, self.method, **kw)

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fixed is not None:
            return torch.tensor([self.fixed[0]], dtype=torch.float32), torch.tensor([self.fixed[1]], dtype=torch.int32)
        if self.hist.count == 0:  # never reached in calibration: any scale (convert needs one)
            return torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32)
        a, b = self.range()
        symmetric = self.qscheme == torch.per_tensor_symmetric
        s, z = scale_zero_point(a, b, "int8", symmetric)
        return torch.tensor([float(s)], dtype=torch.float32), torch.tensor([int(z)], dtype=torch.int32)

    def extra_repr(self) -> str:
        return f"method={self.method}, clamp={self.clamp}, fixed={self.fixed}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """What of lowbit's recipe the PT2E flow takes (checked in `recipe_choice`)."""

    method: str = "minmax"
    percentile: float = 99.99
    per_channel: bool = True
    symmetric_activations: bool = False
    avoid_overflow: bool = False  # lowbit's u8 x s8 guard (its ONNX path applies it to uint8 activations only)
    bias_correction: bool = False


def activation_spec(
    choice: Choice, method: str | None = None, clamp: tuple = (None, None), fixed: tuple[float, int] | None = None
) -> QuantizationSpec:
    qscheme = torch.per_tensor_symmetric if choice.symmetric_activations else torch.per_tensor_affine
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
        qscheme=qscheme,
        is_dynamic=False,
        observer_or_fake_quant_ctr=LowbitObserver.with_args(
            method=method or choice.method, percentile=choice.percentile, clamp=clamp, fixed=fixed
        ),
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


def make_quantizer(choice: Choice, learned: dict[str, tuple[float, int]] | None = None) -> Any:
    """XNNPACKQuantizer with lowbit's specs, then lowbit's folding of activations and exact output ranges; with
    `learned` (a QAT module's tensor name -> (scale, int8 zero point)), those fixed parameters instead."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import QuantizationConfig

    act = activation_spec(choice)
    config = QuantizationConfig(act, act, weight_spec(choice), None, False)

    class LowbitXNNPACKQuantizer(XNNPACKQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            fold_activations(model, choice)
            if learned is None:
                exact_outputs(model, choice)
            else:
                use_learned(model, choice, learned)
            share_edges(model)
            return model

    return LowbitXNNPACKQuantizer().set_global(config)


def _annotation(node: torch.fx.Node) -> Any:
    return node.meta.get("quantization_annotation")


def _bounds(node: torch.fx.Node) -> tuple[float | None, float | None]:
    fixed = CLAMPS[node.target]  # type: ignore[index]
    if fixed is not None:
        return fixed
    args = list(node.args[1:3]) + [None, None]
    if node.target == torch.ops.aten.clamp.default:  # clamp(x, min=None, max=None): either bound may be absent
        lo = args[0] if args[0] is not None else node.kwargs.get("min")
        hi = args[1] if args[1] is not None else node.kwargs.get("max")
        return (None if lo is None else float(lo)), (None if hi is None else float(hi))  # type: ignore[arg-type]
    lo = args[0] if args[0] is not None else node.kwargs.get("min_val", -1.0)
    hi = args[1] if args[1] is not None else node.kwargs.get("max_val", 1.0)
    return float(lo), float(hi)  # type: ignore[arg-type]


def fold_activations(model: torch.fx.GraphModule, choice: Choice) -> None:
    """A ReLU/ReLU6/hardtanh whose producer is quantized and read by it alone shares the producer's observer,
    and that observer sees the clamped values (lowbit's folding of Relu/Clip into the op before)."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in CLAMPS:
            continue
        src = node.args[0]
        src_ann = _annotation(src) if isinstance(src, torch.fx.Node) else None
        if src_ann is None or len(src.users) != 1 or not isinstance(src_ann.output_qspec, QuantizationSpec):
            continue
        ann = _annotation(node)
        if ann is None:  # ReLU6: no XNNPACK annotation; it runs as a clamp on the shared int8 values
            shared = SharedQuantizationSpec(src)
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={src: shared}, output_qspec=shared, _annotated=True
            )
        elif not isinstance(ann.output_qspec, SharedQuantizationSpec):
            continue
        method = src_ann.output_qspec.observer_or_fake_quant_ctr.p.keywords.get("method", choice.method)
        src_ann.output_qspec = activation_spec(choice, method, _bounds(node))


def exact_outputs(model: torch.fx.GraphModule, choice: Choice) -> None:
    """The tensors a model returns are observed with min/max (lowbit's rule for graph outputs)."""
    out = next(n for n in model.graph.nodes if n.op == "output")
    for node in out.all_input_nodes:
        while True:
            ann = _annotation(node)
            spec = ann.output_qspec if ann is not None else None
            if isinstance(spec, SharedQuantizationSpec) and isinstance(node.args[0], torch.fx.Node):
                node = node.args[0]  # a shared scale (a reshape, a mean): the range is its source's
                continue
            if isinstance(spec, QuantizationSpec):
                keywords = spec.observer_or_fake_quant_ctr.p.keywords
                ann.output_qspec = activation_spec(choice, "minmax", keywords.get("clamp", (None, None)))
            break


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


def use_learned(model: torch.fx.GraphModule, choice: Choice, learned: dict[str, tuple[float, int]]) -> None:
    """A QAT module's parameters on the tensors it fake-quantized: a folded activation's on its producer (they
    share one observer), the others on the tensor itself (an input edge for a model input). A model output
    without a fake quantizer stays float (as `lowbit.torch.export_onnx` keeps it); any other tensor XNNPACK
    quantizes needs a learned scale. (The QAT module's weights are on their grid already: a layer run in float
    computes what its int8 form would.)"""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    missing = set(learned)
    outputs = set(next(n for n in model.graph.nodes if n.op == "output").all_input_nodes)
    for node in model.graph.nodes:
        ann = _annotation(node)
        if ann is None:
            continue
        for arg, spec in list(ann.input_qspec_map.items()):
            if isinstance(spec, QuantizationSpec) and arg.name in learned:
                ann.input_qspec_map[arg] = activation_spec(choice, fixed=learned[arg.name])
                missing.discard(arg.name)
        if node.name not in learned:
            continue
        owner, spec = node, ann.output_qspec
        folded = node.target in CLAMPS and isinstance(spec, SharedQuantizationSpec)
        if folded and isinstance(node.args[0], torch.fx.Node):
            owner = node.args[0]  # a folded ReLU6: its range is its producer's observer
        owner_ann = _annotation(owner)
        if isinstance(owner_ann, QuantizationAnnotation) and owner_ann.output_qspec is not None:
            owner_ann.output_qspec = activation_spec(choice, fixed=learned[node.name])
            missing.discard(node.name)
    for node in model.graph.nodes:
        ann = _annotation(node)
        spec = ann.output_qspec if ann is not None else None
        if not isinstance(spec, QuantizationSpec) or spec.observer_or_fake_quant_ctr.p.keywords.get("fixed"):
            continue
        if node in outputs:  # float, on the dequantized input and the weights' grid values (ONNX's QDQ form)
            ann.output_qspec = None
            ann.input_qspec_map = {}
            continue
        raise _no_scale(node)
    if missing:
        raise _no_scale(next(n for n in model.graph.nodes if n.name in missing), unused=True)


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
