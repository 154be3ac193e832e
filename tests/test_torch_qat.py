"""Quantization-aware training: prepare_qat, training steps, export to lowbit's QDQ form."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


W4 = lowbit.Recipe(default=lowbit.Scheme(weights="int4"))


def int4_weights(model) -> dict[str, np.ndarray]:
    """Quantized weight initializers stored as ONNX INT4, as int8 arrays."""
    from onnx import TensorProto, numpy_helper

    return {
        i.name: numpy_helper.to_array(i).astype(np.int8)
        for i in model.graph.initializer
        if i.data_type == TensorProto.INT4 and i.name.endswith("_w1_q")
    }


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
    q = lt.prepare_qat(m, W4 if bits == 4 else None, example_inputs=(batches(1)[0][:1],), calib=batches())
    train_steps(q)
    out_path = tmp_path / "f.onnx"
    res = lt.export_onnx(q, out_path, example_inputs=(batches(1)[0][:1],))
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
    assert len(weights) == 3 and all(t.axis == 0 and t.dtype == f"int{bits}" for t in weights)
    assert all(t.dtype == "uint8" for t in plan.tensors.values() if t.kind == "activation")
    assert all(t.dtype == "int32" for t in plan.tensors.values() if t.kind == "bias")
    stored = (
        int4_weights(res.model)
        if bits == 4
        else {i.name: lowbit_arr(i) for i in res.model.graph.initializer if i.name.endswith("_w1_q")}
    )
    assert len(stored) == 3
    limit = 2 ** (bits - 1) - 1
    vals = np.concatenate([v.ravel() for v in stored.values()])
    assert vals.min() >= -limit and vals.max() <= limit and np.abs(vals).max() == limit


def lowbit_arr(t):
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def test_classifier_export_agrees_with_module(tmp_path: Path) -> None:
    q = lt.prepare_qat(small_cnn(), W4, example_inputs=(batches(1)[0][:1],), calib=batches(), freeze_bn_after=1)
    train_steps(q)
    res = lt.export_onnx(q, tmp_path / "c.onnx", example_inputs=(batches(1)[0][:1],))
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
    with pytest.raises(lowbit.LowbitError, match="nope"), pytest.warns(DeprecationWarning):
        lt.prepare_qat(small_cnn(), example_inputs=(batches(1)[0][:1],), weight_bits={"nope*": 4})
    bad = lowbit.Recipe(exclude_names=("classifier",))
    with pytest.raises(lowbit.LowbitError, match="'classifier', which matches no layer"):
        lt.prepare_qat(small_cnn(), bad, example_inputs=(batches(1)[0][:1],))
    dynamic = lowbit.Recipe(rules=(lowbit.Rule(names=("fc",), scheme=lowbit.Scheme(mode="dynamic")),))
    with pytest.raises(lowbit.LowbitError, match="mode dynamic for 'fc'"):
        lt.prepare_qat(small_cnn(), dynamic, example_inputs=(batches(1)[0][:1],))


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

    q = lt.prepare_qat(small_cnn(), W4, example_inputs=(batches(1)[0][:1],), calib=batches()).eval()
    lt.export_onnx(q, tmp_path / "q.onnx", (batches(1)[0][:1],), float_output=tmp_path / "f.onnx")
    np.save(tmp_path / "d.npy", data(16, seed=4))
    np.save(tmp_path / "l.npy", np.arange(16) % 10)
    assert (
        cli(
            [
                "eval",
                str(tmp_path / "q.onnx"),
                "--data",
                str(tmp_path / "d.npy"),
                "--labels",
                str(tmp_path / "l.npy"),
                "--reference",
                str(tmp_path / "f.onnx"),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "diagnose",
                str(tmp_path / "f.onnx"),
                str(tmp_path / "q.onnx"),
                "--data",
                str(tmp_path / "d.npy"),
                "--quiet",
                "--top",
                "1",
                "--budget",
                "3",
            ]
        )
        == 0
    )
    assert "SQNR" in capsys.readouterr().out


def test_deprecated_weight_bits_still_chooses_per_layer_widths(tmp_path: Path) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(lowbit.Recipe(rules=(lowbit.Rule(names=("features.*",), scheme=lowbit.Scheme()),)).to_json())
    with pytest.warns(DeprecationWarning, match="weight_bits"):
        q = lt.prepare_qat(
            small_cnn(),
            str(recipe),
            example_inputs=(batches(1)[0][:1],),
            calib=batches(),
            weight_bits={"features.3": 4},
        ).eval()
    res = lt.export_onnx(q, None, (batches(1)[0][:1],))
    assert list(int4_weights(res.model)) == ["/features.3/Conv_w1_q"]
    assert {k: t.dtype for k, t in res.plan.tensors.items() if t.kind == "weight"} == {
        "/features.0/Conv:1": "int8",
        "/features.3/Conv:1": "int4",
        "/features.6/Conv:1": "int8",
        "/fc/Gemm:1": "int8",
    }


MIXED = lowbit.Recipe(
    rules=(
        lowbit.Rule(names=("features.3",), scheme=lowbit.Scheme(mode="float")),
        lowbit.Rule(names=("features.6",), scheme=lowbit.Scheme(weights="int4", activations="uint16")),
        lowbit.Rule(op_types=("Gemm",), scheme=lowbit.Scheme(weights="int4")),
    )
)


def test_mixed_recipe_int4_int8_uint16_and_a_float_layer(tmp_path: Path) -> None:
    """One recipe file: features.0 int8, features.3 kept float, features.6 int4 weights with 16-bit output,
    the classifier int4; the export follows it and matches the fake-quant module."""
    path = tmp_path / "mixed.json"
    path.write_text(MIXED.to_json())
    q = lt.prepare_qat(small_cnn(), str(path), example_inputs=(batches(1)[0][:1],), calib=batches(), freeze_bn_after=1)
    assert q.get_submodule("features.3").bits is None and q.get_submodule("features.6").bits == 4
    train_steps(q, 2)
    res = lt.export_onnx(q, tmp_path / "m.onnx", (batches(1)[0][:1],))
    plan = res.plan
    assert {k: t.dtype for k, t in plan.tensors.items() if t.kind == "weight"} == {
        "/features.0/Conv:1": "int8",
        "/features.6/Conv:1": "int4",
        "/fc/Gemm:1": "int4",
    }
    assert not plan.nodes["/features.3/Conv"].quantized and "mode float" in plan.nodes["/features.3/Conv"].reason
    acts = {k: t.dtype for k, t in plan.tensors.items() if t.kind == "activation"}
    assert acts["/features.6/Relu_output_0"] == "uint16" and acts["x"] == "uint8"
    # The float conv reads a quantized tensor and its output is quantized again only where a quantized op reads
    # it (features.6's input): no Q/DQ between the float conv and its fused ReLU6.
    conv3 = next(n for n in res.model.graph.node if n.name == "/features.3/Conv")
    assert any(i.name == conv3.input[1] for i in res.model.graph.initializer)  # float weight, no DequantizeLinear
    assert [n.op_type for n in res.model.graph.node if conv3.output[0] in n.input] == ["Clip"]
    assert sorted(int4_weights(res.model)) == ["/fc/Gemm_w1_q", "/features.6/Conv_w1_q"]
    x = data(64, seed=12)
    with torch.no_grad():
        ref = q(torch.from_numpy(x)).numpy()
    out = session(str(tmp_path / "m.onnx"), mode="kernels").run(None, {"x": x})[0]
    fc_in = plan.tensors[next(k for k in plan.tensors if k.endswith("Flatten_output_0"))].scale[0]
    assert np.all(np.abs(out - ref) <= fc_in * q.fc.linear.weight.detach().abs().sum(1).numpy() * 1.001)


def test_one_recipe_with_onnx_node_names_selects_the_same_layers_in_ptq_and_qat() -> None:
    """Rules naming ONNX nodes as PTQ (and diagnose) write them select the same layers in QAT."""
    recipe = lowbit.Recipe(
        rules=(
            lowbit.Rule(names=("/features/features.3/Conv",), scheme=lowbit.Scheme(mode="float")),
            lowbit.Rule(names=("*/features.6/*",), scheme=lowbit.Scheme(weights="int4", activations="uint16")),
            lowbit.Rule(op_types=("Gemm",), scheme=lowbit.Scheme(weights="int4")),
        )
    )
    example = (batches(1)[0][:1],)
    ptq = lowbit.quantize(small_cnn(), example_inputs=example, calib=data(32), recipe=recipe, progress=False)
    qat = lt.export_onnx(lt.prepare_qat(small_cnn(), recipe, example_inputs=example, calib=batches()), None, example)

    def layers(plan) -> dict[str, str]:
        """layer -> weight type, or float (plan keys: PTQ '/features/features.3/Conv', QAT '/features.3/Conv')"""
        out = {}
        for name, d in plan.nodes.items():
            if d.op_type in ("Conv", "Gemm"):
                t = plan.tensors.get(f"{name}:1")
                out[name.split("/")[-2]] = t.dtype if d.quantized and t is not None else "float"
        return out

    assert (
        layers(ptq.plan)
        == layers(qat.plan)
        == {"features.0": "int8", "features.3": "float", "features.6": "int4", "fc": "int4"}
    )
    # features.6's output (after its ReLU, module features.8) is 16-bit in both
    assert ptq.plan.tensors["/features/features.8/Relu_output_0"].dtype == "uint16"
    assert qat.plan.tensors["/features.6/Relu_output_0"].dtype == "uint16"
    with pytest.raises(lowbit.LowbitError, match="'/features/features.99/Conv', which matches no layer"):
        lt.prepare_qat(
            small_cnn(), lowbit.Recipe(exclude_names=("/features/features.99/Conv",)), example_inputs=example
        )


@pytest.mark.parametrize("keep", ["body.0", "body.3"])
def test_float_layer_export_matches_within_one_step(tmp_path: Path, keep: str) -> None:
    """A layer kept float (first layer: the model input stays float too; middle layer: its output is quantized
    by its reader) trains without fake quantization and exports float; the export matches within one step."""
    recipe = (
        lowbit.Recipe(exclude_names=(keep,))
        if keep == "body.0"
        else lowbit.Recipe(rules=(lowbit.Rule(names=(keep,), scheme=lowbit.Scheme(mode="float")),))
    )
    q = lt.prepare_qat(Features().eval(), recipe, example_inputs=(batches(1)[0][:1],), calib=batches())
    train_steps(q, 2)
    res = lt.export_onnx(q, tmp_path / "m.onnx", (batches(1)[0][:1],))
    conv = f"/{keep}/Conv"
    assert not res.plan.nodes[conv].quantized and f"{conv}:1" not in res.plan.tensors
    assert len([t for t in res.plan.tensors.values() if t.kind == "weight"]) == 2
    assert ("x" in res.plan.tensors) == (keep != "body.0")
    x = data(32, seed=21)
    with torch.no_grad():
        ref = q(torch.from_numpy(x)).numpy()
    step = res.plan.tensors["y"].scale[0]
    for mode in ("simulate", "kernels"):
        out = session(str(tmp_path / "m.onnx"), mode=mode).run(None, {"x": x})[0]
        assert np.abs(out - ref).max() <= step * 1.001, mode
    assert np.abs(ref).max() > 20 * step


def test_one_recipe_for_ptq_and_qat_int4_weights_shrink_the_file(tmp_path: Path) -> None:
    """The same W4A8 recipe drives PTQ (lowbit.quantize on the module) and QAT; both store INT4 weights, two
    per byte, and ONNX Runtime runs them close to float."""
    m, x = small_cnn(), data(64, seed=2)
    example = (batches(1)[0][:1],)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    n_weights = sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight") and p.ndim > 1)
    sizes = {}
    for name, recipe in (("w8", lowbit.Recipe()), ("w4", W4)):
        ptq = lowbit.quantize(
            m, tmp_path / f"ptq_{name}.onnx", example_inputs=example, calib=data(64), recipe=recipe, progress=False
        )
        q = lt.prepare_qat(m, recipe, example_inputs=example, calib=batches())
        qat = lt.export_onnx(q, tmp_path / f"qat_{name}.onnx", example)
        for res in (ptq, qat):
            weights = {k: t.dtype for k, t in res.plan.tensors.items() if t.kind == "weight"}
            assert len(weights) == 4 and set(weights.values()) == {"int8" if name == "w8" else "int4"}
            stored = [i for i in res.model.graph.initializer if i.name.endswith("_w1_q")]
            # INT4: two weights per byte (each of these tensors has an even size)
            assert sum(len(i.raw_data) for i in stored) == n_weights // (2 if name == "w4" else 1)
            out = session(res.model, mode="kernels").run(None, {"x": x})[0]
            cos = float(np.sum(out * ref) / np.linalg.norm(out) / np.linalg.norm(ref))
            assert cos > 0.98, (name, cos)
        sizes[name] = [(tmp_path / f"{k}_{name}.onnx").stat().st_size for k in ("ptq", "qat")]
    assert all(w4 < w8 for w8, w4 in zip(sizes["w8"], sizes["w4"]))


def test_sixteen_bit_activations_from_the_recipe(tmp_path: Path) -> None:
    recipe = lowbit.Recipe(rules=(lowbit.Rule(names=("body.0",), scheme=lowbit.Scheme(activations="uint16")),))
    q = lt.prepare_qat(Features().eval(), recipe, example_inputs=(batches(1)[0][:1],), calib=batches())
    train_steps(q, 2)
    res = lt.export_onnx(q, tmp_path / "m.onnx", (batches(1)[0][:1],))
    dtypes = {k: t.dtype for k, t in res.plan.tensors.items() if t.kind == "activation"}
    assert dtypes["x"] == "uint16" and dtypes["/body.0/Clip_output_0"] == "uint16"
    assert sum(d == "uint8" for d in dtypes.values()) >= 3
    x = data(16, seed=8)
    with torch.no_grad():
        ref = q(torch.from_numpy(x)).numpy()
    out = session(res.model, mode="kernels").run(None, {"x": x})[0]
    assert np.abs(out - ref).max() <= res.plan.tensors["y"].scale[0] * 1.001


def test_tflite_export_runs_the_qat_model(tmp_path: Path) -> None:
    import ai_edge_litert.interpreter as litert

    from lowbit.export.tflite import export_tflite

    q = lt.prepare_qat(small_cnn(), W4, example_inputs=(batches(1)[0][:1],), calib=batches())
    train_steps(q, 2)
    res = lt.export_onnx(q, tmp_path / "q.onnx", (batches(1)[0][:1],))
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


def test_old_export_name_warns_and_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(lt, "export_onnx", lambda *a, **k: calls.append((a, k)) or "result")
    with pytest.warns(DeprecationWarning, match="export_onnx"):
        assert lt.export("module", "m.onnx", example_inputs=()) == "result"
    assert calls == [(("module", "m.onnx"), {"example_inputs": ()})]
