"""Plans record every float graph output's calibrated range (`Plan.output_ranges`) so `lowbit export --to tflite`
is full-integer without data: round trip, plans from before the field, validation, re-applied plans."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lowbit
from conftest import tiny_cnn
from lowbit.errors import LowbitError
from lowbit.export.tflite import convert
from lowbit.plan import Plan
from lowbit.runtimes.ort import session


def _two_outputs() -> onnx.ModelProto:
    """tiny_cnn with two more outputs: the residual sum `s` (quantized by lowbit) and an int64 ArgMax `k`."""
    model = tiny_cnn()
    model.graph.node.append(helper.make_node("ArgMax", ["y"], ["k"], axis=1, name="argmax"))
    model.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 8, 16, 16]))
    model.graph.output.append(helper.make_tensor_value_info("k", TensorProto.INT64, ["N", 1]))
    onnx.checker.check_model(model)
    return model


def _calib(n: int = 32) -> np.ndarray:
    return np.random.default_rng(3).normal(0, 1, (n, 3, 16, 16)).astype(np.float32)


def test_quantize_records_each_float_output_range_as_calibration_saw_it(tmp_path: Path):
    model, calib = _two_outputs(), _calib()
    result = lowbit.quantize(model, tmp_path / "q.onnx", calib=calib, progress=False)
    ranges = result.plan.output_ranges
    assert set(ranges) == {"y", "s"}  # the int64 ArgMax has no range
    y, s = session(model).run(["y", "s"], {"x": calib})
    np.testing.assert_allclose(ranges["y"], [y.min(), y.max()], rtol=1e-6)
    np.testing.assert_allclose(ranges["s"], [s.min(), s.max()], rtol=1e-6)
    assert ranges["s"] == result.plan.tensors["s"].range  # a quantized output: the range its scale came from
    assert "y" not in result.plan.tensors  # the classifier's output stays float in the model
    # written and read back the same; re-applying the plan carries the ranges into the new plan
    loaded = Plan.load(tmp_path / "q.plan.json")
    assert loaded.output_ranges == ranges
    again = lowbit.quantize(model, tmp_path / "r.onnx", plan=tmp_path / "q.plan.json", progress=False)
    assert again.plan.output_ranges == ranges
    assert (tmp_path / "r.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()


def test_a_plan_from_before_output_ranges_still_loads_and_exports_as_before(tmp_path: Path):
    q = tmp_path / "q.onnx"
    lowbit.quantize(tiny_cnn(), q, calib=_calib(), progress=False)
    assert not convert(q).float_nodes
    plan_file = tmp_path / "q.plan.json"
    data = json.loads(plan_file.read_text())
    del data["output_ranges"]
    plan_file.write_text(json.dumps(data))
    assert Plan.load(plan_file).output_ranges == {}
    assert convert(q).float_nodes == ["fc (Gemm)"]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ([1.0], "output 'y' has range [1.0]"),
        ([2.0, 1.0], "output 'y' has range [2.0, 1.0]"),
        (["a", 1.0], "output 'y' has range ['a', 1.0]"),
        ([math.inf, 1.0], "output 'y' has range [inf, 1.0]"),
        (3.0, "output 'y' has range 3.0"),
    ],
)
def test_bad_output_ranges_are_one_line_errors(tmp_path: Path, value, says):
    lowbit.quantize(tiny_cnn(), tmp_path / "q.onnx", calib=_calib(8), progress=False)
    plan_file = tmp_path / "q.plan.json"
    data = json.loads(plan_file.read_text())
    data["output_ranges"]["y"] = value
    plan_file.write_text(json.dumps(data, allow_nan=True))
    with pytest.raises(LowbitError) as e:
        Plan.load(plan_file)
    assert says in str(e.value) and "re-run calibration with --calib" in str(e.value)
    assert "\n" not in str(e.value)


def test_output_ranges_must_be_an_object(tmp_path: Path):
    plan = lowbit.quantize(tiny_cnn(), calib=_calib(8), progress=False).plan
    plan.output_ranges = [[0.0, 1.0]]  # type: ignore[assignment]
    with pytest.raises(LowbitError, match="its output_ranges are not an object"):
        plan.validate()
