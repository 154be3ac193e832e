"""`calibration: "layer_error"` and `"layer_error_fast"` (the default): each activation's range is the candidate that
least disturbs the layers reading it.

A histogram rule (min-max, percentile, MSE, entropy) judges a range by the tensor alone; no single rule wins on
every model (clipping a Sigmoid input near its 0.5 threshold flips a text detector's map, clipping the large
values a GlobalAveragePool averages biases every class score). Here each quantized tensor gets a few candidate
ranges from its histogram (min-max, percentiles 99.9 / 99.99 / 99.999, the MSE range) and keeps the one whose
quantization error, measured where the model uses the tensor, is smallest:

- every node that reads the tensor (or a tensor sharing its scale through data movement such as MaxPool or
  Reshape) is copied once per candidate (`error_model`); each copy reads the tensor through the candidate's
  quantize-dequantize and its other inputs at their float values, and its output's squared difference from the
  original reader's is summed inside the graph, so one ONNX Runtime run per batch measures every candidate of
  every tensor;
- a candidate's error is the sum over those readers of squared output error / output variance (each reader
  counts equally, whatever its output scale); a tensor no copyable node reads (subgraphs, other domains) counts
  its own error instead.

So a convolution weighs each channel's error by its weights, a Sigmoid by its slope (values near the threshold
matter, saturated ones do not), a GlobalAveragePool averages rounding noise away but not clipping. The error is
measured on the first calibration samples (kept by calibrate.py while it streams them); model outputs keep
min-max, as every method does (decide.py). Ties go to the earlier candidate (min-max first).

The copies run on the float tensors calibration held for those samples (`held_names`,
`ranges_graphs.readers_model`): the readers alone, not the float model again. Where a reader needs a tensor that was
not held (an integer shape computed at run time), the copies run inside the whole float model instead, on the kept
input batches; both measure the same errors up to float32 rounding (ONNX Runtime optimizes the two graphs
differently). `Budget` says how much each method measures: `layer_error` every distinct candidate of every tensor on
32 samples; `layer_error_fast` 32 samples too (fewer past HOLD_BYTES held), three candidates (min-max, 99.9th
percentile, MSE), only those moving the scale by 2% or more and clipping at least MIN_CLIPPED of the measured
values, and never the outputs of ops that bound them (ReLU6, Sigmoid): on EfficientNet-Lite0 the full method's
accuracy at a fraction of its cost (bench/RESULTS.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from .graph.external import external_base
from .numerics import qrange
from .observe import Histogram, minmax, mse, percentile
from .ops.activation import clip_bounds
from .planner import Layout
from .ranges_graphs import _Group, _params, _Unit, error_model, readers_model
from .recipe import Scheme
from .runtimes.ort import from_proto

METHOD = "layer_error"


@dataclass(frozen=True)
class Budget:
    """How much a method measures: on the first `samples` calibration samples, and only candidates whose scale
    differs from min-max's by at least `min_change` (relative); a tensor left with min-max alone is not measured."""

    samples: int
    min_change: float
    # Leave outputs of ops that bound them (ReLU6, Sigmoid, ...) at min-max without measuring them.
    skip_bounded: bool = False
    # The percentile candidates (with min-max and MSE).
    percentiles: tuple[float, ...] = (99.9, 99.99, 99.999)
    # Measure on float tensors calibration held (memory: those tensors for `samples` samples), not by running the
    # whole float model again. The full method measures every tensor on 32 samples: it would hold them all.
    hold: bool = False


# `layer_error_fast` (the default), on EfficientNet-Lite0: the model input (its 99.9th percentile 4.8% narrower
# than min-max: alone +2.7 points of top-1 agreement) and the residual stream (MSE ranges 15-35% narrower) are
# measured; ReLU6 outputs, the largest tensors, are not. Percentiles 99.99 and 99.999 as well won 3 of 27 tensors,
# for a third more copies to run: 91.8% top-1 with them, 92.2% without, 18.8 dB SQNR both (256 eval crops; 92.6%
# once candidates clipping fewer than MIN_CLIPPED measured values were dropped as well).
METHODS = {
    METHOD: Budget(32, 0.0),
    "layer_error_fast": Budget(32, 0.02, skip_bounded=True, percentiles=(99.9,), hold=True),
}
# Why 32 samples, not 8: a clipped range chosen on 8 samples fits those samples. On MobileNetV3-Large (corpus, four
# orderings of the same 32 calibration crops) 8 gave 0.500-0.633 top-1 agreement on 256 held-out crops and 32 gave
# 0.637-0.672 (min-max: 0.605-0.645). The cost: more residual-stream candidates clip MIN_CLIPPED measured values
# and win by reader error, and EfficientNet-Lite0 loses 2-3 of 256 top-1 answers (92.2% -> 91.4% with the demo's
# 128 crops, 97.7% -> 96.5% under the onnxruntime target; cosine unchanged); the measurement's time grows with the
# samples (bench/RESULTS_CORPUS.md, ninth session). Held float tensors stop
# growing past HOLD_BYTES once HOLD_MIN_SAMPLES are held (calibrate.Hold): a large model measures on fewer samples.
HOLD_BYTES = 1 << 30
HOLD_MIN_SAMPLES = 8
# Ops whose output is bounded whatever their input (with Clip and its constant bounds): their largest values are
# the saturated ones, a mass at the bound that clipping would move. On EfficientNet-Lite0 the 17 ReLU6 outputs with
# a candidate 2% or more below min-max all kept min-max when measured, and they were most of the measuring cost.
BOUNDED = frozenset({"Sigmoid", "HardSigmoid", "Tanh", "Softmax"})
# Calibration samples the full method measures on: the first ones the data source yields.
SAMPLES = METHODS[METHOD].samples
FLOAT = onnx.TensorProto.FLOAT

Batch = dict[str, np.ndarray]


def wanted(layout: Layout) -> bool:
    """Whether any quantized tensor's scheme chooses its range this way."""
    return any(s.calibration in METHODS for s in layout.tensor_scheme.values())


def samples_wanted(layout: Layout) -> int:
    """Calibration samples to keep for the measurement: the most any scheme's method asks for (0: none)."""
    return max(
        (METHODS[s.calibration].samples for s in layout.tensor_scheme.values() if s.calibration in METHODS), default=0
    )


def keep_first(
    batches: Iterable[Batch], kept: list[Batch], samples: int, count: Callable[[Batch], int]
) -> Iterator[Batch]:
    """Pass `batches` through, copying into `kept` the first ones until they hold `samples` samples (and passing
    the copy on: calibration's held tensors that are graph inputs are then those very arrays, not a third copy)."""
    held = 0
    for batch in batches:
        if held < samples:
            kept.append({k: np.array(v, copy=True) for k, v in batch.items()})
            held += count(batch)
            batch = kept[-1]
        yield batch
        del batch  # before the next one is made: one batch alive, not two (calibration's arrays are at their peak)


def _bounded(value: ir.Value) -> bool:
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Clip":
        bounds = clip_bounds(node)
        return bounds is not None and all(np.isfinite(bounds))
    return node.op_type in BOUNDED


def _scheme_of(layout: Layout, name: str, source: str) -> Scheme | None:
    """A source's scheme, else its member's (a graph output the layout only observes has none)."""
    return layout.tensor_scheme.get(source, layout.tensor_scheme.get(name))


def measured(model: ir.Model, layout: Layout) -> set[str]:
    """The source tensors whose range a method here may measure (they need full histograms): every one whose
    scheme asks for it, but for `skip_bounded` methods not the outputs of ops that bound them."""
    values = {v.name: v for node in model.graph for v in node.outputs if v.name}
    out = set()
    for name, source in sorted(layout.tensors.items()):  # a source's scheme, else its first member's (_groups)
        scheme = _scheme_of(layout, name, source)
        if source in out or scheme is None or scheme.calibration not in METHODS:
            continue  # (observed only: graph outputs the layout does not quantize)
        if METHODS[scheme.calibration].skip_bounded and source in values and _bounded(values[source]):
            continue
        out.add(source)
    return out


def held_names(model: ir.Model, layout: Layout) -> set[str]:
    """The float tensors a measurement reads when it runs on values calibration kept rather than the whole float
    model again: every tensor sharing a measured source's scale, and every other input of the nodes reading them
    (constants aside). A superset: which sources have a candidate besides min-max is known only after calibration."""
    keep = measured(model, layout)
    methods = {s.calibration for n, src in layout.tensors.items() if src in keep and (s := _scheme_of(layout, n, src))}
    if not all(METHODS[m].hold for m in methods):
        return set()  # a method measuring in the whole model: nothing held (it runs the whole model anyway)
    members = {name for name, source in layout.tensors.items() if source in keep}
    out = set(members)
    for node in model.graph:
        if any(v is not None and v.name in members for v in node.inputs):
            # Float ones only (calibration fetches float outputs); a reader needing another is run in the model.
            out.update(v.name for v in node.inputs if v is not None and v.name and v.dtype == ir.DataType.FLOAT)
    return out - set(model.graph.initializers)


def candidates(h: Histogram, scheme: Scheme, budget: Budget = METHODS[METHOD]) -> list[tuple[str, tuple[float, float]]]:
    """(name, range) pairs, distinct ranges only, min-max first (it wins ties); after min-max, only those whose
    scale differs from min-max's by at least the budget's `min_change` (relative)."""
    levels = qrange(scheme.activations)[1] - qrange(scheme.activations)[0] + 1
    found = [("minmax", minmax(h))]
    found += [(f"percentile {p}", percentile(h, p)) for p in budget.percentiles]
    found.append(("mse", mse(h, levels, scheme.symmetric_activations)))
    # No entropy candidate: it won 4 of 60 tensors on EfficientNet-Lite0 and 22 of 534 on the captcha CRNN while
    # its search was the costliest candidate there (57 of 306 s of that model's choice, on a loaded machine).
    out: list[tuple[str, tuple[float, float]]] = []
    for name, (a, b) in found:
        params = _params((a, b), scheme)
        if out and abs(params[0] / _params(out[0][1], scheme)[0] - 1.0) < budget.min_change:
            continue
        if all(_params(r, scheme) != params for _, r in out):
            out.append((name, (float(a), float(b))))
    return out


def choose_ranges(
    model: ir.Model,
    layout: Layout,
    histograms: dict[str, Histogram],
    batches: list[Batch],
    threads: int = 0,
    held: list[Batch] | None = None,
) -> dict[str, tuple[tuple[float, float], str]]:
    """For every source tensor whose scheme asks for it: (range, the winning candidate's name). `held`: per kept
    batch, the float values of `held_names` as calibration computed them; when they cover every reader's inputs
    the readers run alone on them (`readers_model`), else the whole float model runs again on `batches`."""
    keep = measured(model, layout)
    proto = ir.to_proto(model)
    groups = _groups(proto, layout, {k: h for k, h in histograms.items() if k in keep}, _elem_types(model))
    if not groups or not batches:
        return {g.source: (g.options[0][1], g.options[0][0]) for g in groups}
    if held:
        groups = _seen(groups, histograms, held)
        if not groups:
            return {}  # min-max everywhere (decide.py)
    reduced = readers_model(proto, groups, held) if held else None
    if reduced is not None:
        proto, batches = reduced, list(held or [])
    measuring, names = error_model(proto, groups)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # The whole model: no arena, each copy's output is freed once reduced and peak memory stays near the model's.
    # The readers alone are small: the arena saves ~15% of their CPU (EfficientNet-Lite0: 0.61 vs 0.73 s, page
    # faults of the copies' outputs), and goes with the session.
    opts.enable_cpu_mem_arena = opts.enable_mem_pattern = reduced is not None
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        # Weights in external data stay there: ONNX Runtime maps them from the float model's folder.
        sess = from_proto(measuring, opts, external_base(model))
    except Exception as e:  # a copied reader ONNX Runtime refuses: say so, and keep min-max rather than fail
        warnings.warn(
            f"layer_error could not measure ranges ({str(e).splitlines()[0][:120]}); using min-max", stacklevel=2
        )
        return {g.source: (g.options[0][1], g.options[0][0]) for g in groups}
    inputs = {v.name for v in proto.graph.input}
    totals = np.zeros(len(names), np.float64)
    for batch in batches:
        feeds = {k: v for k, v in batch.items() if k in inputs}
        totals += np.array([float(v) for v in sess.run(names, feeds)], np.float64)
    found = {n: float(t) for n, t in zip(names, totals)}
    return {g.source: _best(g, gi, found) for gi, g in enumerate(groups)}


# A holding budget measures few samples: a candidate counts only if they are expected to hold at least this many of
# the values it clips. Otherwise the clipped values may not be among them, and clipping looks free: on a tiny
# attention block (48 values a sample, 8 measured) every 99.9th percentile won and the held-out error rose 24%.
MIN_CLIPPED = 8


def _seen(groups: list[_Group], histograms: dict[str, Histogram], held: list[Batch]) -> list[_Group]:
    """The groups of holding budgets keep the candidates whose clipping the held samples can show (MIN_CLIPPED),
    and are dropped when min-max is left alone."""
    out = []
    for g in groups:
        if METHODS[g.scheme.calibration].hold:
            h, n = histograms[g.source], sum(b[g.source].size for b in held if g.source in b)
            c = h.centers()
            clipped = [
                float(h.counts[(c < min(a, 0.0)) | (c > max(b, 0.0))].sum()) / h.count for _, (a, b) in g.options
            ]
            g.options = [o for o, f in zip(g.options, clipped) if o is g.options[0] or f * n >= MIN_CLIPPED]
        if len(g.options) > 1:
            out.append(g)
    return out


def _elem_types(model: ir.Model) -> dict[str, int]:
    """Each tensor's element type where the model knows it (0: unknown): loading inferred them (the same as
    onnx's shape inference on the corpus, and no second inference of the whole model here)."""
    values = [*model.graph.inputs, *(v for node in model.graph for v in node.outputs)]
    return {v.name: int(v.dtype) if v.dtype is not None else 0 for v in values if v.name}


def _groups(
    proto: onnx.ModelProto, layout: Layout, histograms: dict[str, Histogram], types: dict[str, int] | None = None
) -> list[_Group]:
    """Each measured source with its candidates and readers; `types`: `_elem_types` (None: all unknown)."""
    types = types or {}
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
        if scheme.calibration not in METHODS or source in init or h is None or h.count == 0:
            continue
        if all(n in outputs for n in names):
            continue  # outputs keep min-max (decide.py)
        if any(types.get(n, FLOAT) != FLOAT for n in names):
            continue  # float16 / double activations: min-max
        options = candidates(h, scheme, METHODS[scheme.calibration])
        if len(options) == 1:
            continue  # min-max is the only candidate: nothing to measure
        group = set(names)
        found: dict[str, _Unit] = {}
        for name in names:
            for node in readers.get(name, []):
                # Data movement that shares the group's scale passes the error on unchanged: its readers count.
                if node.output and all(o in group for o in node.output if o):
                    continue
                if not _runnable(node):
                    continue
                unit = found.setdefault(node.name, _Unit(node))
                unit.inputs.add(name)
                unit.outputs = [o for k, o in enumerate(node.output) if o and _float_output(node, k, o, types)]
        units = [u for u in found.values() if u.outputs]
        if not units:  # nobody that can be copied reads it: the tensors' own error decides
            units = [_Unit(None, {n}, [n]) for n in names if n not in outputs]
        groups.append(_Group(source, names, scheme, options, units))
    return groups


# Ops whose first output is not float whatever their input: with no inferred type, their outputs are not compared.
NOT_FLOAT = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "Cast", "Equal", "Less", "Greater", "LessOrEqual"}
NOT_FLOAT |= {"GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}


def _float_output(node: onnx.NodeProto, k: int, name: str, types: dict[str, int]) -> bool:
    if types.get(name, 0):
        return types[name] == FLOAT
    return k == 0 and node.op_type not in NOT_FLOAT  # unknown type: float activations in, float out


def _runnable(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and not any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)


def _best(g: _Group, gi: int, found: dict[str, float]) -> tuple[tuple[float, float], str]:
    """The candidate with the least error summed over readers and outputs, each relative to that output's
    variance (a constant output says nothing); the first one on a tie, min-max."""
    totals = []
    for c in range(len(g.options)):
        total = 0.0
        for ri, r in enumerate(g.readers):
            for k in range(len(r.outputs)):
                var = found[f"var/{gi}/{ri}/{k}"]
                if var > 0:
                    total += found[f"err/{gi}/{ri}/{c}/{k}"] / var
        totals.append(total)
    best = int(np.argmin(totals))
    name, rng = g.options[best]
    return rng, name
