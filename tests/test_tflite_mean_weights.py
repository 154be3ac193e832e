"""An int8 GlobalAveragePool whose scales admit no all-ones weight scale still gives ONNX Runtime's integers: the
summing FULLY_CONNECTED takes all-k weights whose integers are checked against ONNX Runtime's rule for every sum
(`layers._sum_weights`). MobileNetV3-Large's block 6 average (28 x 28, below) has no k = 1 scale; it used to export as
MEAN, which rounds twice, and 6 of 30,720 squeeze-excite averages on 256 crops came out a step apart."""

from __future__ import annotations

import numpy as np
import pytest

import lowbit.export.tflite.layers as layers
import test_tflite_mean_rounding as base
from lowbit.export.tflite import convert

f32 = np.float32
# /0/0.6/block/block.2/avgpool of lowbit's MobileNetV3-Large (uint8 zero points 0 -> int8 -128)
BLOCK6 = {"SI": f32(0.05490317940711975), "ZI": -128, "SO": f32(0.0052070110104978085), "ZO": -128, "H": 28}


@pytest.fixture
def block6(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in BLOCK6.items():
        monkeypatch.setattr(base, k, v)


def test_block6_has_no_all_ones_scale(block6):
    assert layers._sum_weight_scale(base.SI, base.SO, base.H * base.H) is None
    k, sw = layers._sum_weights(base.SI, base.SO, base.H * base.H, base.ZI, base.ZO)
    assert 2 <= k <= 127 and sw > 0


def test_all_k_sum_gives_onnx_runtimes_integers(block6):
    q = base.inputs_near_half_steps()
    q_ort, q_lite = base._both(q)
    np.testing.assert_array_equal(q_lite, q_ort)
    assert convert(base.gap_model(4), io="int8").ops == {"TRANSPOSE": 1, "RESHAPE": 2, "FULLY_CONNECTED": 1}


def test_mean_misses_at_these_scales(block6, monkeypatch: pytest.MonkeyPatch):
    """What the export did before: no k = 1 scale, so MEAN (the check above can fail)."""
    monkeypatch.setattr(layers, "_sum_weights", lambda si, so, n, zi, zo: None)
    q_ort, q_lite = base._both(base.inputs_near_half_steps())
    assert convert(base.gap_model(4), io="int8").ops.get("MEAN") == 1
    assert 1 <= int(np.sum(q_ort != q_lite)) and int(np.abs(q_ort - q_lite).max()) == 1
