"""`lowbit export --to tflite --labels ... --image-metadata` end to end on a real image model (EfficientNet-Lite0,
lowbit's static int8): the metadata reads back, it describes the preprocessing the model was quantized with, and
LiteRT runs the file with the same outputs as the file without metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lowbit
from conftest import run_cli
from lowbit.export.tflite.metadata import AXIS_LABELS, IMAGE, RGB, read
from lowbit.runtimes.litert import LiteRTSession
from lowbit.runtimes.ort import session
from lowbit_zoo.zoo import IMAGENET_MEAN, IMAGENET_STD, photo_crops, photo_crops_uint8

pytestmark = pytest.mark.slow


def test_cli_metadata_on_efficientnet_lite0(tmp_path: Path, efficientnet_lite0: Path) -> None:
    q = tmp_path / "effl0.int8.onnx"
    lowbit.quantize(str(efficientnet_lite0), q, calib=photo_crops(16, "calib"), progress=False)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(1000)))
    plain, tagged = tmp_path / "plain.tflite", tmp_path / "tagged.tflite"
    mean, std = (str(v) for v in IMAGENET_MEAN), (str(v) for v in IMAGENET_STD)
    run = run_cli("export", str(q), "-o", str(tagged), "--to", "tflite", "--labels", str(labels),
                  "--image-metadata", "--mean", *mean, "--std", *std)  # fmt: skip
    assert run.returncode == 0, run.stderr
    run = run_cli("export", str(q), "-o", str(plain), "--to", "tflite")
    assert run.returncode == 0, run.stderr

    meta = read(tagged.read_bytes())
    assert meta["content"] == IMAGE and meta["color_space"] == RGB
    assert meta["files"]["labels.txt"].decode().splitlines() == [f"class {i}" for i in range(1000)]
    assert meta["outputs"][0]["files"] == [{"name": "labels.txt", "type": AXIS_LABELS}]
    # what a Task Library / MediaPipe client computes from the metadata, (pixel - mean) / std, is the model's input
    pixels = photo_crops_uint8(8, "eval").astype(np.float32)
    fed = (pixels - np.asarray(meta["mean"], np.float32)) / np.asarray(meta["std"], np.float32)
    x = photo_crops(8, "eval")
    np.testing.assert_allclose(fed.transpose(0, 3, 1, 2), x, atol=1e-5)

    a, b = (LiteRTSession(p, threads=1) for p in (plain, tagged))
    y_plain = np.concatenate([a.run(None, {"input": xi[None]})[0] for xi in x])
    y_tagged = np.concatenate([b.run(None, {"input": xi[None]})[0] for xi in x])
    np.testing.assert_array_equal(y_plain, y_tagged)
    y_onnx = session(str(q)).run(None, {"input": x})[0]
    assert np.mean(y_tagged.argmax(1) == y_onnx.argmax(1)) >= 7 / 8  # 128 of 128 in bench/RESULTS_LITERT.md
