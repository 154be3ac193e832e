"""PyTorch modules as input to lowbit.quantize."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

import lowbit  # noqa: E402
from lowbit.runtimes.ort import session  # noqa: E402


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU6(),
            torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU6(),
            torch.nn.Conv2d(8, 16, 1),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x))


class Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: tracing would bake one branch in
            return self.conv(x)
        return -self.conv(x)


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    m = SmallCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
    return m.eval()


def data(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 1, 12, 12)).astype(np.float32)


def test_quantize_a_torch_module_runs_in_ort_and_agrees() -> None:
    m = small_cnn()
    calib = data(64)
    res = lowbit.quantize(m, example_inputs=(torch.from_numpy(calib[:1]),), calib=calib, progress=False)
    assert any(n.op_type == "QuantizeLinear" for n in res.model.graph.node)
    x = data(32, seed=2)
    out = session(res.model, mode="kernels").run(None, {"x": x})[0]  # dynamic batch axis: 32 != 1
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape
    cos = float(np.sum(out * ref) / np.linalg.norm(out) / np.linalg.norm(ref))
    assert cos > 0.99
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.85


def test_data_dependent_control_flow_is_one_line_error() -> None:
    with pytest.raises(lowbit.LowbitError) as e:
        lowbit.quantize(Branchy(), example_inputs=(torch.zeros(1, 1, 8, 8),), calib=data(4), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "depends on tensor values" in msg


def test_module_without_example_inputs_is_an_error() -> None:
    with pytest.raises(lowbit.LowbitError, match="example_inputs"):
        lowbit.quantize(small_cnn(), calib=data(4), progress=False)


def test_import_lowbit_does_not_import_torch() -> None:
    code = "import sys, lowbit; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
