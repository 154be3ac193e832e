"""How LiteRT (XNNPACK) and ONNX Runtime requantize an int8/uint8 ADD: the two integer rules, emulated exactly.

The exported .tflite and lowbit's QDQ model compute the same ADD, y = zc + (sa (a - za) + sb (b - zb)) / sc, but
round it differently (measured on EfficientNet-Lite0, docs/tflite.md): ONNX Runtime's QLinearAdd (MLAS) scales in
float32 and rounds half to even; XNNPACK's quantized add turns the two scale ratios into integers with 21
significant bits and shifts right with rounding half up. The results differ by one step where the exact value
sits within about 1e-4 of a half step. Conv, depthwise conv and fully-connected in XNNPACK scale the int32
accumulator in float32 and round half to even, as ONNX Runtime does, so they agree exactly.
`snap_add_scales` nudges a QDQ model's Add scales so that the two ADD rules agree as well.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import onnx

from ..graph.index import GraphIndex

Params = tuple[float, int]  # (scale, zero point) of one tensor


def ort_add(a: np.ndarray, b: np.ndarray, pa: Params, pb: Params, pc: Params, lo: int, hi: int) -> np.ndarray:
    """ONNX Runtime's QLinearAdd (MLAS): float32 ratios, y = ra*a + (rb*b + k), rounded half to even, clamped.
    ORT's vector kernels order the float operations differently, so a few values within ~1e-5 of a half step
    come out one step apart from this emulation."""
    (sa, za), (sb, zb), (sc, zc) = pa, pb, pc
    ra, rb = np.float32(np.float32(sa) / np.float32(sc)), np.float32(np.float32(sb) / np.float32(sc))
    k = np.float32(np.float32(zc) - ra * np.float32(za) - rb * np.float32(zb))
    y = np.rint(ra * a.astype(np.float32) + (rb * b.astype(np.float32) + k))
    return np.clip(y, lo, hi).astype(np.int64)


def xnnpack_add(a: np.ndarray, b: np.ndarray, pa: Params, pb: Params, pc: Params, lo: int, hi: int) -> np.ndarray:
    """XNNPACK's quantized add: the larger ratio scaled into [2**20, 2**21) sets the shift, both ratios rounded to
    integers at that shift, then (acc + 2**(shift-1)) >> shift (an arithmetic shift: ties round up)."""
    (sa, za), (sb, zb), (sc, zc) = pa, pb, pc
    ra, rb = np.float32(np.float32(sa) / np.float32(sc)), np.float32(np.float32(sb) / np.float32(sc))
    shift = 21 - int(np.frexp(max(ra, rb))[1])  # 20 minus the larger ratio's binary exponent
    am, bm = int(np.rint(np.ldexp(ra, shift))), int(np.rint(np.ldexp(rb, shift)))
    acc = (1 << (shift - 1)) - am * za - bm * zb + a.astype(np.int64) * am + b.astype(np.int64) * bm
    return np.clip((acc >> shift) + zc, lo, hi).astype(np.int64)


def exact_add(a: np.ndarray, b: np.ndarray, pa: Params, pb: Params, pc: Params) -> np.ndarray:
    """The real-valued result before rounding (float64), to see how close to a half step a disagreement is."""
    (sa, za), (sb, zb), (sc, zc) = pa, pb, pc
    return (float(sa) * (a - za) + float(sb) * (b - zb)) / float(sc) + zc


def _shift(ra: np.float32, rb: np.float32) -> int:
    return 21 - int(np.frexp(max(ra, rb))[1])


def _exact(num: np.float32, den: np.float32, shift: int) -> bool:
    """float32(num / den) is an integer multiple of 2**-shift: both runtimes then use the same ratio."""
    m = float(np.float32(num / den)) * 2.0**shift
    return m == round(m)


def _candidates(start: np.float32, ok, count: int, window: int = 1 << 16):
    """Up to `count` float32 values nearest `start` (in ulps) for which ok(value) holds."""
    bits = int(np.array(start, np.float32).view(np.int32))
    found = 0
    for step in range(window):
        for b in (bits + step, bits - step) if step else (bits,):
            v = np.array(b, np.int32).view(np.float32)[()]
            if np.isfinite(v) and v > 0 and ok(v):
                yield v
                found += 1
                if found == count:
                    return


def _pick_scales(
    sa: np.float32, sb: np.float32, sc: np.float32, za: int, zb: int, zc: int, k: int, info: np.iinfo
) -> tuple[np.float32, np.float32] | None:
    """New (sa, sc) near the old ones for which the two ADD rules agree, or None. Operand k has scale sa and
    zero point za; the other keeps sb and zb; info bounds the integer type."""
    qa, qb = np.meshgrid(np.arange(info.min, info.max + 1), np.arange(info.min, info.max + 1))
    shift = _shift(np.float32(sa / sc), np.float32(sb / sc))

    def agree(sa2: np.float32, sc2: np.float32) -> bool:
        """Exact ratios, same shift, and the two rules give the same integer for every input pair."""
        if _shift(np.float32(sa2 / sc2), np.float32(sb / sc2)) != shift:
            return False
        pair = [(float(sa2), za), (float(sb), zb)]
        first, second = pair if k == 0 else pair[::-1]
        args = (first, second, (float(sc2), zc), int(info.min), int(info.max))  # ONNX order
        return bool(np.array_equal(ort_add(qa, qb, *args), xnnpack_add(qa, qb, *args)))

    return next(
        (
            (sa2, sc2)
            for sc2 in _candidates(sc, partial(_exact, sb, shift=shift), 8)
            for sa2 in _candidates(sa, partial(_exact, den=sc2, shift=shift), 8)
            if agree(sa2, sc2)
        ),
        None,
    )


def snap_add_scales(model: onnx.ModelProto) -> list[str]:
    """Nudge the scales around each quantized Add (by about 1e-7 relative) so that both ratios sa/sc and sb/sc
    are exact with 21 significant bits and the two rules above give the same integer for every pair of int8
    inputs. XNNPACK's fixed-point ADD then computes what ONNX Runtime's float32 QLinearAdd does (up to
    ONNX Runtime's own float evaluation order, see `ort_add`); measured on EfficientNet-Lite0 in docs/tflite.md.
    Changes `model` in place; returns the Add nodes changed. The output scale and one operand scale move; the
    operand must be a tensor only this Add reads, made by something other than an Add."""
    from onnx import numpy_helper

    g = GraphIndex(model.graph)
    inits = g.inits
    scale_users: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1:
            scale_users[n.input[1]] = scale_users.get(n.input[1], 0) + 1

    def scale_of(dq_output: str) -> tuple[str, str] | None:
        """(tensor, scale initializer) of a DequantizeLinear's per-tensor scale."""
        dq = g.producer_node(dq_output)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
            return None
        if numpy_helper.to_array(inits[dq.input[1]]).size != 1:
            return None
        return dq.input[0], dq.input[1]

    def value(name: str) -> np.float32:
        return np.float32(numpy_helper.to_array(inits[name]).reshape(()))

    changed = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        # Both inputs must come from a DequantizeLinear with a one-value scale.
        ops = [t for t in (scale_of(i) for i in node.input) if t is not None]
        outs = g.reader_nodes(node.output[0])
        if len(ops) != 2 or len(outs) != 1 or outs[0].op_type != "QuantizeLinear" or outs[0].input[1] not in inits:
            continue
        c_scale = outs[0].input[1]

        def own(t: tuple[str, str]) -> bool:  # only this Add reads it, and no Add made it
            q = g.producer_node(t[0])
            made_by = g.producer_node(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            return (
                q is not None
                and q.op_type == "QuantizeLinear"
                and len(g.consumers.get(t[0], [])) == 1
                and (made_by is None or made_by.op_type != "Add")
                and scale_users.get(t[1], 0) == 2
            )

        movable = [k for k in (0, 1) if own(ops[k])]
        if not movable or scale_users.get(c_scale, 0) < 2:
            continue
        k = movable[0]
        a_name, b_name = ops[k][1], ops[1 - k][1]
        sa, sb, sc = value(a_name), value(b_name), value(c_scale)
        za, zb, zc = (
            int(numpy_helper.to_array(inits[n.input[2]])) if len(n.input) > 2 and n.input[2] in inits else 0
            for n in (g.nodes[g.producer[node.input[k]]], g.nodes[g.producer[node.input[1 - k]]], outs[0])
        )
        zdt = inits[outs[0].input[2]].data_type if len(outs[0].input) > 2 and outs[0].input[2] in inits else 2
        info = np.iinfo(onnx.helper.tensor_dtype_to_np_dtype(zdt))
        if info.bits > 8:  # 16-bit ADDs follow other rules in LiteRT, and 65536^2 pairs would not fit in memory
            continue
        ratios = (np.float32(sa / sc), np.float32(sb / sc))
        if not all(2.0**-10 <= r < 2.0**8 for r in ratios):
            continue  # XNNPACK's int8 ADD takes only scale ratios in [2^-10, 2^8): nothing to align with
        pick = _pick_scales(sa, sb, sc, za, zb, zc, k, info)
        if pick is None:
            continue
        sa2, sc2 = pick
        for name, v in ((a_name, sa2), (c_scale, sc2)):
            inits[name].CopyFrom(numpy_helper.from_array(np.array(v, np.float32), name))
        _carry(g, scale_users, outs[0].output[0], sc, sc2)
        changed.append(node.name or node.output[0])
    return changed


# ops that move an Add's integers on unchanged; the planner gives their outputs the Add's scale
MOVES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Split", "Expand"}


def _carry(g: GraphIndex, scale_users: dict[str, int], q_output: str, old: np.float32, new: np.float32) -> None:
    """The Add's new output scale, on down through data movement whose outputs had its old one. Left behind, the
    model requantizes there by (1 +- ~1e-6), which gives the same integers, so the .tflite keeps one scale (its
    kernels need it) while ONNX Runtime's next op reads the old one: MiniLM's value projection (Add -> Reshape ->
    Transpose -> the attention context's QLinearMatMul) then scaled its sums 1.5e-6 apart, 8 of 98,304 outputs
    (4 sentences) a step from LiteRT's."""
    from onnx import numpy_helper

    todo = [q_output]
    while todo:
        for dq in g.reader_nodes(todo.pop()):
            if dq.op_type != "DequantizeLinear":
                continue
            for move in g.reader_nodes(dq.output[0]):
                if move.op_type not in MOVES:
                    continue
                for y in move.output:
                    for q in g.reader_nodes(y):
                        name = q.input[1] if q.op_type == "QuantizeLinear" and len(q.input) > 1 else ""
                        if name not in g.inits or scale_users.get(name, 0) != 1 + len(g.reader_nodes(q.output[0])):
                            continue  # not a one-tensor scale of its own (its Q and DQs only)
                        if np.float32(numpy_helper.to_array(g.inits[name]).reshape(-1)[0]) != old:
                            continue
                        g.inits[name].CopyFrom(numpy_helper.from_array(np.array(new, np.float32), name))
                        todo.append(q.output[0])
