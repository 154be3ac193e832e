"""Fidelity of a quantized model's outputs against a reference (usually the float model).

The generic measures (cosine, SQNR, max error) fit any output; the task measures below fit one kind of output
each (class scores, dense maps, CTC sequences, detector boxes). `outputs.py` decides which kind an output is.
"""

from __future__ import annotations

import numpy as np


def top1_agreement(ref: np.ndarray, out: np.ndarray) -> float:
    """Fraction of samples whose arg-max over the last axis is the same."""
    return float(np.mean(ref.reshape(len(ref), -1).argmax(1) == out.reshape(len(out), -1).argmax(1)))


def topk_agreement(ref: np.ndarray, out: np.ndarray, k: int = 5) -> float:
    """Fraction of samples whose reference top-1 class is among the output's top k ([N, C] scores)."""
    ref2, out2 = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    best = ref2.argmax(1)
    # the reference's class is in the top k when fewer than k classes score strictly higher than it
    mine = out2[np.arange(len(out2)), best]
    return float(np.mean((out2 > mine[:, None]).sum(1) < k))


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean per-sample cosine similarity. Samples that are zero on both sides (padding of sequences of different
    lengths, a masked position) agree but have no direction: they are left out, and all-zero on both sides is 1."""
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = out.reshape(len(out), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    seen = (na > 0) | (nb > 0)
    if not seen.any():
        return 1.0 if len(a) else float("nan")
    den = na[seen] * nb[seen]
    return float(np.mean(np.sum(a[seen] * b[seen], axis=1) / np.where(den > 0, den, 1.0)))


def vector_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean cosine similarity of the vectors along the last axis (one per sample, or per token)."""
    d = ref.shape[-1] if ref.ndim > 1 else 1
    return cosine(ref.reshape(-1, d), out.reshape(-1, d))


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    noise = np.sum((ref.astype(np.float64) - out) ** 2)
    signal = np.sum(ref.astype(np.float64) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """The generic measures, with top-1 over each sample's flattened values (`outputs.output_fidelity` knows
    when top-1 fits)."""
    return {
        "top1_agreement": top1_agreement(ref, out),
        "cosine": cosine(ref, out),
        "sqnr_db": sqnr_db(ref, out),
        "max_abs_error": float(np.max(np.abs(ref.astype(np.float64) - out))),
    }


def map_iou(ref: np.ndarray, out: np.ndarray, threshold: float = 0.5) -> float:
    """Intersection over union of the two maps thresholded at `threshold` (> threshold is "on"), over all
    samples and channels. Two empty maps agree: 1.0."""
    a, b = ref > threshold, out > threshold
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


def pixel_agreement(ref: np.ndarray, out: np.ndarray, axis: int = 1) -> float:
    """Fraction of positions whose arg-max over the class axis is the same (segmentation)."""
    return float(np.mean(ref.argmax(axis) == out.argmax(axis)))


def ctc_blank(scores: np.ndarray) -> int:
    """The blank class of [N, T, C] CTC scores: the one most often the arg-max. CTC outputs mark most steps blank
    (between and around characters), and exporters put it first or last, so no index is assumed."""
    counts = np.bincount(scores.argmax(-1).ravel(), minlength=scores.shape[-1])
    return int(counts.argmax())


def ctc_greedy_decode(scores: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of [N, T, C] scores: arg-max per step, repeats collapsed, the blank class dropped."""
    best = scores.argmax(-1)
    decoded = []
    for row in best.reshape(len(best), -1):
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        decoded.append(tuple(int(c) for c in row[keep] if c != blank))
    return decoded


def sequence_match(ref: np.ndarray, out: np.ndarray, blank: int = 0) -> float:
    """Fraction of samples whose greedy CTC decodings ([N, T, C] scores) are exactly the same sequence."""
    a, b = ctc_greedy_decode(ref, blank), ctc_greedy_decode(out, blank)
    return float(np.mean([x == y for x, y in zip(a, b)]))


def step_agreement(ref: np.ndarray, out: np.ndarray) -> float:
    """Fraction of time steps ([N, T, C]) whose arg-max class is the same."""
    return float(np.mean(ref.argmax(-1) == out.argmax(-1)))


def detection_agreement(
    ref: np.ndarray, out: np.ndarray, score_threshold: float = 0.25, box_values: int = 4
) -> dict[str, float | None]:
    """Detector outputs as [N, A, 4 + C] (anchors, box then class scores; scores already probabilities), or as
    [N, A, C] scores alone (`box_values` 0: a head writing boxes to another output).

    On the anchors whose best reference score exceeds `score_threshold`: how often the best class is the same
    ("class_agreement"; with one class, how many of the anchors either scores above it both do), and the mean
    box error relative to the box size ("box_error"), the size being the mean of the last two box values (width
    and height in YOLO's cx, cy, w, h). None when no anchor qualifies.
    """
    rs, os_ = ref[..., box_values:], out[..., box_values:]
    keep = rs.max(-1) > score_threshold
    if not keep.any():
        return {"class_agreement": None, "box_error": None, "anchors": 0}
    if rs.shape[-1] == 1:  # one class (a pose head's person score): agreement on which anchors are scored
        either = keep | (os_.max(-1) > score_threshold)
        agree = float(np.mean(keep[either] == (os_.max(-1) > score_threshold)[either]))
    else:
        agree = float(np.mean(rs[keep].argmax(-1) == os_[keep].argmax(-1)))
    if not box_values:
        return {"class_agreement": agree, "box_error": None, "anchors": int(keep.sum())}
    rb, ob = ref[..., :4][keep].astype(np.float64), out[..., :4][keep].astype(np.float64)
    size = np.maximum(np.abs(rb[:, 2:]).mean(1), 1e-6)
    err = float(np.mean(np.abs(ob - rb).mean(1) / size))
    return {"class_agreement": agree, "box_error": err, "anchors": int(keep.sum())}
