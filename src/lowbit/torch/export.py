"""export_onnx: a QAT module -> the QDQ ONNX model and plan lowbit's PTQ would write, with the learned parameters.

The module's frozen float form (BatchNorm folded, weights on their quantization grid) is exported with its
activation quantizers as QuantizeLinear/DequantizeLinear pairs; those pairs give each tensor its learned scale
by ONNX name and are then removed. lowbit's planner decides the layout of that float graph exactly as for
PTQ, the learned parameters become its plan, and the integers of every weight and bias are written from the
module's own grid, so the ONNX model computes what the fake-quant module computes.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import numpy_helper

from ..errors import LowbitError
from ..graph.io import save_model
from ..graph.write import check_output_path
from ..numerics import pack_int4
from ..passes import prepare
from ..pipeline import QuantizeResult, quantize, save
from ..plan import Plan, TensorParams
from ..planner import make_layout
from ..recipe import Recipe, Rule, Scheme
from .fakequant import ActFakeQuant, ExportConv, ExportLinear, QConvBnAct, QLinearAct
from .onnx_export import module_to_onnx

# Overflow guard and bias correction would move weights off the grid the module trained on.
EXPORT_RECIPE = Recipe(default=Scheme(avoid_overflow=False, bias_correction=False))
INT4 = dataclasses.replace(EXPORT_RECIPE.default, weights="int4")


def _frozen_copy(module: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, int | None], dict[float, tuple]]:
    """Float copy for export, the bits of each exported weight (by parameter name; None: a float layer), and
    marker scale -> real (scale, zero point, dtype) of 16-bit activations."""
    clone = copy.deepcopy(module).eval()
    bits: dict[str, int | None] = {}
    markers: dict[float, tuple] = {}
    for name, m in list(clone.named_modules()):
        if isinstance(m, (QConvBnAct, QLinearAct)):
            with torch.no_grad():
                new = ExportConv(m) if isinstance(m, QConvBnAct) else ExportLinear(m)
            parent, _, leaf = name.rpartition(".")
            setattr(clone.get_submodule(parent) if parent else clone, leaf, new)
            bits[f"{name}.weight"] = m.bits
        elif isinstance(m, ActFakeQuant):
            if m.dtype == "uint8":
                m.freeze_for_export()
            else:
                marker = 1000.0 + len(markers)  # no real activation scale is this large
                markers[marker] = m.freeze_for_export(marker)
    if isinstance(clone, torch.fx.GraphModule):
        clone.recompile()
    return clone, bits, markers


def _const(graph: onnx.GraphProto, name: str) -> np.ndarray:
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    raise RuntimeError(f"exported Q/DQ parameter {name} is not a constant")


def _strip_activation_qdq(proto: onnx.ModelProto, markers: dict[float, tuple]) -> dict[str, tuple]:
    """Remove the Q->DQ pairs of activation quantizers; return tensor name -> (scale, zero point, dtype)."""
    g = proto.graph
    by_output = {o: n for n in g.node for o in n.output}
    params: dict[str, tuple[float, int]] = {}
    rename: dict[str, str] = {}
    drop = []
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in by_output:
            continue
        q = by_output[n.input[0]]
        if q.op_type != "QuantizeLinear":
            continue
        src = q.input[0]
        s = float(_const(g, q.input[1]))
        params[src] = markers.get(s, (s, int(_const(g, q.input[2])), "uint8"))
        rename[n.output[0]] = src
        drop += [q, n]
    for n in drop:
        g.node.remove(n)
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    for o in g.output:
        if o.name in rename:
            raise LowbitError(
                f"a model output ({o.name}) is fake-quantized; lowbit keeps model outputs of weighted ops in float"
            )
    return params


def _export_recipe(float_proto: onnx.ModelProto, bits: dict[str, int | None]) -> Recipe:
    """EXPORT_RECIPE plus one rule per layer that is not int8: int4 weights by the layer's ONNX node, and mode
    float for every node of a float layer (its conv/linear and fused activation share the layer's scope)."""
    rules = []
    for node in float_proto.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or bits.get(node.input[1], 8) == 8:
            continue
        if bits[node.input[1]] is None:
            scope = node.name.rpartition("/")[0]
            names = (glob.escape(scope) + "/*",) if scope else (glob.escape(node.name),)
            rules.append(Rule(names=names, scheme=Scheme(mode="float")))
        else:
            rules.append(Rule(names=(glob.escape(node.name),), scheme=INT4))
    found = len(rules)
    expected = sum(b != 8 for b in bits.values())
    if found != expected:
        raise LowbitError(
            f"QAT export found {found} of the {expected} int4/float layers in the exported graph; "
            "their weights were renamed by the ONNX export"
        )
    return dataclasses.replace(EXPORT_RECIPE, rules=tuple(rules))


def _plan_tensors(float_proto: onnx.ModelProto, params: dict[str, tuple], recipe: Recipe) -> dict[str, TensorParams]:
    copy_ = onnx.ModelProto()
    copy_.CopyFrom(float_proto)
    model = ir.from_proto(copy_)
    prepare(model)
    layout = make_layout(model, recipe)
    missing = sorted(set(layout.sources()) - set(params) - set(model.graph.initializers))
    extra = sorted(set(params) - set(layout.tensors))
    if missing or extra:
        raise LowbitError(
            f"this module's structure is not supported by QAT export yet: lowbit's planner quantizes "
            f"{missing[:3]} without a fake quantizer, fake quantizers on {extra[:3]} are not quantized by it"
        )
    out = {}
    for name, src in layout.tensors.items():
        s, z, dtype = params[src]
        qmax = 255 if dtype == "uint8" else 65535
        out[name] = TensorParams(dtype, [s], [z], None, "activation", [float((0 - z) * s), float((qmax - z) * s)])
    return out


def _write_grid(result: QuantizeResult, float_proto: onnx.ModelProto, bits: dict[str, int | None]) -> None:
    """Weights and int32 biases from the module's grid (exact integers, its own scales); 4-bit weights are
    stored as packed INT4, two per byte."""
    g = result.model.graph
    inits = {t.name: t for t in g.initializer}
    fnodes = {n.name: n for n in float_proto.graph.node}
    finits = {t.name: numpy_helper.to_array(t) for t in float_proto.graph.initializer}
    dq_by_out = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    plan = result.plan
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm") or node.name not in fnodes or f"{node.name}:1" not in plan.tensors:
            continue
        fnode = fnodes[node.name]
        w = finits[fnode.input[1]].astype(np.float64)
        layer_bits = bits.get(fnode.input[1], 8)
        assert layer_bits is not None  # a float layer's weight is not in the plan
        qmax = 2 ** (layer_bits - 1) - 1
        flat = w.reshape(w.shape[0], -1)
        scale = (np.abs(flat).max(axis=1) / qmax).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1e-12))
        k = np.clip(np.rint(flat / scale[:, None]), -qmax, qmax).astype(np.int8).reshape(w.shape)
        dq = dq_by_out[node.input[1]]
        stored = (
            numpy_helper.from_array(k, dq.input[0])
            if qmax == 127
            else onnx.helper.make_tensor(dq.input[0], onnx.TensorProto.INT4, k.shape, pack_int4(k).tobytes(), raw=True)
        )
        inits[dq.input[0]].CopyFrom(stored)
        inits[dq.input[1]].CopyFrom(numpy_helper.from_array(scale, dq.input[1]))
        plan.tensors[f"{node.name}:1"].scale = scale.astype(float).tolist()
        if len(node.input) > 2 and node.input[2] and f"{node.name}:2" in plan.tensors:
            b = finits[fnode.input[2]].astype(np.float64)
            s_in = np.float64(plan.tensors[fnode.input[0]].scale[0])
            sb = (s_in * scale.astype(np.float64)).astype(np.float32)
            qb = np.clip(np.rint(b / sb.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
            bdq = dq_by_out[node.input[2]]
            inits[bdq.input[0]].CopyFrom(numpy_helper.from_array(qb, bdq.input[0]))
            inits[bdq.input[1]].CopyFrom(numpy_helper.from_array(sb, bdq.input[1]))
            plan.tensors[f"{node.name}:2"].scale = sb.astype(float).tolist()


def export_onnx(
    module: torch.nn.Module, path: str | Path | None, example_inputs: Any, float_output: str | Path | None = None
) -> QuantizeResult:
    """Write the QDQ model to `path` (and `path`.plan.json beside it); returns the QuantizeResult.

    `float_output` also writes the module's float form (BatchNorm folded, weights on their grid, no
    activation quantization) with the same tensor names: the reference `lowbit diagnose` compares with.
    """
    for out in (path, float_output):
        if out is not None:
            check_output_path(out, [])
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        module = module.module
    clone, bits, markers = _frozen_copy(module)
    proto = module_to_onnx(clone, example_inputs)
    params = _strip_activation_qdq(proto, markers)
    recipe = _export_recipe(proto, bits)
    tensors = _plan_tensors(proto, params, recipe)
    if float_output is not None:
        save_model(proto, float_output)
    plan = Plan(recipe=recipe.to_dict(), tensors=tensors)
    result = quantize(proto, plan=plan, recipe=recipe, progress=False)
    _write_grid(result, proto, bits)
    onnx.checker.check_model(result.model)
    if path is not None:
        save(result.model, result.plan, path)  # both files or neither, as `lowbit.quantize` writes them
        result.output = Path(path)
    return result
