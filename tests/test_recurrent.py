"""Dynamic int8 LSTM (ONNX Runtime's DynamicQuantizeLSTM); GRU stays float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lowbit
from helpers import model, node, op_counts, rel_rms, run, samples, weight
from lowbit import Recipe, Rule, Scheme

DYNAMIC = Recipe(default=Scheme(mode="dynamic"))
H, IN, T, B = 16, 10, 7, 2  # hidden size, input size, time steps, batch


def lstm_model(direction: str = "forward", seed: int = 0, **attrs) -> onnx.ModelProto:
    """LSTM -> Y (T, D, B, H) read by a classifier MatMul on the last hidden state, plus Y_c as an output."""
    d = 2 if direction == "bidirectional" else 1
    return model(
        [
            node("LSTM", ["x", "W", "R", "B"], ["y", "yh", "yc"], "lstm", hidden_size=H, direction=direction, **attrs),
            node("Reshape", ["yh", "shape"], ["flat"], "flatten"),
            node("MatMul", ["flat", "w_fc"], ["logits"], "fc"),
        ],
        {"x": (T, B, IN)},
        {"logits": (B, 5), "yc": (d, B, H), "y": (T, d, B, H)},
        {
            "W": weight((d, 4 * H, IN), 1 + seed, 0.3),
            "R": weight((d, 4 * H, H), 2 + seed, 0.3),
            "B": weight((d, 8 * H), 3 + seed, 0.1),
            "shape": np.array([B, d * H], np.int64),
            "w_fc": weight((d * H, 5), 4 + seed),
        },
    )


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_lstm_becomes_dynamic_quantize_lstm_close_to_float(direction, per_channel):
    m = lstm_model(direction)
    res = lowbit.quantize(m, recipe=Recipe(default=Scheme(mode="dynamic", per_channel=per_channel)), progress=False)
    counts = op_counts(res.model)
    assert counts["DynamicQuantizeLSTM"] == 1 and counts["LSTM"] == 0 and counts["MatMulInteger"] == 1
    q = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    d = 2 if direction == "bidirectional" else 1
    # ORT's layout: W (D, input, 4H), R (D, H, 4H), int8; scales per direction or per (direction, gate row).
    assert q["lstm_W_q"].shape == (d, IN, 4 * H) and q["lstm_W_q"].dtype == np.int8
    assert q["lstm_R_q"].shape == (d, H, 4 * H)
    # per_channel: a scale per gate row only where one per direction loses too much (ops/granularity.py)
    rows = res.plan.nodes["lstm"].details["granularity"] == "per-channel"
    assert rows == (per_channel and "per-channel" in res.plan.nodes["lstm"].reason)
    assert q["lstm_W_s"].shape == ((d, 4 * H) if rows else (d,))
    assert not q["lstm_W_zp"].any() and not q["lstm_R_zp"].any()
    feeds = samples(m, 8)
    ref = run(m, feeds, float_model=True)
    got = run(res.model, feeds, mode="kernels")
    # per-tensor scales span all four gates and the overflow guard trims them, so they lose more
    limit = 0.015 if rows else 0.1
    for a, b in zip(ref, got):
        assert rel_rms(a, b) < limit
    assert np.mean(np.argmax(ref[0], 1) == np.argmax(got[0], 1)) >= (0.9 if rows else 0.75)
    n = res.plan.nodes["lstm"]
    assert n.quantized and "DynamicQuantizeLSTM" in n.reason
    p = res.plan.tensors["lstm:1"]
    assert p.dtype == "int8" and p.kind == "weight" and len(p.scale) == (d * 4 * H if rows else d)
    assert len(res.plan.tensors["lstm:2"].scale) == len(p.scale)


def test_lstm_weights_dequantize_to_the_float_weights():
    m = lstm_model("bidirectional")
    res = lowbit.quantize(m, recipe=Recipe(default=Scheme(mode="dynamic", avoid_overflow=False)), progress=False)
    q = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    w = onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "R"))
    s = np.asarray(res.plan.tensors["lstm:2"].scale, np.float32).reshape(2, -1)  # per gate row or per direction
    deq = q["lstm_R_q"].transpose(0, 2, 1).astype(np.float32) * s[..., None]
    assert np.abs(deq - w).max() <= s.max() * 0.5 + 1e-6
    assert not res.plan.overflow_guard


@pytest.mark.parametrize("per_channel", [True, False])
def test_overflow_guard_keeps_every_pair_in_int16(per_channel):
    res = lowbit.quantize(
        lstm_model(), recipe=Recipe(default=Scheme(mode="dynamic", per_channel=per_channel)), progress=False
    )
    q = {t.name: onnx.numpy_helper.to_array(t).astype(np.int64) for t in res.model.graph.initializer}
    assert res.plan.overflow_guard["lstm"] > 0
    for name in ("lstm_W_q", "lstm_R_q"):
        rows = q[name][0].T  # (4H, K): the reduction axis last, as the kernel pairs it
        rows = np.pad(rows, ((0, 0), (0, rows.shape[1] % 2)))
        pos, neg = np.maximum(rows, 0) * 255, np.minimum(rows, 0) * 255
        assert (pos[:, 0::2] + pos[:, 1::2]).max() <= 32767 and (neg[:, 0::2] + neg[:, 1::2]).min() >= -32768


def test_same_input_same_bytes_and_plan_reuse_reproduces_them(tmp_path):
    m = lstm_model()
    path = tmp_path / "lstm.onnx"
    onnx.save(m, str(path))
    a = lowbit.quantize(path, tmp_path / "a.onnx", recipe=DYNAMIC, progress=False)
    lowbit.quantize(path, tmp_path / "b.onnx", recipe=DYNAMIC, progress=False)
    c = lowbit.quantize(path, tmp_path / "c.onnx", plan=tmp_path / "a.plan.json", progress=False)
    first = (tmp_path / "a.onnx").read_bytes()
    assert first == (tmp_path / "b.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()
    assert a.plan.tensors["lstm:1"] == c.plan.tensors["lstm:1"] and "lstm:2" in c.plan.tensors
    # a retrained model (other weights) with the same plan: new weights quantized, same structure
    d = lowbit.quantize(lstm_model(seed=7), plan=tmp_path / "a.plan.json", progress=False)
    assert op_counts(d.model) == op_counts(a.model)
    assert d.plan.tensors["lstm:1"].scale != a.plan.tensors["lstm:1"].scale


def test_lstm_that_cannot_be_quantized_stays_float_with_a_reason():
    m = lstm_model()
    asym = lowbit.quantize(m, recipe=Recipe(default=Scheme(mode="dynamic", symmetric_weights=False)), progress=False)
    assert not asym.plan.nodes["lstm"].quantized and "zero weight zero points" in asym.plan.nodes["lstm"].reason
    assert op_counts(asym.model)["LSTM"] == 1 and asym.plan.nodes["fc"].quantized
    wo = lowbit.quantize(m, recipe=Recipe(default=Scheme(mode="weight_only")), progress=False)
    assert not wo.plan.nodes["lstm"].quantized and "use mode dynamic" in wo.plan.nodes["lstm"].reason
    # a rule keeps it float while the classifier is still quantized
    kept = lowbit.quantize(
        m, recipe=Recipe(default=Scheme(mode="dynamic"), rules=(Rule(op_types=("LSTM",)),)), progress=False
    )
    assert op_counts(kept.model)["LSTM"] == 1 and op_counts(kept.model)["MatMulInteger"] == 1
    batch_first = model(
        [node("LSTM", ["x", "W", "R"], ["y"], "lstm", hidden_size=4, layout=1)],
        {"x": (2, 3, 5)},
        {"y": (2, 3, 1, 4)},
        {"W": weight((1, 16, 5)), "R": weight((1, 16, 4))},
        opset=17,
    )
    res = lowbit.quantize(batch_first, recipe=DYNAMIC, progress=False)
    assert not res.plan.nodes["lstm"].quantized and "layout=1" in res.plan.nodes["lstm"].reason


def test_gru_stays_float_but_its_classifier_is_quantized():
    m = model(
        [
            node("GRU", ["x", "W", "R"], ["y", "h"], "gru", hidden_size=4),
            node("Reshape", ["h", "shape"], ["flat"], "flatten"),
            node("MatMul", ["flat", "w"], ["z"], "fc"),
        ],
        {"x": (3, 1, 5)},
        {"z": (1, 3)},
        {"W": weight((1, 12, 5)), "R": weight((1, 12, 4)), "shape": np.array([1, 4], np.int64), "w": weight((4, 3), 2)},
    )
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)
    assert not res.plan.nodes["gru"].quantized and "no dynamic integer GRU kernel" in res.plan.nodes["gru"].reason
    assert res.plan.nodes["fc"].quantized and op_counts(res.model)["MatMulInteger"] == 1


def test_torch_lstm_classifier_exported_and_quantized():
    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(12, 24, batch_first=True, bidirectional=True)
            self.fc = torch.nn.Linear(48, 6)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.fc(y.mean(dim=1))

    net = Net().eval()
    x = torch.randn(4, 20, 12)
    res = lowbit.quantize(net, example_inputs=(x,), recipe=DYNAMIC, progress=False)
    counts = op_counts(res.model)
    assert counts["DynamicQuantizeLSTM"] == 1 and counts["LSTM"] == 0 and counts["MatMulInteger"] == 1
    with torch.no_grad():
        ref = net(x).numpy()
    got = run(res.model, [{"x": x.numpy()}], mode="kernels")[0]
    assert rel_rms(ref, got) < 0.03


def test_per_tensor_guard_keeps_the_cheaper_of_trimming_and_a_larger_scale():
    from lowbit.ops.recurrent import _quantize_gates
    from lowbit.weights import guard_overflow, quantize_weight

    w = weight((1, 4 * H, H), 2, 0.3)
    scheme = Scheme(mode="dynamic", per_channel=False)
    got = _quantize_gates(w, scheme)
    plain = quantize_weight(w[0], None, "int8", True)
    trimmed, _, changed = guard_overflow(w[0], plain, np.full((4 * H, H), 255), False)
    assert changed and got.guarded_channels == changed
    err = lambda q, s: float(np.sum((q.astype(np.float64) * s - w[0]) ** 2))  # noqa: E731
    assert err(got.q[0], got.scale[0]) <= err(trimmed, plain.scale)
    assert err(got.q[0], got.scale[0]) >= err(plain.q, plain.scale)  # unguarded is the lower bound
