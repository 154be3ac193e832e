"""Where lowbit's int8 .tflite and its int8 ONNX part: every int8 tensor compared as integers, in graph order.

The .tflite is exported as usual (every fusion of the exporter kept), then the int8 tensor of each ONNX value is
added to the subgraph's outputs, so LiteRT with XNNPACK computes exactly the ops of the shipped file and hands
every such tensor back (XNNPACK does not keep intermediate tensors; `experimental_preserve_all_tensors` would turn
it off and measure LiteRT's built-in kernels instead). ONNX Runtime runs the int8 ONNX with every activation
QuantizeLinear output added as a graph output (kernels: fused, as the table measures; `--simulate`: the reference
QDQ run). The two integers of each value are compared (uint8 zero points shifted by -128, as the exporter does);
the first values that differ, walked in ONNX node order, name the op that parts the runtimes. For that op the
script also runs it alone in ONNX Runtime (its QDQ sub-model) on LiteRT's own int8 inputs: a "local" mismatch
is the op's own rounding, not one carried from earlier.

Usage: PYTHONPATH=src:examples python bench/litert_tensors.py NAME [--n 8] [--simulate] [--show 12]
(NAME: a corpus entry, efficientnet_lite0 or minilm, as in bench/litert_corpus.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from litert_corpus import corpus_jobs, shape_groups  # noqa: E402


def probe_tflite(q: Path, shapes: dict, values: dict) -> bytes:
    """The usual export of `q`, with every int8 tensor named after an ONNX value made a subgraph output too."""
    import importlib

    conv = importlib.import_module("lowbit.export.tflite.convert")  # the module (the package exports a function)
    from lowbit.export.tflite.writer import serialize

    proto, _recipe, ranges = conv._load(str(q), values)
    ctx = conv._build(proto, str(q), "float", False, 1, "auto", shapes, None, None, False, ranges)
    fm = ctx.fm
    outs, names = list(fm.outputs), list(fm.output_names)
    for i, t in enumerate(fm.tensors):
        if t.dtype == "int8" and t.data is None and t.quant is not None and i not in outs:
            outs.append(i)
            names.append(f"probe{i}")
    fm.outputs, fm.output_names = outs, names
    fm.metadata["lowbit"] = json.dumps({"layout": "4-D inputs and outputs are NHWC"}).encode()  # as convert writes
    return serialize(fm)


def quantized_values(m: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """ONNX value -> (its QuantizeLinear's output, zero point shift to int8) for every activation."""
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    res = {}
    for nd in m.graph.node:
        if nd.op_type == "QuantizeLinear" and nd.input[0] not in inits:
            zp = inits.get(nd.input[2]) if len(nd.input) > 2 else None
            res[nd.input[0]] = (nd.output[0], -128 if zp is None or zp.dtype == np.uint8 else 0)
    return res


def as_onnx_layout(lite: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """LiteRT's tensor in the ONNX value's layout: as is, or NHWC -> NCHW (also a 1-D chain's (N, L, 1, C))."""
    if lite.shape == shape:
        return lite
    if lite.size != int(np.prod(shape)):
        return None
    if lite.ndim == 4:
        back = lite.transpose(0, 3, 1, 2)
        if back.shape == shape or back.reshape(-1).size == int(np.prod(shape)):
            return back.reshape(shape)
    return lite.reshape(shape)


def main(argv: list[str]) -> int:
    import lowbit
    from lowbit.runtimes.litert import LiteRTSession

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--n", type=int, default=8, help="eval samples")
    ap.add_argument("--simulate", action="store_true", help="compare with ONNX Runtime's reference QDQ run")
    ap.add_argument("--show", type=int, default=12, help="differing values to list")
    ap.add_argument("--keep", default="", help="folder to keep the int8 ONNX and the probe .tflite in")
    args = ap.parse_args(argv)
    jobs = [j for j in corpus_jobs({args.name}) if not isinstance(j, tuple)]
    if not jobs:
        print(f"no model named {args.name}")
        return 2
    job = jobs[0]
    work = Path(args.keep or tempfile.mkdtemp(prefix="lowbit_tensors_"))
    q = work / f"{job.name}.int8.onnx"
    if not q.is_file():
        lowbit.quantize(str(job.model), q, calib=job.calib, progress=False, batch_axes=job.batch_axes)
    shapes, idx = shape_groups(job.eval)[0]
    idx = idx[: args.n]
    values = {n: v for n, v in job.eval[idx[0]].items() if np.ndim(v) == 0}
    path = work / f"{job.name}.probe.tflite"
    path.write_bytes(probe_tflite(q, shapes, values))
    feeds = [{n: v for n, v in job.eval[i].items() if n not in values} for i in idx]

    m = onnx.load(str(q))
    qv = quantized_values(m)
    ext = onnx.ModelProto()
    ext.CopyFrom(m)
    have = {o.name for o in ext.graph.output}
    ext.graph.output.extend(helper.make_empty_tensor_value_info(o) for o, _ in qv.values() if o not in have)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from corpus import session

    ort_s = session(ext.SerializeToString(), simulate=args.simulate)
    onames = [o.name for o in ort_s.get_outputs()]
    lite = LiteRTSession(path, threads=1)
    details = lite._outputs
    diff: dict[str, list] = {}  # value -> [elements differing, elements, largest step]
    for feed in feeds:
        ov = dict(zip(onames, ort_s.run(None, feed)))
        raw = lite.invoke(lite.prepare(feed))
        for d, r in zip(details, raw):
            # a 1-D chain's value on its added axis (chain1d.py); a float-written value QUANTIZE'd (context.py)
            name = d["name"].removesuffix("_q").removesuffix("_2d")
            if name not in qv or d["dtype"] != np.int8:
                continue
            qname, shift = qv[name]
            ref = ov[qname].astype(np.int64) + shift
            got = as_onnx_layout(r.astype(np.int64), ref.shape)
            if got is None:
                continue
            bad = np.abs(ref - got)
            acc = diff.setdefault(name, [0, 0, 0])
            acc[0] += int(np.count_nonzero(bad))
            acc[1] += bad.size
            acc[2] = max(acc[2], int(bad.max(initial=0)))
    producer = {o: nd for nd in m.graph.node for o in nd.output}
    of_q = {o: v for v, (o, _) in qv.items()}
    order = [o for nd in m.graph.node for o in nd.output if o in diff]
    print(f"{job.name}: {len(order)} int8 values compared on {len(feeds)} samples "
          f"({'reference QDQ run' if args.simulate else 'ONNX Runtime kernels'}); probe: {path}")  # fmt: skip
    shown = 0
    for name in order:
        n_bad, n, steps = diff[name]
        if n_bad and shown < args.show:
            nd = producer[name]
            ins = [i for i in nd.input if i in producer and producer[i].op_type == "DequantizeLinear"]
            in_bad = [diff.get(of_q.get(producer[i].input[0], ""), ["?"])[0] for i in ins]
            print(f"  {nd.op_type:>16} {nd.name[:60]:<60} {n_bad:>8}/{n:<9} max {steps} step(s); "
                  f"inputs differing {in_bad}")  # fmt: skip
            shown += 1
    print(f"  differing values: {sum(1 for v in diff.values() if v[0])} of {len(diff)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
