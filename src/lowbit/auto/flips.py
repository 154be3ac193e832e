"""Expected top-1 flips: the error measure the search ranks layers by when the metric counts top-1 answers.

The output-energy noise of a layer alone says little about top-1 agreement: what flips an answer is the error in
the gap between the float model's top two scores, on the samples where that gap is small. So for class scores each
layer's error alone is also kept per sample, as the change it makes to that gap, and an assignment's estimate is
the number of samples whose gap its errors are expected to close: errors of different layers taken as independent
and zero-mean (their variances add), P(flip) = Phi(-margin / sqrt(sum of squared gap errors)).
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
