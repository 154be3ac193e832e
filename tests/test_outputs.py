"""Output kinds (evaluate/outputs.py) and the task metrics that fit each (evaluate/metrics.py), on arrays where the
right answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.evaluate import metrics as m
from lowbit.evaluate.jsonable import jsonable
from lowbit.evaluate.outputs import classify, output_fidelity, parse_kinds, poor_text


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _logits(n: int, c: int, seed: int = 0) -> np.ndarray:
    x = _rng(seed).normal(size=(n, c)).astype(np.float32)
    x[np.arange(n), _rng(seed + 1).integers(0, c, n)] += 8.0  # one clear winner per sample
    return x


# ---- classification ----


@pytest.mark.parametrize(
    ("array", "name", "kind"),
    [
        (_logits(8, 1000), "", "class_scores"),  # dominant maximum
        (_logits(8, 10), "", "class_scores"),  # few columns
        (_softmax(_rng().normal(size=(8, 500)), 1), "", "class_scores"),  # rows sum to 1
        (_logits(8, 10)[:, None, :], "", "class_scores"),  # [N, 1, C]
        (_rng().normal(size=(8, 384)), "", "embedding"),  # no dominant maximum
        (_rng().normal(size=(8, 384)), "logits", "class_scores"),  # the name breaks the tie
        (_rng().normal(size=(8, 40)), "sentence_embedding", "embedding"),
        (_rng().normal(size=(8, 12, 384)), "", "embedding"),  # token vectors
        (1 / (1 + np.exp(-_rng().normal(size=(2, 1, 32, 32)))), "", "dense_map"),
        (_softmax(_rng().normal(size=(2, 5, 16, 16)), 1), "", "dense_map"),
        (_rng().normal(size=(2, 5, 16, 16)), "", "dense_map"),  # segmentation logits
        (_rng().normal(size=(2, 256, 16, 16)), "", "values"),  # a feature map
        (_rng().normal(size=(2, 1, 16, 16)), "", "values"),  # a regression map (depth)
        (np.log(_softmax(_rng().normal(size=(4, 40, 37)) * 3, 2)), "", "sequence"),  # CTC log-softmax
        (_rng().normal(size=(4, 1)), "", "values"),  # a scalar per sample
        (_rng().normal(size=(4, 2, 64)), "state", "values"),  # recurrent state
        (_rng().integers(0, 5, (4, 7)), "", "values"),  # integer output
    ],
)
def test_classify(array: np.ndarray, name: str, kind: str) -> None:
    got = classify(array, name)
    assert got.kind == kind, got
    assert got.why  # the reason is always given


def _detector(n: int = 2, classes: int = 3, anchors: int = 200, seed: int = 0) -> np.ndarray:
    """[N, 4 + C, A] as YOLOv8 writes it: cx, cy, w, h in pixels, then class probabilities."""
    r = _rng(seed)
    boxes = np.concatenate([r.uniform(0, 640, (n, 2, anchors)), r.uniform(10, 100, (n, 2, anchors))], 1)
    scores = r.uniform(0, 0.2, (n, classes, anchors))
    scores[:, 1, :20] = 0.9  # 20 confident anchors per sample, class 1
    return np.concatenate([boxes, scores], 1).astype(np.float32)


def test_classify_detector_heads_both_layouts() -> None:
    x = _detector()
    assert (classify(x).kind, classify(x).variant) == ("boxes", "anchors_last")
    t = np.swapaxes(x, 1, 2)
    assert (classify(t).kind, classify(t).variant) == ("boxes", "anchors_first")


def test_classify_a_raw_yolov5_head_whose_boxes_are_grid_offsets() -> None:
    """[N, A, 4 + 1 + C]: box offsets about -1..2.5 (not probabilities, span 3.5), objectness and class scores in
    [0, 1] (span 0.9): too close for the span rule alone, but only the scores are probabilities."""
    r = _rng(3)
    boxes = r.uniform(-1.0, 2.5, (2, 400, 4))
    scores = r.uniform(0.0, 0.9, (2, 400, 2))
    x = np.concatenate([boxes, scores], 2).astype(np.float32)
    assert (classify(x).kind, classify(x).variant) == ("boxes", "anchors_first")
    assert classify(r.uniform(-1.0, 2.5, (2, 400, 6)).astype(np.float32)).kind != "boxes"  # no probabilities


# ---- metrics with known answers ----


def test_map_iou_known_values() -> None:
    a = np.zeros((1, 1, 8, 8))
    a[..., 0:4, 0:4] = 0.9  # 16 pixels on
    assert m.map_iou(a, a) == 1.0
    b = np.roll(a, 2, axis=-1)  # shifted by 2 columns: overlap 8, union 24
    assert m.map_iou(a, b) == pytest.approx(8 / 24)
    assert m.map_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0  # both empty: they agree


def test_pixel_agreement_known_value() -> None:
    ref = np.zeros((1, 3, 4, 4))
    ref[:, 0] = 1.0
    out = ref.copy()
    out[:, 2, 0, :] = 2.0  # one row of 4 out of 16 pixels changes class
    assert m.pixel_agreement(ref, out) == pytest.approx(12 / 16)


def _one_hot_steps(seqs: list[list[int]], classes: int = 5) -> np.ndarray:
    out = np.zeros((len(seqs), len(seqs[0]), classes))
    for i, s in enumerate(seqs):
        out[i, np.arange(len(s)), s] = 1.0
    return out


def test_ctc_greedy_decode_collapses_repeats_and_drops_blank() -> None:
    x = _one_hot_steps([[0, 1, 1, 0, 1, 2, 2, 0], [3, 3, 3, 3, 0, 0, 0, 0]])
    assert m.ctc_greedy_decode(x) == [(1, 1, 2), (3,)]


def test_sequence_match_and_step_agreement() -> None:
    ref = _one_hot_steps([[0, 1, 1, 0, 2, 0], [0, 3, 0, 3, 0, 4]])
    # sample 0: repeats differ but decode the same; sample 1: one step differs and the decoding too
    out = _one_hot_steps([[1, 1, 1, 0, 2, 2], [0, 3, 0, 0, 0, 4]])
    assert m.sequence_match(ref, out) == 0.5
    assert m.step_agreement(ref, out) == pytest.approx(9 / 12)


def test_topk_agreement() -> None:
    ref = np.array([[0.0, 1, 2, 3, 4, 5, 6]])
    assert m.topk_agreement(ref, ref, 5) == 1.0
    out = np.array([[0.0, 1, 9, 9, 9, 9, 9]])  # ref's best (6) is tied with four others: still in the top 5
    assert m.topk_agreement(ref, out, 5) == 1.0
    out = np.array([[9.0, 9, 9, 9, 9, 9, 1]])  # six classes above it
    assert m.topk_agreement(ref, out, 5) == 0.0


def test_detection_agreement_known_values() -> None:
    ref = np.swapaxes(_detector(n=1), 1, 2).astype(np.float64)  # [N, A, 4 + C]
    out = ref.copy()
    out[0, :20, 4 + 2] = 0.95  # half the confident anchors switch to class 2...
    out[0, 10:20, 4 + 2] = 0.0
    out[0, :20, :4] += ref[0, :20, 2:4].mean(1, keepdims=True) * 0.1  # ...and every box moves 10% of its size
    got = m.detection_agreement(ref, out)
    assert got["anchors"] == 20
    assert got["class_agreement"] == pytest.approx(0.5)
    assert got["box_error"] == pytest.approx(0.1)


# ---- output_fidelity: the kind's headline, top-1 only where it fits ----


def test_fidelity_of_a_probability_map_reports_iou_not_top1() -> None:
    ref = 1 / (1 + np.exp(-_rng().normal(0, 3, (2, 1, 32, 32))))
    f = output_fidelity(ref, ref, "maps")
    assert f["kind"] == "dense_map" and f["top1_agreement"] is None
    assert f["task"]["metric"] == "map_iou" and f["task"]["value"] == 1.0 and not f["task"]["poor"]
    assert json.loads(json.dumps(jsonable(f)))["top1_agreement"] is None  # JSON null


def test_fidelity_of_class_scores_keeps_top1_and_adds_top5() -> None:
    ref = _logits(16, 100)
    out = ref + _rng(3).normal(0, 0.5, ref.shape)
    f = output_fidelity(ref, out)
    assert f["kind"] == "class_scores"
    assert f["task"]["metric"] == "top1_agreement" and f["task"]["value"] == f["top1_agreement"] == 1.0
    assert f["top5_agreement"] == 1.0
    assert set(m.fidelity(ref, out)) <= set(f)  # the old keys are all still there


def test_poor_fidelity_warns_once_and_points_to_diagnose() -> None:
    ref = _logits(20, 10)
    out = _rng(9).normal(size=ref.shape)  # unrelated scores
    f = output_fidelity(ref, out, "y")
    assert f["task"]["poor"]
    line = poor_text("y", f)
    assert line is not None and "top-1 agreement" in line and "lowbit diagnose" in line and "\n" not in line
    assert poor_text("y", output_fidelity(ref, ref, "y")) is None


def test_override_changes_the_kind_and_says_so() -> None:
    ref = _rng().normal(size=(4, 384))
    f = output_fidelity(ref, ref, "h", kind="class_scores")
    assert f["kind"] == "class_scores" and f["why"] == "given by the user" and f["top1_agreement"] == 1.0


def test_values_headline_is_sqnr() -> None:
    ref = _rng().normal(size=(4, 2, 64))
    out = ref + 0.01 * _rng(1).normal(size=ref.shape)
    f = output_fidelity(ref, out, "state")
    assert f["task"]["metric"] == "sqnr_db" and f["task"]["value"] == pytest.approx(40, abs=1.0)


def test_detector_without_confident_anchor_falls_back_to_cosine() -> None:
    x = _detector()
    x[:, 4:, :] = 0.01
    f = output_fidelity(x, x)
    assert f["kind"] == "boxes" and f["class_agreement"] is None and f["task"]["metric"] == "cosine"


@pytest.mark.parametrize(("given", "words"), [(["x"], "NAME=KIND"), (["x=blob"], "not one of")])
def test_parse_kinds_refuses_bad_values(given: list[str], words: str) -> None:
    with pytest.raises(LowbitError, match=words):
        parse_kinds(given)
    assert parse_kinds(["a=b=dense_map"]) == {"a=b": "dense_map"}  # the kind follows the last "="


def test_summary_prints_each_outputs_headline_and_warns_on_poor_fidelity() -> None:
    from lowbit.cli.summary import check_lines

    ref = 1 / (1 + np.exp(-_rng().normal(0, 3, (4, 1, 16, 16))))
    scores = _logits(4, 10)

    def entry(name: str, r: np.ndarray, o: np.ndarray) -> dict:
        f = output_fidelity(r, o, name)
        return {"name": name, "kind": f["kind"], "kernels": f, "simulate": f, "kernels_vs_simulation": f}

    check = jsonable(
        {
            "samples": 4,
            "outputs": [entry("map", ref, ref), entry("y", scores, -scores)],  # negated scores: top-1 fails
            "cpu_note": "cpu",
        }
    )
    lines = check_lines(check)
    assert lines[1].startswith("  map (dense_map): IoU of maps > 0.5 1.0000 / 1.0000")
    assert lines[2].startswith("  y (class_scores): top-1 agreement 0.0% / 0.0%")
    warns = [x for x in lines if x.startswith("warning:")]
    assert len(warns) == 1 and "'y'" in warns[0] and "lowbit diagnose" in warns[0]


@pytest.mark.slow
def test_real_models_keep_the_metric_that_fits(efficientnet_lite0, tmp_path) -> None:
    """EfficientNet-Lite0's logits stay class scores (top-1 reported), MiniLM's sentence embedding is an
    embedding (cosine), with or without their names."""
    import onnxruntime as ort

    from lowbit_zoo.zoo import minilm_onnx, minilm_tokenize, photo_crops, text_sentences

    s = ort.InferenceSession(str(efficientnet_lite0), providers=["CPUExecutionProvider"])
    logits = s.run(None, {s.get_inputs()[0].name: photo_crops(8, "eval")})[0]
    for name in ("logits", ""):
        f = output_fidelity(logits, logits + 0.01, name)
        assert f["kind"] == "class_scores" and f["task"]["metric"] == "top1_agreement", f["why"]
    s = ort.InferenceSession(str(minilm_onnx(tmp_path / "minilm.onnx")), providers=["CPUExecutionProvider"])
    feed = minilm_tokenize(text_sentences(8, "eval"))
    names = [o.name for o in s.get_outputs()]
    outs = s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})
    emb = outs[names.index("sentence_embedding")]
    for name in ("sentence_embedding", ""):
        assert classify(emb, name).kind == "embedding"


@pytest.mark.parametrize("kind", ["boxes", "dense_map", "sequence"])
def test_override_to_a_kind_the_shape_cannot_be_is_refused(kind: str) -> None:
    with pytest.raises(LowbitError, match=f"kind {kind} needs"):
        output_fidelity(_logits(4, 10), _logits(4, 10), "y", kind=kind)


def test_the_ctc_blank_is_found_wherever_the_exporter_put_it() -> None:
    # Steps of "A A - B -" with the blank last (index 3, as captcha-whisperer exports it) or first (index 0).
    for blank, a, b in ((3, 0, 1), (0, 1, 2)):
        steps = [a, a, blank, b, blank, blank]
        ref = np.eye(4)[steps][None] * 5.0
        assert m.ctc_blank(ref) == blank
        assert m.ctc_greedy_decode(ref, blank) == [(a, b)]
        f = output_fidelity(ref, ref.copy(), "logits", "sequence")
        assert f["blank"] == blank and f["sequence_match"] == 1.0


def _scores_only(n: int = 2, anchors: int = 400, classes: int = 10, seed: int = 5) -> np.ndarray:
    """[N, A, C] sigmoid scores as PicoDet writes them beside a separate box output: most anchors near 0."""
    s = _rng(seed).uniform(0.0, 0.1, (n, anchors, classes))
    s[:, :30, 3] = 0.8  # 30 confident anchors per sample, class 3
    return s.astype(np.float32)


def test_a_detectors_score_output_without_boxes_is_measured_on_its_scored_anchors() -> None:
    x = _scores_only()
    got = classify(x)
    assert (got.kind, got.variant) == ("boxes", "scores_anchors_first")
    t = np.swapaxes(x, 1, 2)
    assert classify(t).variant == "scores_anchors_last"
    out = x.copy()
    out[0, :15, 5] = 0.95  # half of one sample's confident anchors switch class; every empty anchor gets noise
    out[:, 30:] += _rng(6).normal(0, 0.05, out[:, 30:].shape).astype(np.float32)
    f = output_fidelity(x, out)
    assert f["task"]["metric"] == "class_agreement" and f["task"]["value"] == pytest.approx(45 / 60)
    assert f["box_error"] is None
    assert classify(_softmax(_rng().normal(size=(2, 400, 10)), 2)).kind == "sequence"  # rows summing to 1: not this
