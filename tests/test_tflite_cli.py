"""`lowbit export --to tflite`, and EfficientNet-Lite0 float32 and int8 in LiteRT against ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lowbit
from conftest import tiny_cnn
from lowbit.cli.main import main


def _run(data: bytes, x: np.ndarray) -> np.ndarray:
    it = litert.Interpreter(model_content=data, num_threads=1)
    inp = it.get_input_details()[0]
    outs = []
    it.allocate_tensors()
    for xi in x:  # the file is batch 1
        it.set_tensor(inp["index"], xi[None].transpose(0, 2, 3, 1))
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]).copy())
    return np.concatenate(outs)


def test_cli_exports_int8_and_prints_summary(tmp_path: Path, capsys) -> None:
    q = tmp_path / "q.onnx"
    calib = np.random.default_rng(1).normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
    lowbit.quantize(tiny_cnn(), q, calib=calib, progress=False)
    out = tmp_path / "q.tflite"
    assert main(["export", str(q), "--to", "tflite", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # full-integer by default: the plan beside q records the classifier output's range, one DEQUANTIZE at the edge
    assert summary["quantized"] and summary["ops"]["CONV_2D"] == 2 and summary["float_nodes"] == []
    assert summary["ops"]["DEQUANTIZE"] == 1 and summary["io"] == "float"
    assert out.stat().st_size == summary["size_bytes"]
    # --float-outputs keeps the classifier float, as the int8 ONNX runs it; not with integer outputs
    assert main(["export", str(q), "-o", str(tmp_path / "k.tflite"), "--float-outputs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["float_nodes"] == ["fc (Gemm)"]
    assert main(["export", str(q), "-o", str(tmp_path / "k.tflite"), "--float-outputs", "--io", "int8"]) == 2
    assert "drop --float-outputs" in capsys.readouterr().err
    # integer outputs need no data either
    assert main(["export", str(q), "-o", str(tmp_path / "u.tflite"), "--io", "uint8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["float_nodes"] == [] and "DEQUANTIZE" not in summary["ops"]
    out_detail = litert.Interpreter(model_path=str(tmp_path / "u.tflite")).get_output_details()[0]
    assert out_detail["dtype"] == np.uint8
    # a plan from before output ranges: the classifier stays float, and integer outputs need --calib
    plan_file = q.with_name("q.plan.json")
    plan = json.loads(plan_file.read_text())
    del plan["output_ranges"]
    plan_file.write_text(json.dumps(plan))
    assert main(["export", str(q), "-o", str(tmp_path / "old.tflite"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["float_nodes"] == ["fc (Gemm)"]
    assert main(["export", str(q), "-o", str(tmp_path / "u2.tflite"), "--io", "uint8"]) == 2
    assert "output y is float in the model and no plan beside it records its range" in capsys.readouterr().err
    np.save(tmp_path / "calib.npy", calib)
    calib_args = ["--calib", str(tmp_path / "calib.npy"), "--json"]
    assert main(["export", str(q), "-o", str(tmp_path / "u2.tflite"), "--io", "uint8", *calib_args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["float_nodes"] == [] and "DEQUANTIZE" not in summary["ops"]
    # float io with --calib: the classifier runs int8 too, float only at the edges
    f = tmp_path / "f.tflite"
    assert main(["export", str(q), "-o", str(f), *calib_args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["float_nodes"] == [] and summary["ops"]["DEQUANTIZE"] == 1 and summary["io"] == "float"
    assert litert.Interpreter(model_path=str(f)).get_output_details()[0]["dtype"] == np.float32


def test_cli_user_mistakes_are_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), str(path))
    assert main(["export", str(path), "-o", str(path)]) == 2
    assert main(["export", str(path), "-o", str(tmp_path / "m.tflite"), "--io", "int8"]) == 2
    graph = helper.make_graph(
        [helper.make_node("Erf", ["x"], ["y"], name="erf1")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    bad = tmp_path / "erf.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(bad))
    assert main(["export", str(bad), "-o", str(tmp_path / "erf.tflite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("lowbit: error: ") for line in err)
    assert "is the input model" in err[0] and "needs a quantized" in err[1] and "node erf1 (Erf)" in err[2]
    assert not list(tmp_path.glob("*.tflite"))


@pytest.mark.slow
def test_efficientnet_lite0_float_and_int8_in_litert(tmp_path: Path, efficientnet_lite0: Path) -> None:
    from lowbit.evaluate.metrics import cosine, top1_agreement
    from lowbit.export.tflite import export_tflite
    from lowbit.runtimes.ort import run_all, session
    from lowbit_zoo.zoo import photo_crops

    float_path = efficientnet_lite0
    crops = photo_crops(16, "eval")
    batches = [{"input": crops[i : i + 8]} for i in range(0, len(crops), 8)]
    ref = run_all(session(float_path), batches)[0]
    f32_data = export_tflite(float_path, tmp_path / "f.tflite").data
    f32 = _run(f32_data, crops[:4])
    assert np.abs(f32 - ref[:4]).max() <= 1e-4 * np.abs(ref[:4]).max()
    # float16 weights: half the file, same answers (measured: 9.29 vs 18.54 MB, max error 0.5% of the top logit)
    f16 = export_tflite(float_path, tmp_path / "h.tflite", precision="float16")
    assert len(f16.data) < 0.52 * len(f32_data)
    y16 = _run(f16.data, crops[:4])
    assert np.abs(y16 - ref[:4]).max() <= 1e-2 * np.abs(ref[:4]).max() and cosine(ref[:4], y16) > 0.9999

    q = tmp_path / "q.onnx"
    lowbit.quantize(float_path, q, calib=photo_crops(64, "calib"), progress=False)
    result = export_tflite(q, tmp_path / "q.tflite")
    assert result.transposes == [] and result.ops["CONV_2D"] + result.ops["DEPTHWISE_CONV_2D"] == 49
    # full-integer by default (the plan records the logits' range): FULLY_CONNECTED runs int8, one DEQUANTIZE
    assert not result.float_nodes and result.ops["DEQUANTIZE"] == 1 and result.ops["QUANTIZE"] == 1
    got = _run(result.data, crops)
    onnx_int8 = run_all(session(q, "kernels"), batches)[0]
    assert cosine(onnx_int8, got) >= 0.999
    # The int8 ONNX keeps its last Gemm's output float; int8 logits (one step = 1/255 of their range) can tie two
    # classes that differ by less than a step (measured on 128 crops: 1 tie, top-1 0.992 vs the int8 ONNX, and
    # vs float 0.883, the int8 ONNX's own 0.875). So: at most one crop of 16 flipped, in either comparison.
    assert top1_agreement(onnx_int8, got) >= 1 - 1 / 16
    assert top1_agreement(ref, got) >= top1_agreement(ref, onnx_int8) - 1 / 16
    # --calib measures the range on the int8 model instead of the plan's: still full-integer
    full = export_tflite(q, tmp_path / "full.tflite", calib=photo_crops(64, "calib"))
    assert not full.float_nodes and full.ops == result.ops
    assert cosine(onnx_int8, _run(full.data, crops)) >= 0.999
