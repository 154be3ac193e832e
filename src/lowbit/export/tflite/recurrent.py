"""ONNX LSTM / GRU -> the cell written out for each time step (FULLY_CONNECTED, LOGISTIC, TANH, MUL, ADD).

Input sizes are fixed at export, so the sequence length is known and the loop unrolls. XNNPACK runs every one
of these ops; TFLite's UNIDIRECTIONAL_SEQUENCE_LSTM it does not take, and its int8 form has a 16-bit cell
state that is not what the ONNX model computes. lowbit's quantizer keeps LSTM / GRU float (static mode), so the
unrolled cell is float too, as in ONNX Runtime. The input projection of all time steps is one FULLY_CONNECTED;
each step adds the recurrent one. A reverse direction walks the steps backwards. Initial states that are
constants (absent: zeros) are folded into the first step.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .layers import fail
from .qdq import Graph
from .rewrite import Names

_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


class _Emit:
    """New float nodes and values, named stably."""

    def __init__(self, g: Graph, shapes: dict, dtypes: dict, label: str) -> None:
        self.g, self.shapes, self.dtypes, self.label = g, shapes, dtypes, label
        self.names = Names(g, shapes)
        self.nodes: list[onnx.NodeProto] = []

    def const(self, data: np.ndarray, tag: str) -> str:
        name = self.names(f"{self.label}_{tag}")
        self.g.consts[name] = np.ascontiguousarray(data)
        return name

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], tag: str, out: str = "", **attrs) -> str:
        y = out or self.names(f"{self.label}_{tag}")
        self.shapes[y] = tuple(shape)
        self.dtypes[y] = onnx.TensorProto.FLOAT
        self.nodes.append(helper.make_node(op, inputs, [y], name=y if not out else f"{self.label}_{tag}", **attrs))
        return y

    def slice(self, x: str, axis: int, start: int, end: int, shape: tuple[int, ...], tag: str) -> str:
        bounds = [self.const(np.array([v], np.int64), f"{tag}_{k}") for k, v in (("s", start), ("e", end), ("a", axis))]
        return self.node("Slice", [x, *bounds], shape, tag)

    def reshape(self, x: str, shape: tuple[int, ...], tag: str, out: str = "") -> str:
        return self.node("Reshape", [x, self.const(np.array(shape, np.int64), f"{tag}_shape")], shape, tag, out)


def _state(g: Graph, e: _Emit, name: str, d: int, batch: int, hidden: int, tag: str) -> str | np.ndarray:
    """Direction d's initial state [batch, hidden]: a constant (zeros when absent) or a value sliced out."""
    if not name:
        return np.zeros((batch, hidden), np.float32)
    if name in g.consts:
        return g.consts[name][d].astype(np.float32)
    s = e.slice(name, 0, d, d + 1, (1, batch, hidden), f"{tag}{d}_slice")
    return e.reshape(s, (batch, hidden), f"{tag}{d}")


def _recurrent(e: _Emit, h: str | np.ndarray, r: np.ndarray, bias: np.ndarray | None, tag: str) -> str | np.ndarray:
    """h @ r.T (+ bias): a Gemm on a value, computed here for a constant h."""
    if isinstance(h, np.ndarray):
        return h @ r.T + (0 if bias is None else bias)
    inputs = [h, e.const(r, f"{tag}_r")]
    if bias is not None and bias.any():
        inputs.append(e.const(bias, f"{tag}_rb"))
    return e.node("Gemm", inputs, (e.shapes[h][0], r.shape[0]), tag, transB=1)


def _add(e: _Emit, a: str, b: str | np.ndarray, tag: str) -> str:
    if isinstance(b, np.ndarray):
        if not b.any():
            return a
        b = e.const(b.astype(np.float32), f"{tag}_c")
    return e.node("Add", [a, b], e.shapes[a], tag)


def _lstm_step(e, xg, h, c, r, hidden, tag):
    batch = e.shapes[xg][0]
    pre = _add(e, xg, _recurrent(e, h, r, None, f"{tag}_rec"), f"{tag}_pre")
    gate = {
        k: e.slice(pre, 1, j * hidden, (j + 1) * hidden, (batch, hidden), f"{tag}_{k}") for j, k in enumerate("iofc")
    }
    i = e.node("Sigmoid", [gate["i"]], (batch, hidden), f"{tag}_is")
    o = e.node("Sigmoid", [gate["o"]], (batch, hidden), f"{tag}_os")
    f = e.node("Sigmoid", [gate["f"]], (batch, hidden), f"{tag}_fs")
    g = e.node("Tanh", [gate["c"]], (batch, hidden), f"{tag}_ct")
    c_new = e.node("Mul", [i, g], (batch, hidden), f"{tag}_ig")
    if not (isinstance(c, np.ndarray) and not c.any()):
        fc = e.node("Mul", [f, c if isinstance(c, str) else e.const(c, f"{tag}_c0")], (batch, hidden), f"{tag}_fc")
        c_new = e.node("Add", [fc, c_new], (batch, hidden), f"{tag}_c")
    tc = e.node("Tanh", [c_new], (batch, hidden), f"{tag}_tc")
    return e.node("Mul", [o, tc], (batch, hidden), f"{tag}_h"), c_new


def _gru_step(e, xg, h, r, rb, hidden, lbr, tag):
    batch = e.shapes[xg][0]
    shape = (batch, hidden)
    if lbr:  # rt (.) (h Rh + Rbh): the whole recurrent projection at once
        rec = _recurrent(e, h, r, rb, f"{tag}_rec")
        if isinstance(rec, str):
            rec_zr: str | np.ndarray = e.slice(rec, 1, 0, 2 * hidden, (batch, 2 * hidden), f"{tag}_rzr")
            rec_h = e.slice(rec, 1, 2 * hidden, 3 * hidden, shape, f"{tag}_rh")
        else:  # from a constant initial state: sliced here
            rec_zr = rec[:, : 2 * hidden].astype(np.float32)
            rec_h = e.const(np.ascontiguousarray(rec[:, 2 * hidden :], np.float32), f"{tag}_rh")
    else:
        rec_zr = _recurrent(e, h, r[: 2 * hidden], rb[: 2 * hidden], f"{tag}_rec")
    xzr = e.slice(xg, 1, 0, 2 * hidden, (batch, 2 * hidden), f"{tag}_xzr")
    zr = e.node("Sigmoid", [_add(e, xzr, rec_zr, f"{tag}_zrp")], (batch, 2 * hidden), f"{tag}_zr")
    z = e.slice(zr, 1, 0, hidden, shape, f"{tag}_z")
    rr = e.slice(zr, 1, hidden, 2 * hidden, shape, f"{tag}_r")
    xh = e.slice(xg, 1, 2 * hidden, 3 * hidden, shape, f"{tag}_xh")
    h_name = h if isinstance(h, str) else e.const(h, f"{tag}_h0")
    if lbr:
        gated = e.node("Mul", [rr, rec_h], shape, f"{tag}_rrh")
    else:
        rh = e.node("Mul", [rr, h_name], shape, f"{tag}_rh")
        gated = _recurrent(e, rh, r[2 * hidden :], rb[2 * hidden :], f"{tag}_hrec")
    hh = e.node("Tanh", [e.node("Add", [xh, gated], shape, f"{tag}_hp")], shape, f"{tag}_hh")
    diff = e.node("Sub", [h_name, hh], shape, f"{tag}_d")  # h_new = hh + z (.) (h - hh)
    return e.node("Add", [hh, e.node("Mul", [z, diff], shape, f"{tag}_zd")], shape, f"{tag}_h")


def _check(g: Graph, node: onnx.NodeProto, attrs: dict) -> None:
    acts = attrs.get("activations")
    if acts and [a.decode() if isinstance(a, bytes) else a for a in acts] != _DEFAULT_ACTS[node.op_type] * (
        len(acts) // len(_DEFAULT_ACTS[node.op_type])
    ):
        raise fail(node, f"activations {acts}; only the default ones are exported")
    if attrs.get("clip") is not None or attrs.get("input_forget", 0) or attrs.get("layout", 0):
        raise fail(node, "clip, input_forget or layout=1 is not exported")
    if not all(i in g.consts for i in node.input[1:4] if i):
        raise fail(node, "weights computed at run time")
    if node.op_type == "LSTM" and len(node.input) > 7 and node.input[7]:
        raise fail(node, "peephole weights are not exported")


def unroll(g: Graph, shapes: dict, dtypes: dict) -> list[str]:
    """Every LSTM / GRU in `g` -> its cell once per time step; returns them ("name (op)"). The cell's nodes join
    `g.float_islands`: float as the ONNX model runs them, reported once per LSTM / GRU, not per step."""
    out: list[onnx.NodeProto] = []
    done: list[str] = []
    for node in g.nodes:
        if node.op_type not in ("LSTM", "GRU"):
            out.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        _check(g, node, attrs)
        label = node.name or node.output[0]
        e = _Emit(g, shapes, dtypes, label)
        x = node.input[0]
        seq, batch, size = shapes[x]
        lens = node.input[4] if len(node.input) > 4 else ""
        if lens and not (lens in g.consts and np.all(g.consts[lens] == seq)):
            raise fail(node, "sequence_lens other than the full length is not exported")
        hidden = int(attrs["hidden_size"])
        direction = attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        dirs = [False, True] if direction == "bidirectional" else [direction == "reverse"]
        gates = 4 if node.op_type == "LSTM" else 3
        w, r = g.consts[node.input[1]].astype(np.float32), g.consts[node.input[2]].astype(np.float32)
        b_in = node.input[3] if len(node.input) > 3 else ""
        bias = g.consts[b_in].astype(np.float32) if b_in else np.zeros((len(dirs), 2 * gates * hidden), np.float32)
        lbr = int(attrs.get("linear_before_reset", 0))
        flat = e.reshape(x, (seq * batch, size), "x2d")
        ys, hs, cs = [], [], []
        for d, reverse in enumerate(dirs):
            wb, rb = bias[d, : gates * hidden], bias[d, gates * hidden :]
            in_bias, rec_bias = wb + rb, np.zeros_like(rb)  # recurrent biases no gate multiplies join the input's
            if node.op_type == "GRU" and lbr:  # Rbh is multiplied by the reset gate: it stays with R's projection
                in_bias = wb + np.concatenate([rb[: 2 * hidden], np.zeros(hidden, np.float32)])
                rec_bias = np.concatenate([np.zeros(2 * hidden, np.float32), rb[2 * hidden :]])
            xg = e.node("Gemm", [flat, e.const(w[d], f"w{d}"), e.const(in_bias, f"b{d}")],
                        (seq * batch, gates * hidden), f"xg{d}", transB=1)  # fmt: skip
            h = _state(g, e, node.input[5] if len(node.input) > 5 else "", d, batch, hidden, "h0_")
            c = _state(g, e, node.input[6] if len(node.input) > 6 else "", d, batch, hidden, "c0_")
            steps: list[str] = [""] * seq
            for t in reversed(range(seq)) if reverse else range(seq):
                tag = f"d{d}t{t}"
                xt = e.slice(xg, 0, t * batch, (t + 1) * batch, (batch, gates * hidden), f"{tag}_x")
                if node.op_type == "LSTM":
                    h, c = _lstm_step(e, xt, h, c, r[d], hidden, tag)
                else:
                    h = _gru_step(e, xt, h, r[d], rec_bias, hidden, lbr, tag)
                steps[t] = str(h)
            ys.append(e.node("Concat", steps, (seq * batch, hidden), f"y{d}", axis=0))
            hs.append(str(h))
            cs.append(str(c))
        outs = list(node.output) + [""] * 3
        n = len(dirs)
        if outs[0] and n == 1:
            e.reshape(ys[0], (seq, 1, batch, hidden), "y", out=outs[0])
        elif outs[0]:
            per_dir = [e.reshape(y, (seq, 1, batch, hidden), f"y{d}_4d") for d, y in enumerate(ys)]
            e.node("Concat", per_dir, (seq, n, batch, hidden), "y", out=outs[0], axis=1)
        for k, states in ((1, hs), (2, cs)):
            if outs[k]:
                joined = states[0] if n == 1 else e.node("Concat", states, (n * batch, hidden), f"s{k}", axis=0)
                e.reshape(joined, (n, batch, hidden), f"s{k}_3d", out=outs[k])
        out += e.nodes
        g.float_islands.update(n.name for n in e.nodes)
        done.append(f"{label} ({node.op_type})")
    g.nodes = out
    return done
