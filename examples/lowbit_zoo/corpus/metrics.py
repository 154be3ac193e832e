"""Task metrics for the corpus: how much of each output's *use* survives quantization (numpy only).

Every metric compares a reference output (float) with a candidate (quantized), sample by sample, and returns a
fraction in [0, 1] (1 = the task sees no difference), except `cosine` which is the mean cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top1_agreement(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], axis: int = -1) -> float:
    """Class scores: the fraction of score vectors (along `axis`) whose argmax is the same."""
    same = [np.argmax(r, axis=axis) == np.argmax(g, axis=axis) for r, g in zip(ref, got)]
    return float(np.mean(np.concatenate([s.ravel() for s in same])))


def map_iou(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], threshold: float) -> float:
    """Dense maps: mean IoU of the maps thresholded at `threshold` (two empty maps agree fully: IoU 1)."""
    ious = []
    for r, g in zip(ref, got):
        a, b = r > threshold, g > threshold
        union = np.logical_or(a, b).sum()
        ious.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
    return float(np.mean(ious))


def box_class_agreement(
    ref: Sequence[np.ndarray], got: Sequence[np.ndarray], n_box: int = 4, min_score: float = 0.25
) -> float:
    """YOLO-style [B, 4 + classes, anchors]: over the anchors whose float top score exceeds `min_score`, the
    fraction whose top class is the same (1 when no anchor qualifies anywhere: nothing to disagree on)."""
    hits, total = 0, 0
    for r, g in zip(ref, got):
        rs, gs = r[:, n_box:, :], g[:, n_box:, :]
        keep = rs.max(axis=1) > min_score
        hits += int((rs.argmax(axis=1) == gs.argmax(axis=1))[keep].sum())
        total += int(keep.sum())
    return 1.0 if total == 0 else hits / total


def ctc_greedy(logits: np.ndarray, blank: int, time_axis: int = 0, class_axis: int = -1) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of a [T, B, C] (or other axis order) array: collapse repeats, drop blanks."""
    best = np.moveaxis(np.argmax(logits, axis=class_axis), time_axis, -1)  # [B, T]
    out = []
    for row in best.reshape(-1, best.shape[-1]):
        seq, prev = [], -1
        for k in row.tolist():
            if k != prev and k != blank:
                seq.append(k)
            prev = k
        out.append(tuple(seq))
    return out


def ctc_exact_match(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], blank: int, time_axis: int = 0) -> float:
    """Sequences: the fraction of greedy-decoded strings that are exactly equal."""
    same = []
    for r, g in zip(ref, got):
        same += [a == b for a, b in zip(ctc_greedy(r, blank, time_axis), ctc_greedy(g, blank, time_axis))]
    return float(np.mean(same))


def cosine(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """Embeddings and states: mean cosine similarity of each sample's flattened output (zero vs zero is 1)."""
    sims = []
    for r, g in zip(ref, got):
        a, b = np.asarray(r, np.float64).ravel(), np.asarray(g, np.float64).ravel()
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na == 0 and nb == 0:
            sims.append(1.0)
        elif na == 0 or nb == 0:
            sims.append(0.0)
        else:
            sims.append(float(a @ b / (na * nb)))
    return float(np.mean(sims))
