"""Decide, before any data is seen, which nodes are quantized, which stay float (and why), and which tensors
must be observed during calibration."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .errors import LowbitError
from .ops import FLOAT16_FRAGILE, FLOAT16_OPS, OpSpec, Skip, spec_for
from .ops.activation import clip_bounds
from .ops.matmul import embedding_table, weight_matmul
from .recipe import Recipe, Scheme
from .attention import attention_float_reason, is_attention
from .recurrent import lstm_float_reason, recurrent_float_reason

CONV_DYNAMIC_REASON = "dynamic quantization of convolutions is several times slower than float on x86 (ConvInteger)"
RECURRENT = ("LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention")
# A calibrated value this large is a sentinel, not a signal: attention masks add -1e4, float32's lowest
# (-3.4e38) or finfo.min to the scores they hide. One such value stretches an 8- or 16-bit grid so far that every
# real value rounds to zero (MiniLM static int8: embedding cosine 0.15), so ops quantizing such a tensor stay float.
SENTINEL = 1e4
SENTINEL_REASON = "calibrated range reaches"


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
    # Nodes handled outside the static QDQ path, by mode (node name -> scheme).
    dynamic: dict[str, Scheme] = field(default_factory=dict)
    weight_only: dict[str, Scheme] = field(default_factory=dict)
    float16: set[str] = field(default_factory=set)
    # static node -> the activation tensors it quantizes (inputs and outputs)
    node_tensors: dict[str, list[str]] = field(default_factory=dict)

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


def make_layout(model: ir.Model, recipe: Recipe, calibrated: bool = True,
                keep_float: dict[str, str] | None = None) -> Layout:
    """`calibrated`: whether calibration data (or a plan) will be given, so static quantization is possible.
    `keep_float`: static nodes to keep float anyway (node name -> reason), e.g. from `sentinel_nodes`."""
    keep_float = keep_float or {}
    graph = model.graph
    ensure_node_names(graph)
    layout = Layout()
    specs: dict[str, OpSpec] = {}
    matched: set[str] = set()
    for node in graph:
        scheme, rule = recipe.scheme_for(node.name, node.op_type)
        if rule.startswith("rule "):
            matched.add(rule.split(" ", 2)[1])
        if scheme is None or scheme.mode == "float":
            reason = rule if scheme is None else f"kept float ({rule}: mode float)"
            layout.nodes[node.name] = NodeDecision(node.name, node.op_type, False, reason, rule)
            continue
        if scheme.mode != "static":
            scheme = _other_mode(node, scheme, rule, layout, calibrated)
            if scheme is None:
                continue
        if node.name in keep_float:
            layout.nodes[node.name] = NodeDecision(node.name, node.op_type, False, keep_float[node.name], rule)
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

    # Add/Mul whose output only float ops read (LayerNormalization after a residual Add, Erf...): ONNX Runtime can
    # only run them in float, so quantizing them would just round what the float op reads. Backwards, so a chain of
    # them (bias Add -> residual Add -> LayerNorm) stays float as a whole.
    for node in reversed(list(graph)):
        if node.op_type not in ("Add", "Mul") or node.name not in specs or node.outputs[0].is_graph_output():
            continue
        readers = {u.node.name for u in node.outputs[0].uses()}
        if readers and not readers & specs.keys():
            del specs[node.name]
            d = layout.nodes[node.name]
            d.quantized, d.spec = False, None
            d.reason = "its output feeds only float ops (nothing to gain, only rounding)"

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
        mine = layout.node_tensors.setdefault(node.name, [])
        for i in spec.activations:
            if _has(node, i):
                _add_tensor(layout, node.inputs[i].name, node.inputs[i].name, scheme)
                mine.append(node.inputs[i].name)
        for i in spec.outputs:
            if i < len(node.outputs):
                out = _out_name(node, i, layout)
                mine.append(out)
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
    for i, rule in enumerate(recipe.rules):
        if str(i) not in matched:
            warnings.warn(f"recipe {rule.describe()} (rule {i}) matches no node of this model", stacklevel=2)
    return layout


def sentinel_nodes(layout: Layout, extremes: dict[str, tuple[float, float]]) -> dict[str, str]:
    """Static nodes that would quantize a tensor whose calibrated range (`extremes`: tensor -> (min, max), as
    observed, before any clipping) reaches |x| >= SENTINEL -> why they stay float. Tensors sharing a scale are
    judged by their source's range."""
    out: dict[str, str] = {}
    for node, tensors in layout.node_tensors.items():
        for t in tensors:
            lo, hi = extremes.get(layout.tensors.get(t, t), (0.0, 0.0))
            if max(-lo, hi) >= SENTINEL:
                edge = lo if -lo >= hi else hi
                out[node] = (f"{SENTINEL_REASON} {edge:.3g} at '{t}' (observed, or a mask constant upstream): a mask "
                             "or sentinel value, not a signal "
                             "(no 8- or 16-bit grid holds both); kept float")
                break
    return out


# Ops that pass a mask constant's huge values on to their output (masks are built, broadcast and added to scores).
_CARRIES = frozenset({"Add", "Sub", "Mul", "Where", "Max", "Min", "Neg", "Cast", "Identity", "Reshape", "Unsqueeze",
                      "Squeeze", "Flatten", "Expand", "Tile", "Transpose", "Concat", "Slice", "Gather"})


def constant_sentinels(model: ir.Model) -> dict[str, float]:
    """Tensors that can carry a sentinel constant (|x| >= SENTINEL, e.g. a mask's -3.4e38) -> that value. A range
    seen in calibration misses it when no calibration input had padding; then it would be clipped at inference."""
    out: dict[str, float] = {}
    for node in model.graph:
        if node.op_type not in _CARRIES or node.domain not in ("", "ai.onnx"):
            continue
        found = None
        for v in node.inputs:
            if v is None:
                continue
            if v.name in out:
                found = out[v.name]
            elif v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point():
                arr = v.const_value.numpy()
                if arr.size and np.abs(arr).max() >= SENTINEL:
                    found = float(arr.flat[np.abs(arr).argmax()])
        if found is not None:
            out.update({o.name: found for o in node.outputs if o is not None})
    return out


def _other_mode(node: ir.Node, scheme: Scheme, rule: str, layout: Layout, calibrated: bool) -> Scheme | None:
    """Decide a dynamic / weight-only / float16 node. Returns a scheme when the node falls back to static."""
    name, op = node.name, node.op_type

    def keep(reason: str) -> None:
        layout.nodes[name] = NodeDecision(name, op, False, reason, rule)

    def take(store: dict, reason: str) -> None:
        store[name] = scheme
        layout.nodes[name] = NodeDecision(name, op, True, reason, rule, scheme)

    if scheme.mode == "float16":
        if op in FLOAT16_FRAGILE:
            keep(f"numerically fragile in float16: {op} stays float32")
        elif node.domain not in ("", "ai.onnx") or op not in FLOAT16_OPS:
            keep(f"no float16 form for {op} in lowbit: stays float32")
        elif any(v is not None and v.dtype not in (None, ir.DataType.FLOAT) and v.dtype.is_floating_point()
                 for v in list(node.inputs) + list(node.outputs)):
            keep(f"{op} has a non-float32 floating-point input or output")
        else:
            layout.float16.add(name)
            layout.nodes[name] = NodeDecision(name, op, True, "float16 weights and compute", rule, scheme)
        return None
    if op in ("Conv", "ConvTranspose"):
        if scheme.weights == "int4":
            raise LowbitError(f"int4 weights cannot be used on {op} node '{name}' ({rule}): ONNX Runtime has int4 "
                              "kernels for MatMul/Gemm/Gather only; add a rule giving convolutions weights=int8, or mode=static for int4 QDQ")
        if scheme.mode == "weight_only":
            spec = spec_for(node)
            if isinstance(spec, Skip):
                keep(spec.reason)
            else:
                take(layout.weight_only, f"weight-only int8 {'per-channel' if scheme.per_channel else 'per-tensor'} weights, float activations")
            return None
        if calibrated:  # dynamic mode: convolutions get static quantization instead
            return dataclasses.replace(scheme, mode="static")
        keep(CONV_DYNAMIC_REASON + "; give calibration data to quantize them statically")
        return None
    if op in ("MatMul", "Gemm"):
        found = weight_matmul(node)
        if isinstance(found, Skip):
            keep(found.reason)
        elif scheme.mode == "dynamic":
            take(layout.dynamic, "dynamic int8: uint8 activations quantized per input at run time, int8 "
                 f"{'per-channel' if scheme.per_channel else 'per-tensor'} weights")
        else:
            take(layout.weight_only, _weight_only_reason(scheme))
        return None
    # An embedding table is a weight: dynamic mode stores it int8 too (the lookup has no activation to quantize),
    # which on a transformer is most of the file.
    if op == "Gather" and scheme.mode in ("weight_only", "dynamic"):
        found = embedding_table(node)
        if isinstance(found, Skip):
            keep(found.reason)
        elif scheme.weights == "uint8":
            raise LowbitError(f"uint8 weights cannot be used on Gather node '{name}' ({rule}): embedding tables are "
                              "int8 (symmetric) or int4; add a rule giving Gather weights=int8")
        else:
            take(layout.weight_only, _weight_only_reason(scheme, rows=True))
        return None
    if is_attention(node) or op == "LSTM":  # ONNX Runtime's fused dynamic kernels
        gran = ("per-column" if is_attention(node) else "per-channel") if scheme.per_channel else "per-tensor"
        why = (attention_float_reason if is_attention(node) else lstm_float_reason)(node, scheme)
        if why:
            keep(why)
        elif is_attention(node):
            take(layout.dynamic, f"dynamic int8 (QAttention): uint8 input quantized per input at run time, int8 {gran} "
                 "Q/K/V weights")
        else:
            take(layout.dynamic, "dynamic int8 (DynamicQuantizeLSTM): input and hidden state quantized per step at "
                 f"run time, int8 {gran} W and R")
    elif op in RECURRENT:
        keep(recurrent_float_reason(op, scheme))
    elif scheme.mode == "dynamic":
        keep(f"dynamic mode quantizes LSTM, com.microsoft Attention, MatMul/Gemm and embedding tables only; {op} stays float")
    else:
        keep(f"weight-only mode: {op} has no weights to quantize")
    return None


def _weight_only_reason(scheme: Scheme, rows: bool = False) -> str:
    if scheme.weights == "int4":
        how = "row-wise" if rows else "MatMulNBits"
        return f"weight-only int4 {'symmetric' if scheme.symmetric_weights else 'affine'} blocks of {scheme.int4_block} ({how}), float activations"
    gran = ("per-row" if rows else "per-channel") if scheme.per_channel else "per-tensor"
    return f"weight-only {scheme.weights} {gran} weights, float activations"


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
