"""lowbit's .tflite files through ai-edge-quantizer's signature handling (it looks models up by `serving_default`,
and refused files without a SignatureDef): its validator runs lowbit's float and int8 files side by side, and it
quantizes lowbit's float file with calibration data given per signature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

import lowbit
from conftest import tiny_cnn
from lowbit.export.tflite import convert


def _files(tmp_path: Path) -> tuple[bytes, bytes, np.ndarray]:
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), str(model))
    calib = np.random.default_rng(1).normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
    lowbit.quantize(model, tmp_path / "tiny.int8.onnx", calib=calib, progress=False)
    return convert(model).data, convert(tmp_path / "tiny.int8.onnx").data, calib


def test_ai_edge_quantizer_validates_lowbits_int8_file_against_its_float_file(tmp_path: Path):
    from ai_edge_quantizer import model_validator

    f32, int8, calib = _files(tmp_path)
    data = {"serving_default": [{"x": c[None].transpose(0, 2, 3, 1)} for c in calib[:8]]}  # NHWC, by input name
    result = model_validator.compare_model(f32, int8, data, validate_output_tensors_only=True)
    assert result.available_signature_keys() == ["serving_default"]
    mse = result.get_signature_comparison_result("serving_default").output_tensors["y"]["mse"]
    y = np.asarray(convert_and_run(f32, data["serving_default"]))
    assert 0 < mse < 1e-3 * float(np.var(y))  # int8 noise, far below the logits' spread (measured 2.7e-5 of it)


def test_ai_edge_quantizer_quantizes_lowbits_float_file_by_signature(tmp_path: Path):
    from ai_edge_quantizer import quantizer, recipe

    f32, _, calib = _files(tmp_path)
    qt = quantizer.Quantizer(f32)
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    data = {"serving_default": [{"x": c[None].transpose(0, 2, 3, 1)} for c in calib]}
    quantized = qt.quantize(qt.calibrate(data)).quantized_model
    assert quantized is not None
    ref = np.asarray(convert_and_run(f32, data["serving_default"][:8]))
    got = np.asarray(convert_and_run(bytes(quantized), data["serving_default"][:8]))
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.99  # measured 0.9990


def convert_and_run(data: bytes, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Each feed through LiteRT's `serving_default` signature runner: output `y` (batch 1 each)."""
    import ai_edge_litert.interpreter as litert

    runner = litert.Interpreter(model_content=data).get_signature_runner("serving_default")
    ins, out = runner.get_input_details(), runner.get_output_details()["y"]
    ys = []
    for feed in feeds:
        native = {}
        for k, v in feed.items():  # ai-edge-quantizer's static file takes and gives int8
            s, z = ins[k]["quantization"]
            native[k] = np.clip(np.rint(v / s) + z, -128, 127).astype(ins[k]["dtype"]) if s else v
        y = runner(**native)["y"][0].astype(np.float32)
        s, z = out["quantization"]
        ys.append((y - z) * s if s else y)
    return ys


def test_ai_edge_quantizer_reads_files_with_an_if_and_an_unrolled_lstm(tmp_path: Path):
    """Subgraphs beside the main one (IF branches) and thousands of unrolled ops: its validator still runs both
    files by signature (measured output mse 1.1e-3 for the If model, 1.7e-5 for the LSTM one)."""
    from ai_edge_quantizer import model_validator

    from test_branches import _feeds, _switch_model
    from test_tflite_recurrent import _lstm_classifier

    r = np.random.default_rng(0)
    cases = [
        (_switch_model(), _feeds(16, 1, 16000) + _feeds(16, 2, 8000), "y"),
        (_lstm_classifier(), [r.normal(0, 1, (1, 3, 12)).astype(np.float32) for _ in range(16)], "logits"),
    ]
    for k, (model, calib, out) in enumerate(cases):
        q = tmp_path / f"q{k}.onnx"
        lowbit.quantize(model, q, calib=calib, progress=False)
        feeds = [
            {
                n: (v.transpose(0, 2, 3, 1) if np.ndim(v) == 4 else v)
                for n, v in (c.items() if isinstance(c, dict) else [("x", c)])
            }
            for c in calib[:4]
        ]
        result = model_validator.compare_model(
            convert(model).data, convert(q).data, {"serving_default": feeds}, validate_output_tensors_only=True
        )
        mse = result.get_signature_comparison_result("serving_default").output_tensors[out]["mse"]
        assert 0 < mse < 1e-2
