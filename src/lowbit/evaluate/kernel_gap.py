"""Where does ONNX Runtime's integer-kernel run depart from the float simulation of the same QDQ model?

Both runs expose the output of every QuantizeLinear (the integers each layer hands on) and the model's outputs.
A QuantizeLinear's output survives ONNX Runtime's QDQ fusion (a fused QLinearConv produces exactly that tensor),
so exposing it does not change which kernels run; a DequantizeLinear's output would (fusion skips a tensor that is
a graph output), which is why only the integers are compared. Each compared tensor belongs to a *region*: the ops
between the DequantizeLinears that feed it and the QuantizeLinear that makes it. A region whose output departs
from the simulation while every integer it reads agrees is where a kernel computes something different.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..runtimes.ort import join, output_batch_axes, session
from .metrics import cosine

GAP_COSINE = 0.999  # below this kernels-vs-simulation cosine, the quantize summary names where they part
# A region whose own drop (inputs' cosine - its output's) is less than this share of the gap at its output did not
# part alone: the gap built up before it (MobileNetV3-Small: 0.9991 -> 0.9989, one or two steps apart per region all
# the way down). Naming it as "the kernel that differs" would send a user after an op that computes nothing wrong.
DRIFT_SHARE = 0.5
_Q = "QuantizeLinear"
_DQ = "DequantizeLinear"
# Ops that only select or move values compute nothing a kernel could round differently; a slice of a tensor can
# still agree less than the whole tensor did, so they are never blamed.
_MOVES = {"Gather", "Slice", "Split", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Flatten", "Identity"}


@dataclass(frozen=True)
class Region:
    tensor: str  # the compared tensor: a QuantizeLinear's output or a model output
    node: str  # the op that makes the float value the QuantizeLinear rounds (the region's last op)
    op_type: str
    ops: tuple[str, ...]  # op types in the region, in graph order
    inputs: tuple[str, ...]  # compared tensors the region reads (upstream QuantizeLinear outputs)


def regions(model: onnx.ModelProto) -> list[Region]:
    """One region per QuantizeLinear output and per model output, in topological (graph) order."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    order = {id(n): i for i, n in enumerate(g.node)}
    out_names = [o.name for o in g.output]
    # The middle of a requantization chain is not compared: exposing it would stop the fold that may be the gap.
    # ONNX Runtime folds the chain only while no tensor in it is a graph output, so its first integers stay hidden too.
    chains = [n for n in g.node if n.op_type == _Q and producer.get(n.input[0], n).op_type == _DQ]
    requant = {n.output[0] for n in chains} | {producer[n.input[0]].input[0] for n in chains}
    found: list[Region] = []
    for n in g.node:
        if n.op_type == _Q and n.output[0] in requant:
            continue
        if n.op_type == _Q and n.input[0] in producer:
            found.append(_region(n.output[0], producer[n.input[0]], producer, order, requant))
        elif n.op_type == _Q:  # quantizes a graph input: compared, reads nothing compared
            found.append(Region(n.output[0], n.name or n.output[0], _Q, (_Q,), ()))
    for name in out_names:
        p = producer.get(name)
        if p is not None and p.op_type != _Q:
            found.append(_region(name, p, producer, order, requant))
    return found


def _region(tensor: str, last: onnx.NodeProto, producer: dict, order: dict, requant: set[str]) -> Region:
    """Walk back from `last` through float ops (and requantization chains) to the DequantizeLinears, or graph
    inputs, that feed it."""
    ops: dict[int, onnx.NodeProto] = {}
    inputs: list[str] = []
    stack = [last]
    while stack:
        n = stack.pop()
        if id(n) in ops:
            continue
        ops[id(n)] = n
        for name in n.input:
            p = producer.get(name)
            if p is None:
                continue  # a graph input or an initializer: the same in both runs
            if p.op_type == _DQ and p.input[0] in requant:
                stack += [p, producer[p.input[0]]]
            elif p.op_type == _DQ:
                src = producer.get(p.input[0])
                if src is not None and src.op_type == _Q and src.output[0] not in inputs:
                    inputs.append(src.output[0])
            elif p.op_type == _Q and p.output[0] in requant:
                stack.append(p)
            elif p.op_type == _Q:
                if p.output[0] not in inputs:
                    inputs.append(p.output[0])
            else:
                stack.append(p)
    chain = sorted(ops.values(), key=lambda n: order[id(n)])
    return Region(tensor, last.name or last.output[0], last.op_type, tuple(n.op_type for n in chain), tuple(inputs))


def _exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy that also outputs `names` (QuantizeLinear outputs typed by their zero point, uint8 without one)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t.data_type for t in out.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t.data_type for n in out.graph.node if n.op_type == "Constant"}
    qtype = {}
    for n in out.graph.node:
        if n.op_type == _Q:
            zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
            qtype[n.output[0]] = inits.get(zp, consts.get(zp, onnx.TensorProto.UINT8)) if zp else onnx.TensorProto.UINT8
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(
                onnx.helper.make_tensor_value_info(name, qtype.get(name, onnx.TensorProto.FLOAT), None)
            )
    return out


def _zero_points(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values.update(
        {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    )
    zps = {}
    for n in model.graph.node:
        if n.op_type == _Q and len(n.input) > 2 and n.input[2] in values:
            zps[n.output[0]] = values[n.input[2]].astype(np.float64)
    return zps


def requantizations(model: onnx.ModelProto) -> list[str]:
    """QuantizeLinears that read a DequantizeLinear directly (a change of scale with no op between). ONNX Runtime's
    DoubleQDQPairsRemover folds such a Q->DQ->Q->DQ chain into one pair under graph optimizations, so kernels
    then skip a rounding the simulation does; exposing the middle tensor stops the fold, which hides it here."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return [
        n.name or n.output[0]
        for n in model.graph.node
        if n.op_type == _Q and n.input[0] in producer and producer[n.input[0]].op_type == _DQ
    ]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b / (na * nb))


class _Agreement:
    """Running agreement of one compared tensor over batches, so no batch is held after it is compared.

    Integer tensors (QuantizeLinear outputs) keep exact sums of k*s, k*k, s*s, k and s (Python ints), from which
    the sums with the zero point z subtracted follow exactly: sum (k-z)(s-z) = sum ks - z sum k - z sum s + n z**2.
    The cosine is then the one of the whole concatenation in float64 bit for bit while those sums stay below 2**53
    (8-bit values: fewer than 2**37 of them). numpy's einsum casts in small buffers (no widened copy of a tensor:
    each large temporary is page-faulted afresh) and does not call BLAS, whose spinning threads a float64 dot woke
    for every tensor (~10x the CPU of einsum in a micro-benchmark on a busy 2-core machine). Other tensors (model
    outputs made by float ops, small) are kept and compared whole."""

    def __init__(self, zp: np.ndarray | None) -> None:
        self.zp = int(zp.item()) if zp is not None and zp.size == 1 else 0
        self.steps = zp is not None  # a steps-apart figure only where the zero point is known
        self.sums = [0, 0, 0, 0, 0, 0]  # k.s, k.k, s.s, sum k, sum s, count
        self.diff = -1
        self.floats: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])

    def add(self, k: np.ndarray, s: np.ndarray) -> None:
        k, s = k.ravel(), s.ravel()
        if k.dtype.kind not in "iu" or s.dtype.kind not in "iu":
            self.floats[0].append(k)
            self.floats[1].append(s)
            return
        if k.dtype == s.dtype and np.array_equal(k, s):  # often (a third of MobileNetV3-Small's values): one sum
            kk, sk = int(np.einsum("i,i->", k, k, dtype=np.int64)), int(k.sum(dtype=np.int64))
            part, diff = (kk, kk, kk, sk, sk, k.size), 0
        else:
            ks, kk, ss = (int(np.einsum("i,i->", x, y, dtype=np.int64)) for x, y in ((k, s), (k, k), (s, s)))
            part = (ks, kk, ss, int(k.sum(dtype=np.int64)), int(s.sum(dtype=np.int64)), k.size)
            d = np.subtract(k, s, dtype=np.int32 if k.dtype.itemsize > 1 else np.int16)
            diff = max(int(d.max()), -int(d.min())) if d.size else -1
        self.sums = [t + p for t, p in zip(self.sums, part)]
        if self.steps and k.size:
            self.diff = max(self.diff, diff)

    def cosine(self) -> float:
        if self.floats[0]:
            k = np.concatenate(self.floats[0]).astype(np.float64)
            s = np.concatenate(self.floats[1]).astype(np.float64)
            if self.zp:
                k, s = k - self.zp, s - self.zp
            if self.steps and k.size:
                self.diff = int(np.max(np.abs(k - s)))
            return _cosine(k, s)
        ks, kk, ss, k1, s1, n = self.sums
        z, nzz = self.zp, n * self.zp * self.zp  # cosine of the real values (the scale cancels)
        ab, aa, bb = float(ks - z * (k1 + s1) + nzz), float(kk - 2 * z * k1 + nzz), float(ss - 2 * z * s1 + nzz)
        na, nb = float(np.sqrt(aa)), float(np.sqrt(bb))  # what np.linalg.norm computes: sqrt(x.x)
        if na == 0.0 and nb == 0.0:
            return 1.0
        if na == 0.0 or nb == 0.0:
            return 0.0
        return float(np.float64(ab) / (na * nb))


def locate(
    quant_model: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    threshold: float = GAP_COSINE,
    top: int = 3,
    kernels: np.ndarray | None = None,
) -> dict:
    """Compare every region's output under kernels and simulation; name where they part.

    Returns JSON-ready data: `first` (the first region, in graph order, whose output cosine falls below
    `threshold` while all its inputs stay at or above it; None if there is none), `worst` (the `top` regions that
    lower the cosine most relative to their inputs) and `output_cosine` (the lowest over the model's outputs of
    the mean per-sample cosine, as the check measures it: one concatenation would let large samples hide small
    ones' drift: MobileNetV3-Small's logits on 256 held-out crops read 0.9997 that way and 0.9990 per sample).
    `kernels`: the model's first output over these batches from its own kernel session (samples first, as
    `run_all` gives it), if the caller has it: it is what the exposed kernels must reproduce (not run again).
    """
    return compare(quant_model, batches, threshold, top, kernels)[0]


def compare(
    quant_model: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    threshold: float = GAP_COSINE,
    top: int = 3,
    kernels: np.ndarray | None = None,
) -> tuple[dict, list[np.ndarray]]:
    """`locate`'s report, and the simulation's model outputs over all batches (samples first, as `run_all` gives
    them). Those are the plain simulation's values: exposing tensors changes no op of a run without graph
    optimizations, so the check (check.py) takes them instead of simulating again.
    Batches are compared as they come (`_Agreement`): memory stays at one batch of every exposed tensor.
    """
    found = regions(quant_model)
    names = [r.tensor for r in found]
    exposed = _exposed(quant_model, names)
    # Worker threads that sleep between ops and runs: the same values, far less CPU on a small or shared machine.
    kern_sess, sim_sess = session(exposed, "kernels", spin=False), session(exposed, "simulate", spin=False)
    # Exposing the integers must not change what runs; where it does, a graph transform (not a kernel) is the gap.
    plain_sess = session(quant_model, "kernels", spin=False) if kernels is None else None
    order = [o.name for o in kern_sess.get_outputs()]
    feeds = {i.name for i in kern_sess.get_inputs()}
    zps = _zero_points(quant_model)
    outputs = [o.name for o in quant_model.graph.output]
    agree = {n: _Agreement(zps.get(n)) for n in names}
    kouts: list[list[np.ndarray]] = [[] for _ in outputs]  # the kernels' model outputs, for `output_cosine`
    sims: list[list[np.ndarray]] = [[] for _ in outputs]
    seen: list[np.ndarray] = []  # the exposed kernels' first output, to hold against `kernels`
    exposure_changed = False
    counted = 0  # samples, as `run_all` counts them: what settles outputs that have no batch axis (see `join`)
    for batch in batches:
        counted += len(next(iter(batch.values())))
        b = {k: v for k, v in batch.items() if k in feeds}
        kern = dict(zip(order, kern_sess.run(None, b)))
        sim = dict(zip(order, sim_sess.run(None, b)))
        if plain_sess is not None:
            plain = plain_sess.run(order[:1], b)[0]
            exposure_changed = exposure_changed or not np.array_equal(plain.ravel(), kern[order[0]].ravel())
        else:
            seen.append(kern[order[0]])
        for name in names:
            agree[name].add(np.asarray(kern[name]), np.asarray(sim[name]))
        for acc, name in zip(kouts, outputs):
            acc.append(kern[name])
        for acc, name in zip(sims, outputs):
            acc.append(sim[name])
    axes = output_batch_axes(sim_sess)
    if kernels is not None:
        exposure_changed = not np.array_equal(kernels, join(seen, axes.get(order[0], 0), counted)) if seen else False
    cos = {name: agree[name].cosine() for name in names}
    rows: list[dict[str, Any]] = []
    for r in found:
        before = min((cos[i] for i in r.inputs), default=1.0)
        diff = agree[r.tensor].diff
        rows.append(
            {
                "tensor": r.tensor,
                "node": r.node,
                "op_type": r.op_type,
                "ops": list(r.ops),
                "cosine": cos[r.tensor],
                "inputs_cosine": before,
                "max_diff_steps": diff if diff >= 0 else None,
            }
        )
    blamable = [x for x in rows if not set(x["ops"]) <= _MOVES | {_DQ}]
    first = next((x for x in blamable if x["cosine"] < threshold <= x["inputs_cosine"]), None)
    worst = sorted(blamable, key=lambda x: x["cosine"] - x["inputs_cosine"])[:top]
    # Each output's simulation joined once: for `output_cosine` here, and returned for the check.
    joined = [(join(s, axes.get(n, 0), counted), k, n) for s, k, n in zip(sims, kouts, outputs) if s]
    report = {
        "threshold": threshold,
        "output_cosine": min((cosine(s, join(k, axes.get(n, 0), counted)) for s, k, n in joined), default=1.0),
        "first": first,
        "worst": [x for x in worst if x["cosine"] < x["inputs_cosine"]],
        "exposure_changed_kernels": exposure_changed,
        "requantizations": requantizations(quant_model) if exposure_changed else [],
    }
    return report, [s for s, _, _ in joined]


def gap_text(gap: dict) -> str:
    """One line naming where kernels and simulation part (for the quantize summary and diagnose)."""
    first = gap.get("first")
    if first is None and gap.get("exposure_changed_kernels"):
        req = gap.get("requantizations") or []
        where = f"; requantizations (DequantizeLinear -> QuantizeLinear) ONNX Runtime folds: {', '.join(req[:3])}"
        return (
            "kernels vs simulation: the gap comes from a graph transform, not one kernel (exposing the integers "
            f"changes the kernels' output){where if req else ''}"
        )
    if first is None:
        w = gap.get("worst") or []
        if not w or gap["output_cosine"] >= gap["threshold"]:
            return f"kernels vs simulation: no region departs (output cosine {gap['output_cosine']:.4f})"
        x = w[0]
        return (
            f"kernels vs simulation: no single region crosses cosine {gap['threshold']}; the largest drop is "
            f"{x['op_type']} '{x['node']}' (inputs {x['inputs_cosine']:.4f} -> output {x['cosine']:.4f})"
        )
    if first["inputs_cosine"] - first["cosine"] < DRIFT_SHARE * (1.0 - first["cosine"]):
        return (
            "kernels vs simulation drift apart over many ops, not at one: integer kernels round some values a step "
            "away from the float simulation and the differences compound through the layers; they cross cosine "
            f"{gap['threshold']} at {first['op_type']} '{first['node']}' (inputs {first['inputs_cosine']:.5f} -> "
            f"output {first['cosine']:.5f}); judge the model by its task metric against float"
        )
    return (
        f"kernels vs simulation part at {first['op_type']} '{first['node']}' (region {'/'.join(first['ops'])}): "
        f"its inputs agree (cosine {first['inputs_cosine']:.4f}), its output does not ({first['cosine']:.4f}, "
        f"up to {first['max_diff_steps']} steps apart)"
    )
