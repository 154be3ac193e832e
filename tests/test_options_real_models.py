"""This session's quantize options on real models: Ray workers on EfficientNet-Lite0, subnormal flushing on the
corpus EEG model whose weights are ~20% subnormal (brainmaze-eeg-models, `make corpus`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import lowbit
from lowbit.evaluate.evaluate import evaluate

pytestmark = pytest.mark.slow


def test_workers_give_the_same_model_and_eval_on_efficientnet_lite0(efficientnet_lite0: Path, tmp_path: Path) -> None:
    from lowbit_zoo.zoo import photo_crops

    calib, held = tmp_path / "calib.npy", tmp_path / "eval.npy"
    np.save(calib, photo_crops(64, "calib", 0))
    np.save(held, photo_crops(32, "eval", 0))
    recipe = lowbit.Recipe(calibration_samples=64)
    one = lowbit.quantize(
        str(efficientnet_lite0), tmp_path / "one.onnx", calib=str(calib), recipe=recipe, progress=False
    )
    two = lowbit.quantize(
        str(efficientnet_lite0), tmp_path / "two.onnx", calib=str(calib), recipe=recipe, progress=False, workers=2
    )
    assert one.model.SerializeToString() == two.model.SerializeToString()
    kw = {"reference": str(efficientnet_lite0), "progress": False, "batch_size": 8}
    a = evaluate(str(tmp_path / "one.onnx"), str(held), **kw)
    b = evaluate(str(tmp_path / "two.onnx"), str(held), workers=2, **kw)
    assert {**a.to_dict(), "model": None} == {**b.to_dict(), "model": None}  # the paths differ, nothing else
    assert a.outputs is not None and a.outputs["logits"]["top1_agreement"] >= 0.8


def test_flush_subnormals_on_an_eeg_model_with_subnormal_weights() -> None:
    from lowbit_zoo.corpus.registry import BY_NAME
    from lowbit_zoo.corpus.wheels import ROOT

    entry = BY_NAME["seizure_modelB"]
    model = entry.get(ROOT)
    calib, held = entry.calib(model, 8), entry.eval(model, 8)
    kept = lowbit.quantize(str(model), calib=calib, progress=False)
    assert any("subnormal" in w for w in kept.warnings)
    flushed = lowbit.quantize(str(model), calib=calib, progress=False, recipe=lowbit.Recipe(flush_subnormals=True))
    assert not any("subnormal" in w for w in flushed.warnings)
    run = lambda m: [  # noqa: E731
        ort.InferenceSession(m.SerializeToString()).run(None, f)[0] for f in held
    ]
    for a, b in zip(run(kept.model), run(flushed.model)):
        np.testing.assert_allclose(a, b, atol=1e-5)
