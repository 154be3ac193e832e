"""Where a corpus model's int8 error comes from: its output error with the activation quantization of one kind of
tensor removed, or with only that kind kept, and per source photo.

A tensor's kind is the op type that produces it, or "pooled vector" (one value per channel per sample: a
GlobalAveragePool's output and what is computed from it, i.e. every [N, C] tensor or one whose spatial size is 1).
Removing a tensor's activation quantization means deleting its QuantizeLinear -> DequantizeLinear pair in lowbit's
QDQ model (a Relu folded into that quantization comes back as a Relu); weights stay quantized throughout, so
"no activation quantized" is the weights' own error. Each row: the entry's task metric and the mean per-sample
output cosine vs float, with ONNX Runtime's integer kernels, on the entry's held-out samples.

Usage: PYTHONPATH=src:examples python bench/error_sources.py mobilenet_v3_large_op17 [--eval N] [--recipe R.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import run, session  # noqa: E402
from lowbit_zoo.corpus.metrics import cosine  # noqa: E402
from lowbit_zoo.corpus.registry import ENTRIES, ROOT  # noqa: E402

Keep = Callable[[str, str], bool]  # (tensor, its kind) -> whether its activation quantization is removed


def kinds(qdq: onnx.ModelProto, pooled: set[str]) -> dict[str, str]:
    """Each activation tensor a QuantizeLinear reads -> its kind."""
    inits = {i.name for i in qdq.graph.initializer}
    made_by = {o: n.op_type for n in qdq.graph.node for o in n.output}
    out = {}
    for n in qdq.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            t = n.input[0]
            out[t] = "pooled vector" if t in pooled else made_by.get(t, "graph input")
    return out


def pooled_vectors(float_model: onnx.ModelProto) -> set[str]:
    """[N, C] tensors, and tensors of rank >= 3 whose spatial dimensions are all 1 (float model's shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(float_model)
    found = set()
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if len(dims) == 2 or (len(dims) >= 3 and all(d == 1 for d in dims[2:])):
            found.add(vi.name)
    return found


def without(qdq: onnx.ModelProto, drop: set[str], float_model: onnx.ModelProto) -> onnx.ModelProto:
    """`qdq` with the Q -> DQ pairs of the tensors in `drop` removed (their readers read the float tensor)."""
    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    g = m.graph
    readers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    gone: set[int] = set()
    rename: dict[str, str] = {}
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.input[0] not in drop:
            continue
        dqs = [r for r in readers[q.output[0]] if r.op_type == "DequantizeLinear"]
        for dq in dqs:
            rename[dq.output[0]] = q.input[0]
            gone.add(id(dq))
        if len(dqs) == len(readers[q.output[0]]):
            gone.add(id(q))
    nodes = [n for n in g.node if id(n) not in gone]
    for n in nodes:
        n.input[:] = [rename.get(i, i) for i in n.input]
    # lowbit folds a Relu/Clip into its producer's quantization (the producer then writes the activation's output
    # name): without the quantization the activation must come back, as the float model has it.
    folded = {o: n for n in float_model.graph.node if n.op_type in ("Relu", "Clip") for o in n.output}
    consts = {i.name: i for i in float_model.graph.initializer}
    for n in list(nodes):
        act = folded.get(n.output[0]) if n.output and n.output[0] in rename.values() else None
        if act is None or n.op_type == act.op_type:
            continue
        raw = n.output[0] + "_before_activation"
        back = onnx.NodeProto()
        back.CopyFrom(act)
        back.input[0] = raw
        for extra in back.input[1:]:  # Clip's min/max
            if extra and extra in consts and extra not in {i.name for i in g.initializer}:
                g.initializer.append(consts[extra])
        nodes.append(back)
        n.output[0] = raw
    outputs = {o.name for o in g.output}
    for dq_out, t in rename.items():  # a graph output keeps its name
        if dq_out in outputs:
            nodes.append(helper.make_node("Identity", [t], [dq_out]))
    del g.node[:]
    g.node.extend(_sorted(nodes, {i.name for i in g.input} | {i.name for i in g.initializer} | {""}))
    return m


def _sorted(nodes: list[onnx.NodeProto], have: set[str]) -> list[onnx.NodeProto]:
    out: list[onnx.NodeProto] = []
    left = nodes
    while left:
        ready = [n for n in left if all(i in have for i in n.input)]
        if not ready:
            raise RuntimeError("the edited graph has a cycle")
        for n in ready:
            have.update(n.output)
        out += ready
        done = {id(n) for n in ready}
        left = [n for n in left if id(n) not in done]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("entry")
    ap.add_argument("--eval", type=int, default=0, help="held-out samples (default: the entry's)")
    ap.add_argument("--recipe", help="lowbit recipe JSON (default recipe otherwise)")
    args = ap.parse_args()
    import lowbit

    entry = next(e for e in ENTRIES if e.name == args.entry)
    model = entry.get(ROOT)
    calib, held = entry.calib(model), entry.eval(model, args.eval or None)
    out = entry.outputs[0]
    ref = run(session(str(model)), held)[out.name]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.onnx"
        recipe = lowbit.Recipe.from_dict(json.loads(Path(args.recipe).read_text())) if args.recipe else None
        lowbit.quantize(
            str(model), output=str(path), calib=calib, recipe=recipe, progress=False, batch_axes=entry.batch_axes
        )
        qdq = onnx.load(str(path))
    float_proto = onnx.load(str(model))
    kind = kinds(qdq, pooled_vectors(float_proto))

    def measure(drop: set[str]) -> tuple[float, float, list[np.ndarray]]:
        got = run(session(without(qdq, drop, float_proto).SerializeToString()), held)[out.name]
        return out.metric(ref, got), cosine(ref, got), got

    task, cos, got = measure(set())
    print(
        f"{entry.name}: {len(calib)} calibration / {len(held)} held-out samples; {out.metric_name} and cosine vs float"
    )
    print(f"| activations quantized | {out.metric_name} | cosine |\n|---|---|---|")
    print(f"| all (lowbit's model) | {task:.3f} | {cos:.4f} |")
    t, c, _ = measure(set(kind))
    print(f"| none (weights only) | {t:.3f} | {c:.4f} |")
    counts = collections.Counter(kind.values())
    for k, n in counts.most_common():
        mine = {x for x, y in kind.items() if y == k}
        t1, c1, _ = measure(set(kind) - mine)
        t2, c2, _ = measure(mine)
        print(f"| only {k} ({n}) | {t1:.3f} | {c1:.4f} |")
        print(f"| all but {k} | {t2:.3f} | {c2:.4f} |")
    if entry.feeds.__qualname__.startswith("_images"):  # photo crops: crop i comes from photo i mod len(photos)
        from lowbit_zoo.zoo import EVAL_PHOTOS

        k = len(EVAL_PHOTOS)
        per = {p: cosine(ref[i::k], got[i::k]) for i, p in enumerate(EVAL_PHOTOS)}
        print("cosine by held-out photo: " + ", ".join(f"{p} {c:.3f}" for p, c in per.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
