"""prepare_qat: a traced copy of the user's module with fake quantization where lowbit's PTQ quantizes.

The module is traced with torch.fx; Conv2d [+ BatchNorm2d] [+ ReLU/ReLU6] and Linear [+ ReLU] become one
fake-quantized module each, and an activation quantizer follows every tensor lowbit's ONNX planner gives its
own scale (model inputs, outputs of convs/linears/adds/average pools, after a ReLU when one follows).
Data movement (flatten, reshape, max pooling, dropout) shares its input's scale and gets none. A layer the
recipe keeps float (mode float, or excluded) is fused the same way without fake quantization; as in PTQ, its
output is quantized only where a quantized op reads it.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..errors import LowbitError
from ..recipe import Recipe
from .fakequant import ACT_BOUNDS, ActFakeQuant, QConvBnAct, QLinearAct
from .onnx_export import as_tuple, module_to_onnx

_PASS_MODULES = (torch.nn.MaxPool2d, torch.nn.Flatten, torch.nn.Dropout, torch.nn.Identity)
_PASS_FUNCS = {torch.flatten, torch.reshape}
_PASS_METHODS = {"view", "reshape", "flatten", "size", "contiguous"}
_POOL_MODULES = (torch.nn.AdaptiveAvgPool2d, torch.nn.AvgPool2d)
_ADD_FUNCS = {operator.add, torch.add}


def _act_kind(node: fx.Node, modules: dict[str, torch.nn.Module]) -> str | None:
    if node.op == "call_module":
        assert isinstance(node.target, str)  # a call_module node's target is the submodule's name
        m = modules[node.target]
        if isinstance(m, torch.nn.ReLU6):
            return "relu6"
        if isinstance(m, torch.nn.ReLU):
            return "relu"
    if node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu):
        return "relu"
    if node.op == "call_function" and node.target is torch.nn.functional.relu6:
        return "relu6"
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _layer_choice(
    name: str, op_type: str, recipe: Recipe, weight_bits: int | dict[str, int] | None, aliases: tuple[str, ...] = ()
) -> tuple[int | None, str]:
    """(weight bits, or None to keep the layer float; activation type of the layer's output) for one conv/linear."""
    scheme, _ = recipe.scheme_for(name, op_type, aliases)
    if scheme is None or scheme.mode == "float":
        return None, "float"
    if scheme.mode != "static":
        raise LowbitError(
            f"QAT trains static quantization (or keeps a layer float); the recipe asks mode "
            f"{scheme.mode} for '{name}': use mode static or float for it"
        )
    if scheme.activations not in ("uint8", "uint16") or not scheme.per_channel or not scheme.symmetric_weights:
        raise LowbitError(
            f"QAT supports uint8/uint16 activations with per-channel symmetric weights; the recipe "
            f"asks {scheme.activations} activations, per_channel={scheme.per_channel}, "
            f"symmetric_weights={scheme.symmetric_weights} for '{name}'"
        )
    bits = 4 if scheme.weights == "int4" else 8
    if isinstance(weight_bits, int):
        bits = weight_bits
    elif isinstance(weight_bits, dict):
        for pattern, b in weight_bits.items():
            if fnmatchcase(name, pattern):
                bits = b
                break
    if bits not in (4, 8):
        raise LowbitError(f"weight_bits must be 4 or 8, got {bits!r}")
    return bits, scheme.activations


def _name_patterns(recipe: Recipe) -> list[str]:
    return [p for r in recipe.rules for p in r.names] + list(recipe.exclude_names)


def _ptq_names(module: torch.nn.Module, inputs: tuple) -> dict[str, str]:
    """Module name -> the ONNX node name `lowbit.quantize(module, ...)` gives that conv/linear (e.g. "features.3"
    -> "/features/features.3/Conv"), so one recipe's name rules select the same layers in PTQ and QAT. Exported
    without constant folding, every weight keeps its parameter name."""
    proto = module_to_onnx(module, inputs, fold_constants=False)
    return {
        n.input[1][: -len(".weight")]: n.name
        for n in proto.graph.node
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1].endswith(".weight")
    }


def _check_patterns(recipe: Recipe, weight_bits: Any, names: list[str]) -> None:
    patterns = _name_patterns(recipe)
    if isinstance(weight_bits, dict):
        patterns += list(weight_bits)
    for p in patterns:
        if not any(fnmatchcase(n, p) for n in names):
            raise LowbitError(
                f"the recipe names layer '{p}', which matches no layer of this module "
                f"(layers: {', '.join(names[:6])}{'...' if len(names) > 6 else ''})"
            )


def prepare_qat(
    module: torch.nn.Module,
    recipe: Recipe | str | Path | None = None,
    example_inputs: Any = None,
    calib: Iterable[Any] | None = None,
    weight_bits: int | dict[str, int] | None = None,
    freeze_bn_after: int | None = None,
) -> fx.GraphModule:
    """A fake-quantized copy of `module`, calibrated on `calib` (batches of inputs; default: example_inputs).

    The recipe's rule name patterns match module names (e.g. "features.3") or the ONNX node names PTQ of the
    same module uses (e.g. "/features/features.3/Conv"), and op types "Conv" / "Gemm";
    a layer's Scheme gives its weights (int8, or int4 with mode static) and output activations (uint8 or
    uint16); mode float (or an exclusion) keeps the layer float. `weight_bits` (4, 8 or {name pattern: bits})
    is deprecated: it overrides the recipe's weight type. BatchNorm statistics stop updating after
    `freeze_bn_after` training steps (None: never).
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe() if recipe is None else Recipe.load(recipe)
    if weight_bits is not None:
        warnings.warn(
            "prepare_qat(weight_bits=...) is deprecated: give 4-bit layers a recipe rule with Scheme(weights='int4')",
            DeprecationWarning,
            stacklevel=2,
        )
    inputs = as_tuple(example_inputs)
    try:
        gm = fx.symbolic_trace(copy.deepcopy(module))
    except Exception as e:  # fx raises TraceError, TypeError, ... on dynamic control flow
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(
            f"cannot prepare {type(module).__name__} for QAT: torch.fx cannot trace its forward "
            f"({first}); remove data-dependent control flow"
        ) from None
    modules = dict(gm.named_modules())
    layer_names = [n for n, m in modules.items() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    # Module names never hold "/": patterns that do are ONNX node names, as a PTQ recipe or diagnose writes them.
    onnx_names = _ptq_names(module, inputs) if any("/" in p for p in _name_patterns(recipe)) else {}
    _check_patterns(recipe, weight_bits, layer_names + list(onnx_names.values()))
    g = gm.graph
    _fuse_layers(gm, recipe, weight_bits, freeze_bn_after, onnx_names)
    _add_fake_quantizers(gm, recipe)
    g.lint()
    gm.recompile()
    calibrate_qat(gm, calib if calib is not None else [inputs])
    gm.train(module.training)
    return gm


def _fuse_layers(
    gm: fx.GraphModule, recipe: Recipe, weight_bits: Any, freeze_bn_after: int | None, onnx_names: dict[str, str]
) -> None:
    """Conv [+BN] [+act] and Linear [+act] become one (fake-quantized or float) module, named after the layer."""
    g, modules = gm.graph, dict(gm.named_modules())
    for node in list(g.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        layer, tail, bn = modules[node.target], node, None
        nxt = _only_user(tail)
        if (
            isinstance(layer, torch.nn.Conv2d)
            and nxt is not None
            and nxt.op == "call_module"
            and isinstance(modules[nxt.target], torch.nn.BatchNorm2d)
        ):
            bn, tail = modules[nxt.target], nxt
        nxt = _only_user(tail)
        act = _act_kind(nxt, modules) if nxt is not None else None
        if act is not None:
            tail = nxt
        op_type = "Conv" if isinstance(layer, torch.nn.Conv2d) else "Gemm"  # the ONNX op, as PTQ recipes name it
        aliases = (onnx_names[node.target],) if node.target in onnx_names else ()
        bits, act_dtype = _layer_choice(node.target, op_type, recipe, weight_bits, aliases)
        fused = (
            QConvBnAct(layer, bn, act, bits, freeze_bn_after)
            if isinstance(layer, torch.nn.Conv2d)
            else QLinearAct(layer, act, bits)
        )
        gm.add_submodule(node.target, fused)
        if tail is not node:
            tail.replace_all_uses_with(node)
            cur = tail
            while cur is not node:
                prev = cur.args[0]
                g.erase_node(cur)
                cur = prev
        fused.act_dtype = act_dtype


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCS) or (
        node.op == "call_method" and node.target == "add"
    )


def _is_pass(node: fx.Node, modules: dict[str, torch.nn.Module]) -> bool:
    m = modules.get(node.target) if node.op == "call_module" and isinstance(node.target, str) else None
    return (
        isinstance(m, _PASS_MODULES)
        or (node.op == "call_function" and node.target in _PASS_FUNCS)
        or (node.op == "call_method" and node.target in _PASS_METHODS)
    )


def _add_fake_quantizers(gm: fx.GraphModule, recipe: Recipe) -> None:
    """An activation quantizer on every tensor lowbit's PTQ quantizes: outputs of quantized layers, pools and
    adds (after a ReLU when one follows), and then the inputs of quantized ops that nothing quantized yet
    (model inputs, outputs of float layers), 16-bit where the recipe gives the layer uint16."""
    g, modules = gm.graph, dict(gm.named_modules())
    default_dtype = recipe.default.activations if recipe.default.activations in ("uint8", "uint16") else "uint8"
    count = 0

    def add_fq(after: fx.Node, act: str | None, dtype: str = default_dtype) -> None:
        nonlocal count
        name = f"lowbit_fq{count}"
        count += 1
        gm.add_submodule(name, ActFakeQuant(*ACT_BOUNDS[act], dtype=dtype))
        with g.inserting_after(after):
            fq = g.call_module(name, (after,))
        after.replace_all_uses_with(fq, delete_user_cb=lambda u: u is not fq)

    def layer(node: fx.Node) -> QConvBnAct | QLinearAct | None:
        m = modules.get(node.target) if node.op == "call_module" else None
        return m if isinstance(m, (QConvBnAct, QLinearAct)) else None

    consumers: list[tuple[fx.Node, str]] = []  # ops that quantize their inputs, with the dtype they would give them
    for node in list(g.nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        m = modules.get(node.target) if node.op == "call_module" else None
        q = layer(node)
        if q is not None:
            if q.bits is None:
                continue  # a float layer; whoever reads it quantizes its output if they need to
            consumers.append((node, q.act_dtype))
            if isinstance(q, QLinearAct) and all(u.op == "output" for u in node.users):
                continue  # lowbit keeps a weighted op's model output in float
            add_fq(node, q.act, q.act_dtype)
        elif isinstance(m, _POOL_MODULES) or _is_add(node):
            consumers.append((node, default_dtype))
            nxt = _only_user(node)
            act = _act_kind(nxt, modules) if nxt is not None else None
            add_fq(nxt if nxt is not None and act else node, act)
        elif _act_kind(node, modules) is not None:
            prev = node.args[0]
            if isinstance(prev, fx.Node) and (
                (prev.op == "call_module" and isinstance(modules.get(prev.target), _POOL_MODULES)) or _is_add(prev)
            ):
                continue  # handled with its producer
            add_fq(node, _act_kind(node, modules))
        elif isinstance(m, torch.nn.MaxPool2d):
            consumers.append((node, default_dtype))  # quantizes its input and shares its scale
        elif isinstance(m, ActFakeQuant) or _is_pass(node, modules):
            continue
        else:
            what = type(m).__name__ if m is not None else getattr(node.target, "__name__", str(node.target))
            raise LowbitError(
                f"QAT does not support {what} (at '{node.name}') yet; supported: Conv2d, BatchNorm2d, "
                "Linear, ReLU, ReLU6, add, average/max pooling, flatten"
            )
    modules = dict(gm.named_modules())

    def quantized(node: fx.Node) -> bool:
        while not isinstance(modules.get(node.target) if node.op == "call_module" else None, ActFakeQuant):
            if not _is_pass(node, modules) or not node.args or not isinstance(node.args[0], fx.Node):
                return False
            node = node.args[0]
        return True

    for node, dtype in consumers:
        args = node.args if _is_add(node) else node.args[:1]
        for a in args:
            if isinstance(a, fx.Node) and not quantized(a):
                q = layer(a)
                add_fq(a, q.act if q is not None else _act_kind(a, modules), dtype)
                modules = dict(gm.named_modules())


def fake_quantizers(gm: torch.nn.Module) -> list[ActFakeQuant]:
    return [m for m in gm.modules() if isinstance(m, ActFakeQuant)]


def calibrate_qat(gm: torch.nn.Module, calib: Iterable[Any]) -> None:
    """Min-max ranges of every quantized activation over `calib`, so training starts from the PTQ solution.
    Weights are fake-quantized while observing, as they will be in the exported model."""
    fqs = fake_quantizers(gm)
    for fq in fqs:
        fq.mode = "observe"
    was = gm.training
    gm.eval()
    n = 0
    with torch.no_grad():
        for batch in calib:
            args = as_tuple(batch)
            gm(*[torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a for a in args])
            n += 1
    if n == 0:
        raise LowbitError("QAT calibration data is empty; pass calib= with at least one batch")
    for fq in fqs:
        fq.init_from_observed()
    gm.train(was)


def freeze_bn(gm: torch.nn.Module) -> None:
    """Stop updating BatchNorm statistics now (same as reaching freeze_bn_after)."""
    for m in gm.modules():
        if isinstance(m, QConvBnAct):
            m.bn_frozen.fill_(True)
