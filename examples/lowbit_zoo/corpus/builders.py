"""Small torch models exported the way real exporters emit them, for patterns no corpus wheel has.

* `yolo_head_onnx`: a YOLOv8-style detector whose one output concatenates pixel boxes (0..320) with sigmoid class
  probabilities, `[1, 4 + classes, anchors]`.
* `dbnet_onnx`: a DBNet-style text detector: FPN with Resize, ConvTranspose followed by an unfused BatchNorm,
  a Sigmoid probability map.
* `vad_onnx`: a Silero-VAD-style stateful model: state `[2, B, 64]` (batch not first), a scalar sample-rate input
  and an `If` on it.

Weights are random but deterministic (torch.manual_seed); BatchNorm statistics are re-estimated on photographs
(`lowbit_zoo.zoo.photo_crops`, calibration split) and each model's last bias is set from a quantile of its float
output so that thresholds used by the task metrics cut through real structure instead of an all-on/all-off map.
All use the legacy TorchScript exporter (dynamo=False), as most exports found in the wild were made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE = 320  # YOLO input side: boxes are pixel coordinates in 0..320
DB_IMAGE = 256
CLASSES = 20


def _torch():
    import torch

    return torch


def _cbr(cin: int, cout: int, stride: int = 1):
    nn = _torch().nn
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


def _reestimate_bn(model, images: np.ndarray) -> None:
    """BatchNorm running statistics as the cumulative average over `images` (momentum None), then eval mode."""
    torch = _torch()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), 8):
            model(torch.from_numpy(images[i : i + 8]))
    model.eval()


def _yolo_module():
    torch = _torch()
    nn = torch.nn

    class YoloHead(nn.Module):
        """Backbone to strides 8/16/32; per level a box branch (4) and a class branch; boxes decoded to pixels."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(_cbr(3, 16, 2), _cbr(16, 32, 2), _cbr(32, 32, 2))  # stride 8
            self.down = nn.ModuleList([_cbr(32, 48, 2), _cbr(48, 64, 2)])  # strides 16, 32
            widths = (32, 48, 64)
            self.box = nn.ModuleList([nn.Sequential(_cbr(w, 32), nn.Conv2d(32, 4, 1)) for w in widths])
            self.cls = nn.ModuleList([nn.Sequential(_cbr(w, 32), nn.Conv2d(32, CLASSES, 1)) for w in widths])
            grids, strides = [], []
            for s in (8, 16, 32):
                n = IMAGE // s
                yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
                grids.append(torch.stack([xx, yy]).reshape(2, -1).float() + 0.5)
                strides.append(torch.full((1, n * n), float(s)))
            self.register_buffer("anchors", torch.cat(grids, 1))
            self.register_buffer("strides", torch.cat(strides, 1))

        def forward(self, x):
            feats = [self.stem(x)]
            for d in self.down:
                feats.append(d(feats[-1]))
            box = torch.cat([b(f).flatten(2) for b, f in zip(self.box, feats)], 2)  # [B, 4, A] ltrb in strides
            cls = torch.cat([c(f).flatten(2) for c, f in zip(self.cls, feats)], 2)
            lt, rb = box.chunk(2, 1)
            lt, rb = 4 * torch.sigmoid(lt), 4 * torch.sigmoid(rb)  # up to 4 strides each way, as DFL's expectation
            x1y1, x2y2 = self.anchors - lt, self.anchors + rb
            xywh = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * self.strides  # pixels, as YOLOv8 exports
            return torch.cat([xywh, cls.sigmoid()], 1)

    return YoloHead()


def _set_bias_for_quantile(conv, pre: np.ndarray, fraction: float) -> None:
    """Shift a conv's bias so that `fraction` of its pre-activation values on calibration images exceed 0."""
    torch = _torch()
    with torch.no_grad():
        conv.bias -= float(np.quantile(pre, 1 - fraction))


def yolo_head_onnx(path: str | Path) -> Path:
    from ..zoo import _export_onnx, photo_crops

    torch = _torch()
    path = Path(path)
    if path.exists():
        return path
    torch.manual_seed(0)
    model = _yolo_module()
    images = photo_crops(32, "calib", seed=11, size=IMAGE)
    _reestimate_bn(model, images)
    # Class logits of about 3% of anchors above logit -1.1 (sigmoid 0.25), as a trained detector on a busy photo.
    pre: list[np.ndarray] = []
    hooks = [
        c[1].register_forward_hook(lambda m, i, o: pre.append(o.detach().max(1).values.numpy())) for c in model.cls
    ]
    with torch.no_grad():
        model(torch.from_numpy(images[:8]))
    for h in hooks:
        h.remove()
    shift = float(np.quantile(np.concatenate([p.ravel() for p in pre]), 0.97)) + 1.1
    with torch.no_grad():
        for c in model.cls:
            c[1].bias -= shift
    x = torch.from_numpy(images[:1])
    _export_onnx(model, (x,), path, ["images"], ["output0"], {"images": {0: "batch"}, "output0": {0: "batch"}}, [])
    return path


def _dbnet_module():
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    class DBNet(nn.Module):
        """Backbone to strides 4..32, FPN (1x1 laterals, nearest Resize + Add), concat at 1/4, DB probability head."""

        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList(
                [
                    nn.Sequential(_cbr(3, 16, 2), _cbr(16, 24, 2)),
                    _cbr(24, 32, 2),
                    _cbr(32, 48, 2),
                    _cbr(48, 64, 2),
                ]
            )
            self.lateral = nn.ModuleList([nn.Conv2d(w, 32, 1) for w in (24, 32, 48, 64)])
            self.smooth = nn.ModuleList([nn.Conv2d(32, 8, 3, padding=1) for _ in range(4)])
            self.head = nn.Sequential(
                nn.Conv2d(32, 16, 3, padding=1, bias=False),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.ConvTranspose2d(16, 16, 2, 2),
                nn.BatchNorm2d(16),  # stays a BatchNormalization node: exporters fold BN into Conv only
                nn.ReLU(),
                nn.ConvTranspose2d(16, 1, 2, 2),
            )

        def forward(self, x):
            feats = []
            for s in self.stages:
                x = s(x)
                feats.append(x)
            lat = [lateral(f) for lateral, f in zip(self.lateral, feats)]
            for i in range(3, 0, -1):
                lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], scale_factor=2.0, mode="nearest")
            size = lat[0].shape[-2:]
            outs = [
                F.interpolate(sm(f), size=size, mode="nearest") if i else sm(f)
                for i, (sm, f) in enumerate(zip(self.smooth, lat))
            ]
            return torch.sigmoid(self.head(torch.cat(outs, 1)))

    return DBNet()


def dbnet_onnx(path: str | Path) -> Path:
    from ..zoo import _export_onnx, photo_crops

    torch = _torch()
    path = Path(path)
    if path.exists():
        return path
    torch.manual_seed(1)
    model = _dbnet_module()
    images = photo_crops(32, "calib", seed=12, size=DB_IMAGE)
    _reestimate_bn(model, images)
    # About 15% of pixels above probability 0.5 on calibration photos: text-like blobs, not an empty map.
    with torch.no_grad():
        logits = torch.logit(model(torch.from_numpy(images[:8])).clamp(1e-6, 1 - 1e-6)).numpy()
    _set_bias_for_quantile(model.head[-1], logits, 0.15)
    x = torch.from_numpy(images[:1])
    _export_onnx(model, (x,), path, ["x"], ["prob_map"], {"x": {0: "batch"}, "prob_map": {0: "batch"}}, [])
    return path
