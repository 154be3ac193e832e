"""`lowbit auto` on EfficientNet-Lite0: the 1-point budget holds on crops of photographs the search never saw."""

from __future__ import annotations

from pathlib import Path

import pytest

import lowbit


@pytest.mark.slow
def test_efficientnet_one_point_budget_holds_on_held_out_photos(tmp_path: Path, efficientnet_lite0: Path) -> None:
    from lowbit.evaluate.metrics import top1_agreement
    from lowbit.runtimes.ort import run_all, session
    from lowbit_zoo.zoo import photo_crops

    # calibration and the search's data: crops of the calibration photos (two seeds); held out: other photos
    calib, search, held_out = photo_crops(128, "calib"), photo_crops(128, "calib", seed=1), photo_crops(256, "eval")
    out = tmp_path / "lite0.auto.onnx"
    r = lowbit.auto_quantize(efficientnet_lite0, [calib], [search], out, max_drop=1.0, progress=False)
    assert r.met and r.score >= 99.0  # the budget, on the search's data
    assert any(p == "int8" for p in r.assignment.values())  # not simply the float model
    batches = [{"input": held_out[i : i + 32]} for i in range(0, len(held_out), 32)]
    ref = run_all(session(efficientnet_lite0), batches)[0]
    got = run_all(session(out, "kernels"), batches)[0]
    # the bar on held-out photos (integer kernels); the search saw none of them
    assert top1_agreement(ref, got) >= 0.95
