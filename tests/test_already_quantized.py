"""A model that holds quantized ops already (ONNX Runtime's quantize_dynamic output, a QDQ model passed in by
mistake) is quantized where it is still float, with a warning that names what it found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lowbit
from helpers import model, node, samples, weight
from lowbit.errors import LowbitError


def _float() -> object:
    inits = {"w1": weight((8, 3, 3, 3), 1), "w2": weight((8, 10), 2)}
    nodes = [
        node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
        node("Relu", ["c"], ["r"]),
        node("GlobalAveragePool", ["r"], ["g"]),
        node("Flatten", ["g"], ["f"]),
        node("MatMul", ["f", "w2"], ["y"]),
    ]
    return model(nodes, {"x": (1, 3, 8, 8)}, {"y": (1, 10)}, inits)


def test_a_qdq_model_is_refused_before_any_work(tmp_path: Path) -> None:
    m = _float()
    first = lowbit.quantize(m, tmp_path / "q.onnx", calib=samples(m, 8), progress=False)
    assert not any("already quantized" in w for w in first.warnings)
    with pytest.raises(LowbitError, match="already quantized .* pass the float model"):
        lowbit.quantize(tmp_path / "q.onnx", calib=samples(m, 8), progress=False)


def test_onnxruntime_dynamic_output_is_named(tmp_path: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    m = _float()
    onnx.save(m, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "d.onnx"), weight_type=QuantType.QInt8)
    res = lowbit.quantize(tmp_path / "d.onnx", calib=samples(m, 8), progress=False)
    note = next(w for w in res.warnings if "already quantized" in w)
    assert "DynamicQuantizeLinear" in note or "MatMulInteger" in note
    assert np.isfinite(res.quantized_bytes)
