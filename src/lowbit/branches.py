"""Quantizing inside an `If` whose condition is computed at run time (a sample-rate switch around a whole model).

lowbit's stages work on the main graph, so a body inside a subgraph stayed float. Exporters put whole models
there: Silero VAD branches on its 0-d sample-rate input into two complete networks. Each branch is quantized as a
model of its own: its inputs are the values it reads from the enclosing graph, its calibration data those values
from the calibration batches that take that branch (ONNX Runtime computes them, and the condition, on the float
model), its recipe the user's. The quantized graph then replaces the branch. A branch no calibration batch takes
stays float, and the summary says so. Nested runtime Ifs are reached the same way, by the branch's own quantize run.

The branch's decisions and parameters join the main plan under their own node and tensor names (exporters make them
unique across branches), so a plan re-applied with `--plan` quantizes each branch again from them, without data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from .data import BatchAxes, DataSource, ImagePreprocess, InputSpec
from .errors import LowbitError
from .plan import Plan
from .recipe import Recipe

BRANCHES = ("then_branch", "else_branch")


@dataclass
class Branch:
    node: str  # the If node's name
    attr: str  # then_branch / else_branch
    graph: onnx.GraphProto
    reads: list[str]  # values it reads from the enclosing graph, in first-use order


def runtime_ifs(proto: onnx.ModelProto) -> list[Branch]:
    """The branches of main-graph If nodes (constant conditions are inlined before this runs)."""
    out = []
    for node in proto.graph.node:
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            continue
        for a in node.attribute:
            if a.name in BRANCHES:
                out.append(Branch(node.name, a.name, a.g, outer_reads(a.g)))
    return out


def outer_reads(graph: onnx.GraphProto) -> list[str]:
    """Names `graph` (and subgraphs nested in it) reads but does not define."""
    defined = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    reads: list[str] = []

    def visit(g: onnx.GraphProto, local: set[str]) -> None:
        local = local | {t.name for t in g.initializer} | {v.name for v in g.input}
        for n in g.node:
            for name in n.input:
                if name and name not in local and name not in reads:
                    reads.append(name)
            for a in n.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    visit(sub, local)
            local |= set(n.output)
        for v in g.output:
            if v.name not in local and v.name not in reads:
                reads.append(v.name)

    visit(graph, defined)
    return reads


Feeds = dict[tuple[str, str], list[dict[str, np.ndarray]]]


def branch_feeds(
    proto: onnx.ModelProto, branches: list[Branch], source: DataSource, session: Callable[[bytes], Any]
) -> tuple[Feeds, dict[tuple[str, str], dict[str, np.ndarray]]]:
    """For each branch, the values it reads on every calibration batch that takes it (one float run per batch),
    and what the If returned on the first of them, by each of its branches' output names (the If's outputs, in
    order): the types of outputs nothing else states (a nested If's), for the untaken twin too."""
    ifs = {n.name: n for n in proto.graph.node if n.name in {b.node for b in branches}}
    conds = {b.node: ifs[b.node].input[0] for b in branches}
    results = [o for n in ifs.values() for o in n.output if o]
    wanted = list(dict.fromkeys([*conds.values(), *(r for b in branches for r in b.reads), *results]))
    inputs = {v.name for v in proto.graph.input}
    augmented = onnx.ModelProto()
    augmented.CopyFrom(proto)
    have = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in have and n not in inputs)
    sess = session(augmented.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    out: Feeds = {(b.node, b.attr): [] for b in branches}
    returned: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for batch in source:
        values = dict(zip(names, sess.run(None, batch)))
        values.update({k: v for k, v in batch.items() if k in inputs})
        for b in branches:
            taken = "then_branch" if bool(np.asarray(values[conds[b.node]]).reshape(())) else "else_branch"
            if taken == b.attr:
                out[(b.node, b.attr)].append({r: values[r] for r in b.reads})
                for twin in branches:  # both branches of an If return the same types: the twin is typed too
                    if twin.node == b.node:
                        pairs = zip(twin.graph.output, ifs[b.node].output)
                        seen = {r: values[r] for r in twin.reads if r in values}  # what it would read: types only
                        seen.update({o.name: values[x] for o, x in pairs if x in values})
                        returned.setdefault((b.node, twin.attr), seen)
    return out, returned


def branch_model(
    main: onnx.ModelProto,
    branch: Branch,
    example: dict[str, np.ndarray] | None,
    returned: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The branch as a model: its outer reads become inputs (typed from the main graph, or from a value seen), its
    outputs typed as exported, else by shape inference, else from the values it `returned` in calibration."""
    known = {v.name: v for v in [*main.graph.input, *main.graph.value_info, *main.graph.output]}
    if any(r not in known or not known[r].type.tensor_type.HasField("shape") for r in branch.reads):
        inferred = onnx.shape_inference.infer_shapes(main).graph.value_info  # the same types with or without data
        known = {**{v.name: v for v in inferred}, **known}
    consts = {t.name: t for t in main.graph.initializer}
    graph = onnx.GraphProto()
    graph.CopyFrom(branch.graph)
    graph.name = f"{branch.node}_{branch.attr}"
    for name in branch.reads:
        if name in consts:  # a weight of the main graph: the branch model holds its own copy
            graph.initializer.append(consts[name])
        elif name in known and known[name].type.tensor_type.HasField("shape"):
            graph.input.append(known[name])
        elif example is not None and name in example:
            a = np.asarray(example[name])
            dtype = helper.np_dtype_to_tensor_dtype(a.dtype)
            graph.input.append(helper.make_tensor_value_info(name, dtype, [None] * a.ndim))
        else:
            raise Untyped(name)
    model = helper.make_model(graph, opset_imports=list(main.opset_import), ir_version=main.ir_version)
    model.functions.extend(main.functions)
    if any(not o.type.tensor_type.HasField("shape") for o in graph.output):
        # Exporters leave a nested branch's outputs untyped (the If's type comes from its enclosing graph); a
        # model's outputs need one, so infer them from its now-typed inputs.
        seen = returned or {}
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
        for o in model.graph.output:
            t = types.get(o.name)
            if not o.type.tensor_type.HasField("shape") and t is not None and t.type.tensor_type.HasField("shape"):
                o.type.CopyFrom(t.type)
            if (not o.type.tensor_type.HasField("shape") or not o.type.tensor_type.elem_type) and o.name in seen:
                # Shape inference stops at an If whose branches' outputs are untyped in turn (Silero VAD's LSTM
                # branch, two Ifs deep); the float run showed what it returns: its dtype and rank are enough.
                a = np.asarray(seen[o.name])
                o.type.CopyFrom(
                    helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim)
                )
                o.type.tensor_type.shape.SetInParent()  # rank 0 has no dims, but a shape all the same
            if not o.type.tensor_type.HasField("shape") or not o.type.tensor_type.elem_type:
                raise Untyped(o.name)
    return model


class Untyped(Exception):
    """A value a branch reads or writes whose type and rank nothing states or infers: the branch cannot stand as a
    model of its own."""


def replace_branch(main: onnx.ModelProto, branch: Branch, quantized: onnx.ModelProto) -> None:
    """Put the quantized graph in the branch's place; its inputs are the enclosing graph's values again."""
    node = next(n for n in main.graph.node if n.name == branch.node)
    attr = next(a for a in node.attribute if a.name == branch.attr)
    g = onnx.GraphProto()
    g.CopyFrom(quantized.graph)
    outer = {t.name for t in main.graph.initializer}
    keep = [t for t in g.initializer if t.name not in outer or t.name not in branch.reads]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.input[:]
    del g.output[:]
    g.output.extend(branch.graph.output)  # as exported (typed or not): the enclosing If gives them their types
    g.name = branch.graph.name
    attr.g.CopyFrom(g)
    drop_unread(main.graph)
    imports = {o.domain: o for o in main.opset_import}
    for o in quantized.opset_import:  # the branch may need a newer opset, or a domain (com.microsoft) it added
        if o.domain not in imports:
            main.opset_import.append(o)
        elif imports[o.domain].version < o.version:
            imports[o.domain].version = o.version


def drop_unread(graph: onnx.GraphProto) -> None:
    """Drop the enclosing graph's weights no node reads any more: a branch that read them from outside now holds
    their quantized copies, and the float ones would otherwise stay in the file beside them."""
    read = set(outer_reads_all(graph)) | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in read]
    if len(keep) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def outer_reads_all(graph: onnx.GraphProto) -> list[str]:
    """Every name a node of `graph`, or of a subgraph nested in it, reads."""
    names: list[str] = []
    for n in graph.node:
        names += [x for x in n.input if x]
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                names += outer_reads_all(sub) + [o.name for o in sub.output]
    return names


def inherited_axes(branch: Branch, given: BatchAxes | None) -> dict[str, int | None]:
    """A branch reading a main-graph input takes the batch axis the user gave that input."""
    return {r: given[r] for r in branch.reads if given is not None and r in given}


def quantize_branches(
    model: ir.Model,
    recipe: Recipe,
    calib: Any,
    plan: Plan | None,
    specs: list[InputSpec],
    preprocess: ImagePreprocess | None,
    batch_axes: BatchAxes | None,
) -> tuple[ir.Model, list[Plan], list[str]]:
    """Quantize the branches of runtime Ifs in `model` (prepared): the model with them replaced, the branches'
    plans, and a note for each branch left float."""
    if not any(n.op_type == "If" for n in model.graph):
        return model, [], []  # the common case: no copy of the model (to_proto would copy every weight)
    from .planner import ensure_node_names

    ensure_node_names(model.graph)  # branches are found, and replaced, by their If's name
    proto = ir.to_proto(model)
    branches = runtime_ifs(proto)
    if not branches:
        return model, [], []
    from .calibrate import open_calibration
    from .pipeline import quantize
    from .runtimes.ort import session

    feeds: Feeds = {}
    returned: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    if plan is None and calib is not None:
        source = open_calibration(calib, specs, recipe, preprocess, batch_axes)
        feeds, returned = branch_feeds(proto, branches, source, lambda b: session(b, mode="simulate"))
    plans, notes = [], []
    for b in branches:
        where = f"the {b.attr.replace('_', ' ')} of If '{b.node}'"
        got = feeds.get((b.node, b.attr), [])
        if plan is not None and not any(n.name in plan.nodes for n in b.graph.node):
            continue  # the run that made the plan left this branch float
        untaken = plan is None and calib is not None and not got
        if untaken and recipe.default.mode == "static" and not recipe.rules:
            notes.append(f"{where} stays float: no calibration batch takes it; add data that does")
            continue
        try:
            seen = returned.get((b.node, b.attr))
            sub = branch_model(proto, b, got[0] if got else seen, seen)
        except Untyped as e:
            notes.append(f"{where} stays float: '{e}' has no known type or rank to quantize it on its own")
            continue
        try:
            res = quantize(
                sub,
                calib=got or None,
                recipe=recipe,
                plan=plan,
                progress=False,
                reuse_ranges=plan is not None,  # the plan was made for the whole model, not this branch alone
                batch_axes=inherited_axes(b, batch_axes) or None,
            )
        except LowbitError as e:
            if plan is None and calib is None and "calibration data is required" in str(e):
                notes.append(f"{where} stays float: static quantization needs calibration data (--calib)")
                continue
            if untaken and "calibration data is required" in str(e):  # a recipe with static parts
                notes.append(f"{where} stays float: no calibration batch takes it; add data that does")
                continue
            raise LowbitError(f"in {where}: {e}") from None
        if not any(d.quantized for d in res.plan.nodes.values()):
            # Nothing gained, and prepare's folded copies of its weights would sit beside the originals that an
            # untaken twin branch still reads: the branch stays as it was.
            if any(d.op_type in WEIGHTED for d in res.plan.nodes.values()):  # not for a branch that only moves data
                notes.append(f"{where} stays float: {why_float(res.plan)}")
            continue
        replace_branch(proto, b, res.model)
        plans.append(res.plan)
        notes += res.warnings
    return ir.from_proto(proto), plans, notes


WEIGHTED = ("LSTM", "GRU", "RNN", "Conv", "ConvTranspose", "MatMul", "Gemm", "Attention")


def why_float(plan: Plan) -> str:
    """Why a branch in which nothing was quantized stays float: its weighted ops' reasons (else any node's)."""
    ds = sorted(plan.nodes.values(), key=lambda d: d.op_type not in WEIGHTED)
    reasons = list(dict.fromkeys(f"{d.op_type}: {d.reason}" for d in ds[:3] if d.op_type in WEIGHTED)) or [
        f"{d.op_type}: {d.reason}" for d in ds[:1]
    ]
    return "; ".join(reasons) if reasons else "it has no node lowbit quantizes"


def merge_plans(plan: Plan, branch_plans: list[Plan]) -> None:
    for b in branch_plans:
        plan.nodes.update(b.nodes)
        plan.tensors.update(b.tensors)
        plan.channel_means.update(b.channel_means)
        plan.calibration_samples = max(plan.calibration_samples, b.calibration_samples)
