"""Patterns from the fourth sweep (models built with PyTorch's exporters from torchvision, timm, ultralytics and
transformers, as users bring them). Each test reproduces one pattern on a small graph or array and fails without
its fix."""

from __future__ import annotations

import numpy as np

from lowbit.evaluate.outputs import classify, output_fidelity


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def test_an_ssd_heads_softmax_scores_are_a_detectors_not_a_ctc_sequence() -> None:
    # torchvision's SSDLite exported without its postprocess: scores [N, 3234, 91], a softmax over background + 90
    # classes per anchor. Read as CTC probabilities, the check reported "decoded sequence match 0.0%" at cosine 0.9994.
    r = np.random.default_rng(0)
    logits = r.normal(0, 1, (4, 1500, 21))
    logits[..., 0] += 3.0  # background wins on most anchors, as in a trained SSD
    logits[:, :40, 7] += 6.0  # a few anchors see an object
    scores = _softmax(logits, 2).astype(np.float32)
    got = classify(scores, "output_1")
    assert (got.kind, got.variant) == ("boxes", "scores_anchors_first"), got
    assert classify(scores[:, :300], "scores").kind == "boxes"  # fewer anchors, named like a detector's scores
    assert classify(scores[:, :300], "output").kind == "sequence"  # the same, unnamed: CTC steps stay CTC
    assert classify(scores, "ctc_probs").kind == "sequence"  # a sequence's name keeps it a sequence
    noisy = scores + r.normal(0, 1e-3, scores.shape).astype(np.float32)
    f = output_fidelity(scores, noisy, "output_1")
    assert f["task"]["metric"] == "class_agreement" and f["task"]["value"] > 0.9
