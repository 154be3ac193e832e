"""The public API: what `import lowbit` offers, the result types, and the one JSON policy for NaN/Inf."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

import lowbit
from conftest import tiny_cnn
from lowbit.evaluate.jsonable import dumps, jsonable

PUBLIC = [
    "__version__",
    "quantize",
    "QuantizeResult",
    "auto_quantize",
    "AutoResult",
    "evaluate_model",
    "EvalResult",
    "diagnose",
    "DiagnoseResult",
    "lint",
    "LintResult",
    "Finding",
    "report",
    "ReportResult",
    "export_tflite",
    "export_ort",
    "OrtExportResult",
    "export_executorch",
    "ExecutorchExportResult",
    "ExportResult",
    "Recipe",
    "Rule",
    "Scheme",
    "Plan",
    "ImagePreprocess",
    "LowbitError",
]


def test_public_api_is_pinned() -> None:
    assert sorted(lowbit.__all__) == sorted(PUBLIC)
    assert all(hasattr(lowbit, name) for name in PUBLIC)
    # evaluate_model keeps `lowbit.evaluate` the subpackage, so `import lowbit.evaluate.bench as b` works
    import lowbit.evaluate.bench as bench

    assert lowbit.evaluate.bench is bench


def test_non_finite_numbers_are_null_in_json() -> None:
    raw = {"a": [math.inf, -math.inf, math.nan, np.float32(1.5), np.int64(2)], "b": (np.bool_(True), Path("p"))}
    assert jsonable(raw) == {"a": [None, None, None, 1.5, 2], "b": [True, "p"]}
    assert json.loads(dumps(raw)) == jsonable(raw)


def test_results_have_to_dict_and_to_json(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (8, 3, 16, 16)).astype(np.float32)
    q = lowbit.quantize(tiny_cnn(), calib=[x], progress=False)
    same = lowbit.evaluate_model(tiny_cnn(), [x], reference=tiny_cnn(), progress=False)
    assert isinstance(same, lowbit.EvalResult) and same.outputs["y"]["sqnr_db"] == math.inf
    assert same.to_dict()["outputs"]["y"]["sqnr_db"] is None and json.loads(same.to_json()) == same.to_dict()

    found = lowbit.lint(q.model, plan=q.plan)
    assert isinstance(found, lowbit.LintResult) and found.to_dict()["findings"] == list(found)
    json.loads(found.to_json())

    onnx.save(q.model, str(tmp_path / "q.onnx"))
    exported = lowbit.export_tflite(tmp_path / "q.onnx", tmp_path / "q.tflite")
    summary = json.loads(exported.to_json())
    assert summary["output"] == str(tmp_path / "q.tflite") and summary["size_bytes"] == len(exported.data)
    assert summary["model"] == str(tmp_path / "q.onnx") and "data" not in summary


@pytest.mark.parametrize(
    "content, words",
    [
        (None, ["model not found"]),
        (b"\x08\x07 not protobuf \xff\xff", ["not a readable ONNX model", "not a valid ONNX model"]),
        (b"", ["holds no graph nodes"]),
    ],
)
def test_one_loader_one_set_of_messages(tmp_path: Path, content: bytes | None, words: list[str]) -> None:
    from lowbit.data import input_specs
    from lowbit.graph.io import load_model, load_proto

    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    messages = set()
    for read in (load_proto, load_model, input_specs, lowbit.lint):
        with pytest.raises(lowbit.LowbitError) as e:
            read(path)
        messages.add(str(e.value))
    assert len(messages) == 1, messages
    text = messages.pop()
    assert "\n" not in text and str(path) in text and all(w in text for w in words), text
