"""Whole models in LiteRT: the benchmark's MobileNetV2-style CNN, full-integer int8, against lowbit's int8 ONNX."""

from __future__ import annotations

import sys
from pathlib import Path

import ai_edge_litert.interpreter as litert
import numpy as np
import pytest

import lowbit

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(data: bytes, x: np.ndarray) -> np.ndarray:
    """Batch-1 file, one NHWC image at a time; integer outputs dequantized."""
    it = litert.Interpreter(model_content=data, num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    ys = []
    for xi in x:
        feed = xi[None].transpose(0, 2, 3, 1)
        if inp["dtype"] != np.float32:
            s, z = inp["quantization"]
            feed = np.clip(np.round(feed / s) + z, -128, 127).astype(inp["dtype"])
        it.set_tensor(inp["index"], feed)
        it.invoke()
        y = it.get_tensor(out["index"]).astype(np.float32)
        if out["dtype"] != np.float32:
            s, z = out["quantization"]
            y = (y - z) * s
        ys.append(y)
    return np.concatenate(ys)


@pytest.mark.slow
def test_mobilenet_v2_full_integer_agrees_with_int8_onnx(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    from lowbit.evaluate.metrics import cosine, top1_agreement
    from lowbit.export.tflite import convert
    from lowbit.runtimes.ort import run_all, session
    from lowbit_zoo.zoo import photo_crops
    from models import mobilenet_v2_onnx

    calib = photo_crops(32, "calib")
    path, _ = mobilenet_v2_onnx(tmp_path / "mnv2.onnx", calib)
    q = tmp_path / "mnv2_q.onnx"
    lowbit.quantize(path, q, calib=calib, progress=False)
    crops = photo_crops(32, "eval")
    onnx_int8 = run_all(session(q, "kernels"), [{"input": crops[i : i + 8]} for i in range(0, len(crops), 8)])[0]
    import onnx

    plain = convert(onnx.load(str(q)))  # a model without its plan: no output range known, the classifier stays float
    assert plain.float_nodes == ["/classifier/Gemm (Gemm)"]
    got = _run(plain.data, crops)
    assert top1_agreement(onnx_int8, got) >= 0.99 and cosine(onnx_int8, got) >= 0.999  # measured 1.0, 0.99999
    result = convert(q)  # full-integer by default: the plan beside q records the logits' range
    assert result.transposes == [] and not result.float_nodes and result.ops["DEQUANTIZE"] == 1
    got = _run(result.data, crops)
    # int8 logits: ties within one output step flip top-1
    assert top1_agreement(onnx_int8, got) >= 0.85 and cosine(onnx_int8, got) >= 0.999
    # --float-outputs: the plan's output range is there, and the classifier stays float as the int8 ONNX runs it
    kept = convert(q, float_outputs=True)
    assert kept.float_nodes == ["/classifier/Gemm (Gemm)"]
    got = _run(kept.data, crops)
    assert top1_agreement(onnx_int8, got) >= 0.99 and cosine(onnx_int8, got) >= 0.999
    # integer io: the float classifier output gets int8 parameters measured on the calibration crops
    result = convert(q, io="int8", calib=calib)
    assert not result.float_nodes and "DEQUANTIZE" not in result.ops
    got = _run(result.data, crops)
    # int8 logits: ties within one output step flip top-1 (measured 0.9375 agreement, cosine 0.99993 on 64 crops)
    assert top1_agreement(onnx_int8, got) >= 0.85 and cosine(onnx_int8, got) >= 0.999
