"""prepare_qat: a traced copy of the user's module with fake quantization where lowbit's PTQ quantizes.

The module is traced with torch.fx; Conv2d [+ BatchNorm2d] [+ ReLU/ReLU6] and Linear [+ ReLU] become one
fake-quantized module each, and an activation quantizer follows every tensor lowbit's ONNX planner gives its
own scale (model inputs, outputs of convs/linears/adds/average pools, after a ReLU when one follows).
Data movement (flatten, reshape, max pooling, dropout) shares its input's scale and gets none.
"""

from __future__ import annotations

import copy
import operator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx

from ..errors import LowbitError
from ..recipe import Recipe
from .fakequant import ACT_BOUNDS, ActFakeQuant, QConvBnAct, QLinearAct
from .onnx_export import as_tuple

_PASS_MODULES = (torch.nn.MaxPool2d, torch.nn.Flatten, torch.nn.Dropout, torch.nn.Identity)
_PASS_FUNCS = {torch.flatten, torch.reshape}
_PASS_METHODS = {"view", "reshape", "flatten", "size", "contiguous"}
_POOL_MODULES = (torch.nn.AdaptiveAvgPool2d, torch.nn.AvgPool2d)
_ADD_FUNCS = {operator.add, torch.add}


def _act_kind(node: fx.Node, modules: dict[str, torch.nn.Module]) -> str | None:
    if node.op == "call_module":
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


def _layer_choice(name: str, op_type: str, recipe: Recipe, weight_bits: int | dict[str, int] | None) -> tuple[int, str]:
    """(weight bits, activation type of the layer's output) for one conv/linear."""
    scheme, _ = recipe.scheme_for(name, op_type)
    if scheme is None:
        raise LowbitError(f"QAT keeps every layer quantized; the recipe leaves '{name}' in float, which QAT does not "
                          "support yet: remove that rule or exclusion")
    if scheme.activations not in ("uint8", "uint16") or not scheme.per_channel or not scheme.symmetric_weights:
        raise LowbitError(f"QAT supports uint8/uint16 activations with per-channel symmetric weights; the recipe "
                          f"asks {scheme.activations} activations, per_channel={scheme.per_channel}, "
                          f"symmetric_weights={scheme.symmetric_weights} for '{name}'")
    bits = 8
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


def _check_patterns(recipe: Recipe, weight_bits: Any, names: list[str]) -> None:
    patterns = [p for r in recipe.rules for p in r.names] + list(recipe.exclude_names)
    if isinstance(weight_bits, dict):
        patterns += list(weight_bits)
    for p in patterns:
        if not any(fnmatchcase(n, p) for n in names):
            raise LowbitError(f"the recipe names layer '{p}', which matches no layer of this module "
                              f"(layers: {', '.join(names[:6])}{'...' if len(names) > 6 else ''})")


def prepare_qat(module: torch.nn.Module, recipe: Recipe | str | Path | None = None, example_inputs: Any = None,
                calib: Iterable[Any] | None = None, weight_bits: int | dict[str, int] | None = None,
                freeze_bn_after: int | None = None) -> fx.GraphModule:
    """A fake-quantized copy of `module`, calibrated on `calib` (batches of inputs; default: example_inputs).

    The recipe's rule name patterns match module names (e.g. "features.3"); its Scheme has no 4-bit weight
    type yet, so `weight_bits` (4 or 8, or {name pattern: bits}) chooses the weight width. BatchNorm
    statistics stop updating after `freeze_bn_after` training steps (None: never).
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe() if recipe is None else Recipe.load(recipe)
    inputs = as_tuple(example_inputs)
    try:
        gm = fx.symbolic_trace(copy.deepcopy(module))
    except Exception as e:  # fx raises TraceError, TypeError, ... on dynamic control flow
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"cannot prepare {type(module).__name__} for QAT: torch.fx cannot trace its forward "
                          f"({first}); remove data-dependent control flow") from None
    modules = dict(gm.named_modules())
    layer_names = [n for n, m in modules.items() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    _check_patterns(recipe, weight_bits, layer_names)
    g = gm.graph

    # 1. fuse Conv [+BN] [+act] and Linear [+act] into fake-quantized modules, named after the conv/linear
    for node in list(g.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        layer, tail, bn = modules[node.target], node, None
        nxt = _only_user(tail)
        if isinstance(layer, torch.nn.Conv2d) and nxt is not None and nxt.op == "call_module" and \
                isinstance(modules[nxt.target], torch.nn.BatchNorm2d):
            bn, tail = modules[nxt.target], nxt
        nxt = _only_user(tail)
        act = _act_kind(nxt, modules) if nxt is not None else None
        if act is not None:
            tail = nxt
        op_type = "Conv" if isinstance(layer, torch.nn.Conv2d) else "Gemm"  # the ONNX op, as PTQ recipes name it
        bits, act_dtype = _layer_choice(node.target, op_type, recipe, weight_bits)
        fused = QConvBnAct(layer, bn, act, bits, freeze_bn_after) if isinstance(layer, torch.nn.Conv2d) \
            else QLinearAct(layer, act, bits)
        gm.add_submodule(node.target, fused)
        if tail is not node:
            tail.replace_all_uses_with(node)
            cur = tail
            while cur is not node:
                prev = cur.args[0]
                g.erase_node(cur)
                cur = prev
        fused.act_dtype = act_dtype
    modules = dict(gm.named_modules())

    # 2. activation quantizers (16-bit where the recipe gives the producing layer uint16, as PTQ does)
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

    for node in list(g.nodes):
        if node.op in ("placeholder", "output", "get_attr"):
            if node.op == "placeholder":
                first = modules.get(next(iter(node.users)).target) if node.users else None
                add_fq(node, None, getattr(first, "act_dtype", default_dtype))
            continue
        m = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(m, (QConvBnAct, QLinearAct)):
            users = list(node.users)
            if isinstance(m, QLinearAct) and all(u.op == "output" for u in users):
                continue  # lowbit keeps a weighted op's model output in float
            add_fq(node, m.act, m.act_dtype)
        elif isinstance(m, _POOL_MODULES) or (node.op == "call_function" and node.target in _ADD_FUNCS) or \
                (node.op == "call_method" and node.target == "add"):
            nxt = _only_user(node)
            act = _act_kind(nxt, modules) if nxt is not None else None
            add_fq(nxt if act else node, act)
        elif _act_kind(node, modules) is not None:
            prev = node.args[0]
            if isinstance(prev, fx.Node) and prev.op == "call_module" and \
                    isinstance(modules.get(prev.target), _POOL_MODULES):
                continue  # handled with its producer
            if isinstance(prev, fx.Node) and ((prev.op == "call_function" and prev.target in _ADD_FUNCS) or
                                              (prev.op == "call_method" and prev.target == "add")):
                continue
            add_fq(node, _act_kind(node, modules))
        elif isinstance(m, (_PASS_MODULES, ActFakeQuant)) or (node.op == "call_function" and node.target in _PASS_FUNCS) \
                or (node.op == "call_method" and node.target in _PASS_METHODS):
            continue
        else:
            what = type(m).__name__ if m is not None else getattr(node.target, "__name__", str(node.target))
            raise LowbitError(f"QAT does not support {what} (at '{node.name}') yet; supported: Conv2d, BatchNorm2d, "
                              "Linear, ReLU, ReLU6, add, average/max pooling, flatten")
    g.lint()
    gm.recompile()
    calibrate_qat(gm, calib if calib is not None else [inputs])
    gm.train(module.training)
    return gm


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
