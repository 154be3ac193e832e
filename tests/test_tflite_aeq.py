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
