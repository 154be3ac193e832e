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
    assert summary["quantized"] and summary["ops"]["CONV_2D"] == 2 and summary["float_nodes"] == ["fc (Gemm)"]
    assert out.stat().st_size == summary["size_bytes"]
    # the quantizer leaves the classifier's Gemm output float: integer outputs need its range measured
    assert main(["export", str(q), "-o", str(tmp_path / "u.tflite"), "--io", "uint8"]) == 2
    assert "output y is float in the model" in capsys.readouterr().err
    np.save(tmp_path / "calib.npy", calib)
    assert (
        main(
            [
                "export",
                str(q),
                "-o",
                str(tmp_path / "u.tflite"),
                "--io",
                "uint8",
                "--calib",
                str(tmp_path / "calib.npy"),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["float_nodes"] == [] and "DEQUANTIZE" not in summary["ops"]
    out_detail = litert.Interpreter(model_path=str(tmp_path / "u.tflite")).get_output_details()[0]
    assert out_detail["dtype"] == np.uint8
    # float io with --calib: the classifier runs int8 too, float only at the edges
    f = tmp_path / "f.tflite"
    assert main(["export", str(q), "-o", str(f), "--calib", str(tmp_path / "calib.npy"), "--json"]) == 0
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
    got = _run(result.data, crops)
    onnx_int8 = run_all(session(q, "kernels"), batches)[0]
    assert top1_agreement(onnx_int8, got) >= 0.99
    assert cosine(onnx_int8, got) >= 0.999
    # full-integer: --calib gives the classifier's output a range, so its FULLY_CONNECTED runs int8 and one
    # DEQUANTIZE sits at the edge (measured on 128 eval crops: 64 -> 63 ops; top-1 vs the int8 ONNX 0.992,
    # cosine 0.99985; vs float 0.898, the int8 ONNX's own 0.891)
    full = export_tflite(q, tmp_path / "full.tflite", calib=photo_crops(64, "calib"))
    assert not full.float_nodes and full.ops["DEQUANTIZE"] == 1
    assert sum(full.ops.values()) < sum(result.ops.values())
    got_full = _run(full.data, crops)
    assert cosine(onnx_int8, got_full) >= 0.999
    # int8 logits can flip a near-tie: at most one of the 16 crops against float, compared with the int8 ONNX
    assert top1_agreement(ref, got_full) >= top1_agreement(ref, onnx_int8) - 1 / 16


def test_cli_precision_float16_and_dynamic(tmp_path: Path, capsys) -> None:
    from lowbit.cli.export_cmd import PRECISIONS
    from lowbit.export.tflite import PRECISIONS as LIB_PRECISIONS

    assert PRECISIONS == LIB_PRECISIONS
    path = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), str(path))
    sizes = {}
    for precision in ("float32", "float16", "dynamic"):
        out = tmp_path / f"{precision}.tflite"
        assert main(["export", str(path), "-o", str(out), "--precision", precision, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["precision"] == precision and summary["size_bytes"] == out.stat().st_size
        sizes[precision] = summary["size_bytes"]
    assert sizes["float16"] < sizes["float32"]
    assert main(["export", str(path), "-o", str(tmp_path / "h.tflite"), "--precision", "float16"]) == 0
    assert "(float16 weights, " in capsys.readouterr().out


def test_cli_shape_fixes_symbolic_sizes(tmp_path: Path, capsys) -> None:
    from test_tflite_transformer import tiny_encoder

    model = tiny_encoder()
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[1].dim_param = "sequence"
    path = tmp_path / "enc.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "enc.tflite"
    assert main(["export", str(path), "-o", str(out)]) == 2
    assert "pass --shape ids=1x..." in capsys.readouterr().err
    assert (
        main(
            ["export", str(path), "-o", str(out), "--shape", "ids=1x8", "--shape", "mask=1x8", "--precision", "dynamic"]
        )
        == 0
    )
    assert "dynamic-range" in capsys.readouterr().out and out.is_file()
    assert main(["export", str(path), "-o", str(out), "--shape", "ids=1xN"]) == 2
    assert "expected INPUT=SIZExSIZE" in capsys.readouterr().err
