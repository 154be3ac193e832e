"""`lowbit auto`: the fastest mixed-precision model within an accuracy budget (or the most accurate within a
latency budget), from measurements on this machine. Stages: calibrate once (and once per other range method, for
the zero-cost candidates) -> profile every precision per layer -> each layer's error alone -> the zero-cost
candidates, measured -> the greedy chain -> bisection on measured accuracy / latency (then repair, trim, head to
head) -> write the choice."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..data import ImagePreprocess
from ..errors import LowbitError
from ..evaluate.bench import machine
from ..evaluate.jsonable import JsonResult, dumps
from ..evaluate.latency import interleaved_latency, paired_ratio
from ..graph.io import check_writable, load_proto
from ..graph.write import check_output_path, check_paths, write_together
from ..pipeline import quantize, reads, save
from ..plan import Plan
from ..recipe import Recipe
from ..runtimes.ort import cpu_has_vnni, run_all, session
from .assign import VARIANTS, Builder, Precision, find_layers
from .edges import cheapest_edge_run
from .flips import Flips, fragile, top_two
from .inputs import auto_writes, batches_of, check_budget, head, recipe_path, report_path, take
from .profile import profile
from .runcost import EdgeFit, elements, fit, fitting_assignments
from .score import Scorer
from .search import (
    CostModel,
    chain,
    contradicted,
    longest_within,
    measured_mixed,
    most_accurate_within,
    pareto,
    repair,
    shortest_passing,
    trim,
    trim_order,
)
from .sensitivity import sensitivities
from .variants import offer, tune


def _asdict(found: EdgeFit | None) -> dict[str, float]:
    return {} if found is None else dict(vars(found))


OFF_CHAIN = 10_000  # the first id of a point measured off the chain (tune, repair, trim), in the report


@dataclass
class AutoResult(JsonResult):
    """The chosen model and how it was found. `front`: the explored points not dominated on (score, latency,
    size); `points`: every assignment measured; `latency_ms[precision][layer]`: profiled medians."""

    model: onnx.ModelProto
    plan: Plan
    recipe: Recipe
    metric: str
    reference: float  # the float model's points
    score: float
    latency_ratio: float  # paired median, chosen / float, 1 thread
    size_bytes: int
    float_bytes: int
    budget: dict[str, Any]
    met: bool
    assignment: dict[str, str]
    step: int = 0  # the chosen point's place in the chain
    points: list[dict[str, Any]] = field(default_factory=list)
    front: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    conversion_ms: dict[str, float] = field(default_factory=dict)  # Q + DQ of each tensor, where unfused
    noise: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    cpu: str = ""
    run_cost: dict[str, float] = field(default_factory=dict)  # the fitted edge price (runcost.EdgeFit), if any
    samples: int = 0  # the --eval samples the score is measured on
    score_interval: list[float] | None = None  # 95% Wilson interval of a count metric (Scorer.interval)
    expected_drop: float | None = None  # count metrics: points expected lost on new samples (flips.expected_lost)
    output: Path | None = None
    _skip = ("model", "plan", "recipe", "output")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.assignment.values():
            out[p] = out.get(p, 0) + 1
        return out


def auto(
    model: str | Path | onnx.ModelProto,
    calib: Any,
    eval_data: Any,
    output: str | Path | None = None,
    *,
    max_drop: float | None = None,
    latency_budget: float | None = None,
    metric: str = "auto",
    labels: str | Path | Sequence[int] | np.ndarray | None = None,
    recipe: Recipe | str | Path | None = None,
    preprocess: ImagePreprocess | None = None,
    sensitivity_samples: int = 32,
    eval_limit: int | None = None,
    latency_rounds: int = 30,
    trim_steps: int = 40,
    repair_steps: int = 30,
    tune_steps: int = 24,
    edge_steps: int = 60,
    explore: int = 4,
    runs: int = 3,
    progress: bool = True,
) -> AutoResult:
    """Choose a precision (int8, int8 with 16-bit activations, int4 weights, float) per layer, measured here.

    `max_drop`: points (fraction x 100) of the metric the model may lose against float on `eval_data` (default 1);
    or `latency_budget`: the largest latency as a ratio to float's (1 thread, paired). With `output`, writes
    OUT.onnx + OUT.plan.json (together), OUT.recipe.json (rerun with `lowbit quantize --recipe`) and OUT.auto.json
    (the explored points, latency table and sensitivities).

    With an accuracy budget, the chosen point of the chain is then trimmed: up to `trim_steps` of its layers not at
    int8 are tried back at int8 one at a time, each kept only if the model still meets the budget, measured.
    With an accuracy budget, up to `edge_steps` single float runs from the model's edges (each prefix and suffix of
    the layers in graph order: one edge where they meet int8) are measured, cheapest by the cost model first, up to
    the estimate of a passing point found already; the first that passes is one more passing point (edges.py).
    With top-1 answers (class scores, or `labels`), a measured repair also searches from the base int8 model: up to
    `repair_steps` assignments, each the last plus the move that most lowers the expected flips of the answers the
    last one measured got wrong, per estimated ms.
    Before any of that, zero-cost candidates (variants.py: per layer, its output range by another calibration
    method, or its weights without the overflow guard; the same int8 kernels) are tried from the base, most
    estimated gain first, up to `tune_steps` of them, each measured and kept only if the model measures better
    (no lower score, and less output noise beyond chance, paired over the samples); the kept ones are the int8
    form every later stage starts from and returns to. 0 turns this off.
    Each passing point (chain, repair, edge run) is trimmed, and they run head to head (paired against float in
    the same interleaved rounds, twice `latency_rounds`): the fastest is written.
    `explore`: that many more chain points, evenly spaced, measured for the front.
    `runs`: the cost model prices a float run by its edges, fitted to profiles of float runs among int8 layers
    (runcost.py), and the searches may float up to that many contiguous layers in one move; 0: the per-tensor
    boundary cost and single-layer moves only."""
    t0 = time.perf_counter()
    budget = check_budget(max_drop, latency_budget)
    for name, value in (
        ("trim_steps", trim_steps),
        ("repair_steps", repair_steps),
        ("tune_steps", tune_steps),
        ("edge_steps", edge_steps),
        ("explore", explore),
        ("runs", runs),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LowbitError(f"{name} must be a whole number >= 0, got {value!r}")
    if isinstance(sensitivity_samples, bool) or not isinstance(sensitivity_samples, int) or sensitivity_samples < 1:
        raise LowbitError(f"sensitivity_samples must be a positive integer, got {sensitivity_samples!r}")
    if output is not None:
        check_output_path(output, [model] if isinstance(model, (str, Path)) else [])
        check_paths(
            auto_writes(output),
            [
                *reads(model, calib, recipe, None),
                ("evaluation data", eval_data),
                ("labels", labels if isinstance(labels, (str, Path)) else None),
            ],
        )
        check_writable(output)

    def tell(text: str) -> None:
        if progress:
            print(f"auto [{time.perf_counter() - t0:5.0f} s] {text}", file=sys.stderr, flush=True)

    float_model = load_proto(model)
    label_array = None
    if labels is not None:
        from ..evaluate.evaluate import load_labels

        label_array = load_labels(labels)
    batches = batches_of(eval_data, float_model, preprocess, eval_limit)
    scorer = Scorer(float_model, batches, metric, label_array)
    seconds: dict[str, float] = {}

    tell("calibrating the base int8 model ...")
    t = time.perf_counter()
    base = quantize(float_model, calib=calib, recipe=recipe, preprocess=preprocess, progress=progress)
    builder = Builder(float_model, base.plan, [])
    builder.layers = find_layers(float_model, base.plan)
    if not builder.layers:
        raise LowbitError("the base recipe quantizes no layer of this model, so there is no precision to choose")
    guarded = base.plan.overflow_guard
    if guarded and cpu_has_vnni():
        tell(
            f"the overflow guard narrowed weights in {len(guarded)} layers for x86 CPUs without VNNI; this CPU has "
            "VNNI, where it only adds rounding error: --no-overflow-guard if the model will not run on such CPUs"
        )
    if tune_steps > 0:
        offer(builder, calib, preprocess, tell=tell)
    seconds["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    feeds = head(batches, 1)[0]
    latency: dict[str, dict[str, float]] = {}
    boundary: dict[str, float] = {}
    totals: list[tuple[dict[str, Precision], float]] = []  # whole profiles, for the run cost's fit
    for p in ("int8", "int16", "int4", "float"):
        where = [x for x in builder.layers if p in builder.precisions(x)]
        if not where:
            continue
        tell(f"profiling every layer in {p} ({len(where)} layers) ...")
        built = builder.build(builder.everywhere(p))[0]
        times, conversions = profile(built, builder.layers, feeds)
        if p in ("int8", "float"):
            totals.append((builder.everywhere(p), sum(times.values()) + sum(conversions.values())))
        latency[p] = {x.node: times[x.node] for x in where}
        latency[p]["other"] = times["other"]
        if p == "int16" or not boundary:  # 16-bit: every tensor's Q and DQ run unfused, so each is timed
            boundary = conversions
    seconds["profile"] = time.perf_counter() - t

    t = time.perf_counter()
    wanted: dict[str, list[Precision]] = {}
    for x in builder.layers:
        # 16-bit activations only where they run faster than float: float is exact, so elsewhere they never win.
        own: list[Precision] = [
            p
            for p in builder.precisions(x)
            if p != "float" and (p != "int16" or latency["int16"][x.node] < latency["float"][x.node])
        ]
        wanted[x.node] = own + list(builder.offered.get(x.node, ()))
    # Top-1 answers flip where the float model's top two scores are close: errors alone are measured on those
    # samples, per sample, and the chain lowers the expected number of flips. Other metrics: the first samples.
    counts_top1 = scorer.metric in ("top1_agreement", "accuracy")
    if counts_top1:
        sens_batches = take(batches, fragile(scorer.refs[0], sensitivity_samples))  # sens_rows, below
    else:
        sens_batches = head(batches, sensitivity_samples)
    sens_rows = fragile(scorer.refs[0], sensitivity_samples) if counts_top1 else np.arange(0)
    sens_refs = run_all(session(float_model, "kernels"), sens_batches)
    chosen_by = "the evaluation samples closest to a flip" if counts_top1 else "the first evaluation samples"
    tell(f"measuring each layer's error alone on {sensitivity_samples} samples ({chosen_by}) ...")
    objective: Flips | None = None
    if counts_top1:
        first, second, margin = top_two(sens_refs[0])
        noise, gaps = sensitivities(builder, wanted, sens_batches, sens_refs, tell, (first, second))
        objective = Flips(builder.layers, margin, gaps)
    else:
        noise, _ = sensitivities(builder, wanted, sens_batches, sens_refs, tell)
    seconds["sensitivity"] = time.perf_counter() - t

    t = time.perf_counter()
    graph = float_model.graph
    cost = CostModel(
        builder.layers,
        {**latency, **dict.fromkeys(VARIANTS, latency["int8"])},  # the variants run the same int8 kernels
        boundary,
        frozenset(i.name for i in graph.input),
        frozenset(o.name for o in graph.output),
    )
    # Float layers among int8 ones cost more than their own time, mostly where a float run meets int8: profile
    # assignments with float runs of different lengths and fit a price per edge tensor (runcost.py); the first two
    # (every other layer float) also give the per-tensor mixed cost used when the fit is not possible.
    t = time.perf_counter()
    floats = [x.node for x in builder.layers if "float" in builder.precisions(x)]
    mixes = []
    fitting = fitting_assignments(floats, builder.everywhere) if len(floats) > 1 else []
    for i, mix in enumerate(fitting):
        tell(f"profiling float runs among int8 layers ({i + 1}/{len(fitting)}) ...")
        times, conversions = profile(builder.build(mix)[0], builder.layers, feeds)
        mixes.append((mix, times["other"], conversions))
        totals.append((mix, sum(times.values()) + sum(conversions.values())))
    cost.mixed = measured_mixed(cost, mixes[:2], latency["int8"]["other"])
    sizes = elements(
        float_model, sorted({t for x in builder.layers for t in x.tensors} | cost.sources | cost.sinks), feeds
    )
    edge_fit = fit(cost, sizes, totals) if runs > 0 else None
    if edge_fit is not None:
        cost.edge, cost.constant, cost.runs = edge_fit.price(sizes), edge_fit.constant, runs
        tell(
            f"run cost: {edge_fit.per_edge:.4f} ms per edge + {1e6 * edge_fit.per_element:.2f} ms per million "
            f"elements (fit residual {edge_fit.residual_ms:.3f} ms over {len(totals)} profiles)"
        )
    seconds["profile"] += time.perf_counter() - t
    t = time.perf_counter()
    estimate = objective if objective is not None else (lambda a: sum(noise[n][p] for n, p in a.items()))
    tuned: dict[str, Precision] = builder.everywhere("int8")
    fresh = iter(range(OFF_CHAIN, 10**9))  # ids of measured assignments off the chain (tune, trim, repair)
    float_session = session(float_model, "kernels", threads=1)
    points: dict[int, dict[str, Any]] = {}
    built_models: dict[int, tuple[onnx.ModelProto, Plan, Recipe]] = {}
    assignments: dict[int, dict[str, Precision]] = {}
    wrongs: dict[int, frozenset[int]] = {}  # each measured point's samples whose top-1 answer is not float's
    noise_rows: dict[int, np.ndarray] = {}  # and its output noise per sample

    def measure(k: int, assignment: dict[str, Precision] | None = None, stage: str = "chain") -> dict[str, Any]:
        """Build, score and time one assignment: step k of the chain, or (a trim trial) `assignment` as step k."""
        if k in points:
            return points[k]
        assignment = steps[k].assignment if assignment is None else assignment
        same = next((j for j, b in assignments.items() if b == assignment), None)
        if same is not None:  # measured already (the tuned start is the chain's step 0)
            points[k], wrongs[k] = {**points[same], "step": k, "stage": stage}, wrongs[same]
            noise_rows[k] = noise_rows[same]
            assignments[k], built_models[k] = assignments[same], built_models[same]
            return points[k]
        model_k, plan_k, recipe_k = builder.build(assignment)
        score = scorer.score(model_k)
        wrongs[k] = scorer.last_wrong
        noise_rows[k] = scorer.last_noise_rows
        times = interleaved_latency(
            {"float": float_session, "candidate": session(model_k, "kernels", threads=1)},
            feeds,
            runs=latency_rounds,
            warmup=2,
        )
        counts: dict[str, int] = {}
        for p in assignment.values():
            counts[p] = counts.get(p, 0) + 1
        points[k] = {
            "step": k,
            "stage": stage,
            "score": score,
            "drop": scorer.reference - score,
            "noise": scorer.last_noise,
            "expected_drop": scorer.last_expected,
            "latency_ratio": paired_ratio(times, "candidate", "float"),
            "size_bytes": model_k.ByteSize(),
            "estimated_ms": cost.ms(assignment),
            "estimated_noise": sum(noise[x.node][assignment[x.node]] for x in builder.layers),
            "estimated_flips": objective(assignment) if objective is not None else None,
            "precisions": counts,
            "changed": {n: p for n, p in assignment.items() if p != "int8"},  # layers not at int8
        }
        assignments[k] = dict(assignment)
        built_models[k] = (model_k, plan_k, recipe_k)
        pt = points[k]
        tell(
            f"{stage} {k}: {scorer.label} {score:.2f} (float {scorer.reference:.2f}), "
            f"{pt['latency_ratio']:.3f}x float latency, {pt['size_bytes'] / 1e6:.2f} MB, {counts}"
        )
        return pt

    def over(pt: dict[str, Any]) -> bool:
        return bool(pt["drop"] > budget["max_drop"] + 1e-9)

    def passes(pt: dict[str, Any]) -> bool:
        if over(pt):
            return False
        against = contradicted(pt, [q for q in points.values() if over(q)])
        if against is not None and "contradicted_by" not in pt:
            pt["contradicted_by"] = against
            tell(
                f"{pt['stage']} {pt['step']} is within the budget by count, but point {against}, faster and less "
                "noisy, is not: taken as the chance of these samples, not passed"
            )
        return against is None

    candidates = [(x.node, v) for x in builder.layers for v in builder.offered.get(x.node, ())]
    if candidates and tune_steps > 0:
        tell(f"trying zero-cost candidates (other int8 parameters per layer): up to {tune_steps}, each measured ...")

        def measured(a: dict[str, Precision]) -> tuple[float, np.ndarray]:
            pt = measure(next(fresh), a, "tune")
            return (round(-pt["score"], 9), noise_rows[pt["step"]])

        tuned = tune(tuned, candidates, estimate, measured, tune_steps)
    seconds["tune"] = time.perf_counter() - t
    t = time.perf_counter()
    steps = chain(cost, noise, objective, tuned)
    tell(f"searching a chain of {len(steps)} assignments ({scorer.label}) ...")
    if budget["kind"] == "accuracy":
        k = shortest_passing(len(steps), lambda i: passes(measure(i)))
        passing = [k] if passes(measure(k)) else []  # the passing points: the chain's first, the repair's
        if objective is not None and repair_steps > 0:
            flips = objective
            sens_index = {int(r): j for j, r in enumerate(sens_rows)}

            def wrong(a: dict[str, Precision]) -> frozenset[int] | None:
                i = next((j for j, b in assignments.items() if b == a), None)
                pt = measure(next(fresh), a, "repair") if i is None else points[i]
                return None if passes(pt) else wrongs[pt["step"]]

            def target(bad: frozenset[int]) -> Flips:
                rows = [sens_index[i] for i in sorted(bad) if i in sens_index]
                return flips.only(rows) if rows else flips  # no wrong answer among the measured samples: all

            tell(f"repairing from the base: up to {repair_steps} assignments, each measured ...")
            fixed = repair(cost, noise, tuned, wrong, target, repair_steps)
            if fixed is not None:
                passing.append(next(i for i in sorted(points, reverse=True) if assignments[i] == fixed))
        if edge_steps > 0:
            able = [x.node for x in builder.layers if "float" in builder.precisions(x)]
            cap = min((cost.ms(assignments[i]) for i in passing), default=float("inf"))
            tell(f"float runs from the model's edges: up to {edge_steps}, cheapest first, each measured ...")
            edge = cheapest_edge_run(
                cost, able, tuned, lambda a: passes(measure(next(fresh), a, "edge run")), edge_steps, cap
            )
            if edge is not None:
                passing.append(next(i for i in sorted(points, reverse=True) if assignments[i] == edge))
        if passing and trim_steps > 0:
            for j, start_k in enumerate(passing):
                start = assignments[start_k]
                order = trim_order(cost, noise, start, objective, tuned, spans=cost.runs > 0)

                def again(a: dict[str, Precision]) -> list[str | tuple[str, ...]]:
                    return trim_order(cost, noise, a, objective, tuned, spans=cost.runs > 0)

                tell(
                    f"trimming: up to {trim_steps} layers or spans tried back at int8 ({len(order)} now), measured ..."
                )
                best = trim(
                    start,
                    order,
                    lambda a: passes(measure(next(fresh), a, "trim")),
                    tuned,
                    again if cost.runs else None,
                    trim_steps,
                )
                passing[j] = next(i for i in sorted(points, reverse=True) if assignments[i] == best)
        distinct: dict[str, int] = {}  # the same assignment reached twice is one point
        for i in sorted(passing):
            distinct.setdefault(json.dumps(assignments[i], sort_keys=True), i)
        passing = sorted(distinct.values())
        met = bool(passing)
        if len(passing) > 1:
            # The cost model misjudges float layers among int8 ones (layout reorders): the passing points run
            # head to head, paired against float in the same interleaved rounds, and the faster is written.
            tell(f"timing the {len(passing)} passing points head to head ({2 * latency_rounds} paired rounds) ...")
            sessions = {str(i): session(built_models[i][0], "kernels", threads=1) for i in passing}
            sessions["float"] = float_session
            rounds = interleaved_latency(sessions, feeds, runs=2 * latency_rounds, warmup=2)
            for i in passing:
                points[i]["head_to_head_ratio"] = paired_ratio(rounds, str(i), "float")
            k = min(passing, key=lambda i: (points[i]["head_to_head_ratio"], i))
        elif passing:
            k = passing[0]
    else:
        found = longest_within(len(steps), lambda i: measure(i)["latency_ratio"] <= budget["ratio"])
        k = 0 if found is None else found
        met = found is not None
    # More of the chain's points, evenly spaced, for the front it prints: what the time between int8 and float buys.
    extra = [int(round(v)) for v in np.linspace(0, len(steps) - 1, explore + 2)[1:-1]]
    for i in sorted(set(extra) - set(points)):
        measure(i, stage="front")
    if budget["kind"] == "latency" and met:
        k = most_accurate_within(points, budget["ratio"], scorer.counted)
    seconds["search"] = time.perf_counter() - t
    chosen = measure(k)
    model_k, plan_k, recipe_k = built_models[k]
    every = [points[i] for i in sorted(points)]
    front = pareto(every, (("latency_ratio", -1), ("score", 1), ("size_bytes", -1)))
    seconds["total"] = time.perf_counter() - t0
    result = AutoResult(
        model_k,
        plan_k,
        recipe_k,
        scorer.label,
        scorer.reference,
        chosen["score"],
        chosen["latency_ratio"],
        chosen["size_bytes"],
        float_model.ByteSize(),
        budget,
        met,
        dict(assignments[k]),
        k,
        every,
        front,
        latency,
        boundary,
        noise,
        seconds,
        machine()["cpu"],
        run_cost=_asdict(edge_fit),
        samples=scorer.samples,
        score_interval=None if (ci := scorer.interval(chosen["score"])) is None else [round(v, 2) for v in ci],
        expected_drop=chosen["expected_drop"],
    )
    if output is not None:
        save(model_k, plan_k, output)
        text = {"recipe": recipe_k.to_json(), "report": dumps(result.to_dict())}
        write_together(
            [
                (recipe_path(output), text["recipe"].encode()),
                (report_path(output), text["report"].encode()),
            ]
        )
        result.output = Path(output)
    return result
