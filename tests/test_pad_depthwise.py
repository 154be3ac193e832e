"""onnxruntime target: a depthwise conv whose channel count ORT's fast int8 kernel does not take (not a multiple of 16)
is widened with zero channels, together with every tensor tied to it, and the float model computes the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

import lowbit
from helpers import model, node, quantize, rel_rms, run, samples, weight
from lowbit.passes import pad_depthwise


def _block(c: int = 24, dw_out_is_output: bool = False) -> onnx.ModelProto:
    """expand conv -> HardSwish -> depthwise conv -> HardSwish -> squeeze-excite -> project conv (MobileNetV3)."""
    nodes = [
        node("Conv", ["x", "we", "be"], ["e"], name="expand"),
        node("HardSwish", ["e"], ["e_act"], name="expand_act"),
        node("Conv", ["e_act", "wd", "bd"], ["d"], name="dw", pads=[1, 1, 1, 1], group=c),
        node("HardSwish", ["d"], ["d_act"], name="dw_act"),
        node("GlobalAveragePool", ["d_act"], ["p"], name="gap"),
        node("Conv", ["p", "w1", "b1"], ["s1"], name="fc1"),
        node("Relu", ["s1"], ["r1"], name="relu"),
        node("Conv", ["r1", "w2", "b2"], ["s2"], name="fc2"),
        node("HardSigmoid", ["s2"], ["g"], name="gate", alpha=1 / 6, beta=0.5),
        node("Mul", ["d_act", "g"], ["m"], name="scale"),
        node("Conv", ["m", "wp"], ["y"], name="project"),
    ]
    inits = {
        "we": weight((c, 8, 1, 1), 1),
        "be": weight((c,), 2, 0.1),
        "wd": weight((c, 1, 3, 3), 3),
        "bd": weight((c,), 4, 0.1),
        "w1": weight((8, c, 1, 1), 5),
        "b1": weight((8,), 6, 0.1),
        "w2": weight((c, 8, 1, 1), 7),
        "b2": weight((c,), 8, 0.1),
        "wp": weight((8, c, 1, 1), 9),
    }
    outputs: dict = {"y": (1, 8, 8, 8)}
    if dw_out_is_output:
        outputs["d"] = (1, c, 8, 8)
    return model(nodes, {"x": (1, 8, 8, 8)}, outputs, inits, opset=17)


def test_the_group_is_widened_and_the_float_outputs_stay() -> None:
    m = _block()
    g = ir.from_proto(m)
    ir.passes.common.ShapeInferencePass()(g)
    assert pad_depthwise(g, 16)
    out = ir.to_proto(g)
    onnx.checker.check_model(out, full_check=True)
    convs = {n.name: n for n in out.graph.node}
    assert [a.i for a in convs["dw"].attribute if a.name == "group"] == [32]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert inits[convs["expand"].input[1]].shape == (32, 8, 1, 1)  # zero rows
    assert inits[convs["fc1"].input[1]].shape == (8, 32, 1, 1)  # zero columns
    assert inits[convs["fc2"].input[1]].shape == (32, 8, 1, 1)  # the gate's channels too
    assert inits[convs["project"].input[1]].shape == (8, 32, 1, 1)
    assert not np.any(inits[convs["expand"].input[1]][24:]) and not np.any(inits[convs["project"].input[1]][:, 24:])
    feeds = samples(m, 8)
    ref, got = run(m, feeds, float_model=True)[0], run(out, feeds, float_model=True)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_a_group_a_reader_would_see_widened_stays_as_it_is() -> None:
    g = ir.from_proto(_block(dw_out_is_output=True))
    ir.passes.common.ShapeInferencePass()(g)
    assert not pad_depthwise(g, 16)
    assert g.graph.node("dw").attributes.get_int("group") == 24
    g = ir.from_proto(_block(c=32))  # already a multiple
    ir.passes.common.ShapeInferencePass()(g)
    assert not pad_depthwise(g, 16)


def test_only_the_onnxruntime_target_widens_and_its_model_stays_close_to_float() -> None:
    m = _block()
    fast = quantize(m, lowbit.Recipe(target="onnxruntime"), n=32)
    plain = quantize(m, n=32)

    def group(res: lowbit.QuantizeResult) -> int:
        dw = next(n for n in res.model.graph.node if n.name == "dw")
        return next(a.i for a in dw.attribute if a.name == "group")

    assert (group(fast), group(plain)) == (32, 24)
    feeds = samples(m, 16, seed=7)
    ref = run(m, feeds, float_model=True)[0]
    err_fast = rel_rms(ref, run(fast.model, feeds, mode="kernels")[0])
    err_plain = rel_rms(ref, run(plain.model, feeds, mode="kernels")[0])
    assert err_fast < 0.05 and err_fast <= 1.5 * err_plain + 0.005, (err_fast, err_plain)


def test_diagnose_pairs_the_widened_tensors() -> None:
    """diagnose prepares the float model in the plan's target forms too: its tensors have the quantized model's
    shapes."""
    from lowbit.evaluate.diagnose import diagnose

    m = _block()
    res = quantize(m, lowbit.Recipe(target="onnxruntime"), n=32)
    report = diagnose(m, res.model, samples(m, 8), plan=res.plan)
    assert report.before["cosine"] > 0.99
