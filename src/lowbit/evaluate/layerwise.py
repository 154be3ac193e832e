"""Layer-by-layer error measurement for `lowbit diagnose`.

Two measurements:
- per tensor: the float model and the QDQ model run side by side with every quantized activation added as a
  graph output; signal and noise energy are summed batch by batch (activations are never kept);
- per layer "alone": the plan is re-applied with every node but one kept float, and the final outputs are
  compared with the float model's, so a layer's own damage is not mixed with that of the layers before it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from ..decision import Reason
from ..observe import Histogram
from ..pipeline import quantize
from ..plan import Plan, TensorParams
from ..recipe import Recipe, Rule, Scheme
from ..runtimes.ort import join, output_batch_axes, session, with_outputs
from .outputs import OutputKind, output_fidelity, resolve

Batches = list[dict[str, np.ndarray]]
_NO_OWN_ERROR = (Reason.FOLDED, Reason.SHARES_SCALE)
# Nodes whose error is their own: they compute something. Folded Relu/Clip and scale-sharing data movement
# have no error of their own (the producer's output range carries it).


@dataclass
class Energy:
    """Running sums for SQNR = 10 log10(sum ref^2 / sum (ref - q)^2)."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, ref: np.ndarray, q: np.ndarray) -> None:
        r = ref.astype(np.float64, copy=False)
        d = r - q
        self.signal += float(np.vdot(r, r))
        self.noise += float(np.vdot(d, d))

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.noise)


@dataclass
class TensorStats:
    """Per-tensor SQNR of the quantized model and histograms of the float tensors, keyed by float name."""

    energy: dict[str, Energy] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    ref_outputs: list[np.ndarray] = field(default_factory=list)  # float model's final outputs, all samples
    quant_outputs: list[np.ndarray] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # the models' final output names
    samples: int = 0

    def sqnr(self, name: str) -> float:
        return self.energy[name].sqnr_db if name in self.energy else math.nan


def _values(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input}
    for n in graph.node:
        names.update(o for o in n.output if o)
    return names


def pair_tensors(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, plan: Plan) -> dict[str, str]:
    """float tensor name -> the quantized model's value holding its quantized version.

    In lowbit's QDQ form tensor X is read back as `X_dq`, or keeps the name X when it is a graph output (the
    float value inside becomes `X_float`). Folded Relu/Clip outputs exist under the same name in both models.
    """
    fvals, qvals = _values(float_model.graph), _values(quant_model.graph)
    qouts = {o.name for o in quant_model.graph.output}
    consts = {i.name for i in float_model.graph.initializer}
    pairs: dict[str, str] = {}
    for name, p in plan.tensors.items():
        if p.kind != "activation" or name in consts or name not in fvals:
            continue
        if f"{name}_dq" in qvals:
            pairs[name] = f"{name}_dq"
        elif name in qouts and f"{name}_float" in qvals:
            pairs[name] = name
    for o in float_model.graph.output:  # final outputs, quantized or not
        if o.name in qouts:
            pairs.setdefault(o.name, o.name)
    return pairs


def pair_outputs(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, plan: Plan) -> dict[str, str]:
    """float tensor name -> the same name in the quantized model, for the outputs of quantized nodes.

    Dynamic and weight-only nodes have no activation tensors in the plan: lowbit replaces the node by a small
    subgraph (DynamicQuantizeLinear -> MatMulInteger, MatMulNBits, DynamicQuantizeLSTM, ...) that writes the
    same output name, so the node's output is what can be compared. Model outputs are paired too.
    """
    qvals = _values(quant_model.graph)
    pairs: dict[str, str] = {}
    for n in float_model.graph.node:
        entry = plan.nodes.get(n.name)
        if entry is not None and entry.quantized and n.output and n.output[0] in qvals:
            pairs[n.output[0]] = n.output[0]
    qouts = {o.name for o in quant_model.graph.output}
    for o in float_model.graph.output:
        if o.name in qouts:
            pairs.setdefault(o.name, o.name)
    return pairs


def output_layers(float_model: onnx.ModelProto, plan: Plan, pairs: dict[str, str]) -> list[Layer]:
    """Quantized nodes of the float graph whose output is paired, in graph order (dynamic / weight-only)."""
    found = []
    for n in float_model.graph.node:
        entry = plan.nodes.get(n.name)
        if entry is None or not entry.quantized or not n.output or n.output[0] not in pairs:
            continue
        if entry.code in _NO_OWN_ERROR:  # static: no error of their own
            continue
        # The weight is input 1 (MatMul/Gemm/LSTM W) or the table, input 0 (Gather).
        w = plan.tensors.get(f"{n.name}:1") or plan.tensors.get(f"{n.name}:0")
        has_weight = w is not None and w.kind == "weight"
        found.append(
            Layer(
                n.name,
                entry.op_type,
                [i for i in n.input if i in pairs],
                n.output[0],
                has_weight,
                bool(has_weight and w is not None and w.axis is not None),
            )
        )
    return found


def measure_tensors(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    pairs: dict[str, str],
    batches: Batches,
    histograms: Iterable[str] = (),
    progress: bool = False,
    count: Callable[[dict[str, np.ndarray]], int] | None = None,
) -> TensorStats:
    """Stream `batches` through both models; sum signal/noise energy per paired tensor.

    The float model runs with ONNX Runtime's optimizations (it has no Q/DQ to fuse), the quantized one in
    simulation so each tensor is read where the quantization math puts it, not inside a fused kernel.
    """
    from tqdm import tqdm

    outputs = [o.name for o in float_model.graph.output]
    fnames = list(dict.fromkeys(outputs + list(pairs)))
    qnames = [pairs.get(n, n) for n in fnames]
    fsess = session(with_outputs(float_model, fnames), "kernels")
    qsess = session(with_outputs(quant_model, qnames), "simulate")
    finputs = {i.name for i in fsess.get_inputs()}
    qinputs = {i.name for i in qsess.get_inputs()}
    hist_names = set(histograms)
    stats = TensorStats(energy={n: Energy() for n in pairs}, outputs=outputs)
    refs: list[list[np.ndarray]] = [[] for _ in outputs]
    outs: list[list[np.ndarray]] = [[] for _ in outputs]
    count = count or (lambda b: len(next(iter(b.values()))))  # the data source's count knows each batch axis
    total = sum(count(b) for b in batches)
    bar = tqdm(total=total, desc="measuring layers", unit="sample", disable=None if progress else True, leave=False)
    try:
        for batch in batches:
            fres = fsess.run(fnames, {k: v for k, v in batch.items() if k in finputs})
            qres = qsess.run(qnames, {k: v for k, v in batch.items() if k in qinputs})
            for i, name in enumerate(fnames):
                ref, q = fres[i], qres[i]
                if i < len(outputs):
                    refs[i].append(ref)
                    outs[i].append(q)
                if name in stats.energy:
                    stats.energy[name].add(ref, q)
                if name in hist_names:
                    stats.histograms.setdefault(name, Histogram()).update(ref)
            del fres, qres
            stats.samples += count(batch)
            bar.update(count(batch))
    finally:
        bar.close()
    axes = output_batch_axes(fsess)
    stats.ref_outputs = [join(r, axes.get(n, 0), stats.samples) for r, n in zip(refs, fnames)]
    stats.quant_outputs = [join(o, axes.get(n, 0), stats.samples) for o, n in zip(outs, fnames)]
    return stats


@dataclass
class Layer:
    """A quantized node that computes something, with the tensors it reads and writes (float names)."""

    node: str
    op_type: str
    inputs: list[str]
    output: str | None
    has_weight: bool
    per_channel: bool
    folded: list[str] = field(default_factory=list)  # Relu/Clip folded into its output range


def layers(quant_model: onnx.ModelProto, plan: Plan, pairs: dict[str, str]) -> list[Layer]:
    """Quantized compute nodes of the QDQ model, in graph order."""
    qouts = {o.name for o in quant_model.graph.output}
    folded: dict[str, list[str]] = {}
    for name, decision in plan.nodes.items():
        if decision.code is Reason.FOLDED:
            folded.setdefault(decision.details["into"], []).append(name)
    found = []
    for n in quant_model.graph.node:
        entry = plan.nodes.get(n.name)
        if entry is None or not entry.quantized or entry.code in _NO_OWN_ERROR:
            continue
        ins = [i[:-3] for i in n.input if i.endswith("_dq") and pairs.get(i[:-3]) == i]
        out = n.output[0] if n.output else None
        if out is not None and out.endswith("_float") and out[:-6] in qouts:
            out = out[:-6]
        w = plan.tensors.get(f"{n.name}:1")
        has_weight = w is not None and w.kind == "weight"
        found.append(
            Layer(
                n.name,
                entry.op_type,
                ins,
                out if out in pairs else None,
                has_weight,
                bool(has_weight and w is not None and w.axis is not None),
                folded.get(n.name, []),
            )
        )
    return found


def final_fidelity(
    ref: np.ndarray, out: np.ndarray, name: str = "", kind: str | OutputKind | None = None
) -> dict[str, Any]:
    """A final output's fidelity, measured with what fits its kind (outputs.py): "kind", "why", "task" (the
    headline), "top1_agreement" (None unless class scores), "cosine", "sqnr_db" and the kind's own measures."""
    return output_fidelity(ref, out, name, kind)


def all_fidelity(
    refs: list[np.ndarray], outs: list[np.ndarray], kinds: list[OutputKind], names: list[str]
) -> dict[str, Any]:
    """The first output's fidelity, with every output's under "outputs" (name -> fidelity)."""
    every = {n: final_fidelity(r, o, n, k) for n, r, o, k in zip(names, refs, outs, kinds)}
    return {**every[names[0]], "outputs": every}


def escape(name: str) -> str:
    """A node name as an fnmatch pattern matching only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class Trials:
    """Re-apply the plan (no calibration) with changed recipes/ranges and measure the final outputs."""

    def __init__(
        self,
        float_model: onnx.ModelProto,
        plan: Plan,
        batches: Batches,
        refs: list[np.ndarray],
        names: list[str],
        kinds: Mapping[str, str] | None = None,
    ) -> None:
        """`refs`: the float model's final outputs `names`; `kinds` overrides their guessed kinds by name."""
        self.float_model, self.plan, self.batches, self.refs, self.names = float_model, plan, batches, refs, names
        self.kinds = [resolve(r, n, (kinds or {}).get(n)) for r, n in zip(refs, names)]
        # Through JSON: an in-memory plan's recipe dict holds tuples, which Recipe.from_dict rejects.
        self.recipe = Recipe.from_dict(json.loads(json.dumps(plan.recipe)), "plan recipe")
        self.runs = 0

    def scheme(self, node: str, op_type: str) -> Scheme | None:
        return self.recipe.scheme_for(node, op_type)[0]

    def alone(
        self, layer: Layer, scheme: Scheme | None = None, tensors: dict[str, TensorParams] | None = None
    ) -> dict[str, Any]:
        """Final-output fidelity when only `layer` (and the Relu/Clip folded into it) is quantized."""
        own = scheme or self.scheme(layer.node, layer.op_type)
        rules = [Rule(names=(escape(layer.node),), scheme=own)]
        rules += [Rule(names=(escape(f),), scheme=self.scheme(f, self.plan.nodes[f].op_type)) for f in layer.folded]
        rules.append(Rule(names=("*",), scheme=None))
        recipe = replace(self.recipe, rules=tuple(rules))
        plan = replace(self.plan, tensors={**self.plan.tensors, **(tensors or {})})
        model = quantize(self.float_model, recipe=recipe, plan=plan, progress=False).model
        return self.measure(model)

    def measure(self, model: onnx.ModelProto) -> dict[str, Any]:
        """The first output's fidelity (its SQNR ranks the layers), every output's under "outputs"."""
        from ..runtimes.ort import run_all

        self.runs += 1
        outs = run_all(session(model, "simulate"), self.batches, len(self.refs[0]) if self.refs else None)
        return all_fidelity(self.refs, outs, self.kinds, self.names)
