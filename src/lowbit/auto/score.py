"""The metric `lowbit auto` holds to its budget, on the evaluation data, with ONNX Runtime's integer kernels.

Scores are in points: a fraction (top-1 agreement, cosine, accuracy, the output kind's headline measure) times 100.
The reference is what the float model scores: 100 for agreement or cosine with itself, its own accuracy with
labels. The budget `max_drop` is in the same points: with agreement, a 1-point budget asks for >= 99% of the
evaluation samples to keep the float model's top-1 answer.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import onnx

from ..errors import LowbitError
from ..evaluate.outputs import output_fidelity, resolve
from ..runtimes.ort import run_all, session
from .flips import expected_lost
from .sensitivity import noise_fraction, noise_per_sample

Metric = Literal["auto", "top1", "cosine", "accuracy"]
METRICS: tuple[str, ...] = ("auto", "top1", "cosine", "accuracy")
# Headline measures that are fractions (higher is better), so "points" mean something; others fall back to cosine.
_FRACTIONS = ("top1_agreement", "cosine", "pixel_agreement", "map_iou", "sequence_match", "class_agreement")

Batches = list[dict[str, np.ndarray]]


class Scorer:
    """Scores models on fixed evaluation batches against the float model's outputs (or labels)."""

    def __init__(
        self, float_model: onnx.ModelProto, batches: Batches, metric: str, labels: np.ndarray | None = None
    ) -> None:
        if metric not in METRICS:
            raise LowbitError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if metric == "accuracy" and labels is None:
            raise LowbitError("--metric accuracy needs --labels FILE (one integer class per evaluation sample)")
        if labels is not None and metric not in ("auto", "accuracy"):
            raise LowbitError(f"--labels measures accuracy, not {metric}: drop --metric or use --metric accuracy")
        self.batches = batches
        self.labels = labels
        self.refs = run_all(session(float_model, "kernels"), batches)
        self.names = [o.name for o in float_model.graph.output]
        first = self.refs[0]
        if labels is not None:
            if first.ndim < 2 or int(np.prod(first.shape[1:])) != first.shape[-1]:
                raise LowbitError(
                    f"output '{self.names[0]}' has shape {list(first.shape)}; accuracy needs (N, classes) scores"
                )
            if len(labels) != len(first):
                raise LowbitError(
                    f"the labels number {len(labels)} but the evaluation data has {len(first)} samples; "
                    "give exactly one label per sample"
                )
            if labels.min() < 0 or labels.max() >= first.shape[-1]:
                raise LowbitError(f"labels must be class indices in 0..{first.shape[-1] - 1}")
            self.metric, self.label = "accuracy", "top-1 accuracy"
        else:
            self.kind = resolve(first, self.names[0])
            head = output_fidelity(first, first, self.names[0], self.kind)["task"]
            if metric == "top1":
                if self.kind.kind != "class_scores":
                    raise LowbitError(
                        f"output '{self.names[0]}' is {self.kind.kind}, not class scores: top-1 agreement does not "
                        "fit it; use --metric cosine or auto"
                    )
                self.metric, self.label = "top1_agreement", "top-1 agreement with float"
            elif metric == "cosine" or head["metric"] not in _FRACTIONS:
                self.metric, self.label = "cosine", "cosine with float"
            else:
                self.metric, self.label = head["metric"], f"{head['label']} (vs float)"
        self.reference = self._points(self.refs)
        self.last_wrong: frozenset[int] = frozenset()
        self.last_noise = 0.0
        self.last_noise_rows = np.zeros(0)
        self.last_expected: float | None = None

    @property
    def samples(self) -> int:
        return len(self.refs[0])

    @property
    def counted(self) -> bool:
        """Is the metric a count of answers, one per sample (top-1 agreement, accuracy)?"""
        return self.metric in ("top1_agreement", "accuracy")

    def interval(self, points: float) -> tuple[float, float] | None:
        """The 95% Wilson score interval, in points, of a count (top-1 agreement or accuracy: one answer per
        sample) measured on these samples; None for other metrics. It holds for one model measured once: the
        fastest of many models passing the same count tends to lose more on other data than its count says."""
        if not self.counted:
            return None
        n, p, z = self.samples, points / 100.0, 1.959964
        mid = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return 100.0 * max(0.0, mid - half), 100.0 * min(1.0, mid + half)

    def _points(self, outs: list[np.ndarray]) -> float:
        if self.labels is not None:
            return 100.0 * float(np.mean(outs[0].reshape(len(outs[0]), -1).argmax(1) == self.labels))
        value = output_fidelity(self.refs[0], outs[0], self.names[0], self.kind)[self.metric]
        return 100.0 * float(value if value is not None else 0.0)

    def score(self, model: onnx.ModelProto) -> float:
        """The model's points with integer kernels (what ships), on every evaluation sample. Keeps in `last_wrong`
        the samples whose top-1 answer differs from the float model's (class scores; empty otherwise), and in
        `last_noise` its output noise against float's outputs (sensitivity.noise_fraction), a finer measure, and
        in `last_noise_rows` the same per sample (what a paired comparison of two models needs). Counts (top-1
        agreement, accuracy): `last_expected` the points it is expected to lose on new samples like these
        (flips.expected_lost)."""
        outs = run_all(session(model, "kernels"), self.batches)
        self.last_wrong = self._wrong(outs[0])
        self.last_noise = noise_fraction(self.refs, outs)
        self.last_noise_rows = noise_per_sample(self.refs, outs)
        self.last_expected = None
        if self.counted:
            self.last_expected = 100.0 * expected_lost(self.refs[0], outs[0], self.labels) / self.samples
        return self._points(outs)

    def _wrong(self, out: np.ndarray) -> frozenset[int]:
        if self.labels is None and self.kind.kind != "class_scores":
            return frozenset()
        ref = self.refs[0]
        answers = out.reshape(len(out), -1).argmax(1) != ref.reshape(len(ref), -1).argmax(1)
        return frozenset(int(i) for i in np.flatnonzero(answers))
