"""`calibration: "layer_error"`: each activation's range is the candidate that least disturbs the layers reading it.

A histogram rule (min-max, percentile, MSE, entropy) judges a range by the tensor alone; no single rule wins on
every model (clipping a Sigmoid input near its 0.5 threshold flips a text detector's map, clipping the large
values a GlobalAveragePool averages biases every class score). Here each quantized tensor gets a few candidate
ranges from its histogram (min-max, percentiles 99.9 / 99.99 / 99.999, the MSE range, the entropy range) and keeps
the one whose quantization error, measured where the model uses the tensor, is smallest:

- every node that reads the tensor (or a tensor sharing its scale through data movement such as MaxPool or
  Reshape) is run alone in float by ONNX Runtime, its other inputs at their float values, once with the tensor in
  float and once with it quantized at each candidate;
- the error of a candidate is the sum over those readers of squared output error / output variance (each reader
  counts equally, whatever its output scale); a tensor nobody runnable reads counts its own error instead.

So a convolution weighs each channel's error by its weights, a Sigmoid by its slope (values near the threshold
matter, saturated ones do not), a GlobalAveragePool averages rounding noise away but not clipping. The error is
measured on the first `SAMPLES` calibration samples (kept by calibrate.py while it streams them); model outputs
keep min-max, as every method does (decide.py). Deterministic: readers run on one thread, ties go to the earlier
candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from .numerics import qrange, scale_zero_point
from .observe import Histogram, entropy, minmax, mse, percentile
from .planner import Layout
from .recipe import Scheme

METHOD = "layer_error"
# Calibration samples the error is measured on: the first ones the data source yields.
SAMPLES = 32
PERCENTILES = (99.9, 99.99, 99.999)
READER_THREADS = 1

Batch = dict[str, np.ndarray]


def wanted(layout: Layout) -> bool:
    """Whether any quantized tensor's scheme chooses its range this way."""
    return any(s.calibration == METHOD for s in layout.tensor_scheme.values())


def keep_first(
    batches: Iterable[Batch], kept: list[Batch], samples: int, count: Callable[[Batch], int]
) -> Iterator[Batch]:
    """Pass `batches` through, copying into `kept` the first ones until they hold `samples` samples."""
    held = 0
    for batch in batches:
        if held < samples:
            kept.append({k: np.array(v, copy=True) for k, v in batch.items()})
            held += count(batch)
        yield batch


def candidates(h: Histogram, scheme: Scheme) -> list[tuple[str, tuple[float, float]]]:
    """(name, range) pairs, distinct ranges only, min-max first (it wins ties)."""
    levels = qrange(scheme.activations)[1] - qrange(scheme.activations)[0] + 1
    found = [("minmax", minmax(h))]
    found += [(f"percentile {p}", percentile(h, p)) for p in PERCENTILES]
    found.append(("mse", mse(h, levels, scheme.symmetric_activations)))
    found.append(("entropy", entropy(h, levels)))
    out: list[tuple[str, tuple[float, float]]] = []
    for name, (a, b) in found:
        params = _params((a, b), scheme)
        if all(_params(r, scheme) != params for _, r in out):
            out.append((name, (float(a), float(b))))
    return out


def _params(r: tuple[float, float], scheme: Scheme) -> tuple[float, int]:
    s, z = scale_zero_point(r[0], r[1], scheme.activations, scheme.symmetric_activations)
    return float(s), int(z)


def fake_quantize(x: np.ndarray, r: tuple[float, float], scheme: Scheme) -> np.ndarray:
    """Quantize then dequantize as QuantizeLinear/DequantizeLinear do (float32 divide, round half to even)."""
    s, z = _params(r, scheme)
    qmin, qmax = qrange(scheme.activations)
    q = np.rint(x / np.float32(s))
    q += np.float32(z)
    np.clip(q, qmin, qmax, out=q)
    q -= np.float32(z)
    q *= np.float32(s)
    return q


def _sum_of_squares(d: np.ndarray) -> float:
    """Sum of d**2 (overwrites d), accumulated in float64. Float32 work on activations of tens of MB is
    memory-bound: this is 5x faster than converting to float64 first (EfficientNet-Lite0: 21 s -> 4 s)."""
    np.multiply(d, d, out=d)
    return float(d.sum(dtype=np.float64))


@dataclass
class _Unit:
    """One place a group's error is measured: a node reading its tensors, run alone in float by ONNX Runtime
    (`node`), or, when no reader can run alone, the group's tensors themselves (`node` None)."""

    node: onnx.NodeProto | None
    inputs: set[str] = field(default_factory=set)  # the group tensors it reads
    session: ort.InferenceSession | None = None
    # per output: sum, sum of squares and count of its float values, over all batches (its variance)
    moments: list[list[float]] = field(default_factory=list)
    # candidate -> per output, the summed squared error
    errors: dict[int, list[float]] = field(default_factory=dict)

    def add_reference(self, outs: list[np.ndarray]) -> None:
        if not self.moments:
            self.moments = [[0.0, 0.0, 0.0] for _ in outs]
        for m, y in zip(self.moments, outs):
            m[0] += float(y.sum(dtype=np.float64))
            m[1] += _sum_of_squares(y.copy())
            m[2] += y.size

    def add_error(self, c: int, outs: list[np.ndarray], ref: list[np.ndarray]) -> None:
        row = self.errors.setdefault(c, [0.0] * len(ref))
        for k, (y, r) in enumerate(zip(outs, ref)):
            row[k] += _sum_of_squares(np.subtract(y, r, dtype=np.float32))

    def relative_error(self, c: int) -> float:
        """Squared error / (variance * count), summed over outputs that vary (a constant output says nothing)."""
        total = 0.0
        for (s, s2, n), sq in zip(self.moments, self.errors.get(c, [])):
            var = s2 / n - (s / n) ** 2 if n else 0.0
            if var > 1e-12 * max(s2 / n if n else 0.0, 1e-30):
                total += sq / (var * n)
        return total


@dataclass
class _Group:
    """A source tensor and every tensor sharing its parameters, with the places its error is measured."""

    source: str
    members: list[str]
    scheme: Scheme
    options: list[tuple[str, tuple[float, float]]]
    readers: list[_Unit]
    tried: bool = False


def choose_ranges(
    model: ir.Model,
    layout: Layout,
    histograms: dict[str, Histogram],
    batches: list[Batch],
    session: Callable[[list[str]], ort.InferenceSession],
) -> dict[str, tuple[tuple[float, float], str]]:
    """For every source tensor whose scheme asks for it: (range, the winning candidate's name). `session(names)`
    gives a float session of the model that also outputs `names` (calibrate.calibration_session)."""
    proto = ir.to_proto(model)
    groups = _groups(proto, layout, histograms)
    if not groups or not batches:
        return {g.source: (g.options[0][1], g.options[0][0]) for g in groups}
    inputs = {v.name for v in proto.graph.input}
    initializers = {t.name for t in proto.graph.initializer}
    needed = {t for g in groups for t in g.members}
    for g in groups:
        for r in g.readers:
            assert r.node is not None
            needed.update(n for n in r.node.input if n)
    fetch = sorted(needed - inputs - initializers)
    sess = session(fetch)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = READER_THREADS  # same sums in the same order on every machine load: same choices
    opts.log_severity_level = 3
    for batch in batches:
        feeds = {k: v for k, v in batch.items() if k in inputs}
        values = dict(feeds)
        values.update(zip(fetch, sess.run(fetch, feeds)))
        for g in groups:
            _measure(g, values, proto, initializers, opts)
        del values
    return {g.source: _best(g) for g in groups}


def _groups(proto: onnx.ModelProto, layout: Layout, histograms: dict[str, Histogram]) -> list[_Group]:
    init = {t.name for t in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in dict.fromkeys(node.input):
            if name:
                readers.setdefault(name, []).append(node)
    members: dict[str, list[str]] = {}
    for name, source in sorted(layout.tensors.items()):
        members.setdefault(source, []).append(name)
    groups = []
    for source, names in sorted(members.items()):
        scheme = layout.tensor_scheme.get(source, layout.tensor_scheme[names[0]])
        h = histograms.get(source)
        if scheme.calibration != METHOD or source in init or h is None or h.count == 0:
            continue
        if all(n in outputs for n in names):
            continue  # outputs keep min-max (decide.py)
        group = set(names)
        found: dict[str, _Unit] = {}
        for name in names:
            for node in readers.get(name, []):
                # Data movement that shares the group's scale passes the error on unchanged: its readers count.
                if node.output and all(o in group for o in node.output if o):
                    continue
                found.setdefault(node.name, _Unit(node)).inputs.add(name)
        groups.append(_Group(source, names, scheme, candidates(h, scheme), list(found.values())))
    return groups


def _runnable(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and not any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)


def _reader_session(
    node: onnx.NodeProto,
    values: dict[str, np.ndarray],
    proto: onnx.ModelProto,
    initializers: set[str],
    opts: ort.SessionOptions,
) -> ort.InferenceSession | None:
    """The reader alone as a model, its constant inputs inside; None if it cannot run alone."""
    if not _runnable(node) or any(n and n not in values and n not in initializers for n in node.input):
        return None
    ins = [
        onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(values[n].dtype), None)
        for n in dict.fromkeys(node.input)
        if n and n not in initializers
    ]
    consts = [t for t in proto.graph.initializer if t.name in set(node.input)]
    outs = []
    for o in node.output:
        if o:
            outs.append(onnx.ValueInfoProto())
            outs[-1].name = o  # no type: ONNX Runtime infers it
    graph = onnx.helper.make_graph([node], "reader", ins, outs, consts)
    model = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception:  # an op ONNX Runtime cannot run alone: the group's own error is measured instead
        return None


def _measure(
    g: _Group, values: dict[str, np.ndarray], proto: onnx.ModelProto, initializers: set[str], opts: ort.SessionOptions
) -> None:
    """Add one batch's squared errors of every candidate, at every place the group's error is measured."""
    if not g.tried:
        for r in g.readers:
            assert r.node is not None
            r.session = _reader_session(r.node, values, proto, initializers, opts)
        g.readers = [r for r in g.readers if r.session is not None]
        if not g.readers:
            g.readers = [_Unit(None, {m}) for m in g.members]
        g.tried = True
    for r in g.readers:
        if r.node is None:
            (name,) = r.inputs
            if name not in values:
                continue
            x = values[name]
            r.add_reference([x])
            for c, (_, rng) in enumerate(g.options):
                r.add_error(c, [fake_quantize(x, rng, g.scheme)], [x])
            continue
        assert r.session is not None
        feeds = {n: values[n] for n in dict.fromkeys(r.node.input) if n and n not in initializers}
        ref = [y for y in r.session.run(None, feeds) if np.issubdtype(y.dtype, np.floating)]
        r.add_reference(ref)
        for c, (_, rng) in enumerate(g.options):
            quantized = dict(feeds)
            for name in r.inputs:
                quantized[name] = fake_quantize(values[name], rng, g.scheme)
            got = [y for y in r.session.run(None, quantized) if np.issubdtype(y.dtype, np.floating)]
            r.add_error(c, got, ref)


def _best(g: _Group) -> tuple[tuple[float, float], str]:
    """The candidate with the least total relative error (the first one on a tie: min-max)."""
    totals = [sum(r.relative_error(c) for r in g.readers) for c in range(len(g.options))]
    best = int(np.argmin(totals)) if totals else 0
    name, rng = g.options[best]
    return rng, name
