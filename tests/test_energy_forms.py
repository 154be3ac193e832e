"""Energy estimate on lowbit's other quantized forms: static int4 weights (com.microsoft DequantizeLinear below
opset 21), 16-bit activations, dynamic MatMulInteger, weight-only MatMulNBits, DynamicQuantizeLSTM."""

from __future__ import annotations

import numpy as np
import pytest

import lowbit
from helpers import model, node, weight
from lowbit.evaluate.energy import count_ops
from test_recurrent import IN, B, H, T, lstm_model

# MatMul (64 -> 128), Relu, Gemm (128 -> 64), MatMul (64 -> 10): MACs per sample.
MLP_MACS = 64 * 128 + 128 * 64 + 64 * 10


def _mlp():
    return model(
        [
            node("MatMul", ["x", "w1"], ["h1"], "mm1"),
            node("Relu", ["h1"], ["r1"], "relu"),
            node("Gemm", ["r1", "w2", "b2"], ["h2"], "gemm", transB=1),
            node("MatMul", ["h2", "w3"], ["y"], "mm3"),
        ],
        {"x": ("N", 64)},
        {"y": ("N", 10)},
        {"w1": weight((64, 128), 1), "w2": weight((64, 128), 2), "b2": weight((64,), 3), "w3": weight((64, 10), 4)},
    )


CALIB = [np.random.default_rng(0).normal(0, 1, (16, 64)).astype(np.float32)]
FORMS = {  # recipe scheme, precision of the MACs
    "int8": (lowbit.Scheme(), "int8"),
    "int4 weights": (lowbit.Scheme(weights="int4"), "int8"),  # 4-bit operands are priced as 8-bit
    "uint16 activations": (lowbit.Scheme(activations="uint16"), "int32"),
    "dynamic": (lowbit.Scheme(mode="dynamic"), "int8"),
    "weight-only int4": (lowbit.Scheme(mode="weight_only", weights="int4", block_size=32), "fp32"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_counts_the_float_models_macs(form: str) -> None:
    scheme, precision = FORMS[form]
    q = lowbit.quantize(
        _mlp(), calib=CALIB if scheme.mode == "static" else None, recipe=lowbit.Recipe(default=scheme), progress=False
    ).model
    for batch in (1, 3):
        c = count_ops(q, batch)
        assert c["uncounted"] == []
        assert c["macs"] == {precision: batch * MLP_MACS}
    if "int4" in form:  # stored at 4 bits: well under the int8 model's weight bytes
        int8 = lowbit.quantize(_mlp(), calib=CALIB, progress=False).model
        assert count_ops(q)["weight_bytes"] < 0.7 * count_ops(int8)["weight_bytes"]


def test_lstm_macs_float_and_dynamic() -> None:
    m = lstm_model()
    expected = T * B * 4 * H * (IN + H) + B * H * 5  # LSTM gates over input and hidden state, then the classifier
    assert count_ops(m)["macs"] == {"fp32": expected}
    q = lowbit.quantize(m, recipe=lowbit.Recipe(default=lowbit.Scheme(mode="dynamic")), progress=False).model
    assert "DynamicQuantizeLSTM" in {n.op_type for n in q.graph.node}
    c = count_ops(q)
    assert c["uncounted"] == [] and c["macs"] == {"int8": expected}
