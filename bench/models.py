"""Benchmark models built locally (no network): a MobileNetV2-style CNN exported to ONNX.

No pretrained MobileNetV2 weights exist offline, so the network is initialised with a fixed seed
(torchvision's init scheme) and its BatchNorm statistics are then re-estimated on the calibration
crops (train mode, no gradients, cumulative average). Without that step a randomly initialised deep
CNN has activations that grow or vanish layer by layer, which would make any quantization comparison
meaningless. Weights are still random: the classifier's top-1 is not an ImageNet prediction, only a
deterministic function of the input that quantization may or may not preserve.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def mobilenet_v2(width_mult: float = 0.75, num_classes: int = 1000, seed: int = 0):
    """MobileNetV2 (Sandler et al. 2018): inverted residual blocks, depthwise 3x3, ReLU6, linear bottlenecks."""
    import torch
    from torch import nn

    class ConvBNReLU(nn.Sequential):
        def __init__(self, cin, cout, k=3, stride=1, groups=1):
            super().__init__(
                nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=True),
            )

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = int(round(cin * expand))
            self.use_res = stride == 1 and cin == cout
            layers = []
            if expand != 1:
                layers.append(ConvBNReLU(cin, hidden, k=1))
            layers += [
                ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),  # depthwise 3x3
                nn.Conv2d(hidden, cout, 1, bias=False),  # linear bottleneck
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = [
                (1, 16, 1, 1),
                (6, 24, 2, 2),
                (6, 32, 3, 2),
                (6, 64, 4, 2),
                (6, 96, 3, 1),
                (6, 160, 3, 2),
                (6, 320, 1, 1),
            ]
            cin = _make_divisible(32 * width_mult)
            last = _make_divisible(1280 * max(1.0, width_mult))
            feats = [ConvBNReLU(3, cin, stride=2)]
            for t, c, n, s in cfg:
                cout = _make_divisible(c * width_mult)
                for i in range(n):
                    feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                    cin = cout
            feats.append(ConvBNReLU(cin, last, k=1))
            self.features = nn.Sequential(*feats)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(last, num_classes)

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    torch.manual_seed(seed)
    model = MobileNetV2()
    for m in model.modules():  # torchvision's MobileNetV2 initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def recalibrate_batchnorm(model, x: np.ndarray, batch: int = 16) -> None:
    """Re-estimate every BatchNorm's running mean/var on `x` (train mode, no grad, cumulative average)."""
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])))
    model.eval()


def mobilenet_v2_onnx(path: str | Path, calib: np.ndarray, width_mult: float = 0.75, seed: int = 0) -> tuple[Path, int]:
    """Build, BN-recalibrate on `calib` and export (opset 17, input 'input', output 'logits', dynamic batch).

    Returns (path, parameter count). Skips the work if `path` exists (parameter count then recomputed).
    """
    import torch

    path = Path(path)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = mobilenet_v2(width_mult=width_mult, seed=seed)
    params = sum(p.numel() for p in model.parameters())
    if path.exists():
        return path, params
    recalibrate_batchnorm(model, calib)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.zeros(1, 3, 224, 224),),
                tmp,
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path, params
