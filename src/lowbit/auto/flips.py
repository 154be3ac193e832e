"""Expected top-1 flips: the error measure the search ranks layers by when the metric counts top-1 answers.

The output-energy noise of a layer alone says little about top-1 agreement: what flips an answer is the error in
the gap between the float model's top two scores, on the samples where that gap is small. So for class scores each
layer's error alone is also kept per sample, as the change it makes to that gap, and an assignment's estimate is
the number of samples whose gap its errors are expected to close: errors of different layers taken as independent
and zero-mean (their variances add), P(flip) = Phi(-margin / sqrt(sum of squared gap errors)).

For a model already measured, `expected_lost` reads from its whole outputs how many answers it is expected to lose
on new samples like these: what `auto` reports beside the count its budget is held to.
"""

from __future__ import annotations

import math

import numpy as np

from .assign import Layer, Precision


def top_two(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, margin) of each sample's float scores: the two top classes and the gap between them."""
    scores = ref.reshape(len(ref), -1).astype(np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    rows = np.arange(len(scores))
    first, second = order[:, 0], order[:, 1]
    return first, second, scores[rows, first] - scores[rows, second]


def gap_error(ref: np.ndarray, out: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per sample: how much `out` changed the float top-two gap (negative: closer to a flip)."""
    d = out.reshape(len(out), -1).astype(np.float64) - ref.reshape(len(ref), -1).astype(np.float64)
    rows = np.arange(len(d))
    return d[rows, first] - d[rows, second]


RANKS = 16  # each sample's top classes whose order an error may change
ERROR_DRAWS = 1024  # errors each sample is paired with, at most (evenly spaced): the cost stays n x 1024 x RANKS


def expected_lost(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> float:
    """How many of these samples' answers a model with `out`'s errors is expected to lose, chance aside: top-1
    answers that are no longer float's, or with `labels`, right answers lost less wrong ones put right.

    The count depends on which sample drew which error: the fastest of many models passing the same count is the
    one whose errors happened to miss the close calls, and it loses more on new samples than on these. Here each
    sample's float top scores meet every sample's errors on its own top scores (rank by rank, each in its own
    sample's unit: the std of its float scores), and the outcomes are averaged: no draw decides it, so choosing a
    model by its count leaves this nearly unbiased. Measured (bench/RESULTS_AUTO.md, eleventh round): ten
    EfficientNet-Lite0 models (`auto`'s, NNCF's) whose counts on 128 search crops read 0.8-3.1 points lost are
    expected here to lose 2.4-4.6 and lost 1.9-4.2% of 1024 held-out crops (mean gap 0.55 points; the count's 2.0);
    on untrained MobileNetV3s, whose flat scores flip a third of the answers, within 10% (bench/expected_drop.py)."""
    n = len(ref)
    scores = ref.reshape(n, -1).astype(np.float64)
    errors = out.reshape(n, -1).astype(np.float64) - scores
    unit = scores.std(axis=1, keepdims=True)
    unit[unit == 0] = 1.0
    order = np.argsort(-scores, axis=1, kind="stable")[:, :RANKS]
    top = np.take_along_axis(scores, order, axis=1) / unit
    moved = np.take_along_axis(errors, order, axis=1) / unit
    draws = moved[np.unique(np.linspace(0, n - 1, min(n, ERROR_DRAWS)).round().astype(int))]
    right = None  # with labels: the label's place in each sample's float order (-1: below the top ranks kept)
    if labels is not None:
        k = order.shape[1]
        at = np.where(order == np.asarray(labels).reshape(n, 1), np.arange(k), k).min(axis=1)
        right = np.where(at < k, at, -1)
    lost = 0.0
    for i in range(0, n, 64):  # 64 x draws x RANKS at a time
        first = (top[i : i + 64, None, :] + draws[None]).argmax(axis=2)  # each pairing's answer, as a float rank
        if right is None:
            lost += float(np.sum(np.mean(first != 0, axis=1)))
        else:
            now = np.mean(first == right[i : i + 64, None], axis=1)
            lost += float(np.sum((right[i : i + 64] == 0) - now))
    return lost


def fragile(ref: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n samples with the smallest float top-two gap (the answers that can flip), in order."""
    return np.sort(np.argsort(top_two(ref)[2], kind="stable")[:n])


_erfc = np.vectorize(math.erfc)


class Flips:
    """Expected flips of an assignment from each layer's per-sample gap errors alone."""

    def __init__(self, layers: list[Layer], margin: np.ndarray, errors: dict[str, dict[str, np.ndarray]]) -> None:
        self.layers = layers
        self.margin = np.maximum(margin, 0.0)
        # squared gap errors; float (and anything not measured) adds none
        self.var = {n: {p: np.square(e) for p, e in row.items()} for n, row in errors.items()}

    def only(self, rows: list[int]) -> Flips:
        """The same estimate over the samples at `rows` alone (the answers a measured model got wrong)."""
        part = Flips(self.layers, self.margin[rows], {})
        part.var = {n: {p: v[rows] for p, v in row.items()} for n, row in self.var.items()}
        return part

    def __call__(self, assignment: dict[str, Precision]) -> float:
        zero = np.zeros_like(self.margin)
        var = sum((self.var[x.node].get(assignment[x.node], zero) for x in self.layers), zero)
        with np.errstate(divide="ignore"):
            z = np.where(var > 0, self.margin / np.sqrt(var), np.inf)
        return float(np.sum(0.5 * _erfc(z / math.sqrt(2.0))))
