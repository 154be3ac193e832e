"""Quantization-aware training: prepare_qat, training steps, export to lowbit's QDQ form."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

import lowbit  # noqa: E402
import lowbit.torch as lt  # noqa: E402
from lowbit.runtimes.ort import session  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_torch import Branchy, SmallCNN, data, small_cnn  # noqa: E402


class Features(torch.nn.Module):
    """Ends in a quantized tensor (pooled features), so the output has a quantization step."""

    def __init__(self) -> None:
        super().__init__()
        self.body = SmallCNN().features

    def forward(self, x):
        return self.body(x)


def batches(n: int = 4) -> list:
    return [torch.from_numpy(data(16, seed=10 + i)) for i in range(n)]


def train_steps(q, steps: int = 3) -> None:
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.02, momentum=0.9)
    target = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    for b in batches(steps):
        out = q(b)
        loss = torch.nn.functional.cross_entropy(out, target) if out.shape[1] == 10 else out.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_export_matches_fake_quant_within_one_step(tmp_path: Path, bits: int) -> None:
    torch.manual_seed(0)
    m = Features().eval()
    q = lt.prepare_qat(m, example_inputs=(batches(1)[0][:1],), calib=batches(), weight_bits=bits)
    train_steps(q)
    out_path = tmp_path / "f.onnx"
    res = lt.export(q, out_path, example_inputs=(batches(1)[0][:1],))
    x = data(32, seed=99)
    with torch.no_grad():
        ref = q(torch.from_numpy(x)).numpy()
    step = res.plan.tensors["y"].scale[0]  # the model output is the quantized, flattened pooled features
    for mode in ("simulate", "kernels"):
        out = session(str(out_path), mode=mode).run(None, {"x": x})[0]
        assert np.abs(out - ref).max() <= step * 1.001, mode
    assert np.abs(ref).max() > 20 * step  # a real signal, not all zeros
    plan = lowbit.Plan.load(lowbit.plan.plan_path(out_path))
    weights = [t for t in plan.tensors.values() if t.kind == "weight"]
    assert weights and all(t.axis == 0 and t.dtype == "int8" for t in weights)
    assert all(t.dtype == "uint8" for t in plan.tensors.values() if t.kind == "activation")
    assert all(t.dtype == "int32" for t in plan.tensors.values() if t.kind == "bias")
    q_ints = [i for i in res.model.graph.initializer if i.name.endswith("_w1_q")]
    limit = 2 ** (bits - 1) - 1
    vals = np.concatenate([lowbit_arr(i).ravel() for i in q_ints])
    assert vals.min() >= -limit and vals.max() <= limit and np.abs(vals).max() == limit


def lowbit_arr(t):
    from onnx import numpy_helper
    return numpy_helper.to_array(t)


def test_classifier_export_agrees_with_module(tmp_path: Path) -> None:
    q = lt.prepare_qat(small_cnn(), example_inputs=(batches(1)[0][:1],), calib=batches(), weight_bits=4,
                       freeze_bn_after=1)
    train_steps(q)
    res = lt.export(q, tmp_path / "c.onnx", example_inputs=(batches(1)[0][:1],))
    x = data(64, seed=5)
    with torch.no_grad():
        ref = q(torch.from_numpy(x)).numpy()
    out = session(res.model, mode="kernels").run(None, {"x": x})[0]
    # The float logits come from the Gemm: its inputs (quantized) each off by at most one step move logit j by
    # at most s_in * sum_k |w_jk|.
    fc_in = res.plan.tensors[next(k for k in res.plan.tensors if k.endswith("Flatten_output_0"))].scale[0]
    w = q.fc.linear.weight.detach().abs().sum(1).numpy()
    assert np.all(np.abs(out - ref) <= fc_in * w * 1.001)
    assert np.all(out.argmax(1) == ref.argmax(1))


def test_training_learns_activation_scales_and_freezes_batchnorm() -> None:
    q = lt.prepare_qat(small_cnn(), example_inputs=(batches(1)[0][:1],), calib=batches(), freeze_bn_after=2)
    fq = lt.qat.fake_quantizers(q)
    before = [float(f.scale.detach()) for f in fq]
    conv = q.get_submodule("features.0")
    bn = conv.bn
    means = []
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    for b in batches(4):
        loss = q(b).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        means.append(bn.running_mean.clone())
    assert any(abs(float(f.scale.detach()) - s) > 0 for f, s in zip(fq, before))
    assert not torch.equal(means[0], means[1])  # live for two steps
    assert torch.equal(means[2], means[3])  # frozen afterwards
    assert bool(conv.bn_frozen)


def test_qat_starts_from_the_ptq_solution() -> None:
    """Right after prepare_qat the fake-quant module is close to the float one (calibrated ranges)."""
    m = small_cnn()
    q = lt.prepare_qat(m, example_inputs=(batches(1)[0][:1],), calib=batches()).eval()
    x = torch.from_numpy(data(32, seed=3))
    with torch.no_grad():
        a, b = m(x).numpy(), q(x).numpy()
    assert float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def test_recipe_naming_a_missing_layer_is_one_line_error() -> None:
    recipe = lowbit.Recipe(rules=(lowbit.Rule(names=("features.99",), scheme=lowbit.Scheme()),))
    with pytest.raises(lowbit.LowbitError) as e:
        lt.prepare_qat(small_cnn(), recipe, example_inputs=(batches(1)[0][:1],))
    assert "features.99" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(lowbit.LowbitError, match="nope"):
        lt.prepare_qat(small_cnn(), example_inputs=(batches(1)[0][:1],), weight_bits={"nope*": 4})


def test_untraceable_module_is_one_line_error() -> None:
    with pytest.raises(lowbit.LowbitError) as e:
        lt.prepare_qat(Branchy(), example_inputs=(torch.zeros(1, 1, 8, 8),))
    assert "\n" not in str(e.value) and "trace" in str(e.value)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_untrusted_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.zeros(2), "evil": Evil()}, bad)
    with pytest.raises(lowbit.LowbitError) as e:
        lt.load_checkpoint(bad)
    assert "refusing" in str(e.value) and "\n" not in str(e.value)
    assert "must never run" not in capsys.readouterr().out
    good = tmp_path / "good.pt"
    m = small_cnn()
    torch.save(m.state_dict(), good)
    fresh = SmallCNN()
    lt.load_checkpoint(good, fresh)
    assert torch.equal(fresh.fc.weight, m.fc.weight)
    with pytest.raises(lowbit.LowbitError, match="does not fit"):
        lt.load_checkpoint(good, Branchy())


def test_lowbit_eval_and_diagnose_work_on_the_export(tmp_path: Path, capsys) -> None:
    from lowbit.cli.main import main as cli

    q = lt.prepare_qat(small_cnn(), example_inputs=(batches(1)[0][:1],), calib=batches(), weight_bits=4).eval()
    lt.export(q, tmp_path / "q.onnx", (batches(1)[0][:1],), float_output=tmp_path / "f.onnx")
    np.save(tmp_path / "d.npy", data(16, seed=4))
    np.save(tmp_path / "l.npy", np.arange(16) % 10)
    assert cli(["eval", str(tmp_path / "q.onnx"), "--data", str(tmp_path / "d.npy"), "--labels",
                str(tmp_path / "l.npy"), "--reference", str(tmp_path / "f.onnx"), "--json", "--quiet"]) == 0
    assert cli(["diagnose", str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), "--data", str(tmp_path / "d.npy"),
                "--quiet", "--top", "1", "--budget", "3"]) == 0
    assert "SQNR" in capsys.readouterr().out


def test_mixed_weight_bits_per_layer_and_recipe_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(lowbit.Recipe(rules=(lowbit.Rule(names=("features.*",), scheme=lowbit.Scheme()),)).to_json())
    q = lt.prepare_qat(small_cnn(), str(recipe), example_inputs=(batches(1)[0][:1],), calib=batches(),
                       weight_bits={"features.3": 4}).eval()
    res = lt.export(q, None, (batches(1)[0][:1],))
    from onnx import numpy_helper
    peak = {i.name: int(np.abs(numpy_helper.to_array(i)).max()) for i in res.model.graph.initializer
            if i.name.endswith("_w1_q")}
    assert peak.pop("/features.3/Conv_w1_q") == 7
    assert set(peak.values()) == {127}


def test_sixteen_bit_activations_from_the_recipe(tmp_path: Path) -> None:
    recipe = lowbit.Recipe(rules=(lowbit.Rule(names=("body.0",), scheme=lowbit.Scheme(activations="uint16")),))
    q = lt.prepare_qat(Features().eval(), recipe, example_inputs=(batches(1)[0][:1],), calib=batches())
    train_steps(q, 2)
    res = lt.export(q, tmp_path / "m.onnx", (batches(1)[0][:1],))
    dtypes = {k: t.dtype for k, t in res.plan.tensors.items() if t.kind == "activation"}
    assert dtypes["x"] == "uint16" and dtypes["/body.0/Clip_output_0"] == "uint16"
    assert sum(d == "uint8" for d in dtypes.values()) >= 3
    x = data(16, seed=8)
    with torch.no_grad():
        ref = q(torch.from_numpy(x)).numpy()
    out = session(res.model, mode="kernels").run(None, {"x": x})[0]
    assert np.abs(out - ref).max() <= res.plan.tensors["y"].scale[0] * 1.001


def test_tflite_export_runs_the_qat_model(tmp_path: Path) -> None:
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    from lowbit.export.tflite import export_tflite

    q = lt.prepare_qat(small_cnn(), example_inputs=(batches(1)[0][:1],), calib=batches(), weight_bits=4)
    train_steps(q, 2)
    res = lt.export(q, tmp_path / "q.onnx", (batches(1)[0][:1],))
    export_tflite(tmp_path / "q.onnx", tmp_path / "q.tflite")
    it = litert.Interpreter(model_path=str(tmp_path / "q.tflite"), num_threads=1)
    x = data(1, seed=6)
    inp = it.get_input_details()[0]
    it.allocate_tensors()
    it.set_tensor(inp["index"], x.transpose(0, 2, 3, 1).copy())
    it.invoke()
    out = it.get_tensor(it.get_output_details()[0]["index"])
    with torch.no_grad():
        ref = q(torch.from_numpy(x)).numpy()
    fc_in = res.plan.tensors[next(k for k in res.plan.tensors if k.endswith("Flatten_output_0"))].scale[0]
    bound = fc_in * q.fc.linear.weight.detach().abs().sum(1).numpy()
    assert np.all(np.abs(out - ref) <= 2 * bound)
