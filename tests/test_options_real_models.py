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


def test_onnxruntime_target_keeps_the_stem_float_and_more_answers_on_efficientnet_lite0(
    efficientnet_lite0: Path,
) -> None:
    """The README's tour: on the demo's 128 calibration and 256 held-out crops, `--target onnxruntime` (image stem
    float) keeps more of the float model's answers than the default (measured 97.7% against 92.2%), with the stem
    and only the stem's neighbours float."""
    from lowbit.evaluate.metrics import fidelity
    from lowbit.runtimes.ort import run_all, session
    from lowbit_zoo.zoo import photo_crops

    calib, held = photo_crops(128, "calib"), photo_crops(256, "eval")
    batches = [{"input": held[i : i + 32]} for i in range(0, len(held), 32)]
    ref = run_all(session(efficientnet_lite0), batches)[0]
    top1 = {}
    for target in ("portable", "onnxruntime"):
        res = lowbit.quantize(str(efficientnet_lite0), calib=calib, recipe=lowbit.Recipe(target=target), progress=False)
        top1[target] = fidelity(ref, run_all(session(res.model, "kernels"), batches)[0])["top1_agreement"]
        if target == "onnxruntime":
            kept = sorted(n for n, d in res.plan.nodes.items() if d.code.value == "image_stem")
            assert kept and all("_conv_stem" in n or "_blocks.0" in n or n == "/_swish/Clip" for n in kept), kept
    assert top1["onnxruntime"] >= 0.95 and top1["onnxruntime"] > top1["portable"] >= 0.90, top1
