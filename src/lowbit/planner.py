"""Decide, before any data is seen, which nodes are quantized, in which mode, which stay float (and why), and which
tensors must be observed during calibration. What is decided after calibration (sentinels, mixed ranges) lives in
`settle.py`.

The planner is a generic loop: what each op does in each mode comes from the op registry (ops/).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from .decision import Decision, Reason, RuleMatch
from .errors import LowbitError
from .ops import AsStatic, OpSpec, Refuse, Skip, Take, decide
from .ops.activation import clip_bounds
from .recipe import Recipe, Scheme


@dataclass
class NodeDecision:
    """A node's decision while planning, with the scheme and (static) OpSpec the rewrite needs."""

    name: str
    decision: Decision
    scheme: Scheme | None = None
    spec: OpSpec | None = None

    @property
    def quantized(self) -> bool:
        return self.decision.quantized

    @property
    def op_type(self) -> str:
        return self.decision.op_type

    @property
    def reason(self) -> str:
        return self.decision.reason

    def keep_float(self, code: Reason, details: dict[str, Any] | None = None) -> None:
        self.decision.quantized, self.decision.code, self.decision.details = False, code, details or {}
        self.decision.mode, self.spec = "float", None


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
    fused: dict[str, tuple[str, tuple[float, float] | None]] = field(default_factory=dict)
    # activation tensors feeding weighted ops -> channel axis, for the per-channel means bias correction needs
    channel_stats: dict[str, int] = field(default_factory=dict)
    # Nodes rewritten by their op family (dynamic, weight-only, float16), in graph order: name -> (mode, scheme).
    rewrites: dict[str, tuple[str, Scheme]] = field(default_factory=dict)
    # static node -> the activation tensors it quantizes (inputs and outputs)
    node_tensors: dict[str, list[str]] = field(default_factory=dict)
    # tensors with their source's range but a scale TIE_NUDGE larger (OpSpec.input_range)
    nudged: set[str] = field(default_factory=set)

    def sources(self) -> set[str]:
        return set(self.tensors.values())

    @property
    def quantized_nodes(self) -> list[NodeDecision]:
        return [d for d in self.nodes.values() if d.quantized]

    def decisions(self) -> dict[str, Decision]:
        return {name: d.decision for name, d in self.nodes.items()}


def ensure_node_names(graph: ir.Graph) -> None:
    """Plans refer to nodes by name, so every node needs a unique one."""
    seen: set[str] = set()
    for i, node in enumerate(graph):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _decision(
    node: ir.Node,
    match: RuleMatch,
    quantized: bool,
    code: Reason,
    details: dict[str, Any] | None = None,
    mode: str = "float",
) -> Decision:
    return Decision(node.op_type, quantized, code, details or {}, mode, match.text, match.index, match.by)


def _recipe_float(node: ir.Node, scheme: Scheme | None, match: RuleMatch) -> Decision | None:
    """The decision when the recipe itself keeps the node float."""
    if scheme is None:
        if match.by == "exclude_names":
            return _decision(node, match, False, Reason.EXCLUDED_NAME)
        if match.by == "exclude_op_types":
            return _decision(node, match, False, Reason.EXCLUDED_OP_TYPE, {"op": node.op_type})
        return _decision(node, match, False, Reason.RULE_FLOAT, {"rule": match.text})
    if scheme.mode == "float":
        return _decision(node, match, False, Reason.MODE_FLOAT, {"rule": match.text})
    return None


def make_layout(
    model: ir.Model, recipe: Recipe, calibrated: bool = True, keep_float: dict[str, Skip] | None = None
) -> Layout:
    """`calibrated`: whether calibration data (or a plan) will be given, so static quantization is possible.
    `keep_float`: static nodes to keep float anyway (node name -> why), e.g. from `sentinel_nodes`."""
    keep_float = keep_float or {}
    graph = model.graph
    ensure_node_names(graph)
    layout = Layout()
    specs: dict[str, OpSpec] = {}
    matched: set[int] = set()
    fold_only: dict[str, Skip] = {}  # static only if they fold into their producer, else float for this reason
    for node in graph:
        name = _nm(node)
        scheme, match = recipe.match(name, node.op_type)
        if match.index is not None:
            matched.add(match.index)
        fixed = _recipe_float(node, scheme, match)
        if fixed is not None:
            layout.nodes[name] = NodeDecision(name, fixed)
            continue
        assert scheme is not None  # _recipe_float decides every node the recipe gives no scheme
        try:
            found = decide(scheme.mode, node, scheme)
            if isinstance(found, AsStatic):
                fallback = found
                if calibrated:
                    scheme = dataclasses.replace(scheme, mode="static")
                    found = decide("static", node, scheme)
                    if fallback.fold_only and isinstance(found, OpSpec):
                        if found.fusable_activation:
                            fold_only[name] = fallback.otherwise
                        else:
                            found = fallback.otherwise
                else:
                    found = fallback.otherwise
        except Refuse as e:
            raise LowbitError(f"{e.what} ({match.text}): {e.fix}") from None
        if isinstance(found, Take):
            mode = found.mode or scheme.mode
            layout.rewrites[name] = (mode, scheme)
            layout.nodes[name] = NodeDecision(
                name, _decision(node, match, True, found.code, found.details, mode), scheme
            )
            continue
        if isinstance(found, OpSpec) and name in keep_float:
            found = keep_float[name]
        if isinstance(found, Skip):
            layout.nodes[name] = NodeDecision(name, _decision(node, match, False, found.code, found.details))
            continue
        assert isinstance(found, OpSpec)
        specs[name] = found
        layout.nodes[name] = NodeDecision(
            name, _decision(node, match, True, Reason.STATIC, mode="static"), scheme, found
        )

    _float_image_stem(graph, layout, specs, recipe)
    _fold_activations(graph, layout, specs, fold_only)
    _drop_float_only_arithmetic(graph, layout, specs)
    _drop_isolated(graph, layout, specs, set(keep_float))
    _drop_isolated_data_movement(graph, layout, specs)
    _collect_tensors(graph, layout, specs)
    for i, rule in enumerate(recipe.rules):
        if i not in matched:
            warnings.warn(f"recipe {rule.describe()} (rule {i}) matches no node of this model", stacklevel=2)
    return layout


STEM_CHANNELS = 3  # RGB or grey: where an int8 convolution has too few input channels to gain
STEM_ACTIVATIONS = ("Relu", "Clip", "HardSwish", "HardSigmoid", "LeakyRelu")


def _float_image_stem(graph: ir.Graph, layout: Layout, specs: dict[str, OpSpec], recipe: Recipe) -> None:
    """For a target that asks for it (onnxruntime): a 2-D Conv reading a graph input of few channels stays float,
    with the activation right after it; quantization starts at what they produce. On MobileNetV3-Small the stem's
    QLinearConv took 21% of ONNX Runtime's int8 kernel time (14% as a float conv), plus the input's QuantizeLinear
    and transpose: kept float, the model ran at 0.87x float CPU time instead of 0.99x (bench/RESULTS_MOBILENET.md)."""
    from .targets import TARGETS

    if not TARGETS[recipe.target].float_image_stem:
        return
    for node in graph:
        x = node.inputs[0] if node.inputs else None
        if node.op_type != "Conv" or _nm(node) not in specs or x is None or not x.is_graph_input():
            continue
        channels = x.shape[1] if x.shape is not None and len(x.shape) == 4 else None
        if not isinstance(channels, int) or channels > STEM_CHANNELS:
            continue
        del specs[_nm(node)]
        layout.nodes[_nm(node)].keep_float(Reason.IMAGE_STEM, {"channels": channels, "after": ""})
        out = _keep_float_after(node, specs, layout, {"channels": channels, "after": f", after {_nm(node)}"})
        # A max pool reading the stem stays float with it. PP-OCRv6's stem feeds a conv and a 2x2 pool side by side:
        # quantized, the pool ran as ORT's int8 NCHW MaxPool, 6.4 of 21 ms per run; float, the onnxruntime target
        # went from 1.37-1.46x float latency to 0.97-1.02x. (ResNet-18's 3x3 pool costs as much either way: ORT
        # fuses DQ -> MaxPool -> Q back into its int8 pool, and a float NCHW pool is no faster.)
        pools = [u.node for u in out.uses() if u.node.op_type == "MaxPool" and _nm(u.node) in specs]
        for pool in pools:
            del specs[_nm(pool)]
            layout.nodes[_nm(pool)].keep_float(
                Reason.IMAGE_STEM, {"channels": channels, "after": f", after {_nm(node)}"}
            )
        if len(pools) == 1 and _only_reader(out) is pools[0]:
            out = pools[0].outputs[0]
        # A depthwise conv reading the stem stays float too (with its activation): ORT's int8 depthwise kernel is no
        # faster than its float one, and quantizing after it (stride 2: a quarter of the values) is cheaper than
        # before it. MobileNetV3-Small: 0.81 -> 0.76x float CPU time (bench/RESULTS_CORPUS.md).
        dw = _only_reader(out)
        if dw is not None and _nm(dw) in specs and _depthwise(dw):
            del specs[_nm(dw)]
            after = {"channels": channels, "after": f", the depthwise conv after {_nm(node)}"}
            layout.nodes[_nm(dw)].keep_float(Reason.IMAGE_STEM, after)
            _keep_float_after(dw, specs, layout, {"channels": channels, "after": f", after {_nm(dw)}"})


def _only_reader(value: ir.Value | None) -> ir.Node | None:
    uses = list(value.uses()) if value is not None else []
    return uses[0].node if len(uses) == 1 and value is not None and not value.is_graph_output() else None


def _keep_float_after(node: ir.Node, specs: dict[str, OpSpec], layout: Layout, details: dict[str, object]) -> ir.Value:
    """The activation right after a float-kept stem node stays float too; returns what the pair produces."""
    act = _only_reader(node.outputs[0])
    if act is None or act.op_type not in STEM_ACTIVATIONS or _nm(act) not in specs:
        return node.outputs[0]
    del specs[_nm(act)]
    layout.nodes[_nm(act)].keep_float(Reason.IMAGE_STEM, details)
    return act.outputs[0]


def _depthwise(node: ir.Node) -> bool:
    w = node.inputs[1] if node.op_type == "Conv" and len(node.inputs) > 1 else None
    shape = w.shape if w is not None else None
    group = node.attributes.get_int("group", 1)
    return shape is not None and len(shape) == 4 and shape[1] == 1 and group > 1 and shape[0] == group


def _fold_activations(graph: ir.Graph, layout: Layout, specs: dict[str, OpSpec], fold_only: dict[str, Skip]) -> None:
    """Relu/Clip(0, x) right after a quantized op: the quantization clamp does its work, so it disappears."""

    def is_quantized_compute(node: ir.Node | None) -> bool:
        if node is None or _nm(node) not in specs:
            return False
        s = specs[_nm(node)]
        return not s.shares_input_scale and not s.fusable_activation

    for node in graph:
        spec = specs.get(_nm(node))
        if spec is None or not spec.fusable_activation:
            continue
        src = node.inputs[0]
        assert src is not None
        producer = src.producer()
        if (
            producer is not None
            and is_quantized_compute(producer)
            and len(src.uses()) == 1
            and not src.is_graph_output()
        ):
            layout.fused[_nm(node)] = (_nm(producer), clip_bounds(node))
            d = layout.nodes[_nm(node)].decision
            d.code, d.details = Reason.FOLDED, {"into": _nm(producer)}
        elif _nm(node) in fold_only:
            del specs[_nm(node)]
            layout.nodes[_nm(node)].keep_float(fold_only[_nm(node)].code, fold_only[_nm(node)].details)
        else:
            # On its own only its output is worth quantizing: quantizing its input would spend the 256 levels on
            # the pre-activation range (e.g. [-111, 129] before a Clip to [0, 6]).
            specs[_nm(node)] = OpSpec(activations=())


def _drop_float_only_arithmetic(graph: ir.Graph, layout: Layout, specs: dict[str, OpSpec]) -> None:
    """Add/Mul whose output only float ops read (LayerNormalization after a residual Add, Erf...): ONNX Runtime can
    only run them in float, so quantizing them would just round what the float op reads. Backwards, so a chain of
    them (bias Add -> residual Add -> LayerNorm) stays float as a whole."""
    for node in reversed(list(graph)):
        if node.op_type not in ("Add", "Mul") or _nm(node) not in specs or node.outputs[0].is_graph_output():
            continue
        readers = {_nm(u.node) for u in node.outputs[0].uses()}
        if readers and not readers & specs.keys():
            del specs[_nm(node)]
            layout.nodes[_nm(node)].keep_float(Reason.FEEDS_ONLY_FLOAT)


def _drop_isolated(graph: ir.Graph, layout: Layout, specs: dict[str, OpSpec], settled: set[str]) -> None:
    """A Concat, Add or Mul that no quantized op feeds (through data movement) and none reads: quantizing it only
    rounds what it hands on (a recurrent model's state output stacked from float LSTM states: Silero VAD's Concat
    of h and c before its graph output). Graph inputs count as quantized (a full-integer model takes them int8), and
    so do nodes `settled` float after calibration (a mixed-range Concat): what they carry stays float for their own
    reason (settle.py)."""

    def computes(spec: OpSpec | None) -> bool:
        return spec is not None and not spec.needs_quantized_neighbour

    def fed(v: ir.Value | None) -> bool:
        while v is not None:
            node = v.producer()
            if node is None:  # a graph input is an edge a full-integer model (--io int8) takes quantized
                return v.is_graph_input()
            if _nm(node) in settled or computes(specs.get(_nm(node))):
                return True
            if _nm(node) not in specs or not node.inputs:
                return False
            v = node.inputs[0]
        return False

    def read(v: ir.Value) -> bool:
        for use in v.uses():
            spec = specs.get(_nm(use.node))
            if computes(spec) or (spec is not None and any(read(o) for o in use.node.outputs)):
                return True
        return False

    for node in graph:
        if node.op_type not in ("Concat", "Add", "Mul") or _nm(node) not in specs or _nm(node) in layout.fused:
            continue
        if any(fed(v) for v in node.inputs) or any(read(o) for o in node.outputs):
            continue
        del specs[_nm(node)]
        layout.nodes[_nm(node)].keep_float(Reason.ISOLATED)


def _drop_isolated_data_movement(graph: ir.Graph, layout: Layout, specs: dict[str, OpSpec]) -> None:
    """Data movement only pays off between quantized ops; walk forward so chains propagate."""
    touched: set[str] = set()
    for name, spec in specs.items():
        if not spec.needs_quantized_neighbour and name not in layout.fused:
            node = graph.node(name)
            touched.update(_nm(_input(node, i)) for i in spec.activations if _has(node, i))
            touched.update(_out_name(node, i, layout) for i in spec.outputs if i < len(node.outputs))
    for node in graph:
        found = specs.get(_nm(node))
        if found is None or not found.needs_quantized_neighbour:
            continue
        if _nm(_input(node, 0)) in touched:
            touched.update(_nm(o) for o in node.outputs)
        else:
            del specs[_nm(node)]
            if not _table_weight_only(node, layout):
                layout.nodes[_nm(node)].keep_float(Reason.ISOLATED_DATA_MOVEMENT)
    order = {_nm(n): i for i, n in enumerate(graph)}
    layout.rewrites = dict(sorted(layout.rewrites.items(), key=lambda kv: order[kv[0]]))


def _table_weight_only(node: ir.Node, layout: Layout) -> bool:
    """An embedding table whose lookups only float ops read (Gather -> GRU) is still a weight: stored int8 as in
    weight-only mode, or the file keeps its largest tensor float (a 31 MB table left a text model at 100% of its
    float size)."""
    d = layout.nodes[_nm(node)]
    if node.op_type != "Gather" or d.scheme is None:
        return False
    try:
        found = decide("weight_only", node, d.scheme)
    except Refuse:  # e.g. uint8 weights, which tables cannot take: the lookup stays float, as before
        return False
    if not isinstance(found, Take):
        return False
    layout.rewrites[_nm(node)] = (found.mode or "weight_only", d.scheme)
    d.spec = None
    d.decision.quantized, d.decision.code, d.decision.details = True, found.code, found.details
    d.decision.mode = found.mode or "weight_only"
    return True


def _collect_tensors(graph: ir.Graph, layout: Layout, specs: dict[str, OpSpec]) -> None:
    """The activation tensors, weights and biases the static nodes quantize; each quantized node's description."""
    for node in graph:
        spec = specs.get(_nm(node))
        if spec is None or _nm(node) in layout.fused:
            continue
        d = layout.nodes[_nm(node)]
        scheme = d.scheme
        assert scheme is not None
        mine = layout.node_tensors.setdefault(_nm(node), [])
        for i in spec.activations:
            if _has(node, i):
                _add_tensor(layout, _nm(_input(node, i)), _nm(_input(node, i)), scheme)
                mine.append(_nm(_input(node, i)))
        for i in spec.outputs:
            if i < len(node.outputs):
                out = _out_name(node, i, layout)
                mine.append(out)
                first = _nm(_input(node, 0))
                same = spec.shares_input_scale or spec.input_range
                src = layout.tensors.get(first, first) if same else out
                _add_tensor(layout, out, src, scheme)
                if spec.input_range:
                    layout.nudged.add(out)
        if spec.weight is not None:
            idx, axis = spec.weight
            layout.weights.append((_nm(node), idx, axis if scheme.per_channel else None))
            if spec.bias is not None:
                layout.biases.append((_nm(node), spec.bias, _nm(_input(node, 0)), idx))
            if scheme.bias_correction and node.op_type != "ConvTranspose":
                layout.channel_stats[_nm(_input(node, 0))] = 1 if node.op_type == "Conv" else -1
        d.decision.code, d.decision.details = _static_reason(scheme, spec)


def _static_reason(s: Scheme, spec: OpSpec) -> tuple[Reason, dict[str, Any]]:
    if spec.shares_input_scale or spec.input_range:
        return Reason.SHARES_SCALE, {}
    if spec.weight is not None:
        gran = "per-channel" if s.per_channel and spec.weight[1] is not None else "per-tensor"
        return Reason.STATIC, {"activations": s.activations, "weights": s.weights, "granularity": gran}
    return Reason.STATIC, {"activations": s.activations}


def _nm(x: ir.Node | ir.Value) -> str:
    """Names are set for every node (ensure_node_names) and value lowbit plans for."""
    assert x.name is not None
    return x.name


def _has(node: ir.Node, i: int) -> bool:
    return i < len(node.inputs) and node.inputs[i] is not None


def _input(node: ir.Node, i: int) -> ir.Value:
    v = node.inputs[i]
    assert v is not None
    return v


def _out_name(node: ir.Node, i: int, layout: Layout) -> str:
    """A fused Relu/Clip's output stands in for its producer's output."""
    out = node.outputs[i]
    uses = list(out.uses())
    if len(uses) == 1 and _nm(uses[0].node) in layout.fused:
        return _nm(uses[0].node.outputs[0])
    return _nm(out)


def _add_tensor(layout: Layout, name: str, source: str, scheme: Scheme) -> None:
    if name not in layout.tensors:
        layout.tensors[name] = source
        layout.tensor_scheme[name] = scheme
