"""Decide, before any data is seen, which nodes are quantized, which stay float (and why), and which tensors
must be observed during calibration."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from .ops import OpSpec, Skip, spec_for
from .ops.activation import clip_bounds
from .recipe import Recipe, Scheme


@dataclass
class NodeDecision:
    name: str
    op_type: str
    quantized: bool
    reason: str  # why it stays float, or how it is quantized
    rule: str  # what in the recipe decided its scheme
    scheme: Scheme | None = None
    spec: OpSpec | None = None


@dataclass
class Layout:
    """What to quantize, as names; the plan adds numbers to it after calibration."""

    nodes: dict[str, NodeDecision] = field(default_factory=dict)
    # activation tensor -> the tensor whose parameters it uses (itself, or the input of a data-movement chain)
    tensors: dict[str, str] = field(default_factory=dict)
    tensor_scheme: dict[str, Scheme] = field(default_factory=dict)
    # (node name, input index, per-channel axis or None)
    weights: list[tuple[str, int, int | None]] = field(default_factory=list)
    # (node name, input index, activation tensor, weight input index)
    biases: list[tuple[str, int, str, int]] = field(default_factory=list)
    # fused Relu/Clip node name -> (producer node name, clip bounds)
    fused: dict[str, tuple[str, tuple[float, float]]] = field(default_factory=dict)
    # activation tensors feeding weighted ops -> channel axis, for the per-channel means bias correction needs
    channel_stats: dict[str, int] = field(default_factory=dict)

    def sources(self) -> set[str]:
        return set(self.tensors.values())

    @property
    def quantized_nodes(self) -> list[NodeDecision]:
        return [d for d in self.nodes.values() if d.quantized]


def ensure_node_names(graph: ir.Graph) -> None:
    """Plans refer to nodes by name, so every node needs a unique one."""
    seen: set[str] = set()
    for i, node in enumerate(graph):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def make_layout(model: ir.Model, recipe: Recipe) -> Layout:
    graph = model.graph
    ensure_node_names(graph)
    layout = Layout()
    specs: dict[str, OpSpec] = {}
    for node in graph:
        scheme, rule = recipe.scheme_for(node.name, node.op_type)
        if scheme is None:
            layout.nodes[node.name] = NodeDecision(node.name, node.op_type, False, rule, rule)
            continue
        spec = spec_for(node)
        if isinstance(spec, Skip):
            layout.nodes[node.name] = NodeDecision(node.name, node.op_type, False, spec.reason, rule)
            continue
        specs[node.name] = spec
        layout.nodes[node.name] = NodeDecision(node.name, node.op_type, True, "", rule, scheme, spec)

    def is_quantized_compute(node: ir.Node | None) -> bool:
        if node is None or node.name not in specs:
            return False
        s = specs[node.name]
        return not s.shares_input_scale and not s.fusable_activation

    # Relu/Clip(0, x) right after a quantized op: the quantization clamp does its work, so it disappears.
    for node in graph:
        spec = specs.get(node.name)
        if spec is None or not spec.fusable_activation:
            continue
        src = node.inputs[0]
        producer = src.producer()
        if is_quantized_compute(producer) and len(src.uses()) == 1 and not src.is_graph_output():
            layout.fused[node.name] = (producer.name, clip_bounds(node))
            layout.nodes[node.name].reason = f"folded into the output range of {producer.name}"
        else:
            # On its own only its output is worth quantizing: quantizing its input would spend the 256 levels on
            # the pre-activation range (e.g. [-111, 129] before a Clip to [0, 6]).
            specs[node.name] = OpSpec(activations=())

    touched: set[str] = set()
    for name, spec in specs.items():
        if not spec.needs_quantized_neighbour and name not in layout.fused:
            node = graph.node(name)
            touched.update(node.inputs[i].name for i in spec.activations if _has(node, i))
            touched.update(_out_name(node, i, layout) for i in spec.outputs if i < len(node.outputs))
    # Data movement only pays off between quantized ops; walk forward so chains propagate.
    for node in graph:
        spec = specs.get(node.name)
        if spec is None or not spec.needs_quantized_neighbour:
            continue
        if node.inputs[0].name in touched:
            touched.update(o.name for o in node.outputs)
        else:
            del specs[node.name]
            d = layout.nodes[node.name]
            d.quantized, d.reason, d.spec = False, "data movement between float ops (nothing to gain)", None

    for node in graph:
        spec = specs.get(node.name)
        if spec is None or node.name in layout.fused:
            continue
        scheme = layout.nodes[node.name].scheme
        for i in spec.activations:
            if _has(node, i):
                _add_tensor(layout, node.inputs[i].name, node.inputs[i].name, scheme)
        for i in spec.outputs:
            if i < len(node.outputs):
                out = _out_name(node, i, layout)
                src = layout.tensors.get(node.inputs[0].name, node.inputs[0].name) if spec.shares_input_scale else out
                _add_tensor(layout, out, src, scheme)
        if spec.weight is not None:
            idx, axis = spec.weight
            layout.weights.append((node.name, idx, axis if scheme.per_channel else None))
            if spec.bias is not None:
                layout.biases.append((node.name, spec.bias, node.inputs[0].name, idx))
            if scheme.bias_correction and node.op_type != "ConvTranspose":
                layout.channel_stats[node.inputs[0].name] = 1 if node.op_type == "Conv" else -1
    for d in layout.nodes.values():
        if d.quantized and not d.reason:
            d.reason = _describe(d)
    return layout


def _has(node: ir.Node, i: int) -> bool:
    return i < len(node.inputs) and node.inputs[i] is not None


def _out_name(node: ir.Node, i: int, layout: Layout) -> str:
    """A fused Relu/Clip's output stands in for its producer's output."""
    out = node.outputs[i]
    uses = out.uses()
    if len(uses) == 1 and uses[0].node.name in layout.fused:
        return uses[0].node.outputs[0].name
    return out.name


def _add_tensor(layout: Layout, name: str, source: str, scheme: Scheme) -> None:
    if name not in layout.tensors:
        layout.tensors[name] = source
        layout.tensor_scheme[name] = scheme


def _describe(d: NodeDecision) -> str:
    s, spec = d.scheme, d.spec
    assert s is not None and spec is not None
    if spec.shares_input_scale:
        return "shares its input's scale"
    if spec.weight is not None:
        gran = "per-channel" if s.per_channel and spec.weight[1] is not None else "per-tensor"
        return f"{s.activations} activations, {s.weights} {gran} weights"
    return f"{s.activations} activations"
