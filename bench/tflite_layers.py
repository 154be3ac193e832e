"""Where lowbit's int8 .tflite (LiteRT, XNNPACK) and its int8 ONNX model (ONNX Runtime kernels) part ways, per layer.

For every activation QuantizeLinear of the QDQ model it counts, over the eval crops:
  * cumulative: elements whose int8 value differs between the two full runs (differences carried from earlier);
  * local: elements where LiteRT's op output differs from ONNX Runtime running that same op (the QDQ sub-model
    extracted from the ONNX file, kernels on) on LiteRT's own int8 inputs -- the op's own rounding difference.
For ADD it also checks both against numpy emulations of the two rounding rules (see docs/tflite.md): MLAS
QLinearAdd (float32 scale ratios, round half to even) and XNNPACK's qs8 add (21-bit fixed-point multipliers,
round half up), and how far from a half step the exact value is where they differ.

LiteRT exposes intermediate tensors under XNNPACK only as model outputs, so the .tflite is exported from a copy
of the ONNX model whose outputs include every quantized activation (dequantized, then rounded back to int8).

Usage: PYTHONPATH=src .venv/bin/python bench/tflite_layers.py QDQ.onnx EVAL.npy [--n 256] [--threads 0]
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.export.tflite import export_tflite
from lowbit.runtimes.litert import LiteRTSession
from lowbit.runtimes.ort import session
from lowbit.targets.add_rounding import exact_add, ort_add, xnnpack_add


def _float_shapes(m: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, list[int]]:
    """Each named value's shape, from one ONNX Runtime run (batch axis left symbolic)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = sess.run(names, {m.graph.input[0].name: x})
    return {n: ["N", *np.shape(v)[1:]] for n, v in zip(names, values)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model"), ap.add_argument("eval")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    x = np.load(args.eval)[: args.n]
    m = onnx.load(args.model)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    producer = {o: nd for nd in m.graph.node for o in nd.output}
    qnodes = [nd for nd in m.graph.node if nd.op_type == "QuantizeLinear" and nd.input[0] not in inits]
    qby = {q.output[0]: q for q in qnodes}

    def params(q):
        return np.float32(inits[q.input[1]]), int(inits[q.input[2]])

    def bounds(q):
        info = np.iinfo(inits[q.input[2]].dtype)
        return info.min, info.max

    mo = onnx.ModelProto()
    mo.CopyFrom(m)
    mt = onnx.ModelProto()
    mt.CopyFrom(m)
    # LiteRT's integers are read from each tensor's DequantizeLinear output (exact multiples of the scale): the
    # float before the QuantizeLinear would show numpy's rounding, not LiteRT's QUANTIZE (it multiplies by 1/scale)
    dq_of = {nd.input[0]: nd.output[0] for nd in m.graph.node if nd.op_type == "DequantizeLinear"}
    seen = {q.output[0]: dq_of.get(q.output[0], q.input[0]) for q in qnodes}
    shapes = _float_shapes(m, list(seen.values()), x[:1])  # the export checks outputs' types and shapes
    for q in qnodes:
        mo.graph.output.append(helper.make_empty_tensor_value_info(q.output[0]))
        if q.input[0] not in {i.name for i in m.graph.input}:  # the input's own QUANTIZE: seen via the first op
            t = seen[q.output[0]]
            mt.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, shapes[t]))
    tmp = tempfile.mkdtemp()
    tfl = os.path.join(tmp, "probe.tflite")
    export_tflite(mt, tfl)
    ort_s, lite_s = session(mo, "kernels"), LiteRTSession(tfl, threads=args.threads)
    onames, lnames = [o.name for o in ort_s.get_outputs()], [o.name for o in lite_s.get_outputs()]
    # each op's QDQ sub-model (its int8 inputs -> its int8 output), to run it in ORT on LiteRT's inputs
    subs = {}
    for k, q in enumerate(qnodes):
        p = producer.get(q.input[0])
        if p is None:
            continue
        ins = [
            producer[i].input[0]
            for i in p.input
            if i in producer and producer[i].op_type == "DequantizeLinear" and producer[i].input[0] in qby
        ]
        if ins and p.op_type != "Reshape":  # Reshape's shape comes from the graph input; it moves bytes only
            path = os.path.join(tmp, f"s{k}.onnx")
            onnx.utils.extract_model(args.model, path, ins, [q.output[0]], check_model=False)
            subs[q.output[0]] = (p.op_type, ins, session(path, "kernels"))
    cum, loc = collections.Counter(), collections.Counter()
    size = collections.Counter()
    add_rule = collections.Counter()
    top1 = 0
    fc = {"crops_same_input": 0, "max_abs_logit_diff": 0.0}
    last = qnodes[-1].output[0]  # the classifier's int8 input (float FULLY_CONNECTED in the .tflite)
    for i in range(0, len(x), 32):
        feeds = {"input": x[i : i + 32]}
        ov = dict(zip(onames, ort_s.run(None, feeds)))
        lv = dict(zip(lnames, lite_s.run(None, feeds)))
        top1 += int(np.sum(ov["logits"].argmax(1) == lv["logits"].argmax(1)))

        def lite_int(name, lv=lv, ov=ov):
            q = qby[name]
            if seen[name] not in lv:  # graph input: LiteRT's QUANTIZE matched ORT's (first conv agrees)
                return ov[name].astype(np.int64)
            sc, zp = params(q)
            return (np.rint(lv[seen[name]] / sc) + zp).astype(np.int64)

        same = np.all((ov[last].astype(np.int64) == lite_int(last)).reshape(len(feeds["input"]), -1), axis=1)
        fc["crops_same_input"] += int(same.sum())
        if same.any():
            fc["max_abs_logit_diff"] = max(
                fc["max_abs_logit_diff"], float(np.abs(ov["logits"][same] - lv["logits"][same]).max())
            )

        for q in qnodes:
            name = q.output[0]
            a, b = ov[name].astype(np.int64), lite_int(name)
            cum[name] += int(np.sum(a != b))
            size[name] += a.size
            if name in subs:
                op, ins, s = subs[name]
                li = [lite_int(n) for n in ins]
                r = s.run(None, {n: v.astype(ov[n].dtype) for n, v in zip(ins, li)})[0].astype(np.int64)
                loc[name] += int(np.sum(r != b))
                if op == "Add":
                    lo, hi = bounds(q)
                    pa, pb, pc = params(qby[ins[0]]), params(qby[ins[1]]), params(q)
                    emu_o, emu_x = ort_add(*li, pa, pb, pc, lo, hi), xnnpack_add(*li, pa, pb, pc, lo, hi)
                    exact = exact_add(*li, pa, pb, pc)
                    dist = np.abs(exact - np.floor(exact) - 0.5)[emu_o != emu_x]
                    add_rule["elements"] += b.size
                    add_rule["xnnpack_rule_vs_litert"] += int(np.sum(emu_x != b))
                    add_rule["mlas_rule_vs_ort"] += int(np.sum(emu_o != r))
                    add_rule["rules_differ"] += int(dist.size)
                    add_rule["rules_differ_at_exact_half"] += int(np.sum(dist == 0))
                    add_rule["max_1e9_distance_from_half"] = max(
                        add_rule["max_1e9_distance_from_half"], int(dist.max() * 1e9) if dist.size else 0
                    )
    print(f"crops {len(x)}; top-1 agreement LiteRT vs ORT int8: {100 * top1 / len(x):.2f}%")
    print("| # | op | tensor | elements | local mismatches | cumulative mismatches |")
    print("|---|---|---|---|---|---|")
    per_op = collections.defaultdict(lambda: [0, 0])
    for k, q in enumerate(qnodes):
        name = q.output[0]
        op = subs[name][0] if name in subs else (producer[q.input[0]].op_type if q.input[0] in producer else "input")
        local = loc[name] if name in subs else "-"
        if name in subs:
            per_op[op][0] += loc[name]
            per_op[op][1] += size[name]
        print(f"| {k} | {op} | {name} | {size[name]} | {local} | {cum[name]} |")
    print("per op type (local mismatches / elements):")
    for op, (n, e) in per_op.items():
        print(f"  {op}: {n} / {e}")
    print("ADD rounding rules:", dict(add_rule))
    print("final Gemm on identical int8 input (ORT QGemm vs LiteRT float FULLY_CONNECTED):", fc)


if __name__ == "__main__":
    main()
