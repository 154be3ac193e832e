"""What each model output is, and the fidelity measures that fit it.

"Top-1 agreement" means something for class scores and nothing for a text detector's probability map. So each
output is classified from its reference (float) values and shape, with its name only as a tie-breaker, into one
`Kind`, and measured with what fits that kind:

| kind | looks like | headline (warn below) | also |
|---|---|---|---|
| class_scores | [N, C] / [N, 1, C], C >= 2 | top1_agreement (0.90) | top5_agreement (C > 5), cosine |
| dense_map | [N, K, H, W], probabilities or segmentation logits | map_iou (0.90) or pixel_agreement (0.90) | cosine |
| sequence | [N, T, C] per-step class scores (CTC) | sequence_match (0.90) | step_agreement, cosine |
| boxes | [N, 4 + C, A] / [N, A, 4 + C], boxes >> scores; [N, A, C] scores | class_agreement (0.90) | box_error |
| embedding | [N, D] / [N, T, D] vectors without a dominant class | cosine (0.99) | |
| values | anything else: scalars, state, regression maps | sqnr_db (20 dB); integer: exact_match (0.90) | cosine |

Every kind also gets cosine, sqnr_db and max_abs_error; top1_agreement is None where it does not fit. The
heuristic is small on purpose: its reason is returned (`why`) and the caller can override it per output.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from ..errors import LowbitError
from . import metrics as m

Kind = Literal["class_scores", "dense_map", "sequence", "boxes", "embedding", "values"]
KINDS: tuple[str, ...] = get_args(Kind)

# headline metric per kind (dense maps: per variant), the value below which fidelity is poor, and its label
HEADLINE = {
    "class_scores": ("top1_agreement", 0.90, "top-1 agreement"),
    "binary_map": ("map_iou", 0.90, "IoU of maps > 0.5"),
    "multiclass_map": ("pixel_agreement", 0.90, "per-pixel arg-max agreement"),
    "sequence": ("sequence_match", 0.90, "decoded sequence match"),
    "boxes": ("class_agreement", 0.90, "top-class agreement on scored anchors"),
    "embedding": ("cosine", 0.99, "cosine"),
    "values": ("sqnr_db", 20.0, "SQNR dB"),
    # integer outputs are labels or indices (a classifier's `label`, an ArgMax): 2 for 0 is wrong, not "noisy"
    "integer_values": ("exact_match", 0.90, "exact match"),
}
_CLASS_NAMES = ("logit", "class", "prob", "score", "cls", "label", "pred")
_EMBED_NAMES = ("emb", "feature", "feat", "hidden", "pool", "vector", "vec", "encod", "fingerprint", "descriptor")
_SEQ_NAMES = ("ctc", "seq", "char", "text", "token")
_SEG_NAMES = ("seg", "mask", "logit", "class", "prob")
# names of a detector's per-anchor score output, and the row count from which softmax rows are anchors, not CTC steps
_STATE_NAMES = ("present", "past", "cache", "state_out", "new_state")
_DET_NAMES = ("score", "conf", "cls", "det", "anchor")
SOFTMAX_ANCHORS = 1000
# [N, T, F] probabilities named so are a speech enhancer's time-frequency mask or gains (VoiceFilter, DeepFilterNet):
# read as a detector's anchor scores, argmax over time steps flipped between near-equal gains (63% "agreement" at
# 52 dB SQNR, cosine 1.0000), a false alarm. They are compared as values.
_GAIN_NAMES = ("mask", "gain", "spec", "erb")
# The share of steps whose top class is the most common one, for raw CTC logits: most steps are blank between and
# around characters (ddddocr's captcha CRNN: 0.71 over 16 lines), but not all of them.
BLANK_SHARE = (0.25, 0.98)


@dataclass(frozen=True)
class OutputKind:
    """`kind`, the sentence saying why, and how to read the array ("binary"/"multiclass" maps, boxes layout
    "anchors_last"/"anchors_first", or "scores_anchors_last"/"scores_anchors_first" for scores without boxes)."""

    kind: Kind
    why: str
    variant: str = ""
    classes: int = 0  # boxes: the score rows after the 4 box values (0: all of them; fewer when extras follow)


def _hint(name: str, words: tuple[str, ...]) -> bool:
    low = name.lower()
    return any(w in low for w in words)


def _is_state(name: str) -> bool:
    """A decoder's key/value cache ([N, heads, T, head_dim], transformers' `present.0.key`) or a recurrent state:
    read as a [N, K, H, W] map, its heads were "segmentation classes" and its scores a per-pixel arg-max."""
    low = name.lower()
    return _hint(low, _STATE_NAMES) or bool(re.search(r"(^|[._/])(key|value)s?$", low))


def _is_prob(x: np.ndarray) -> bool:
    return bool(x.size) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def _sums_to_one(x: np.ndarray, axis: int) -> bool:
    return _is_prob(x) and bool(np.allclose(x.sum(axis), 1.0, atol=1e-3))


def _log_softmax(x: np.ndarray, axis: int) -> bool:
    if not x.size or float(x.max()) > 1e-4:
        return False
    top = x.max(axis, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis)) + np.squeeze(top, axis)
    return bool(np.allclose(lse, 0.0, atol=1e-3))


def _peaked(x: np.ndarray) -> bool:
    """Whether the top value of a typical row stands out more than the largest of D Gaussian values would
    (about sqrt(2 ln D) standard deviations), plus one: class logits do, embeddings do not."""
    d = x.shape[-1]
    rows = x.reshape(-1, d).astype(np.float64)
    std = rows.std(1)
    z = (rows.max(1) - rows.mean(1)) / np.where(std > 0, std, 1.0)
    return float(np.median(z)) >= math.sqrt(2 * math.log(d)) + 1.0


def classify(ref: np.ndarray, name: str = "") -> OutputKind:
    """The kind of an output from its reference values `ref` (samples on axis 0) and, to break ties, its name."""
    x = np.asarray(ref)
    if x.dtype.kind not in "f":
        return OutputKind("values", f"{x.dtype} values (labels or indices): compared for exact equality per sample")
    if x.ndim < 2 or x[0].size == 1:
        return OutputKind("values", "one value per sample (a scalar)")
    shape = x.shape[1:]
    squeezed = tuple(d for d in shape if d != 1)
    if len(squeezed) == 1:
        return _vector(x.reshape(len(x), -1), name)
    if x.ndim >= 3 and _is_state(name):
        return OutputKind("values", f"{x.ndim}-D output named like a key/value cache or state ({name!r})")
    if x.ndim == 4:
        return _map(x, name)
    if x.ndim == 3:
        # Scores alone first: with every value a probability, four score columns are no box (PicoDet's class 3)
        if _hint(name, _GAIN_NAMES) and _is_prob(x):
            return OutputKind("values", f"[N, {x.shape[1]}, {x.shape[2]}] in [0, 1] named like a mask or gains")
        found = _anchor_scores(x, name) or _boxes(x)
        return found if found is not None else _sequence(x, name)
    return OutputKind("values", f"{x.ndim}-D output of shape {list(shape)} per sample: no task pattern")


def _vector(x: np.ndarray, name: str) -> OutputKind:
    d = x.shape[1]
    if _sums_to_one(x, 1):
        return OutputKind("class_scores", f"{d} values per sample summing to 1 (softmax probabilities)")
    if _log_softmax(x, 1):
        return OutputKind("class_scores", f"{d} values per sample forming a log-softmax")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if d >= 16 and np.allclose(norms, 1.0, atol=1e-3):
        return OutputKind("embedding", f"{d} values per sample with unit L2 norm (a normalized embedding)")
    if _hint(name, _EMBED_NAMES):
        return OutputKind("embedding", f"{d} values per sample, named like an embedding ({name!r})")
    if _hint(name, _CLASS_NAMES):
        return OutputKind("class_scores", f"{d} values per sample, named like scores ({name!r})")
    if d < 64:
        return OutputKind("class_scores", f"{d} values per sample (under 64: taken as class logits)")
    if _peaked(x):
        return OutputKind("class_scores", f"{d} values per sample with a dominant maximum (class logits)")
    return OutputKind("embedding", f"{d} values per sample with no dominant maximum (an embedding)")


def _map(x: np.ndarray, name: str) -> OutputKind:
    k, h, w = x.shape[1:]
    where = f"[N, {k}, {h}, {w}]"
    if h * w < 16:
        return OutputKind("values", f"{where}: too few positions for a map")
    if k >= 2 and _sums_to_one(x, 1):
        return OutputKind("dense_map", f"{where} summing to 1 over channels (segmentation)", "multiclass")
    if _is_prob(x):
        return OutputKind("dense_map", f"{where} with values in [0, 1] (probability maps)", "binary")
    if k >= 2 and (k <= 32 or _hint(name, _SEG_NAMES)):
        return OutputKind("dense_map", f"{where}, unbounded, {k} channels (segmentation logits)", "multiclass")
    return OutputKind(
        "values", f"{where}, unbounded, {'one channel' if k == 1 else f'{k} channels'} (a feature or regression map)"
    )


def _boxes(x: np.ndarray) -> OutputKind | None:
    """[N, 4 + C, A] or [N, A, 4 + C]: the 4 box rows span a range far larger than the class rows, or (a head
    whose boxes are still grid offsets, YOLOv5's raw output) the scores are probabilities and the boxes are not."""
    a, b = x.shape[1:]
    for layout, feat_axis, feats, anchors in (("anchors_last", 1, a, b), ("anchors_first", 2, b, a)):
        if not 5 <= feats <= 4 + 1000 or anchors < 4 * feats:
            continue
        box = np.take(x, range(4), axis=feat_axis)
        nc = _score_rows(x, feat_axis, feats)
        cls = np.take(x, range(4, 4 + nc), axis=feat_axis)
        span_box, span_cls = float(np.ptp(box)), float(np.ptp(cls))
        if span_box > 8 * max(span_cls, 1e-6) or (_is_prob(cls) and not _is_prob(box) and span_box > 2 * span_cls):
            extra = f" + {feats - 4 - nc} other values (mask coefficients, keypoints)" if nc < feats - 4 else ""
            why = (
                f"{anchors} anchors x (4 box values + {nc} scores{extra}); box values span {span_box:.3g}, "
                f"scores {span_cls:.3g} (a detector head)"
            )
            return OutputKind("boxes", why, layout, nc if nc < feats - 4 else 0)
    return None


def _score_rows(x: np.ndarray, feat_axis: int, feats: int) -> int:
    """How many rows after the 4 box values are scores: all of them, or (ultralytics' -seg and -pose heads, 4 + 80
    classes + 32 mask coefficients, 4 + 1 + 17 x 3 keypoints) the leading run of probability rows when rows that
    are not probabilities follow. Those extras are no classes: an arg-max over them measured nothing."""
    probs = [_is_prob(np.take(x, k, axis=feat_axis)) for k in range(4, feats)]
    if not probs[0] or all(probs):
        return feats - 4
    return probs.index(False)


def _anchor_scores(x: np.ndarray, name: str = "") -> OutputKind | None:
    """[N, A, C] or [N, C, A] independent probabilities (sigmoid, not summing to 1) over many more anchors than
    classes: a detector head whose boxes are another output (PicoDet, NanoDet, RetinaNet-style exports). Measured as
    boxes are, on the scores: SQNR would count the near-zero scores of empty anchors.

    Rows summing to 1 are an SSD-style head's softmax over background + classes (torchvision's SSDLite: [N, 3234,
    91]) or a recognizer's per-step CTC probabilities; they are a detector's when named like scores, or over
    SOFTMAX_ANCHORS or more rows, which no CTC recognizer's steps reach (PaddleOCR's: 40-80; speech: ~50 a second)."""
    if not _is_prob(x):
        return None
    a, b = x.shape[1:]
    for layout, feat_axis, feats, anchors in (("scores_anchors_last", 1, a, b), ("scores_anchors_first", 2, b, a)):
        if not (2 <= feats <= 1000 and anchors >= max(64, 4 * feats)):
            continue
        if not _sums_to_one(x, feat_axis):
            why = f"{anchors} anchors x {feats} independent class probabilities, no box values (a detector's scores)"
            return OutputKind("boxes", why, layout)
        if not _hint(name, _SEQ_NAMES) and (_hint(name, _DET_NAMES) or anchors >= SOFTMAX_ANCHORS):
            why = f"{anchors} anchors x {feats} softmax class probabilities, no box values (an SSD head's scores)"
            return OutputKind("boxes", why, layout)
    return None


def _sequence(x: np.ndarray, name: str) -> OutputKind:
    t, c = x.shape[1:]
    where = f"[N, {t}, {c}]"
    if _sums_to_one(x, 2) or _log_softmax(x, 2):
        return OutputKind("sequence", f"{where}: per-step class probabilities (CTC-like)")
    if c > 128 and not _hint(name, _EMBED_NAMES) and _ctc_logits(x):
        return OutputKind("sequence", f"{where}: {t} steps of {c} peaked scores, mostly one class (CTC logits)")
    if c > 128 or _hint(name, _EMBED_NAMES):
        return OutputKind("embedding", f"{where}: {c} values per step (token vectors)")
    if c >= 2 and t >= 4 and (_hint(name, _SEQ_NAMES) or _peaked(x)):
        return OutputKind("sequence", f"{where}: {t} steps of {c} peaked scores (CTC-like)")
    return OutputKind("values", f"{where}: no per-step class structure")


def _ctc_logits(x: np.ndarray) -> bool:
    """Raw CTC logits over a large alphabet (a Chinese recognizer's thousands of characters): rows peaked like class
    logits, one class (the blank) the top of BLANK_SHARE of the steps, and others the top of the rest. Token vectors
    are not peaked, or (a transformer's outlier feature) have the same top in nearly every step."""
    if x.shape[1] < 4 or not _peaked(x):
        return False
    top = np.bincount(x.argmax(-1).ravel()).max() / x[..., 0].size
    return bool(BLANK_SHARE[0] <= top <= BLANK_SHARE[1])


def parse_kinds(pairs: list[str] | None) -> dict[str, Kind]:
    """CLI `--output-kind NAME=KIND` values as a dict, checked."""
    found: dict[str, Kind] = {}
    for p in pairs or []:
        name, sep, kind = p.rpartition("=")
        if not sep or not name:
            raise LowbitError(f"--output-kind takes NAME=KIND, got {p!r}; e.g. --output-kind probs=dense_map")
        found[name] = check_kind(kind, name)
    return found


def check_kind(kind: str, name: str) -> Kind:
    if kind not in KINDS:
        raise LowbitError(f"output kind {kind!r} for {name!r} is not one of {', '.join(KINDS)}; pick one of them")
    return kind  # type: ignore[return-value]


def check_kind_names(kinds: Mapping[str, str] | None, names: list[str]) -> None:
    """Every overridden output must exist: a typo would otherwise silently leave the guess in place."""
    for name, kind in (kinds or {}).items():
        check_kind(kind, name)
        if name not in names:
            raise LowbitError(
                f"output kind given for {name!r}, which is not an output (outputs: {', '.join(names)}); fix the name"
            )


def resolve(ref: np.ndarray, name: str, kind: str | OutputKind | None = None) -> OutputKind:
    """The user's kind if given (its variant still read from the values), else the guess."""
    if isinstance(kind, OutputKind):
        return kind
    guess = classify(ref, name)
    if kind is None or kind == guess.kind:
        return guess
    given = check_kind(kind, name)
    need = {"dense_map": 4, "sequence": 3, "boxes": 3}.get(given)
    if need is not None and (ref.ndim != need or (given == "boxes" and max(ref.shape[1:]) < 5)):
        form = {"dense_map": "[N, K, H, W]", "sequence": "[N, T, C]", "boxes": "[N, 4 + C, A] or [N, A, 4 + C]"}
        raise LowbitError(
            f"output {name!r} has shape {list(ref.shape)}, but kind {given} needs {form[given]}; "
            f"pick another kind (the guess was {guess.kind})"
        )
    variant = ""
    if given == "dense_map":
        variant = "multiclass" if ref.ndim == 4 and ref.shape[1] >= 2 and not _is_prob(ref) else "binary"
    elif given == "boxes":
        variant = "anchors_first" if ref.ndim == 3 and ref.shape[1] > ref.shape[2] else "anchors_last"
    return OutputKind(given, "given by the user", variant)


def output_fidelity(
    ref: np.ndarray, out: np.ndarray, name: str = "", kind: str | OutputKind | None = None
) -> dict[str, Any]:
    """The generic measures, the ones that fit the output's kind, `kind`/`why`, and `task`: the headline
    {"metric", "label", "value", "threshold", "poor"}. `kind`: a `Kind` name to override the guess, or an
    `OutputKind` already resolved (to measure two runs against each other as their float reference was).
    Values are floats (+inf SQNR: identical); None where a measure does not fit or has nothing to count."""
    ref, out = np.asarray(ref), np.asarray(out)
    k = resolve(ref, name, kind)
    r, o = ref.astype(np.float64), out.astype(np.float64)
    f: dict[str, Any] = {
        "kind": k.kind,
        "why": k.why,
        "top1_agreement": None,
        "cosine": m.cosine(r, o),
        "sqnr_db": m.sqnr_db(r, o),
        "max_abs_error": float(np.max(np.abs(r - o))) if r.size else 0.0,
    }
    head: str = k.kind
    if k.kind == "class_scores":
        f["top1_agreement"] = m.top1_agreement(r, o)
        classes = r[0].size
        f["top5_agreement"] = m.topk_agreement(r, o, 5) if classes > 5 else None
    elif k.kind == "dense_map":
        head = f"{k.variant}_map"
        if k.variant == "multiclass":
            f["pixel_agreement"] = m.pixel_agreement(r, o, axis=1)
        else:
            f["map_iou"] = m.map_iou(r, o, 0.5)
    elif k.kind == "sequence":
        f["step_agreement"] = m.step_agreement(r, o)
        f["blank"] = m.ctc_blank(r)
        f["sequence_match"] = m.sequence_match(r, o, blank=f["blank"])
    elif k.kind == "boxes":
        first = k.variant.endswith("anchors_first")
        rb, ob = (r, o) if first else (np.swapaxes(r, 1, 2), np.swapaxes(o, 1, 2))
        nb = 0 if k.variant.startswith("scores") else 4
        if k.classes:  # scores followed by other values: measured on the boxes and scores only
            rb, ob = rb[..., : nb + k.classes], ob[..., : nb + k.classes]
        if not _is_prob(rb[..., nb:]):  # logits: sigmoid them so the 0.25 score threshold means something
            rb, ob = rb.copy(), ob.copy()
            rb[..., nb:], ob[..., nb:] = _sigmoid(rb[..., nb:]), _sigmoid(ob[..., nb:])
        f.update(m.detection_agreement(rb, ob, 0.25, nb))
    elif k.kind == "embedding":
        f["cosine"] = m.vector_cosine(r, o)
    elif k.kind == "values" and ref.dtype.kind in "iub" and ref.shape == out.shape and len(ref):
        head = "integer_values"  # SQNR between class ids reads a wrong label as a small error, or as inf
        f["exact_match"] = float(np.mean(np.all((ref == out).reshape(len(ref), -1), axis=1)))
    metric, threshold, label = HEADLINE[head]
    value = f.get(metric)
    if value is None:  # e.g. a detector with no confident anchor in these samples: fall back to cosine
        metric, threshold, label = "cosine", 0.99, "cosine (no anchor scored > 0.25)"
        value = f["cosine"]
    f["task"] = {
        "metric": metric,
        "label": label,
        "value": value,
        "threshold": threshold,
        "poor": bool(value < threshold),
    }
    return f


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def headline_text(f: dict[str, Any]) -> str:
    """ "top-1 agreement 98.4%" / "IoU of maps > 0.5 0.973" / "SQNR dB 31.2" from an `output_fidelity` dict
    (or its JSON form)."""
    t = f["task"]
    return f"{t['label']} {format_value(t['metric'], t['value'])}"


def format_value(metric: str, value: float | None) -> str:
    if value is None:
        return "inf" if metric == "sqnr_db" else "-"
    if metric in ("cosine", "map_iou"):
        return f"{value:.4f}"
    if metric == "sqnr_db":
        return f"{value:.1f}"
    return f"{100 * value:.1f}%"


def poor_text(name: str, f: dict[str, Any], where: str = "", hint: bool = True) -> str | None:
    """One warning line when the headline metric of output `name` is below its kind's threshold; `hint`
    points to `lowbit diagnose` (not wanted in diagnose's own output)."""
    t = f["task"]
    if not t["poor"]:
        return None
    line = (
        f"warning: output '{name}' ({f['kind']}){where}: {t['label']} {format_value(t['metric'], t['value'])} is "
        f"below {format_value(t['metric'], t['threshold'])}"
    )
    return line + ("; run `lowbit diagnose` to find the layers that lose it" if hint else "")
