"""Embedding tables in weight-only mode as recommendation models use them: several tables, a table read by two
Gathers, index tensors of rank 1 and 2 (int64 and int32, negative ids), rows shorter than or not a multiple of the
int4 block, hybrid recipes per table, and plans that reproduce int4 models byte for byte."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from helpers import op_counts, rel_rms, run, weight
from lowbit import Recipe, Rule, Scheme
from lowbit.weights import quantize_blocks

INT8 = Scheme(mode="weight_only")


def int4(block: int = 32, symmetric: bool = True) -> Scheme:
    return Scheme(mode="weight_only", weights="int4", block_size=block, symmetric_weights=symmetric)


def tables_model(tables: dict[str, tuple[int, int]], lookups: list[tuple[str, str, list, int]]) -> onnx.ModelProto:
    """Gathers `name` = table[ids] for lookups (node name, table, index shape, index dtype); every output is a graph
    output, so each lookup is checked on its own."""
    inits = [numpy_helper.from_array(weight(shape, seed=i), t) for i, (t, shape) in enumerate(tables.items())]
    nodes = [helper.make_node("Gather", [t, f"{n}_ids"], [n], name=n) for n, t, _, _ in lookups]
    inputs = [helper.make_tensor_value_info(f"{n}_ids", dt, shape) for n, _, shape, dt in lookups]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, shape + [tables[t][1]]) for n, t, shape, _ in lookups
    ]
    m = helper.make_model(
        helper.make_graph(nodes, "tables", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def feeds_for(m: onnx.ModelProto, tables: dict[str, tuple[int, int]], lookups: list, batch: int = 5) -> dict:
    r = np.random.default_rng(3)
    out = {}
    for n, t, shape, dt in lookups:
        dims = [batch if isinstance(d, str) else d for d in shape]
        v = tables[t][0]
        out[f"{n}_ids"] = r.integers(-v, v, dims).astype(np.int64 if dt == TensorProto.INT64 else np.int32)
    return out


def table_of(m: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == name)


def stored_bytes(m: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in m.graph.initializer)


@pytest.mark.parametrize(
    # int8: one scale per table (this Gaussian table reaches 40 dB with it, granularity.py), ~1% error
    "scheme,limit",
    [(INT8, 0.015), (int4(32), 0.15), (int4(16, False), 0.12)],
    ids=["int8", "int4", "int4-affine"],
)
def test_a_table_read_by_two_gathers_is_stored_once(scheme, limit):
    tables = {"items": (3000, 32)}
    lookups = [("item", "items", ["N"], TensorProto.INT64), ("history", "items", ["N", 4], TensorProto.INT64)]
    m = tables_model(tables, lookups)
    res = lowbit.quantize(m, recipe=Recipe(default=scheme), progress=False)
    feeds = feeds_for(m, tables, lookups)
    ref, got = run(m, [feeds], float_model=True), run(res.model, [feeds], mode="kernels")
    for r, g in zip(ref, got):
        assert r.shape == g.shape and rel_rms(r, g) < limit
    one = lowbit.quantize(tables_model(tables, lookups[:1]), recipe=Recipe(default=scheme), progress=False)
    assert stored_bytes(res.model) == stored_bytes(one.model) < 3000 * 32 * 4 * 0.3
    assert res.plan.nodes["item"].quantized and res.plan.nodes["history"].quantized


@pytest.mark.parametrize("dim,block", [(24, 32), (16, 32), (8, 16), (48, 32), (17, 16)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_rows_not_a_multiple_of_the_block(dim, block, symmetric):
    """ONNX Runtime needs a power-of-two block >= 16 even when rows are shorter; the last block may be partial."""
    tables = {"t": (500, dim)}
    lookups = [("e", "t", ["N", 3], TensorProto.INT32)]
    m = tables_model(tables, lookups)
    res = lowbit.quantize(m, recipe=Recipe(default=int4(block, symmetric)), progress=False)
    counts = op_counts(res.model)
    if symmetric and dim % 2 == 0:  # bytes of two nibbles, unpacked by standard ops (faster than the contrib op)
        assert counts["GatherBlockQuantized"] == 0 and counts["Mod"] == counts["BitShift"] == 1
        assert table_of(res.model, f"t_n4_{block}").shape == (500, dim // 2)
    else:
        gbq = next(n for n in res.model.graph.node if n.op_type == "GatherBlockQuantized")
        assert helper.get_attribute_value(next(a for a in gbq.attribute if a.name == "block_size")) == block
    feeds = feeds_for(m, tables, lookups)
    got = run(res.model, [feeds], mode="kernels")[0]
    deq = quantize_blocks(table_of(m, "t"), block, symmetric).dequantize()
    want = deq[feeds["e_ids"]]
    assert got.shape == (5, 3, dim) and np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    p = res.plan.tensors["e:0"]
    assert p.block_size == block and len(p.scale) == 500 * -(-dim // block)


def test_hybrid_recipe_per_table():
    tables = {"users": (2000, 16), "ads": (1000, 32), "tiny": (20, 8)}
    lookups = [
        ("user", "users", ["N"], TensorProto.INT64),
        ("ad", "ads", ["N"], TensorProto.INT64),
        ("small", "tiny", ["N"], TensorProto.INT64),
    ]
    m = tables_model(tables, lookups)
    rec = Recipe(default=INT8, rules=(Rule(names=("ad",), scheme=int4(32)), Rule(names=("small",), scheme=None)))
    res = lowbit.quantize(m, recipe=rec, progress=False)
    counts = op_counts(res.model)
    # float 'small'; int8 table (one scale is enough for this Gaussian table, granularity.py); int4 bytes and scales
    assert counts["Gather"] == 1 + 1 + 2 and counts["Mod"] == 1 and counts["DequantizeLinear"] == 2
    assert not res.plan.nodes["small"].quantized and res.plan.nodes["small"].rule.startswith("rule 1")
    assert "int4" in res.plan.nodes["ad"].reason and "int8 per-tensor" in res.plan.nodes["user"].reason
    feeds = feeds_for(m, tables, lookups)
    ref, got = run(m, [feeds], float_model=True), run(res.model, [feeds], mode="kernels")
    assert np.array_equal(ref[2], got[2])  # kept float
    assert rel_rms(ref[0], got[0]) < 0.01 and rel_rms(ref[1], got[1]) < 0.15


def test_reapplying_an_int4_plan_reproduces_the_model(tmp_path):
    tables = {"t": (400, 48)}
    lookups = [("e", "t", ["N"], TensorProto.INT64)]
    emb = tables_model(tables, lookups)
    # Add an MLP layer so the plan holds MatMulNBits blocks as well as GatherBlockQuantized ones.
    g = emb.graph
    g.initializer.append(numpy_helper.from_array(weight((48, 40), 5), "w"))
    g.node.append(helper.make_node("MatMul", ["e", "w"], ["y"], name="fc"))
    g.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 40]))
    src = tmp_path / "m.onnx"
    onnx.save(emb, src)
    rec = Recipe(default=int4(64, symmetric=False), rules=(Rule(op_types=("Gather",), scheme=int4(16)),))
    first = lowbit.quantize(src, tmp_path / "a.onnx", recipe=rec, progress=False)
    again = lowbit.quantize(src, tmp_path / "b.onnx", plan=tmp_path / "a.plan.json", progress=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    plan = lowbit.Plan.load(tmp_path / "a.plan.json")
    assert plan.tensors["e:0"].block_size == 16 and plan.tensors["fc:1"].block_size == 64
    assert len(plan.tensors["fc:1"].scale) == 40 * 1  # K = 48 in one block of 64
    assert again.plan.tensors == first.plan.tensors
    nbits = next(n for n in first.model.graph.node if n.op_type == "MatMulNBits")
    assert helper.get_attribute_value(next(a for a in nbits.attribute if a.name == "block_size")) == 64
    assert table_of(first.model, "t_s4_16").shape == (400, 3)  # 48 columns in blocks of 16


def _dlrm_example():
    """examples/dlrm.py as a module: the test trains the same model on the same kind of generated clicks."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("dlrm_example", Path(__file__).parents[1] / "examples" / "dlrm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tiny_dlrm_keeps_its_auc_with_int8_and_int4_tables(tmp_path):
    import sklearn.metrics as sklearn_metrics
    import torch

    ex = _dlrm_example()
    cards = (20_000, 5_000, 2_000, 1_000)
    train, test = (
        ex.make_clicks(60_000, seed=0, cardinalities=cards),
        ex.make_clicks(20_000, seed=1, cardinalities=cards),
    )
    torch.manual_seed(0)
    model = ex.DLRM(cards)
    ex.train(model, train, epochs=1)
    src = tmp_path / "dlrm.onnx"
    ex.export(model, test, src)
    auc = {"float": sklearn_metrics.roc_auc_score(test.label, ex.predict(src, test))}
    sizes = {"float": src.stat().st_size}
    recipes = ex.recipes()
    chosen = {"int8": ex.DEFAULT, "int4": "int4 rows (block 32 = row), weight-only int8 MLP"}
    for key, label in chosen.items():
        res = lowbit.quantize(src, tmp_path / f"{key}.onnx", recipe=recipes[label], progress=False)
        auc[key] = sklearn_metrics.roc_auc_score(test.label, ex.predict(res.output, test))
        sizes[key] = res.output.stat().st_size
        gathers = [d for d in res.plan.nodes.values() if d.op_type == "Gather" and d.quantized]
        assert len(gathers) == len(cards) + 1  # every table, and the history lookup into the item table
    # It learned something beyond the base rate (the hidden model allows ~0.85 here) ...
    assert auc["float"] > 0.68, auc
    # ... and quantized tables keep it; a wrong scale, sign or nibble order would cost far more than this.
    assert abs(auc["int8"] - auc["float"]) < 0.005, auc
    assert abs(auc["int4"] - auc["float"]) < 0.015, auc
    # The item table is read by two Gathers and stored once: int8 ~ 1/4 (+ its scales), int4 ~ 1/8 (+ scales).
    assert sizes["int8"] < 0.31 * sizes["float"] and sizes["int4"] < 0.19 * sizes["float"], sizes


def test_one_scale_per_table_is_a_dequantize_after_the_gather():
    tables = {"t": (1000, 32)}
    lookups = [("e", "t", ["N", 2], TensorProto.INT64)]
    m = tables_model(tables, lookups)
    # An Unsqueeze after the lookup, as DLRM's stacking has: ONNX Runtime propagates the DequantizeLinear past it.
    m.graph.output[0].name = "y"
    m.graph.output[0].type.tensor_type.shape.dim.insert(1, onnx.TensorShapeProto.Dimension(dim_value=1))
    m.graph.initializer.append(numpy_helper.from_array(np.array([1]), "axis1"))
    m.graph.node.append(helper.make_node("Unsqueeze", ["e", "axis1"], ["y"], name="unsqueeze"))
    res = lowbit.quantize(m, recipe=Recipe(default=Scheme(mode="weight_only", per_channel=False)), progress=False)
    counts = op_counts(res.model)
    assert counts["Gather"] == 1 and counts["DequantizeLinear"] == 1 and counts["Mul"] == 0  # one lookup per id
    feeds = feeds_for(m, tables, lookups)
    assert rel_rms(run(m, [feeds], float_model=True)[0], run(res.model, [feeds], mode="kernels")[0]) < 0.02
    assert "per-tensor" in res.plan.nodes["e"].reason and res.plan.tensors["e:0"].axis is None


def test_uint8_tables_are_a_one_line_error():
    m = tables_model({"t": (100, 16)}, [("e", "t", ["N"], TensorProto.INT64)])
    rec = Recipe(default=Scheme(mode="weight_only", weights="uint8", symmetric_weights=False))
    with pytest.raises(lowbit.LowbitError, match="uint8 weights cannot be used on Gather node 'e'") as e:
        lowbit.quantize(m, recipe=rec, progress=False)
    assert "\n" not in str(e.value)


def _lookup_then(reader: str) -> onnx.ModelProto:
    """ids -> Gather(table 2000 x 64) -> `reader` -> y (LayerNormalization runs in float; MatMul is quantized)."""
    table = numpy_helper.from_array(weight((2000, 64), seed=5), "table")
    extra = (
        [numpy_helper.from_array(np.ones(64, np.float32), "g"), numpy_helper.from_array(np.zeros(64, np.float32), "b")]
        if reader == "LayerNormalization"
        else [numpy_helper.from_array(weight((64, 16), seed=6), "w")]
    )
    ins = ["e", "g", "b"] if reader == "LayerNormalization" else ["e", "w"]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="lookup"), helper.make_node(reader, ins, ["y"])]
    width = 64 if reader == "LayerNormalization" else 16
    m = helper.make_model(
        helper.make_graph(
            nodes,
            "lookup",
            [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, width])],
            [table, *extra],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    m.ir_version = 8
    return m


@pytest.mark.parametrize("reader", ["LayerNormalization", "MatMul"])
def test_static_mode_stores_an_embedding_table_int8(reader):
    m = _lookup_then(reader)
    ids = [{"ids": np.random.default_rng(i).integers(0, 2000, (4, 6))} for i in range(4)]
    res = lowbit.quantize(m, calib=ids, progress=False)
    decision = res.plan.nodes["lookup"]
    assert decision.mode == "weight_only" and decision.quantized, decision.reason
    assert stored_bytes(res.model) < stored_bytes(m) / 3  # the 512 KB table is int8 now (was float: 100% of size)
    assert rel_rms(run(m, ids, float_model=True)[0], run(res.model, ids, mode="kernels")[0]) < 0.03


def test_static_uint8_weights_leave_a_table_float_rather_than_refuse():
    m = _lookup_then("LayerNormalization")
    ids = [{"ids": np.random.default_rng(i).integers(0, 2000, (4, 6))} for i in range(4)]
    rec = Recipe(default=Scheme(weights="uint8", symmetric_weights=False))
    res = lowbit.quantize(m, calib=ids, recipe=rec, progress=False)
    assert not res.plan.nodes["lookup"].quantized  # tables are int8 or int4: kept float, no error
