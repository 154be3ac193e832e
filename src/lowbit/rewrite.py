"""Apply a plan to a prepared float graph: QuantizeLinear/DequantizeLinear pairs (QDQ form)."""

from __future__ import annotations

import hashlib
import weakref

import numpy as np
import onnx_ir as ir

from .graph.edit import take_over_output
from .numerics import pack_int4, qtype, quantize
from .plan import TensorParams

MS_DOMAIN = "com.microsoft"


def _name(x: ir.Node | ir.Value) -> str:
    """The name of a node or value lowbit works on (as ops.base.name_of, which this module cannot import)."""
    assert x.name is not None
    return x.name


def _input(node: ir.Node, i: int) -> ir.Value:
    """Input i of a node that has it."""
    v = node.inputs[i]
    assert v is not None, f"{node.name} has no input {i}"
    return v


# Quantized weights at least this large are shared when their contents are identical: an unrolled recurrent network
# reuses one float weight in every time step, and one copy per reading node made the captcha CRNN's int8 model
# 3.6x the size of its float one. Only callers that never change or remove the value afterwards ask for sharing.
SHARE_BYTES = 1024
_shared: weakref.WeakKeyDictionary[ir.Graph, dict[tuple, ir.Value]] = weakref.WeakKeyDictionary()


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, share: bool = False) -> ir.Value:
    """An initializer holding `array`, registered in `graph`: a new one, or with `share` an earlier shared one
    with the same contents (see SHARE_BYTES)."""
    key = None
    if share and array.nbytes >= SHARE_BYTES:
        array = np.ascontiguousarray(array)
        key = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).digest())
        if (old := _shared.setdefault(graph, {}).get(key)) is not None and old.name in graph.initializers:
            return old
    v = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape))
    v.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(v)
    if key is not None:
        _shared[graph][key] = v
    return v


def _domain(model: ir.Model, dtype: str) -> str:
    """16-bit and 4-bit QDQ need opset 21; older models use ONNX Runtime's com.microsoft operators instead."""
    if dtype in ("int16", "uint16", "int4", "uint4") and model.opset_imports.get("", 1) < 21:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        return MS_DOMAIN
    return ""


def _packed4(value: ir.Value, q: np.ndarray, dtype: str) -> ir.Value:
    """Store a 4-bit initializer two values per byte (ONNX INT4/UINT4)."""
    value.const_value = ir.PackedTensor(
        pack_int4(q), ir.DataType.INT4 if dtype == "int4" else ir.DataType.UINT4, shape=ir.Shape(np.shape(q))
    )
    value.dtype = value.const_value.dtype
    return value


def _qdq_params(graph: ir.Graph, name: str, p: TensorParams) -> tuple[ir.Value, ir.Value]:
    scale, zp = p.arrays()
    t = qtype(p.dtype)
    z = add_initializer(graph, f"{name}_zp", zp.astype(t.np_dtype))
    if p.dtype in ("int4", "uint4"):  # the zero point has the type of the quantized tensor
        _packed4(z, zp, p.dtype)
    return add_initializer(graph, f"{name}_s", scale.astype(np.float32)), z


def _dq_node(model: ir.Model, name: str, q: ir.Value, p: TensorParams) -> ir.Node:
    s, z = _qdq_params(model.graph, name, p)
    inputs = [q, s, z]
    if p.kind == "bias" and not np.any(p.zero_point):
        # Zero points default to 0; int32 biases save 4 bytes per channel
        # (weights keep theirs: ORT's QGemm fusion needs them).
        model.graph.initializers.pop(_name(z))
        inputs = [q, s]
    attrs = {"axis": ir.AttrInt64("axis", p.axis)} if p.axis is not None else {}
    return ir.Node(_domain(model, p.dtype), "DequantizeLinear", inputs, attrs, name=f"{name}_DQ")


def constant_dq(model: ir.Model, name: str, array: np.ndarray | None, q: np.ndarray, p: TensorParams) -> ir.Value:
    """A quantized initializer and the DequantizeLinear that feeds the float op."""
    t = qtype(p.dtype)
    four = p.dtype in ("int4", "uint4")
    stored = add_initializer(model.graph, f"{name}_q", q.astype(t.np_dtype), share=not four)
    if four:
        _packed4(stored, q, p.dtype)
    node = _dq_node(model, name, stored, p)
    node.outputs[0].name = f"{name}_dq"
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape(q.shape)
    model.graph.append(node)
    return node.outputs[0]


def _float_weight_channels(node: ir.Node) -> int | None:
    """Input channels of a Conv/ConvTranspose/Gemm whose weight is a float constant (left float), else None."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or node.domain not in ("", "ai.onnx"):
        return None
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.FLOAT or len(w.const_value.shape) < 2:
        return None

    def attr(key: str, default: int) -> int:
        a = node.attributes.get(key)
        return default if a is None else int(a.as_int())

    shape = w.const_value.numpy().shape  # a constant's shape is concrete
    if node.op_type == "Conv":
        return int(shape[1]) * attr("group", 1)
    if node.op_type == "ConvTranspose":
        return int(shape[0])
    if attr("transA", 0):
        return None
    return int(shape[1] if attr("transB", 0) else shape[0])


def insert_qdq(model: ir.Model, value: ir.Value, p: TensorParams) -> None:
    """value -> Q -> DQ, and every consumer (and graph output) reads the DQ result."""
    graph = model.graph
    name = _name(value)
    uses = list(value.uses())
    s, z = _qdq_params(graph, name, p)
    dom = _domain(model, p.dtype)
    qn = ir.Node(dom, "QuantizeLinear", [value, s, z], name=f"{name}_Q")
    qn.outputs[0].name = f"{name}_q"
    qn.outputs[0].dtype = ir.DataType.from_numpy(np.dtype(qtype(p.dtype).np_dtype))
    qn.outputs[0].shape = value.shape
    dn = ir.Node(dom, "DequantizeLinear", [qn.outputs[0], s, z], name=f"{name}_DQ")
    out = dn.outputs[0]
    out.dtype, out.shape = ir.DataType.FLOAT, value.shape
    float_readers = []
    for use in uses:
        channels = _float_weight_channels(use.node) if use.idx == 0 else None
        if channels is None:
            use.node.replace_input_with(use.idx, out)
        else:
            float_readers.append((use, channels))
    if value.is_graph_output():
        take_over_output(graph, value, out, "_float")
    else:
        out.name = f"{name}_dq"
    graph.append(qn)
    graph.append(dn)
    # ONNX Runtime (WeightBiasQuantization) quantizes the float weights of a Conv/Gemm that reads a per-tensor DQ,
    # per tensor, symmetric int8: a depthwise conv left float among int8 layers lost 23 points of top-1 agreement
    # on EfficientNet-Lite0. A DQ with the same scale repeated per channel (axis 1) is not matched: it stays float.
    axis_dq: dict[int, ir.Value] = {}  # one per channel count, shared by the float readers that take it
    for use, channels in float_readers:
        if channels not in axis_dq:
            scale, zp = p.arrays()
            t = qtype(p.dtype)
            tag = f"{name}_axis" if len(axis_dq) == 0 else f"{name}_axis{channels}"
            sc = add_initializer(graph, f"{tag}_s", np.full(channels, scale.reshape(-1)[0], np.float32))
            zc = add_initializer(graph, f"{tag}_zp", np.full(channels, zp.reshape(-1)[0], t.np_dtype))
            an = ir.Node(dom, "DequantizeLinear", [qn.outputs[0], sc, zc], [ir.AttrInt64("axis", 1)], name=f"{tag}_DQ")
            an.outputs[0].name, an.outputs[0].dtype = f"{tag}_dq", ir.DataType.FLOAT
            an.outputs[0].shape = value.shape
            graph.append(an)
            axis_dq[channels] = an.outputs[0]
        use.node.replace_input_with(use.idx, axis_dq[channels])


def quantize_constant(model: ir.Model, value: ir.Value, p: TensorParams) -> None:
    """A constant that an op treats as an activation (Add with a constant): stored quantized."""
    assert value.const_value is not None
    array = value.const_value.numpy()
    scale, zp = p.arrays()
    q = quantize(array, scale, zp, p.dtype, axis=p.axis)
    out = constant_dq(model, _name(value), array, q, p)
    for use in list(value.uses()):
        if use.node.op_type != "DequantizeLinear":
            use.node.replace_input_with(use.idx, out)


def fuse_activation(graph: ir.Graph, node_name: str) -> None:
    """Remove a Relu/Clip whose work the producer's output quantization now does."""
    node = graph.node(node_name)
    src, dst = _input(node, 0), node.outputs[0]
    name = dst.name
    dst.replace_all_uses_with(src, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    dst.name = None
    src.name = name


# --- dynamic and weight-only forms: the node is replaced by a small subgraph writing the same output ---


def _node(
    graph: ir.Graph, op: str, inputs: list, name: str, domain: str = "", dtype=ir.DataType.FLOAT, **attrs
) -> ir.Value:
    n = ir.Node(domain, op, inputs, [ir.convenience.convert_attribute(k, v) for k, v in attrs.items()], name=name)
    n.outputs[0].name = f"{name}_out"
    n.outputs[0].dtype = dtype
    graph.append(n)
    return n.outputs[0]


def take_output(graph: ir.Graph, node: ir.Node, new: ir.Value) -> None:
    """`new` replaces node's output everywhere, under the old name; the node goes."""
    old = node.outputs[0]
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    old.name = None
    new.name = name
    new.shape = new.shape or old.shape


def _add_bias(model: ir.Model, node: ir.Node, y: ir.Value, bias: np.ndarray | ir.Value | None) -> ir.Value:
    if bias is None:
        return y
    b = (
        bias
        if isinstance(bias, ir.Value)
        else add_initializer(model.graph, f"{node.name}_bias", bias.astype(np.float32))
    )
    return _node(model.graph, "Add", [y, b], f"{node.name}_bias_add")


def dynamic_quantize(model: ir.Model, x: ir.Value, cache: dict[str, tuple]) -> tuple:
    """One DynamicQuantizeLinear per activation, shared by every MatMul that reads it (e.g. Q, K, V projections)."""
    name = _name(x)
    if name not in cache:
        n = ir.Node("", "DynamicQuantizeLinear", [x], num_outputs=3, name=f"{name}_DynQ")
        for o, suffix, t in zip(n.outputs, ("q", "s", "zp"), (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8)):
            o.name, o.dtype = f"{name}_dyn_{suffix}", t
        model.graph.append(n)
        cache[name] = tuple(n.outputs)
    return cache[name]


def dynamic_matmul(
    model: ir.Model, node: ir.Node, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, bias, cache: dict
) -> None:
    """x -> DynamicQuantizeLinear -> MatMulInteger(int8 W (K, N)) -> Cast -> Mul(x_scale * w_scale) [-> Add bias].
    Standard ONNX ops that ONNX Runtime fuses into one DynamicQuantizeMatMul kernel (measured: same speed)."""
    g, name = model.graph, node.name
    xq, xs, xz = dynamic_quantize(model, _input(node, 0), cache)
    wq = add_initializer(g, f"{name}_w_q", q.astype(np.int8), share=True)
    wz = add_initializer(g, f"{name}_w_zp", zp.astype(np.int8))
    ws = add_initializer(g, f"{name}_w_s", np.asarray(scale, np.float32))
    acc = _node(g, "MatMulInteger", [xq, wq, xz, wz], f"{name}_MatMulInteger", dtype=ir.DataType.INT32)
    acc_f = _node(g, "Cast", [acc], f"{name}_Cast", to=ir.DataType.FLOAT)
    s = _node(g, "Mul", [xs, ws], f"{name}_scale")
    y = _node(g, "Mul", [acc_f, s], f"{name}_rescale")
    take_output(g, node, _add_bias(model, node, y, bias))


def matmul_nbits(
    model: ir.Model,
    node: ir.Node,
    packed: np.ndarray,
    scale: np.ndarray,
    zp: np.ndarray | None,
    k: int,
    n: int,
    block: int,
    bias,
) -> None:
    """ONNX Runtime's com.microsoft.MatMulNBits: B uint8 (N, n_blocks, block/2), scales (N * n_blocks),
    zero points packed two per byte per row (absent: 8)."""
    g, name = model.graph, node.name
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    inputs = [
        node.inputs[0],
        add_initializer(g, f"{name}_w_q4", packed),
        add_initializer(g, f"{name}_w_s", scale.astype(np.float32).ravel()),
    ]
    if zp is not None:
        inputs.append(add_initializer(g, f"{name}_w_zp4", zp.ravel()))
    y = _node(g, "MatMulNBits", inputs, f"{name}_MatMulNBits", domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=block)
    take_output(g, node, _add_bias(model, node, y, bias))


def _shared_init(graph: ir.Graph, name: str, make) -> ir.Value:
    """One quantized copy of a table however many Gathers read it (a tied embedding is stored once)."""
    return graph.initializers[name] if name in graph.initializers else make(name)


def gather_rows_int8(model: ir.Model, node: ir.Node, q: np.ndarray, scale: np.ndarray) -> None:
    """Gather int8 rows first, then scale only them: the table is never dequantized whole. One scale for the
    table (per-tensor) is a DequantizeLinear after the Gather: one lookup per id instead of two."""
    g, name, t = model.graph, node.name, _input(node, 0).name
    idx = node.inputs[1]
    if np.ndim(scale) == 0:
        # Stored as uint8 q + 128 with zero point 128 (the same values): ONNX Runtime then moves the
        # DequantizeLinear past a following Unsqueeze, where int8 gets an extra Q/DQ pair per lookup
        # (measured on the DLRM example: ~4% of the model's time at batch 256).
        table = _shared_init(g, f"{t}_u8", lambda n: add_initializer(g, n, (q.astype(np.int16) + 128).astype(np.uint8)))
        rows = _node(g, "Gather", [table, idx], f"{name}_Gather_q", dtype=ir.DataType.UINT8)
        s = _shared_init(g, f"{t}_s8", lambda n: add_initializer(g, n, np.asarray(scale, np.float32)))
        z = _shared_init(g, f"{t}_z8", lambda n: add_initializer(g, n, np.array(128, np.uint8)))
        take_output(g, node, _node(g, "DequantizeLinear", [rows, s, z], f"{name}_DQ"))
        return
    table = _shared_init(g, f"{t}_q8", lambda n: add_initializer(g, n, q.astype(np.int8)))
    rows = _node(g, "Gather", [table, idx], f"{name}_Gather_q", dtype=ir.DataType.INT8)
    rows_f = _node(g, "Cast", [rows], f"{name}_Cast", to=ir.DataType.FLOAT)
    scales = _shared_init(g, f"{t}_s8", lambda n: add_initializer(g, n, scale.reshape(-1, 1).astype(np.float32)))
    s = _node(g, "Gather", [scales, idx], f"{name}_Gather_s")
    take_output(g, node, _node(g, "Mul", [rows_f, s], f"{name}_rescale"))


def gather_int4_nibbles(model: ir.Model, node: ir.Node, codes: np.ndarray, scale: np.ndarray, block: int) -> None:
    """Symmetric int4 rows (codes in [0, 15] around 8, D even) as uint8 bytes holding column j in the low nibble
    and column j + D/2 in the high one: Gather bytes -> Mod / BitShift -> Concat -> DequantizeLinear(zero point 8)
    -> Mul by the gathered block scales. Standard opset-11 ops; measured 4-5x faster than ONNX Runtime's
    GatherBlockQuantized (256 rows of 32: 22 vs 104 us, 1 thread), with the same bytes and the same values."""
    g, name, t = model.graph, node.name, _input(node, 0).name
    idx, half = node.inputs[1], codes.shape[1] // 2
    packed = (codes[:, :half] | (codes[:, half:] << 4)).astype(np.uint8)
    table = _shared_init(g, f"{t}_n4_{block}", lambda n: add_initializer(g, n, packed))
    rows = _node(g, "Gather", [table, idx], f"{name}_Gather_q", dtype=ir.DataType.UINT8)
    const = lambda n, v: _shared_init(g, f"lowbit_{n}", lambda k: add_initializer(g, k, v))  # noqa: E731
    lo = _node(g, "Mod", [rows, const("u8_16", np.array(16, np.uint8))], f"{name}_low", dtype=ir.DataType.UINT8)
    hi = _node(
        g,
        "BitShift",
        [rows, const("u8_4", np.array(4, np.uint8))],
        f"{name}_high",
        dtype=ir.DataType.UINT8,
        direction="RIGHT",
    )
    both = _node(g, "Concat", [lo, hi], f"{name}_codes", dtype=ir.DataType.UINT8, axis=-1)
    centred = _node(
        g,
        "DequantizeLinear",
        [both, const("f32_1", np.array(1, np.float32)), const("u8_8", np.array(8, np.uint8))],
        f"{name}_centre",
    )
    scales = _shared_init(g, f"{t}_s4_{block}", lambda n: add_initializer(g, n, scale.astype(np.float32)))
    s = _node(g, "Gather", [scales, idx], f"{name}_Gather_s")
    if scale.shape[1] > 1:  # one scale per block: spread them over the row's columns
        cols = np.arange(codes.shape[1], dtype=np.int32) // block
        s = _node(g, "Gather", [s, const(f"blocks_{codes.shape[1]}_{block}", cols)], f"{name}_spread", axis=-1)
    take_output(g, node, _node(g, "Mul", [centred, s], f"{name}_rescale"))


def gather_block_quantized(
    model: ir.Model, node: ir.Node, codes: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, block: int
) -> None:
    """int4 rows in blocks along D: ONNX Runtime's com.microsoft.GatherBlockQuantized (INT4 data, zero point 0;
    affine: UINT4 data and zero points)."""
    g, name = model.graph, node.name
    t, tag = _input(node, 0).name, f"4_{block}{'u' if zp is not None else ''}"  # one copy per table and format
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    kind = ir.DataType.UINT4 if zp is not None else ir.DataType.INT4

    def int4add_initializer(vname: str, values: np.ndarray) -> ir.Value:
        v = add_initializer(g, vname, values.astype(np.int8 if kind == ir.DataType.INT4 else np.uint8))
        v.const_value = ir.PackedTensor(pack_int4(values), kind, shape=ir.Shape(values.shape))
        v.dtype = kind
        return v

    inputs = [
        _shared_init(g, f"{t}_q{tag}", lambda n: int4add_initializer(n, codes)),
        node.inputs[1],
        _shared_init(g, f"{t}_s{tag}", lambda n: add_initializer(g, n, scale.astype(np.float32))),
    ]
    if zp is not None:
        inputs.append(_shared_init(g, f"{t}_z{tag}", lambda n: int4add_initializer(n, zp)))
    y = _node(
        g,
        "GatherBlockQuantized",
        inputs,
        f"{name}_GatherBlockQuantized",
        domain=MS_DOMAIN,
        gather_axis=0,
        quantize_axis=1,
        block_size=block,
        bits=4,
    )
    take_output(g, node, y)
