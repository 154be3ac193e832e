"""The default calibration, "layer_error_fast" (ranges_by_error.py): layer_error on the first 8 samples, only where a
candidate moves the scale by 2% or more, never on the outputs of bounding ops (ReLU6, Sigmoid), and measured by
running the readers alone on the float tensors calibration held (no second pass of the float model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
import lowbit.ranges_by_error as by_error
from helpers import model, node, weight
from lowbit.calibrate import EXTREMES_BINS, calibrate_layout
from lowbit.evaluate.metrics import fidelity, top1_agreement
from lowbit.observe import Histogram
from lowbit.passes import prepare
from lowbit.planner import make_layout
from lowbit.ranges_by_error import METHODS, candidates, measured
from lowbit.recipe import Recipe, Scheme
from lowbit.runtimes.ort import run_all, session

FAST = METHODS["layer_error_fast"]


def _block(side: int = 32) -> onnx.ModelProto:
    """x -> Conv -> Clip(0, 6) -> Conv -> Add(x') -> Conv -> y: a ReLU6 output and a residual sum."""
    return model(
        [
            node("Conv", ["x", "w1"], ["c1"], name="expand", pads=[1, 1, 1, 1]),
            node("Clip", ["c1", "lo", "hi"], ["r"], name="relu6"),
            node("Conv", ["r", "w2"], ["c2"], name="project"),
            node("Add", ["c2", "x"], ["s"], name="residual"),
            node("Conv", ["s", "w3"], ["y"], name="head"),
        ],
        {"x": (1, 4, side, side)},
        {"y": None},
        {
            "w1": weight((8, 4, 3, 3)),
            "w2": weight((4, 8, 1, 1), seed=1),
            "w3": weight((2, 4, 1, 1), seed=2),
            "lo": np.array(0.0, np.float32),
            "hi": np.array(6.0, np.float32),
        },
    )


def _feeds(n: int = 24, seed: int = 0, side: int = 32) -> list[dict[str, np.ndarray]]:
    """N(0, 1) inputs with a rare +12 (a 99.9th percentile well inside the min-max range)."""
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = r.standard_normal((1, 4, side, side)).astype(np.float32)
        if r.random() < 0.3:
            x.flat[int(r.integers(x.size))] = 12.0
        out.append({"x": x})
    return out


def _layout(m: onnx.ModelProto, recipe: Recipe) -> tuple[ir.Model, object]:
    irm = ir.from_proto(m)
    prepare(irm)
    return irm, make_layout(irm, recipe)


def test_the_default_is_layer_error_fast_and_min_max_stays_available() -> None:
    assert Recipe().default.calibration == "layer_error_fast"
    assert Recipe(default=Scheme(calibration="minmax")).default.calibration == "minmax"


def test_outputs_of_bounding_ops_are_not_measured() -> None:
    """The ReLU6 output keeps min-max under the default (a mass of values at 6 that clipping would move); the full
    method measures it too."""
    m = _block()
    irm, layout = _layout(m, Recipe())
    sources = layout.sources()
    assert "r" in sources and "x" in sources
    fast = measured(irm, layout)
    assert "r" not in fast and {"x", "s"} <= fast
    irm, layout = _layout(m, Recipe(default=Scheme(calibration="layer_error")))
    assert "r" in measured(irm, layout)


def test_candidates_within_two_percent_of_min_max_are_not_measured() -> None:
    flat = Histogram()
    flat.update(np.linspace(-1, 1, 100001, dtype=np.float32))  # uniform: every rule is within 2% of min-max
    assert [name for name, _ in candidates(flat, Scheme(), FAST)] == ["minmax"]
    assert len(candidates(flat, Scheme(calibration="layer_error"))) > 1  # the full method measures them anyway
    tail = Histogram()
    tail.update(np.concatenate([np.random.default_rng(0).standard_normal(20000), [40.0]]).astype(np.float32))
    names = [name for name, _ in candidates(tail, Scheme(), FAST)]
    assert names == ["minmax", "percentile 99.9", "mse"]


def test_full_histograms_only_where_the_default_may_measure() -> None:
    m = _block()
    irm, layout = _layout(m, Recipe())
    specs = lowbit.pipeline.load(m).inputs
    stats = calibrate_layout(irm, layout, _feeds(), specs, Recipe(), None, progress=False)
    assert stats.histograms["r"].max_bins == EXTREMES_BINS
    assert stats.histograms["x"].max_bins > EXTREMES_BINS and stats.histograms["s"].max_bins > EXTREMES_BINS
    # All 24 samples (fewer than the budget's) are held: the measured tensors and the other inputs of their readers.
    assert FAST.samples >= 24
    assert sum(len(b["x"]) for b in stats.held) == 24 and {"x", "s", "c2"} <= set(stats.held[0])


def test_holding_stops_past_the_byte_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _block()
    irm, layout = _layout(m, Recipe())
    specs = lowbit.pipeline.load(m).inputs
    monkeypatch.setattr(lowbit.calibrate, "HOLD_BYTES", 1)  # any batch passes it: only the minimum is held
    stats = calibrate_layout(irm, layout, _feeds(), specs, Recipe(), None, progress=False)
    assert sum(len(b["x"]) for b in stats.held) == lowbit.calibrate.HOLD_MIN_SAMPLES == 8
    assert sum(len(b["x"]) for b in stats.inputs) == 24  # the inputs are still kept for the budget's samples


def test_the_full_method_holds_nothing() -> None:
    """`layer_error` measures every tensor on 32 samples: holding them all would cost memory that grows with the
    model; it runs the whole float model again instead (its memory stays one batch's)."""
    irm, layout = _layout(_block(), Recipe(default=Scheme(calibration="layer_error")))
    assert by_error.held_names(irm, layout) == set()
    irm, layout = _layout(_block(), Recipe())
    assert {"x", "s", "c2"} <= by_error.held_names(irm, layout) and "r" not in by_error.held_names(irm, layout)


def test_readers_on_held_tensors_measure_what_the_whole_model_measures(monkeypatch: pytest.MonkeyPatch) -> None:
    """The readers run alone on the held float tensors: the same errors as the whole float model run again (to
    float32 rounding), the same ranges and bytes here."""
    seen: list[dict[str, float]] = []
    best = by_error._best

    def spy(g: object, gi: int, found: dict[str, float]) -> object:
        seen.append(found)
        return best(g, gi, found)  # type: ignore[arg-type]

    monkeypatch.setattr(by_error, "_best", spy)
    reduced = []
    readers_model = by_error.readers_model
    monkeypatch.setattr(by_error, "readers_model", lambda *a: reduced.append(readers_model(*a)) or reduced[-1])
    held = lowbit.quantize(_block(), calib=_feeds(), progress=False)
    assert reduced and reduced[0] is not None  # the readers alone, on held tensors
    assert {i.name for i in reduced[0].graph.input} <= {"x", "s", "c2", "c1", "r"}
    errors_held = seen[-1]
    monkeypatch.setattr(by_error, "readers_model", lambda *a: None)
    whole = lowbit.quantize(_block(), calib=_feeds(), progress=False)
    assert seen[-1].keys() == errors_held.keys()
    for k, v in errors_held.items():
        assert seen[-1][k] == pytest.approx(v, rel=1e-3, abs=1e-9)  # ORT optimizes the two graphs differently
    assert held.model.SerializeToString() == whole.model.SerializeToString()
    assert len(errors_held) > 4  # candidates besides min-max were measured (x's rare +12, the residual sum)


def test_a_reader_needing_a_tensor_calibration_did_not_hold_runs_in_the_whole_model() -> None:
    """A held set that misses a reader's input gives no reduced model (the whole float model runs instead)."""
    m = _block()
    irm, layout = _layout(m, Recipe())
    h = Histogram()
    h.update(np.concatenate([np.random.default_rng(0).standard_normal(4000), [30.0]]).astype(np.float32))
    groups = by_error._groups(ir.to_proto(irm), layout, {"s": h})
    assert groups and by_error.readers_model(ir.to_proto(irm), groups, [{}]) is None
    full = {"s": np.zeros((1, 4, 32, 32), np.float32)}
    assert by_error.readers_model(ir.to_proto(irm), groups, [full, {}]) is None  # held in every batch, or not used
    assert by_error.readers_model(ir.to_proto(irm), groups, [full]) is not None


def test_clipping_the_held_samples_cannot_show_is_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 samples of 4x8x8 values: a 99.9th percentile clips ~2 of their 2048 values, fewer than MIN_CLIPPED, so
    clipping would look free there; nothing is measured and every range is min-max's."""
    calls: list[object] = []
    monkeypatch.setattr(by_error, "error_model", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    small = lowbit.quantize(_block(8), calib=_feeds(8, side=8), progress=False)
    assert not calls
    minmax = lowbit.quantize(_block(8), calib=_feeds(8, side=8), recipe=Recipe(default=Scheme(calibration="minmax")))
    assert {n: t.range for n, t in small.plan.tensors.items()} == {n: t.range for n, t in minmax.plan.tensors.items()}


def test_weights_in_external_data_are_measured_from_the_model_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose weights live in an external data file: the readers' session maps them from its folder (it
    warned "could not measure" and fell back to min-max before), the same bytes as the self-contained model."""
    import warnings

    path = tmp_path / "m.onnx"
    onnx.save(_block(), path, save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0)
    measured_runs: list[object] = []
    error_model = by_error.error_model
    monkeypatch.setattr(by_error, "error_model", lambda *a: measured_runs.append(a) or error_model(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        external = lowbit.quantize(str(path), calib=_feeds(), progress=False)
    assert measured_runs
    inline = lowbit.quantize(_block(), calib=_feeds(), progress=False)
    assert {n: t.range for n, t in external.plan.tensors.items()} == {
        n: t.range for n, t in inline.plan.tensors.items()
    }


def test_same_bytes_twice(tmp_path: Path) -> None:
    a = lowbit.quantize(_block(), tmp_path / "a.onnx", calib=_feeds(), progress=False)
    lowbit.quantize(_block(), tmp_path / "b.onnx", calib=_feeds(), progress=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert a.plan.recipe["default"]["calibration"] == "layer_error_fast"


def test_a_plan_of_the_default_replays_to_the_same_bytes() -> None:
    first = lowbit.quantize(_block(), calib=_feeds(), progress=False)
    again = lowbit.quantize(_block(), plan=first.plan, progress=False)
    assert first.model.SerializeToString() == again.model.SerializeToString()


@pytest.mark.slow  # starts a Ray cluster
def test_sharded_calibration_holds_the_same_tensors(tmp_path: Path) -> None:
    """With Ray workers the main process computes the held tensors from the first samples read again: the same
    ranges and bytes as one process."""
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.concatenate([f["x"] for f in _feeds(32)]))
    path = tmp_path / "m.onnx"
    onnx.save(_block(), path)
    recipe = dataclasses.replace(Recipe(), batch_size=4)
    single = lowbit.quantize(str(path), calib=str(data), recipe=recipe, progress=False)
    sharded = lowbit.quantize(str(path), calib=str(data), recipe=recipe, progress=False, workers=2)
    assert single.plan.to_json() == sharded.plan.to_json()
    assert single.model.SerializeToString() == sharded.model.SerializeToString()


# EfficientNet-Lite0, 64 calibration crops, 256 held-out crops, integer kernels (AMD EPYC with VNNI): the default
# 92.6% top-1 agreement with float, cosine 0.9940; min-max 88.3% / 0.9888 (bench/calibration_methods.py). The issue
# asks for >= 90% from the default.
DEFAULT_FLOOR = 0.90


@pytest.mark.slow
def test_the_default_agrees_with_float_on_90_percent_of_efficientnet_lite0(efficientnet_lite0: Path) -> None:
    from lowbit_zoo.zoo import photo_crops

    result = lowbit.quantize(efficientnet_lite0, calib=photo_crops(64, "calib"), progress=False)
    assert result.plan.recipe["default"]["calibration"] == "layer_error_fast"
    crops = photo_crops(256, "eval")
    batches = [{"input": crops[i : i + 32]} for i in range(0, len(crops), 32)]
    ref = run_all(session(efficientnet_lite0), batches)[0]
    out = run_all(session(result.model, "kernels"), batches)[0]
    assert top1_agreement(ref, out) >= DEFAULT_FLOOR and fidelity(ref, out)["cosine"] >= 0.99
