"""Fake-quantization modules for QAT, numerically the same as lowbit's QDQ graph in float simulation.

Activations: uint8 (or uint16), asymmetric, scale learned LSQ-style (gradient with a straight-through estimator through
the rounding); the zero point is fixed by calibration. Weights: per-channel symmetric on the narrow range
[-qmax, qmax] (int8: 127, int4: 7), scale max|w|/qmax per output channel, as lowbit's PTQ computes it, with
a straight-through estimator for the weights. BatchNorm is folded into the conv weights during training. A layer
the recipe keeps float is the same module with bits None: BatchNorm folded, no rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class ActFakeQuant(torch.nn.Module):
    """uint8 (or uint16) fake quantization of one tensor; `lo/hi` are bounds the tensor is known to respect (a
    fused ReLU6 gives [0, 6]): the range is kept inside them so the exported graph can drop the clamp."""

    # Buffers (registered in __init__), declared for the type checker.
    zero_point: torch.Tensor
    seen_min: torch.Tensor
    seen_max: torch.Tensor

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, dtype: str = "uint8") -> None:
        super().__init__()
        self.lo, self.hi, self.dtype = lo, hi, dtype
        self.qmax = {"uint8": 255, "uint16": 65535}[dtype]
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("seen_min", torch.tensor(math.inf))
        self.register_buffer("seen_max", torch.tensor(-math.inf))
        self.mode = "quantize"  # observe | quantize | export
        self.export_params: tuple[float, int] | None = None

    def effective_scale(self) -> torch.Tensor:
        s = self.scale.abs().clamp(min=1e-8)
        # Keep 255 * s inside the known upper bound when the zero point is 0 (post-ReLU6 tensors).
        if self.hi < math.inf and float(self.zero_point) == 0.0:
            s = s.clamp(max=self.hi / self.qmax)
        return s

    def init_from_observed(self) -> None:
        a = min(float(self.seen_min), 0.0)
        b = max(float(self.seen_max), 0.0)
        a, b = max(a, self.lo), min(b, self.hi)
        if b - a < 1e-8:
            b = a + 1e-8
        s = (b - a) / self.qmax
        z = min(float(self.qmax), max(0.0, round(-a / s)))
        with torch.no_grad():
            self.scale.fill_(s)
            self.zero_point.fill_(z)
        self.mode = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            with torch.no_grad():
                self.seen_min.fill_(min(float(self.seen_min), float(x.min())))
                self.seen_max.fill_(max(float(self.seen_max), float(x.max())))
            return x
        if self.mode == "export":
            assert self.export_params is not None
            s, z = self.export_params
            return torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255)
        grad_factor = 1.0 / math.sqrt(x.numel() * self.qmax)  # LSQ's step-size gradient scale
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.effective_scale().reshape(1), self.zero_point.reshape(1), 0, self.qmax, grad_factor
        )

    def freeze_for_export(self, marker: float | None = None) -> tuple[float, int, str]:
        """Export as a uint8 Q/DQ pair the exporter understands; a 16-bit tensor is exported with a `marker`
        scale that the exporter maps back to its real parameters. Returns (scale, zero point, dtype)."""
        real = (float(self.effective_scale().detach()), int(self.zero_point), self.dtype)
        self.export_params = (real[0], real[1]) if marker is None else (marker, 0)
        self.mode = "export"
        return real


def fake_quant_weight(w: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Per-output-channel symmetric fake quantization; gradients pass straight through to w. bits None: a
    layer kept float, returned as is."""
    if bits is None:
        return w
    qmax = 2 ** (bits - 1) - 1
    scale = (w.detach().abs().amax(dim=tuple(range(1, w.ndim))).clamp(min=1e-12) / qmax).float()
    zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -qmax, qmax)


def _act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == "relu":
        return F.relu(y)
    if act == "relu6":
        return torch.clamp(y, 0.0, 6.0)
    return y


ACT_BOUNDS = {None: (-math.inf, math.inf), "relu": (0.0, math.inf), "relu6": (0.0, 6.0)}


class QConvBnAct(torch.nn.Module):
    """Conv2d with an optional BatchNorm folded into it and an optional ReLU/ReLU6, weights fake-quantized.

    While BatchNorm is live (training, before `freeze_bn_after` steps), the folded conv is rescaled to batch
    statistics as in Jacob et al. 2018 and the running statistics keep updating; once frozen (and in eval),
    the running statistics are folded for good, which is what the exported model computes.
    """

    # Buffers (registered in __init__), declared for the type checker.
    steps: torch.Tensor
    bn_frozen: torch.Tensor
    act_dtype: str  # the layer output's activation type, set by lowbit.torch.qat

    def __init__(
        self,
        conv: torch.nn.Conv2d,
        bn: torch.nn.BatchNorm2d | None,
        act: str | None,
        bits: int | None,
        freeze_bn_after: int | None,
    ) -> None:
        super().__init__()
        self.conv, self.bn, self.act, self.bits = conv, bn, act, bits
        self.freeze_bn_after = freeze_bn_after
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("bn_frozen", torch.tensor(False))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(folded float weight, folded bias, per-channel BN factor gamma / std)."""
        w, b = self.conv.weight, self.conv.bias
        if self.bn is None:
            return w, b, None
        mean, var = self.bn.running_mean, self.bn.running_var
        assert mean is not None and var is not None  # folding needs them (track_running_stats, the default)
        factor = self.bn.weight / torch.sqrt(var + self.bn.eps)
        w = w * factor.reshape(-1, 1, 1, 1)
        b0 = b if b is not None else torch.zeros_like(mean)
        return w, self.bn.bias + factor * (b0 - mean), factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.training:
            self.steps += 1
            if self.freeze_bn_after is not None and int(self.steps) > self.freeze_bn_after:
                self.bn_frozen.fill_(True)
        w, b, factor = self.folded()
        wq = fake_quant_weight(w, self.bits)
        if self.bn is not None and self.training and not bool(self.bn_frozen):
            assert factor is not None  # folded() returns one whenever there is a BatchNorm
            y = F.conv2d(x, wq, None, c.stride, c.padding, c.dilation, c.groups) / factor.reshape(1, -1, 1, 1)
            if c.bias is not None:
                y = y + c.bias.reshape(1, -1, 1, 1)
            bn = self.bn
            y = F.batch_norm(
                y,
                bn.running_mean,
                bn.running_var,
                bn.weight,
                bn.bias,
                True,
                bn.momentum if bn.momentum is not None else 0.1,
                bn.eps,
            )
        else:
            y = F.conv2d(x, wq, b, c.stride, c.padding, c.dilation, c.groups)
        return _act(y, self.act)


class QLinearAct(torch.nn.Module):
    act_dtype: str  # the layer output's activation type, set by lowbit.torch.qat

    def __init__(self, linear: torch.nn.Linear, act: str | None, bits: int | None) -> None:
        super().__init__()
        self.linear, self.act, self.bits = linear, act, bits

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        return self.linear.weight, self.linear.bias, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(F.linear(x, fake_quant_weight(self.linear.weight, self.bits), self.linear.bias), self.act)


class ExportConv(torch.nn.Module):
    """The frozen float form of a QConvBnAct: on-grid weights, folded bias; exports as Conv (+ Relu/Clip)."""

    def __init__(self, q: QConvBnAct) -> None:
        super().__init__()
        w, b, _ = q.folded()
        c = q.conv
        self.weight = torch.nn.Parameter(fake_quant_weight(w, q.bits).detach().clone())
        self.bias = torch.nn.Parameter(b.detach().clone()) if b is not None else None
        self.stride, self.padding, self.dilation, self.groups = c.stride, c.padding, c.dilation, c.groups
        self.act, self.bits = q.act, q.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(
            F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups), self.act
        )


class ExportLinear(torch.nn.Module):
    def __init__(self, q: QLinearAct) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(fake_quant_weight(q.linear.weight, q.bits).detach().clone())
        b = q.linear.bias
        self.bias = torch.nn.Parameter(b.detach().clone()) if b is not None else None
        self.act, self.bits = q.act, q.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(F.linear(x, self.weight, self.bias), self.act)
