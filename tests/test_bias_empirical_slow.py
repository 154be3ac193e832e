"""Empirical bias correction end to end on a real model: EfficientNet-Lite0 on photo crops (64 calibration, 256
held out), ONNX Runtime's integer kernels. Measured 2026-12-06 (bench/calibration_methods.py --empirical-bias):
default 92.6% top-1 agreement, cosine 0.9940; with the correction 93.8%, 0.9950."""

from __future__ import annotations

from pathlib import Path

import pytest

import lowbit
from lowbit.evaluate.metrics import fidelity
from lowbit.runtimes.ort import run_all, session

pytestmark = pytest.mark.slow


def test_efficientnet_lite0_keeps_its_agreement_and_gains_cosine(efficientnet_lite0: Path) -> None:
    from lowbit_zoo.zoo import photo_crops

    calib, held = photo_crops(64, "calib"), photo_crops(256, "eval")
    batches = [{"input": held[i : i + 32]} for i in range(0, len(held), 32)]
    ref = run_all(session(str(efficientnet_lite0), "kernels"), batches)[0]

    def measured(recipe: lowbit.Recipe) -> tuple[dict[str, float], lowbit.QuantizeResult]:
        result = lowbit.quantize(str(efficientnet_lite0), calib=calib, recipe=recipe, progress=False)
        return fidelity(ref, run_all(session(result.model, "kernels"), batches)[0]), result

    base, _ = measured(lowbit.Recipe())
    got, result = measured(lowbit.Recipe(empirical_bias_correction=True))
    assert len(result.plan.bias_shifts) == 50  # every Conv and the classifier Gemm
    assert got["top1_agreement"] >= 0.92 and got["top1_agreement"] >= base["top1_agreement"] - 2 / 256
    assert got["cosine"] > base["cosine"]
