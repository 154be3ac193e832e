"""MobileNetV3 Small/Large as ONNX, the way third-party exports look (hard-swish, hard-sigmoid, squeeze-excite).

The architecture is torchvision's ``mobilenet_v3_small``/``mobilenet_v3_large`` (same block tables, channel
rounding, BatchNorm eps/momentum, initialisation), written out here because the torchvision wheel that installs
offline is a CUDA build whose C extension does not load beside the pinned CPU torch (``import torchvision`` fails
with "operator torchvision::nms does not exist"). No pretrained weights install offline: the weights are a seeded
random init, and the BatchNorm running statistics are re-estimated on photo crops (calibration split) so that
activation ranges look like a trained network's rather than an untrained one's.

Opset 11 is exported with hard-swish and hard-sigmoid decomposed as older exporters and paddle2onnx emit them
(``x * Clip(x + 3, 0, 6) / 6`` and ``Clip(x + 3, 0, 6) / 6``); opset 17 keeps the current exporter's forms
(``HardSwish``, ``HardSigmoid``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

__all__ = ["mobilenet_v3_onnx", "mobilenet_v3_torch"]

Variant = Literal["small", "large"]

# (input, kernel, expanded, output, squeeze-excite, hard-swish, stride): torchvision's _mobilenet_v3_conf
_LARGE = [
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
]
_SMALL = [
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
]
_LAST = {"small": 1024, "large": 1280}
SEED = 0
BN_CROPS = 64  # photo crops (calibration split) the BatchNorm statistics are re-estimated on


def _divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def mobilenet_v3_torch(variant: Variant, decomposed: bool = False):
    """torchvision's MobileNetV3 (1000 classes), seeded random init, BatchNorm statistics from photo crops, eval
    mode. ``decomposed`` computes hard-swish/hard-sigmoid with explicit arithmetic (the opset-11 export form)."""
    import torch
    from torch import nn

    from .zoo import photo_crops

    class HardSwish(nn.Module):
        def forward(self, x):
            return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0

    class HardSigmoid(nn.Module):
        def forward(self, x):
            return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0

    hswish = HardSwish if decomposed else nn.Hardswish
    hsigmoid = HardSigmoid if decomposed else nn.Hardsigmoid

    def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act=None) -> nn.Sequential:
        layers = [
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
        ]
        return nn.Sequential(*layers, *([act()] if act is not None else []))

    class SqueezeExcite(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            squeeze = _divisible(channels // 4)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc1, self.relu = nn.Conv2d(channels, squeeze, 1), nn.ReLU()
            self.fc2, self.scale = nn.Conv2d(squeeze, channels, 1), hsigmoid()

        def forward(self, x):
            return self.scale(self.fc2(self.relu(self.fc1(self.avgpool(x))))) * x

    class Block(nn.Module):
        def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool, stride: int) -> None:
            super().__init__()
            act = hswish if hs else nn.ReLU
            layers = [conv_bn(cin, exp, 1, act=act)] if exp != cin else []
            layers.append(conv_bn(exp, exp, k, stride, groups=exp, act=act))
            layers += [SqueezeExcite(exp)] if se else []
            layers.append(conv_bn(exp, cout, 1))
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.block(x)
            return y + x if self.residual else y

    table = _SMALL if variant == "small" else _LARGE
    torch.manual_seed(SEED)
    last_in = table[-1][3]
    features = nn.Sequential(
        conv_bn(3, 16, 3, 2, act=hswish), *[Block(*row) for row in table], conv_bn(last_in, 6 * last_in, 1, act=hswish)
    )
    classifier = nn.Sequential(
        nn.Linear(6 * last_in, _LAST[variant]), hswish(), nn.Dropout(0.2), nn.Linear(_LAST[variant], 1000)
    )
    model = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), classifier)
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    # Re-estimate BatchNorm statistics: a cumulative average (momentum None) over photo crops in train mode.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    crops = torch.from_numpy(photo_crops(BN_CROPS, "calib", seed=SEED))
    with torch.no_grad():
        for batch in crops.split(16):
            model(batch)
    return model.eval()


def mobilenet_v3_onnx(path: str | Path, variant: Variant = "small", opset: int = 11) -> Path:
    """Export MobileNetV3 ``variant`` at ``opset`` to ``path`` (skipped if it exists).

    Input ``input`` (N, 3, 224, 224) ImageNet-normalised RGB, output ``logits`` (N, 1000), dynamic batch axis.
    Opset < 14 (no ONNX HardSwish) decomposes hard-swish/hard-sigmoid into Add/Clip/Mul/Div; both use the
    TorchScript exporter (``dynamo=False``), whose output bytes are reproducible.
    """
    path = Path(path)
    if path.exists():
        return path
    if variant not in _LAST:
        raise ValueError(f"variant must be 'small' or 'large', not {variant!r}")
    import torch

    from .zoo import _export_onnx

    model = mobilenet_v3_torch(variant, decomposed=opset < 14)
    _export_onnx(
        model,
        (torch.zeros(1, 3, 224, 224, dtype=torch.float32),),
        path,
        ["input"],
        ["logits"],
        {"input": {0: "batch"}, "logits": {0: "batch"}},
        quiet=[],
        opset=opset,
    )
    return path
