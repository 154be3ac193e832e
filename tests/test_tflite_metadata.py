"""TFLite metadata for image models (issue 12): the input's normalization and color space, the classifier's labels
packed in the file, read back through the schema; LiteRT still loads the file and computes the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_cli, tiny_cnn
from lowbit.errors import LowbitError
from lowbit.export.tflite import ImageMetadata, export_tflite
from lowbit.export.tflite.metadata import AXIS_LABELS, IMAGE, RGB, read
from lowbit.runtimes.litert import LiteRTSession

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def _model(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(), path)
    return path


def test_metadata_reads_back_and_litert_runs_the_file_as_before(tmp_path: Path):
    model = _model(tmp_path)
    labels = [f"class {i}" for i in range(10)]
    plain, tagged = tmp_path / "plain.tflite", tmp_path / "tagged.tflite"
    export_tflite(model, plain)
    export_tflite(model, tagged, metadata=ImageMetadata(mean=MEAN, std=STD, labels=labels))
    meta = read(tagged.read_bytes())
    assert meta["name"] == "cnn" and meta["min_parser_version"] == "1.0.0"
    assert meta["content"] == IMAGE and meta["color_space"] == RGB
    np.testing.assert_allclose(meta["mean"], MEAN, rtol=1e-6)
    np.testing.assert_allclose(meta["std"], STD, rtol=1e-6)
    np.testing.assert_allclose(meta["stats"]["min"], [-m / s for m, s in zip(MEAN, STD)], rtol=1e-6)
    assert meta["outputs"] == [{"name": "y", "files": [{"name": "labels.txt", "type": AXIS_LABELS}]}]
    assert meta["files"] == {"labels.txt": "".join(f"{x}\n" for x in labels).encode()}
    x = np.random.default_rng(0).normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    a, b = (LiteRTSession(p, threads=1).run(None, {"input": x})[0] for p in (plain, tagged))
    np.testing.assert_array_equal(a, b)
    again = tmp_path / "again.tflite"
    export_tflite(model, again, metadata=ImageMetadata(mean=MEAN, std=STD, labels=labels))
    assert again.read_bytes() == tagged.read_bytes()  # deterministic, zip dates included


def test_a_file_without_metadata_says_so(tmp_path: Path):
    out = tmp_path / "plain.tflite"
    export_tflite(_model(tmp_path), out)
    with pytest.raises(LowbitError, match="^the model has no TFLITE_METADATA entry$"):
        read(out.read_bytes())


@pytest.mark.parametrize(
    "meta, message",
    [
        (ImageMetadata(labels=["a", "b"]), r"^--labels: 2 labels for an output of 10 classes; one label per line$"),
        (ImageMetadata(mean=(1.0, 2.0)), r"^--mean: 2 values for 3 input channels; give 1 or 3$"),
        (ImageMetadata(std=(0.0,)), r"^--std must be positive"),
    ],
)
def test_metadata_that_does_not_fit_the_model_is_a_one_line_error(tmp_path: Path, meta, message):
    with pytest.raises(LowbitError, match=message):
        export_tflite(_model(tmp_path), tmp_path / "m.tflite", metadata=meta)
    assert not (tmp_path / "m.tflite").exists()


def test_cli_labels_file_and_imagenet_normalization(tmp_path: Path):
    model = _model(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"name {i}\n" for i in range(10)) + "\n")  # a trailing blank line is not a label
    out = tmp_path / "m.tflite"
    run = run_cli("export", str(model), "-o", str(out), "--labels", str(labels))
    assert run.returncode == 0, run.stderr
    meta = read(out.read_bytes())
    np.testing.assert_allclose(meta["mean"], [0.485 * 255, 0.456 * 255, 0.406 * 255], rtol=1e-6)
    np.testing.assert_allclose(meta["std"], [0.229 * 255, 0.224 * 255, 0.225 * 255], rtol=1e-6)
    assert meta["files"]["labels.txt"].decode().splitlines() == [f"name {i}" for i in range(10)]
    bad = run_cli("export", str(model), "-o", str(out), "--labels", str(tmp_path / "missing.txt"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--labels" in bad.stderr
    assert "Traceback" not in bad.stderr
