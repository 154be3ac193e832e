"""The captcha CRNN (captcha-whisperer 0.1.0, fetched with pip like bench/recognizers.py): static int8 keeps
ONNX Runtime's integer kernels with the float simulation and keeps most CTC strings. Fails if pip cannot fetch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import lowbit
from lowbit.evaluate.kernel_gap import locate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from recognizers import ctc_greedy, fetch_captcha_model, render, run  # noqa: E402


@pytest.mark.slow
def test_captcha_crnn_kernels_agree_and_strings_survive(tmp_path: Path) -> None:
    float_path = fetch_captcha_model(tmp_path)
    calib, images = render(16, seed=1), render(48, seed=2)
    q = lowbit.quantize(str(float_path), calib=[{"image": c[None]} for c in calib], progress=False).model
    gap = locate(q, [{"image": images[i : i + 8]} for i in range(0, 16, 8)])
    assert gap["output_cosine"] >= 0.999 and gap["first"] is None and not gap["exposure_changed_kernels"]
    ref, got = ctc_greedy(run(str(float_path), images)), ctc_greedy(run(q, images))
    assert float(np.mean([a == b for a, b in zip(ref, got)])) >= 0.85
