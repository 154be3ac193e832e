"""An If whose condition is a constant (after constant folding): its taken branch replaces it in the main graph, so
the nodes in it can be quantized. Exporters leave such Ifs around a whole model body (a flag fixed at export, a
shape test folded to True); lowbit does not quantize inside subgraphs, so without this nothing there would be.
An If whose condition is computed from an input (a sample-rate switch) stays as it is, float inside.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common


def _taken_branch(node: ir.Node) -> ir.Graph | None:
    cond = node.inputs[0] if node.inputs else None
    if cond is None or cond.const_value is None or cond.const_value.size != 1:
        return None
    which = "then_branch" if bool(cond.const_value.numpy().reshape(())) else "else_branch"
    attr = node.attributes.get(which)
    return attr.as_graph() if isinstance(attr, ir.Attr) else None


def _fresh(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    return out


def inline_constant_ifs(model: ir.Model) -> bool:
    """Replace each main-graph If with a constant condition by its taken branch; whether any was."""
    graph = model.graph
    changed = False
    for node in list(graph):
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            continue
        branch = _taken_branch(node)
        if branch is None:
            continue
        names = set(graph.initializers) | {v.name for v in graph.inputs if v.name}
        names |= {o.name for n in graph for o in n.outputs if o.name}
        for name, v in list(branch.initializers.items()):
            branch.initializers.pop(name)
            v.name = fresh = _fresh(name, names)
            names.add(fresh)
            graph.register_initializer(v)
        moved = list(branch)
        for n in moved:
            branch.remove(n)
        graph.insert_before(node, moved)
        inside = {o for n in moved for o in n.outputs}
        results = list(branch.outputs)
        branch.outputs.clear()
        for old, new in zip(list(node.outputs), results):
            keep = old.name
            if new in inside and not new.is_graph_output():
                old.replace_all_uses_with(new, replace_graph_outputs=True)
                old.name, new.name = None, keep  # the model's output names stay as they were
            else:  # the branch returns an outer value (or one value twice): an Identity keeps the name
                ident = ir.node("Identity", [new])
                graph.insert_before(node, [ident])
                old.replace_all_uses_with(ident.outputs[0], replace_graph_outputs=True)
                old.name, ident.outputs[0].name = None, keep
        graph.remove(node, safe=True)
        changed = True
    if changed:  # Constant nodes that came out of a branch become initializers, as prepare made the others
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    return changed
