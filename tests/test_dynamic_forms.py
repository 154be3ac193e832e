"""Which form dynamic and weight-only modes choose for an LSTM's W and R and for an embedding table: one scale
(the form ONNX Runtime runs faster) unless a scale per channel is measurably more accurate (ops/granularity.py);
the plan records the choice and the SQNRs behind it, and the model still matches float."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from helpers import model, node, op_counts, optimized, rel_rms, rng, run, samples, weight
from lowbit import Recipe, Scheme
from lowbit.ops.granularity import ENOUGH_DB, GAIN_DB, one_scale_is_enough, sqnr_db

DYNAMIC = Recipe(default=Scheme(mode="dynamic"))
WEIGHT_ONLY = Recipe(default=Scheme(mode="weight_only"))
H, IN, T, B = 16, 10, 7, 2


def table_model(table: np.ndarray, unsqueeze: bool = False) -> onnx.ModelProto:
    """y = table[ids] for ids (N, 3); with `unsqueeze`, then Unsqueeze(axis 1) as DLRM's stacking does."""
    n, dim = table.shape
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="lookup")]
    out = ["N", 3, dim]
    if unsqueeze:
        nodes.append(helper.make_node("Unsqueeze", ["e", "axis1"], ["y"], name="unsqueeze"))
        out = ["N", 1, 3, dim]
    inits = [numpy_helper.from_array(table.astype(np.float32), "table")]
    if unsqueeze:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    g = helper.make_graph(
        nodes,
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("y" if unsqueeze else "e", TensorProto.FLOAT, out)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def ids_for(n: int) -> dict[str, np.ndarray]:
    return {"ids": rng(5).integers(0, n, (64, 3)).astype(np.int64)}


def outlier_rows(n: int = 2000, dim: int = 32) -> np.ndarray:
    """Two rows 50x larger than the rest (as MiniLM's position 0 is 5x its neighbours): one scale for the whole
    table leaves every other row with a few levels. SQNR is over the whole table, so what counts is how much of
    the table's energy one scale misrepresents, not how many small rows there are."""
    table = weight((n, dim), seed=2)
    table[[17, n // 2]] *= 50
    return table


def test_the_rule():
    assert one_scale_is_enough(ENOUGH_DB, ENOUGH_DB + 20)  # good enough, however much better per channel is
    assert not one_scale_is_enough(ENOUGH_DB - 0.1, ENOUGH_DB - 0.1 + GAIN_DB)  # poor, and per channel helps
    assert one_scale_is_enough(ENOUGH_DB - 5, ENOUGH_DB - 5 + GAIN_DB - 0.1)  # poor, but per channel barely helps
    w = weight((50, 20))
    assert sqnr_db(w, w) == float("inf")
    assert abs(sqnr_db(w, w * 1.01) - 40.0) < 1e-4  # 1% error is 40 dB


def test_a_table_one_scale_fits_is_one_gather_and_a_dequantize():
    table = weight((3000, 32), seed=1)
    m = table_model(table)
    res = lowbit.quantize(m, recipe=WEIGHT_ONLY, progress=False)
    d = res.plan.nodes["lookup"]
    assert d.details["granularity"] == "per-tensor" and "per-tensor" in d.reason
    assert d.details["sqnr_db"]["per-table"] >= ENOUGH_DB
    assert res.plan.tensors["lookup:0"].axis is None and len(res.plan.tensors["lookup:0"].scale) == 1
    counts = op_counts(res.model)
    assert counts["Gather"] == 1 and counts["DequantizeLinear"] == 1 and counts["Mul"] == 0
    # the stored table is uint8 q + 128 around zero point 128: exactly the symmetric int8 values
    scale = res.plan.tensors["lookup:0"].scale[0]
    feeds = ids_for(3000)
    got = run(res.model, [feeds], mode="kernels")[0]
    want = np.clip(np.round(table / np.float32(scale)), -127, 127) * np.float32(scale)
    assert np.array_equal(got, want[feeds["ids"]].astype(np.float32))
    assert rel_rms(table[feeds["ids"]], got) < 0.015


def test_a_table_with_outlier_rows_keeps_a_scale_per_row():
    table = outlier_rows()
    res = lowbit.quantize(table_model(table), recipe=DYNAMIC, progress=False)
    d = res.plan.nodes["lookup"]
    db = d.details["sqnr_db"]
    assert d.details["granularity"] == "per-row" and "per-row" in d.reason
    assert db["per-table"] < ENOUGH_DB and db["per-row"] >= db["per-table"] + GAIN_DB
    assert res.plan.tensors["lookup:0"].axis == 0 and len(res.plan.tensors["lookup:0"].scale) == 2000
    assert op_counts(res.model)["Gather"] == 2  # the rows, then their scales
    feeds = ids_for(2000)
    got = run(res.model, [feeds], mode="kernels")[0]
    ref = table[feeds["ids"]]
    # every row to int8 precision, the smallest as well as the largest
    assert np.all(np.abs(got - ref).max(axis=-1) <= np.abs(ref).max(axis=-1) / 127 * 0.5 + 1e-7)
    # what one scale would have done to them: measurably worse, which is why per row was chosen
    one = lowbit.quantize(
        table_model(table), recipe=Recipe(default=Scheme(mode="weight_only", per_channel=False)), progress=False
    )
    rows = np.linalg.norm(ref, axis=-1)
    small = rows < np.percentile(rows, 20)
    err = lambda y: float(np.mean(np.linalg.norm(y - ref, axis=-1)[small] / rows[small]))  # noqa: E731
    assert err(got) * 10 < err(run(one.model, [feeds], mode="kernels")[0])


def test_one_scale_when_rows_would_not_help_even_below_the_threshold():
    """Two heavy-tailed rows alike: one scale is below 30 dB, but a scale per row gains under 3 dB."""
    table = np.clip(rng(4).standard_cauchy((2, 512)), -300, 300).astype(np.float32)
    table[1] *= 0.9
    res = lowbit.quantize(table_model(table), recipe=WEIGHT_ONLY, progress=False)
    db = res.plan.nodes["lookup"].details["sqnr_db"]
    assert db["per-table"] < ENOUGH_DB and db["per-row"] < db["per-table"] + GAIN_DB  # the case this test is for
    assert res.plan.nodes["lookup"].details["granularity"] == "per-tensor"
    assert res.plan.tensors["lookup:0"].axis is None


def test_onnx_runtime_moves_the_tables_dequantize_without_adding_qdq_pairs():
    """uint8 storage: ORT's optimizer swaps DequantizeLinear and the Unsqueeze after the lookup; with an int8 table it
    inserts a QuantizeLinear/DequantizeLinear pair instead, one more op per lookup."""
    m = table_model(weight((1000, 32), seed=6), unsqueeze=True)
    res = lowbit.quantize(m, recipe=WEIGHT_ONLY, progress=False)
    opt = op_counts(optimized(res.model))
    assert opt["QuantizeLinear"] == 0 and opt["DequantizeLinear"] == 1 and opt["Gather"] == 1
    feeds = ids_for(1000)
    assert rel_rms(run(m, [feeds], float_model=True)[0], run(res.model, [feeds], mode="kernels")[0]) < 0.015


def test_per_channel_false_is_always_one_scale():
    res = lowbit.quantize(
        table_model(outlier_rows()),
        recipe=Recipe(default=Scheme(mode="weight_only", per_channel=False)),
        progress=False,
    )
    assert res.plan.tensors["lookup:0"].axis is None and "sqnr_db" not in res.plan.nodes["lookup"].details


def lstm(w: np.ndarray, r: np.ndarray) -> onnx.ModelProto:
    d = w.shape[0]
    return model(
        [node("LSTM", ["x", "W", "R", "B"], ["y", "yh"], "lstm", hidden_size=H, direction="bidirectional")],
        {"x": (T, B, IN)},
        {"y": (T, d, B, H), "yh": (d, B, H)},
        {"W": w, "R": r, "B": weight((d, 8 * H), 3, 0.1)},
    )


def test_an_lstm_one_scale_fits_gets_one_per_direction_and_stays_close_to_float(tmp_path):
    m = lstm(weight((2, 4 * H, IN), 1, 0.3), weight((2, 4 * H, H), 2, 0.3))
    path = tmp_path / "lstm.onnx"
    onnx.save(m, str(path))
    res = lowbit.quantize(path, tmp_path / "q.onnx", recipe=DYNAMIC, progress=False)
    d = res.plan.nodes["lstm"]
    assert d.details["granularity"] == "per-tensor" and "per-tensor W and R" in d.reason
    assert all(v >= ENOUGH_DB for v in d.details["sqnr_db"]["per-tensor"].values())
    q = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert q["lstm_W_s"].shape == (2,) and q["lstm_R_s"].shape == (2,)
    assert len(res.plan.tensors["lstm:1"].scale) == 2
    feeds = samples(m, 8)
    for a, b in zip(run(m, feeds, float_model=True), run(res.model, feeds, mode="kernels")):
        assert rel_rms(a, b) < 0.03
    # the choice and its numbers are in the saved plan, as JSON
    saved = json.loads((tmp_path / "q.plan.json").read_text())
    assert saved["nodes"]["lstm"]["details"]["sqnr_db"] == d.details["sqnr_db"]


def test_an_lstm_with_an_outlier_gate_row_keeps_a_scale_per_gate_row():
    """One gate row 40x larger than the rest: one scale per direction leaves the other rows coarse."""
    w, r = weight((2, 4 * H, IN), 1, 0.3), weight((2, 4 * H, H), 2, 0.3)
    w[:, 3] *= 40
    r[:, 3] *= 40
    m = lstm(w, r)
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)
    d = res.plan.nodes["lstm"]
    assert d.details["granularity"] == "per-channel"
    one, rows = d.details["sqnr_db"]["per-tensor"], d.details["sqnr_db"]["per-channel"]
    assert any(one[k] < ENOUGH_DB and rows[k] >= one[k] + GAIN_DB for k in one)
    q = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert q["lstm_W_s"].shape == (2, 4 * H) and q["lstm_R_s"].shape == (2, 4 * H)
    feeds = samples(m, 8)
    for a, b in zip(run(m, feeds, float_model=True), run(res.model, feeds, mode="kernels")):
        assert rel_rms(a, b) < 0.03
    # the guard still holds every u8 x s8 pair in int16 (AVX2 without VNNI), whichever form was chosen
    assert res.plan.overflow_guard.get("lstm", 0) > 0
    for name in ("lstm_W_q", "lstm_R_q"):
        rows_k = np.pad(q[name][0].T.astype(np.int64), ((0, 0), (0, q[name].shape[1] % 2)))
        pos, neg = np.maximum(rows_k, 0) * 255, np.minimum(rows_k, 0) * 255
        assert (pos[:, 0::2] + pos[:, 1::2]).max() <= 32767 and (neg[:, 0::2] + neg[:, 1::2]).min() >= -32768


@pytest.mark.parametrize("recipe", [DYNAMIC, WEIGHT_ONLY], ids=["dynamic", "weight-only"])
def test_the_choice_is_deterministic(recipe, tmp_path):
    m = table_model(outlier_rows(500, 16))
    a = lowbit.quantize(m, recipe=recipe, progress=False).model.SerializeToString()
    b = lowbit.quantize(m, recipe=recipe, progress=False).model.SerializeToString()
    assert a == b
