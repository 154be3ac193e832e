"""MobileNetV3-style blocks (hard-swish, squeeze-excite with HardSigmoid, residual) exported by torch at opset 11
(hard-swish written out as x * HardSigmoid(x)) and 17 (HardSwish): lowbit's int8 QDQ -> full-integer TFLite with no
float fallback, agreeing with the int8 ONNX in LiteRT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import lowbit
from lowbit.evaluate.metrics import cosine, top1_agreement
from lowbit.export.tflite import convert
from lowbit.runtimes.litert import LiteRTSession
from lowbit.runtimes.ort import session
from test_tflite_models import _run

torch = pytest.importorskip("torch")
nn = torch.nn


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


def _block(cin: int, c: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, c, 1, bias=False),
        nn.BatchNorm2d(c),
        nn.Hardswish(),
        nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False),
        nn.BatchNorm2d(c),
        nn.Hardswish(),
        SqueezeExcite(c, 8),
        nn.Conv2d(c, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
    )


class TinyMobileNetV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.b1, self.b2 = _block(16, 32, 16, 1), _block(16, 48, 24, 2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(24, 32), nn.Hardswish(), nn.Linear(32, 10))

    def forward(self, x):
        x = self.stem(x)
        x = self.b2(x + self.b1(x))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1))


def _export(path: Path, opset: int) -> Path:
    torch.manual_seed(0)
    net = TinyMobileNetV3()
    g = torch.Generator().manual_seed(1)
    net.train()
    with torch.no_grad():  # BatchNorm statistics from data, so activations have real ranges
        for _ in range(5):
            net(torch.randn(16, 3, 32, 32, generator=g))
    net.eval()
    torch.onnx.export(
        net,
        (torch.randn(1, 3, 32, 32),),
        str(path),
        opset_version=opset,
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
    )
    return path


@pytest.mark.parametrize("opset", [11, 17])
def test_mobilenet_v3_blocks_export_full_integer_and_agree(tmp_path: Path, opset: int) -> None:
    path = _export(tmp_path / "m.onnx", opset)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "HardSigmoid" in ops and ("HardSwish" in ops) == (opset >= 14)
    rng = np.random.default_rng(0)
    calib = rng.normal(0, 1, (32, 3, 32, 32)).astype(np.float32)
    q = tmp_path / "q.onnx"
    lowbit.quantize(path, q, calib=[calib], progress=False)
    result = convert(q, calib=[calib])
    assert not result.fallbacks and not result.float_nodes, result.to_dict()
    assert result.ops["HARD_SWISH"] == 6, result.ops  # opset 11's too
    # hard gates: DEQUANTIZE -> float -> QUANTIZE, which XNNPACK takes whole (int8 HARD_SWISH split the graph)
    assert result.ops["DEQUANTIZE"] == result.ops["QUANTIZE"] > 6, result.ops
    (tmp_path / "q.tflite").write_bytes(result.data)
    assert LiteRTSession(tmp_path / "q.tflite", threads=1).delegate_partitions() == 1
    x = rng.normal(0, 1, (64, 3, 32, 32)).astype(np.float32)
    ref = session(q, "kernels").run(None, {"x": x})[0]
    got = _run(result.data, x)
    agree, cos = top1_agreement(ref, got), cosine(ref, got)
    print(f"opset {opset}: top-1 agreement {agree:.4f}, cosine {cos:.6f}")
    assert agree >= 0.99 and cos >= 0.999
