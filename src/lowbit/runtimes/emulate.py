"""Run a QDQ model as an x86 CPU with AVX2 but without VNNI would: float simulation everywhere, except that
Conv / Gemm / MatMul between a uint8 activation and int8 constant weights go through the u8 x s8 integer
kernel, whose `vpmaddubsw` clips each neighbouring pair of products along the reduction axis to int16.

This machine may well have VNNI (int32 accumulation, never clips), so ONNX Runtime alone cannot show what
those CPUs compute. Everything except the integer ops runs per node on `onnx.reference`, which is what ORT
with graph optimizations off computes (the float simulation).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ..graph.io import load_proto

INT16_MIN, INT16_MAX = -32768, 32767
_CHUNK = 1 << 22  # elements per temporary int32 block: keeps memory modest on large images


@dataclass
class _IntOp:
    """A Conv/Gemm/MatMul the fused integer kernel would run, with its int8 weight in kernel order."""

    act_q: str  # uint8 tensor feeding the activation DequantizeLinear
    act_scale: str
    act_zp: str | None
    w: np.ndarray  # (M, K) int8 rows; for Conv (M, kh*kw*Cg) in (kh, kw, c) order, c fastest
    w_scale: np.ndarray  # (M,)
    w_zp: np.ndarray  # (M,)
    out_dtype: np.dtype
    kind: str
    attrs: dict


@dataclass
class _Stats:
    pairs_total: int = 0
    pairs_saturated: int = 0
    outputs_affected: int = 0


def run_emulated(
    model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray], saturate: bool = True
) -> list[np.ndarray]:
    """The graph outputs, in order, as a non-VNNI AVX2 CPU computes them (saturate=False: as VNNI / int32 does)."""
    return _Emulator(model).run(feeds, saturate)


def saturation_report(
    model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray] | Iterable[dict[str, np.ndarray]]
) -> dict[str, dict[str, int]]:
    """Per integer op (by node name): pair sums computed, pair sums that clipped to int16, and output elements
    that differ from exact int32 accumulation. Depthwise convs accumulate in int32 and report zero pairs.
    `feeds` is one feed dict or an iterable of them (counts add up)."""
    emu = _Emulator(model)
    stats = {name: _Stats() for name in emu.int_ops}
    for feed in [feeds] if isinstance(feeds, dict) else feeds:
        emu.run(feed, True, stats)
    return {k: dict(vars(v)) for k, v in stats.items()}


class _Emulator:
    def __init__(self, model: onnx.ModelProto | str | Path) -> None:
        self.model = model if isinstance(model, onnx.ModelProto) else load_proto(model)
        g = self.model.graph
        self.opsets = list(self.model.opset_import)
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:  # Constant nodes are weights too (some exporters store them that way)
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                outs = ReferenceEvaluator(n).run(None, {})
                assert isinstance(outs, list)  # a dict only with intermediate=True
                self.consts[n.output[0]] = outs[0]
        self.producer = {o: n for n in g.node for o in n.output}
        # Unnamed nodes get report names without touching the caller's model.
        self.names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(g.node)]
        self.int_ops: dict[str, _IntOp] = {}
        for name, n in zip(self.names, g.node):
            op = self._plan(n)
            if op is not None:
                self.int_ops[name] = op
        self._evaluators: dict[int, ReferenceEvaluator] = {}

    # --- which ops run on the integer kernel ---

    def _dq(self, tensor: str) -> onnx.NodeProto | None:
        p = self.producer.get(tensor)
        return p if p is not None and p.op_type == "DequantizeLinear" and p.domain in ("", "ai.onnx") else None

    def _plan(self, n: onnx.NodeProto) -> _IntOp | None:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            return None
        a_dq, w_dq = self._dq(n.input[0]), self._dq(n.input[1])
        if a_dq is None or w_dq is None or a_dq.input[0] in self.consts:
            return None
        if a_dq.input[1] not in self.consts or self.consts[a_dq.input[1]].size != 1:
            return None  # ORT's integer kernels need a per-tensor activation scale
        if len(a_dq.input) > 2 and a_dq.input[2] and self.consts.get(a_dq.input[2], np.zeros(2)).size != 1:
            return None
        w_names = list(w_dq.input) + [""] * (3 - len(w_dq.input))
        if w_names[0] not in self.consts or self.consts[w_names[0]].dtype != np.int8:
            return None
        if w_names[1] not in self.consts or (w_names[2] and w_names[2] not in self.consts):
            return None
        q, scale = self.consts[w_names[0]], self.consts[w_names[1]]
        zp = self.consts[w_names[2]] if w_names[2] else np.zeros((), np.int8)
        axis = _attrs(w_dq).get("axis", 1) % q.ndim if scale.size > 1 else None
        a = _attrs(n)
        if n.op_type == "Conv":
            if q.ndim != 4 or axis not in (None, 0):
                return None
            rows = np.moveaxis(q, 1, -1).reshape(q.shape[0], -1)
            a.setdefault("kernel_shape", list(q.shape[2:]))
            out_axis = 0
        elif n.op_type == "Gemm":
            if q.ndim != 2 or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                return None
            out_axis = 0 if a.get("transB", 0) else 1
            rows = q if out_axis == 0 else q.T
        else:
            if q.ndim != 2:
                return None
            rows, out_axis = q.T, 1
        if axis not in (None, out_axis):
            return None  # per-channel along the reduction axis: no integer kernel takes that
        m = rows.shape[0]
        return _IntOp(
            a_dq.input[0],
            a_dq.input[1],
            a_dq.input[2] if len(a_dq.input) > 2 and a_dq.input[2] else None,
            np.ascontiguousarray(rows),
            np.broadcast_to(scale.astype(np.float64).reshape(-1), (m,)).copy(),
            np.broadcast_to(zp.astype(np.int64).reshape(-1), (m,)).copy(),
            np.dtype(scale.dtype),
            n.op_type,
            a,
        )

    # --- execution ---

    def run(
        self, feeds: dict[str, np.ndarray], saturate: bool, stats: dict[str, _Stats] | None = None
    ) -> list[np.ndarray]:
        g = self.model.graph
        outputs = [o.name for o in g.output]
        missing = [i.name for i in g.input if i.name not in feeds and i.name not in self.consts]
        if missing:
            raise ValueError(f"no feed for graph input {missing[0]!r}")
        values: dict[str, np.ndarray] = dict(self.consts)
        values.update(feeds)
        last_use = {t: i for i, n in enumerate(g.node) for t in n.input}
        for i in range(len(g.node)):
            if self.names[i] in self.int_ops:
                q = self.int_ops[self.names[i]].act_q
                last_use[q] = max(last_use[q], i)
        for i, n in enumerate(g.node):
            if n.op_type == "Constant" and n.output[0] in self.consts:
                continue
            op = self.int_ops.get(self.names[i])
            if op is not None and values[op.act_q].dtype == np.uint8:
                st = stats.setdefault(self.names[i], _Stats()) if stats is not None else None
                values[n.output[0]] = self._integer(n, op, values, saturate, st)
            elif n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx"):
                values[n.output[0]] = _qdq(n, [values[t] if t else None for t in n.input])
            else:
                ins = {t: values[t] for t in n.input if t}
                for name, v in zip(n.output, self._evaluator(i, n).run(None, ins, attributes={})):
                    values[name] = v
            # Freeing dead activations keeps a whole-image pass of a large model within modest memory.
            for t in list(n.input) + ([op.act_q] if op is not None else []):
                if last_use.get(t) == i and t not in self.consts and t not in outputs:
                    values.pop(t, None)
        return [values[o] for o in outputs]

    def _evaluator(self, i: int, n: onnx.NodeProto) -> ReferenceEvaluator:
        if i not in self._evaluators:
            # A one-node function keeps the model's opset versions (a bare NodeProto would use the newest).
            ins = list(dict.fromkeys(t for t in n.input if t))
            fn = helper.make_function("lowbit.emulate", f"node{i}", ins, list(n.output), [n], self.opsets)
            self._evaluators[i] = ReferenceEvaluator(fn)
        return self._evaluators[i]

    def _integer(
        self, n: onnx.NodeProto, op: _IntOp, values: dict[str, np.ndarray], saturate: bool, st: _Stats | None
    ) -> np.ndarray:
        x = values[op.act_q]
        za = int(values[op.act_zp].reshape(-1)[0]) if op.act_zp else 0
        s_a = float(np.asarray(values[op.act_scale], np.float64).reshape(-1)[0])
        if op.kind == "Conv":
            acc = _conv(x, za, op, saturate, st)  # (N, M, OH, OW)
            scale = (s_a * op.w_scale)[None, :, None, None]
        else:
            flat = x.reshape(-1, x.shape[-1])
            acc = np.empty((flat.shape[0], op.w.shape[0]), np.float64)
            step = max(1, _CHUNK // max(flat.shape[1], op.w.shape[0]))
            for r in range(0, flat.shape[0], step):
                acc[r : r + step] = _u8s8(flat[r : r + step], za, op.w, op.w_zp, saturate, st)
            acc = acc.reshape(*x.shape[:-1], op.w.shape[0])
            scale = s_a * op.w_scale
        y = acc * scale
        if len(n.input) > 2 and n.input[2]:
            b = np.asarray(values[n.input[2]], np.float64)
            y = y + (b.reshape(1, -1, 1, 1) if op.kind == "Conv" else b)
        return y.astype(op.out_dtype)


def _qdq(n: onnx.NodeProto, ins: list[np.ndarray | None]) -> np.ndarray:
    """QuantizeLinear / DequantizeLinear as ORT computes them in float32 (onnx.reference has no opset < 19
    versions of these, and lowbit writes opset 17 models)."""
    x, scale = ins[0], np.asarray(ins[1])
    assert x is not None  # input 0 is required
    zp = ins[2] if len(ins) > 2 else None
    a = _attrs(n)
    if a.get("block_size"):
        raise NotImplementedError(f"{n.op_type} {n.name!r}: blocked quantization")
    shape = [1] * x.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[a.get("axis", 1) % x.ndim] = scale.size
    s = scale.reshape(shape) if scale.size > 1 else scale.reshape(())
    z = np.zeros((), np.uint8) if zp is None else np.asarray(zp)
    z = z.reshape(shape) if z.size > 1 else z.reshape(())
    if n.op_type == "DequantizeLinear":
        return ((x.astype(np.float32) - z.astype(np.float32)) * s).astype(s.dtype)
    dtype = (
        z.dtype if zp is not None or not a.get("output_dtype") else helper.tensor_dtype_to_np_dtype(a["output_dtype"])
    )
    if not np.issubdtype(dtype, np.integer):
        raise NotImplementedError(f"QuantizeLinear {n.name!r} to {dtype}")
    info = np.iinfo(dtype)
    q = np.rint(x.astype(np.float32) / s.astype(np.float32)) + z.astype(np.float32)
    return np.clip(q, info.min, info.max).astype(dtype)


def _attrs(n: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _u8s8(a: np.ndarray, za: int, w: np.ndarray, zw: np.ndarray, saturate: bool, st: _Stats | None) -> np.ndarray:
    """(N, K) uint8 x (M, K) int8 -> (N, M) accumulators sum_k (a - za)(w - zw), as float64 holding exact
    integers (float64 BLAS is exact below 2**53 and far faster than integer matmul in numpy).

    The kernel clips the raw pair sums a[2j]w[2j] + a[2j+1]w[2j+1] before the zero-point corrections, so the
    clipping shows up as an additive correction, computed only for the (channel, pair) combinations whose
    largest reachable |pair sum| given this block's per-position activation maxima exceeds int16."""
    acc = (a.astype(np.float64) - za) @ (w.astype(np.float64) - zw[:, None]).T
    n, k = a.shape
    m = w.shape[0]
    if st is not None:
        st.pairs_total += n * m * ((k + 1) // 2)
    if not saturate or n == 0 or k < 2:
        return acc
    j_all = k // 2  # an odd K's last product has no partner and 255 * 128 fits int16
    bound = a[:, : 2 * j_all].max(axis=0).astype(np.int64)
    w64 = w[:, : 2 * j_all].astype(np.int64)
    hi = bound * np.maximum(w64, 0)
    lo = bound * np.minimum(w64, 0)
    can = (hi[:, 0::2] + hi[:, 1::2] > INT16_MAX) | (lo[:, 0::2] + lo[:, 1::2] < INT16_MIN)
    mi, ji = np.nonzero(can)  # sorted by channel, which the segment sums below rely on
    if not len(mi):
        return acc
    corr = np.zeros((n, m), np.int64)
    saturated = 0
    step = max(1, _CHUNK // n)
    a32 = a.astype(np.int32)
    for c in range(0, len(mi), step):
        cm, cj = mi[c : c + step], ji[c : c + step]
        p = a32[:, 2 * cj] * w[cm, 2 * cj].astype(np.int32) + a32[:, 2 * cj + 1] * w[cm, 2 * cj + 1].astype(np.int32)
        d = np.clip(p, INT16_MIN, INT16_MAX) - p
        saturated += int(np.count_nonzero(d))
        starts = np.flatnonzero(np.r_[True, cm[1:] != cm[:-1]])
        corr[:, cm[starts]] += np.add.reduceat(d, starts, axis=1)
    if st is not None:
        st.pairs_saturated += saturated
        st.outputs_affected += int(np.count_nonzero(corr))
    return acc + corr


def _conv_geometry(x_shape: tuple[int, ...], w_shape: tuple[int, int, int], attrs: dict) -> tuple:
    h, wd = x_shape[2:]
    kh, kw = w_shape[1:]
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in ((h, kh, sh, dh), (wd, kw, sw, dw)):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            pads.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        (t, b), (left, r) = pads
    elif auto == "VALID":
        t = left = b = r = 0
    else:
        t, left, b, r = attrs.get("pads", [0, 0, 0, 0])
    oh = (h + t + b - (kh - 1) * dh - 1) // sh + 1
    ow = (wd + left + r - (kw - 1) * dw - 1) // sw + 1
    return (t, left, b, r), (sh, sw), (dh, dw), (oh, ow)


def _conv(x: np.ndarray, za: int, op: _IntOp, saturate: bool, st: _Stats | None) -> np.ndarray:
    if x.ndim != 4:
        raise NotImplementedError("the integer Conv emulation handles 2-D convolutions only")
    n, c = x.shape[:2]
    group = int(op.attrs.get("group", 1))
    m, cg = op.w.shape[0], c // group
    kh, kw = op.attrs["kernel_shape"]
    (t, left, b, r), (sh, sw), (dh, dw), (oh, ow) = _conv_geometry(x.shape, (m, kh, kw), op.attrs)
    # The integer kernels pad with the zero point: a real zero, which is a large uint8 when za is large.
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)), constant_values=np.uint8(za))
    out = np.empty((n, m, oh, ow), np.float64)
    taps = [(i, j) for i in range(kh) for j in range(kw)]

    def tap(img: np.ndarray, i: int, j: int) -> np.ndarray:
        return img[:, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw]

    if cg == 1 and m == group and group > 1:
        # Depthwise: ORT's depthwise kernel accumulates in int32, no pairs, so nothing can clip.
        wf = (op.w.astype(np.float64) - op.w_zp[:, None]).reshape(m, kh, kw)
        for img in range(n):
            xs = xp[img].astype(np.float64) - za
            acc = np.zeros((m, oh, ow))
            for i, j in taps:
                acc += wf[:, i, j][:, None, None] * tap(xs, i, j)
            out[img] = acc
        return out
    mg = m // group
    for img in range(n):
        for g in range(group):
            xg = xp[img, g * cg : (g + 1) * cg]
            cols = np.empty((oh, ow, kh, kw, cg), np.uint8)
            for i, j in taps:
                cols[:, :, i, j, :] = tap(xg, i, j).transpose(1, 2, 0)
            cols = cols.reshape(oh * ow, kh * kw * cg)
            sl = slice(g * mg, (g + 1) * mg)
            res = np.empty((oh * ow, mg))
            step = max(1, _CHUNK // max(cols.shape[1], mg))
            for r0 in range(0, oh * ow, step):
                res[r0 : r0 + step] = _u8s8(cols[r0 : r0 + step], za, op.w[sl], op.w_zp[sl], saturate, st)
            out[img, sl] = res.T.reshape(mg, oh, ow)
    return out


__all__ = ["run_emulated", "saturation_report"]
