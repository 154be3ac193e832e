"""Decomposed layer norms (PyTorch below opset 17) become one LayerNormalization before quantization."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.passes.layernorm import fuse_layer_norm


def decomposed(
    opset: int = 14, square: str = "Pow", affine: bool = True, axes: tuple[int, ...] = (-1,), extra_reader: bool = False
) -> onnx.ModelProto:
    """x [N, 5, 8] -> (x - mean) / sqrt(mean((x - mean)^2) + eps) [* gamma + beta] -> y."""
    r = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array(r.normal(size=8).astype(np.float32), "gamma"),
        numpy_helper.from_array(r.normal(size=8).astype(np.float32), "beta"),
    ]

    def mean(x: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [x, "axes"], [out])
        return helper.make_node("ReduceMean", [x], [out], axes=list(axes))

    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
    sq = helper.make_node("Pow", ["d", "two"], ["p"]) if square == "Pow" else helper.make_node("Mul", ["d", "d"], ["p"])
    nodes = [
        mean("x", "m"),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        sq,
        mean("p", "v"),
        helper.make_node("Add", ["v", "eps"], ["e"]),
        helper.make_node("Sqrt", ["e"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["n" if affine else "y"], name="/enc/norm/Div"),
    ]
    if affine:
        nodes += [helper.make_node("Mul", ["n", "gamma"], ["g"]), helper.make_node("Add", ["g", "beta"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 8])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 5, 1]))
    graph = helper.make_graph(
        nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 8])], outputs, inits
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def outputs(m: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def fused(m: onnx.ModelProto) -> tuple[bool, onnx.ModelProto]:
    model = ir.from_proto(m)
    changed = fuse_layer_norm(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return changed, out


@pytest.mark.parametrize(
    "opset,square,affine,axes",
    [(14, "Pow", True, (-1,)), (13, "Mul", True, (2,)), (17, "Pow", False, (-1,)), (18, "Pow", True, (-2, -1))],
)
def test_decomposed_layer_norm_is_one_node_computing_the_same(opset, square, affine, axes):
    m = decomposed(opset, square, affine, axes)
    changed, out = fused(m)
    ops = [n.op_type for n in out.graph.node]
    assert changed and ops == ["LayerNormalization"], ops
    assert {o.domain: o.version for o in out.opset_import}[""] == max(17, opset)
    x = np.random.default_rng(1).normal(3.0, 2.0, (4, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(outputs(out, x)[0], outputs(m, x)[0], rtol=1e-5, atol=1e-5)


def test_a_chain_whose_variance_is_read_elsewhere_stays_as_it_is():
    changed, out = fused(decomposed(extra_reader=True))
    assert not changed and "LayerNormalization" not in [n.op_type for n in out.graph.node]


def test_normalizing_over_a_middle_axis_stays_as_it_is():
    changed, _ = fused(decomposed(axes=(1,)))  # LayerNormalization normalizes over trailing axes only
    assert not changed


def test_an_opset_13_model_with_roi_align_keeps_its_opset_and_its_chain():
    m = decomposed(13)
    roi = helper.make_node("RoiAlign", ["img", "rois", "idx"], ["pooled"])
    m.graph.node.append(roi)
    m.graph.input.extend(
        [
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 1, 4, 4]),
            helper.make_tensor_value_info("rois", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, [1]),
        ]
    )
    m.graph.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 1, 1, 1]))
    changed, out = fused(m)  # RoiAlign 16 changed its default coordinates: opset 17 would change its outputs
    assert not changed and {o.domain: o.version for o in out.opset_import}[""] == 13


@pytest.mark.slow
def test_minilm_exported_at_opset_14_quantizes_as_well_as_at_17(tmp_path):
    """At opset 14 each of MiniLM's 13 LayerNorms is nine nodes; quantized unfused, static int8 kept a mean
    cosine of 0.575 with float over 256 held-out sentences (the variance got 256 levels). Fused: 0.940, as the
    opset-17 export's static int8 (bench/RESULTS_MINILM.md)."""
    import lowbit
    from lowbit_zoo import zoo

    path = zoo.minilm_onnx(tmp_path / "minilm14.onnx", opset=14)
    assert "LayerNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    calib = [zoo.minilm_tokenize(zoo.text_sentences(32, "calib")[i : i + 8]) for i in range(0, 32, 8)]
    res = lowbit.quantize(str(path), calib=calib, progress=False)
    assert sum(n.op_type == "LayerNormalization" for n in res.model.graph.node) == 13
    sentences = zoo.text_sentences(256, "eval")
    f = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    cos = []
    for i in range(0, 256, 16):
        feeds = zoo.minilm_tokenize(sentences[i : i + 16])
        a, b = f.run(None, feeds)[0], q.run(None, feeds)[0]
        cos.extend((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert np.mean(cos) > 0.92, np.mean(cos)
