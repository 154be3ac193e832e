"""`lowbit auto` on EfficientNet-Lite0 with a 1-point budget, against NNCF's `quantize_with_accuracy_control`.

Data (real photographs, lowbit_zoo): calibration = 128 crops of the calibration photos (seed 0); the search's
evaluation data = 128 other crops of the same photos (seed 1); held-out = 1024 crops of the evaluation photos,
which neither tool sees (rounds before the ninth used the first 256 of them: too few to tell two points that
lose 2-3% of their answers apart). Both tools get the same calibration and search data and the same budget:
top-1 agreement with float may drop by at most 1 point on the search data (NNCF: max_drop=0.01, absolute, with a
validation function computing that agreement with ONNX Runtime's integer kernels).

Three stages, so that the slow ones can run apart (each writes its model and a JSON beside it in --out):
  python bench/auto.py lowbit [--max-drop 1 | --latency-budget 0.6] [--name NAME]   # lowbit auto
  python bench/auto.py nncf [--ranking-subset 64] [--max-iterations 40]             # NNCF accuracy control
  python bench/auto.py table [--rounds 60]       # every saved model: held-out agreement + paired latency, one run
  python bench/auto.py points --of NAME --steps 0,16   # more of a lowbit run's measured points, as table rows
  python bench/auto.py grouping [--regions 0-2,4-7]    # float layers in one run vs alone among int8: latency
  python bench/auto.py spans [--base onnxruntime]      # single float runs (prefixes, blocks, suffixes): answers
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import lowbit  # noqa: E402
from lowbit.auto.flips import expected_lost  # noqa: E402
from lowbit.auto.sensitivity import noise_per_sample  # noqa: E402
from lowbit.evaluate.bench import machine  # noqa: E402
from lowbit.evaluate.latency import interleaved_latency, paired_ratio  # noqa: E402
from lowbit.evaluate.metrics import fidelity  # noqa: E402
from lowbit.runtimes.ort import run_all, session  # noqa: E402
from lowbit_zoo.zoo import efficientnet_lite0_onnx, photo_crops  # noqa: E402

# Outside the repository: the float model is exported here too, so runs never share files with other checkouts.
ART = Path(tempfile.gettempdir()) / "lowbit-bench-auto"


def float_compute(model: onnx.ModelProto) -> int:
    """Conv/Gemm/MatMul nodes whose data input (input 0) is not the DequantizeLinear of an activation: the layers
    left float (MatMulNBits, int4 weight-only, is not counted)."""
    consts = {i.name for i in model.graph.initializer}
    dq_of_act = {
        o for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in consts for o in n.output
    }
    return sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[0] not in dq_of_act)


def data(args: argparse.Namespace) -> tuple[Path, np.ndarray, np.ndarray]:
    """The float model (exported into --out) and the calibration and search crops."""
    args.out.mkdir(parents=True, exist_ok=True)
    float_path = efficientnet_lite0_onnx(args.out / "efficientnet_lite0.onnx")
    return float_path, photo_crops(args.calib, "calib"), photo_crops(args.search, "calib", seed=1)


def batched_agreement(sess, x: np.ndarray, labels: np.ndarray) -> list[float]:
    """Per-sample 1.0/0.0: does the model's top-1 answer match `labels` (the float model's)? Batches of 32."""
    got = np.concatenate([sess.run(None, {"input": x[i : i + 32]})[0] for i in range(0, len(x), 32)])
    return [float(v) for v in got.argmax(1) == labels]


def run_nncf(args: argparse.Namespace) -> None:
    """NNCF's accuracy control, bounded by its own documented knobs (AdvancedAccuracyRestorerParameters): rank on
    a subset of the search data, revert at most --max-iterations groups. The validation function computes the
    same metric lowbit's search does (top-1 agreement with float, integer kernels, on all search crops)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    float_path, calib, search = data(args)
    refs = run_all(session(str(float_path)), [{"input": search}])[0].argmax(1)
    calls = {"n": 0, "seconds": 0.0}

    def validate(model: onnx.ModelProto, items) -> tuple[float, list[float]]:
        t = time.perf_counter()
        items = list(items)
        x = np.concatenate([xi for xi, _ in items])
        per = batched_agreement(session(model, "kernels", threads=1, spin=False), x, np.array([y for _, y in items]))
        calls["n"] += 1
        calls["seconds"] += time.perf_counter() - t
        return float(np.mean(per)), per

    calib_ds = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))], lambda x: {"input": x})
    val_ds = nncf.Dataset([(search[i : i + 1], int(refs[i])) for i in range(len(search))])
    knobs = {
        "ranking_subset_size": args.ranking_subset,
        "max_num_iterations": args.max_iterations,
        "num_ranking_workers": 1,
    }
    t = time.perf_counter()
    model = nncf.quantize_with_accuracy_control(
        onnx.load(str(float_path)),
        calib_ds,
        val_ds,
        validate,
        max_drop=args.max_drop / 100,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calib),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(**knobs),  # type: ignore[arg-type]
    )
    seconds = time.perf_counter() - t
    name = args.name or "NNCF accuracy control"
    save(args.out, name, model, {"seconds": seconds, "knobs": knobs, "validations": calls, "max_drop": args.max_drop})


def run_lowbit(args: argparse.Namespace) -> None:
    float_path, calib, search = data(args)
    budget = {"latency_budget": args.latency_budget} if args.latency_budget else {"max_drop": args.max_drop}
    name = args.name or "lowbit auto"
    t = time.perf_counter()
    out = args.out / f"{slug(name)}.scratch.onnx"
    recipe = base_recipe(args.base)
    r = lowbit.auto_quantize(
        str(float_path),
        calib,
        search,
        out,
        recipe=recipe,
        runs=args.runs,
        repair_steps=args.repair_steps,
        edge_steps=args.edge_steps,
        **budget,
    )
    seconds = time.perf_counter() - t
    info = {"seconds": seconds, "budget": r.budget, "base": args.base, "runs": args.runs}
    info |= {
        "repair_steps": args.repair_steps,
        "edge_steps": args.edge_steps,
        "auto": r.to_dict(),
    }
    save(args.out, name, r.model, info)
    t = time.perf_counter()
    base = lowbit.quantize(str(float_path), calib=calib, progress=False).model
    save(args.out, "lowbit int8 (default)", base, {"seconds": time.perf_counter() - t})


# Base recipes `auto` can start from (--base): all-int8 accuracy at no latency cost (the same int8 kernels).
BASES = {
    "default": {},
    "accurate": {"calibration": "layer_error"},
    "equalize": {"equalize": True},
    "adaround": {"adaround": True},
    "equalize+adaround": {"equalize": True, "adaround": True},
    "empirical_bias": {"empirical_bias_correction": True},
    # the target runtime's own forms: ONNX Runtime keeps an image stem and the depthwise conv after it float (its
    # float kernels are the faster ones there) and leaves Add scales as calibrated
    "onnxruntime": {"target": "onnxruntime"},
    "empirical_bias+onnxruntime": {"empirical_bias_correction": True, "target": "onnxruntime"},
    "accurate+onnxruntime": {"calibration": "layer_error", "target": "onnxruntime"},
    "equalize+onnxruntime": {"equalize": True, "target": "onnxruntime"},
    "accurate+empirical_bias+onnxruntime": {
        "calibration": "layer_error",
        "empirical_bias_correction": True,
        "target": "onnxruntime",
    },
    # without the u8 x s8 overflow guard (auto's --no-overflow-guard): for CPUs whose kernels cannot saturate
    "noguard+onnxruntime": {"avoid_overflow": False, "target": "onnxruntime"},
    "noguard+empirical_bias+onnxruntime": {
        "avoid_overflow": False,
        "empirical_bias_correction": True,
        "target": "onnxruntime",
    },
    "noguard+accurate+onnxruntime": {"avoid_overflow": False, "calibration": "layer_error", "target": "onnxruntime"},
    "noguard+adaround+onnxruntime": {"avoid_overflow": False, "adaround": True, "target": "onnxruntime"},
    "minmax": {"calibration": "minmax"},
    "percentile": {"calibration": "percentile"},
    "mse": {"calibration": "mse"},
    "no-overflow-guard": {"avoid_overflow": False},
}
RECIPE_LEVEL = ("equalize", "empirical_bias_correction", "target")  # Recipe options; the rest are Scheme options


def base_recipe(name: str) -> lowbit.Recipe:
    opts = dict(BASES[name])
    recipe_opts = {k: opts.pop(k) for k in RECIPE_LEVEL if k in opts}
    return lowbit.Recipe(default=lowbit.Scheme(**opts), **recipe_opts)


def bases(args: argparse.Namespace) -> None:
    """All-int8 top-1 agreement of each base recipe on the search crops and the held-out crops (kernels), the
    held-out answers lost and output noise, and how long its quantization took: the start `auto`'s search
    improves on, at int8 latency."""
    float_path, calib, search = data(args)
    heldout = photo_crops(args.heldout, "eval")
    fl = session(str(float_path))

    def batched(s, x: np.ndarray) -> np.ndarray:
        return run_all(s, [{"input": x[i : i + 32]} for i in range(0, len(x), 32)])[0]

    ref_held = batched(fl, heldout)
    refs = {"search": batched(fl, search).argmax(1), "heldout": ref_held.argmax(1)}
    for name in args.bases.split(","):
        t = time.perf_counter()
        m = lowbit.quantize(str(float_path), calib=calib, recipe=base_recipe(name), progress=False).model
        seconds = time.perf_counter() - t
        s = session(m, "kernels")
        flips = int(np.sum(batched(s, search).argmax(1) != refs["search"]))
        held = batched(s, heldout)
        lost = int(np.sum(held.argmax(1) != refs["heldout"]))
        agree = {"search": 1 - flips / len(search), "heldout": 1 - lost / len(heldout)}
        noise = float(np.mean(noise_per_sample([ref_held], [held])))
        if args.save_bases:  # a row of the table
            save(args.out, f"lowbit int8 ({name} base)", m, {"seconds": seconds, "base": name})
        print(
            f"| {name} | {agree['search']:.1%} ({flips} flips of {len(search)}) | {agree['heldout']:.1%} ({lost}) "
            f"| {1e3 * noise:.2f} | {seconds:.0f} s |",
            flush=True,
        )


def points(args: argparse.Namespace) -> None:
    """Save more of a `lowbit` run's measured points as rows of the table (--of NAME --steps 0,16): each is rebuilt
    from its assignment (the same base calibration and candidates), compared first on the chosen point with the
    saved model."""
    from lowbit.auto.assign import Builder, find_layers
    from lowbit.auto.variants import offer

    float_path, calib, _ = data(args)
    info = json.loads((args.out / f"{slug(args.of)}.json").read_text())
    run = info["auto"]
    model = onnx.load(str(float_path))
    base = lowbit.quantize(model, calib=calib, recipe=base_recipe(info.get("base", "default")), progress=False)
    builder = Builder(model, base.plan, find_layers(model, base.plan))
    offer(builder, calib, None)
    by_step = {p["step"]: p for p in run["points"]}

    def build(step: int) -> onnx.ModelProto:
        return builder.build({**builder.everywhere("int8"), **by_step[step]["changed"]})[0]

    chosen = onnx.load(str(args.out / f"{slug(args.of)}.onnx"))
    saved = {i.name: i.SerializeToString() for i in chosen.graph.initializer}
    again = build(run["step"]).graph.initializer
    differ = [i.name for i in again if saved.get(i.name) != i.SerializeToString()]
    # Measured: a rebuild in another process can differ in a few Add-related scales (~1e-7 relative, the portable
    # target's Add nudge); the table measures every rebuilt row again, on the search crops too.
    print(f"the chosen point rebuilt: {len(differ)} of {len(again)} initializers differ from the saved one", differ[:3])
    for step in (int(s) for s in args.steps.split(",")):
        p = by_step[step]
        name = f"{args.of}, {p['stage']} point {step}"
        save(args.out, name, build(step), {"seconds": 0.0, "point": p})
        print(f"saved {name}: search {p['score']:.1f}%, {len(p['changed'])} layers not at plain int8", flush=True)


def grouping(args: argparse.Namespace) -> None:
    """Does a float layer cost less inside a contiguous float run than alone among int8 layers? For a region of
    blocks: all its layers float (one run), then every other layer float, then the others (each alone among int8
    neighbours). With additive costs the two halves add up to the run; what they cost beyond it is what the
    boundaries (Q/DQ, per-channel DQ, layout reorders) add. Paired latency against float, 1 thread."""
    from lowbit.auto.assign import Builder, find_layers

    float_path, calib, _ = data(args)
    model = onnx.load(str(float_path))
    base = lowbit.quantize(model, calib=calib, progress=False)
    builder = Builder(model, base.plan, find_layers(model, base.plan))
    int8 = builder.everywhere("int8")
    sessions = {"float": session(str(float_path), threads=1), "int8": session(builder.build(int8)[0], threads=1)}
    regions = {}
    for region in args.regions.split(","):
        lo, hi = (int(b) for b in region.split("-"))
        names = [
            x.node
            for x in builder.layers
            if any(f"/_blocks.{b}/" in x.node for b in range(lo, hi + 1)) and "float" in builder.precisions(x)
        ]
        regions[region] = names
        for label, part in (("run", names), ("odd", names[0::2]), ("even", names[1::2])):
            sessions[f"{region} {label}"] = session(
                builder.build({**int8, **dict.fromkeys(part, "float")})[0], threads=1
            )
    times = interleaved_latency(sessions, {"input": calib[:1]}, runs=args.rounds, warmup=3)
    ratio = {k: paired_ratio(times, k, "float") for k in sessions}
    float_ms = 1e3 * float(np.median(times["float"]))
    print(f"float {float_ms:.2f} ms/crop, 1 thread, {args.rounds} paired rounds")
    print(f"int8: {ratio['int8']:.3f}x float\n")
    cost, fitted = fitted_cost(model, builder, calib[:1])
    if fitted is not None:
        print(
            f"run cost fit: {fitted.per_edge:.4f} ms per edge + {1e6 * fitted.per_element:.3f} ms per million elements,"
            f" constant {fitted.constant:.3f} ms, residual {fitted.residual_ms:.3f} ms (profiles, not paired runs)\n"
        )

    def predicted(part: list[str]) -> float:  # added latency (x float) the fitted cost model predicts
        return (cost.ms({**int8, **dict.fromkeys(part, "float")}) - cost.ms(int8)) / float_ms

    print(
        "| blocks | layers float | one run: added (fit predicts) | every other, alone: added, two halves (fit) "
        "| halves / run |"
    )
    print("|---|---|---|---|---|")
    for region, names in regions.items():
        run = ratio[f"{region} run"] - ratio["int8"]
        halves = ratio[f"{region} odd"] + ratio[f"{region} even"] - 2 * ratio["int8"]
        fit_run, fit_halves = predicted(names), predicted(names[0::2]) + predicted(names[1::2])
        print(
            f"| {region} | {len(names)} | {run:+.3f}x ({fit_run:+.3f}x) | {halves:+.3f}x ({fit_halves:+.3f}x) "
            f"| {halves / run if run else float('nan'):.2f} |"
        )


def block(node: str) -> int:
    """EfficientNet-Lite0's block of a layer; the head (conv, pool, classifier) is block 16."""
    return int(node.split("/_blocks.")[1].split("/")[0]) if "/_blocks." in node else 16


def span_setup(args: argparse.Namespace) -> tuple:
    """What `spans` and auto_holes.py measure on: (float model path, calib, search and held-out crops, the float
    model, a Builder on the base's plan, the all-int8 assignment, the layers that can stay float)."""
    from lowbit.auto.assign import Builder, find_layers

    float_path, calib, search = data(args)
    heldout = photo_crops(args.heldout, "eval")
    model = onnx.load(str(float_path))
    base = lowbit.quantize(model, calib=calib, recipe=base_recipe(args.base), progress=False)
    builder = Builder(model, base.plan, find_layers(model, base.plan))
    int8 = builder.everywhere("int8")
    able = [x.node for x in builder.layers if "float" in builder.precisions(x)]
    return float_path, calib, search, heldout, model, builder, int8, able


def measure_runs(setup: tuple, runs: dict[str, list[str]]) -> tuple[dict, dict, dict]:
    """Each float run on the all-int8 model: (layers, lost search and held-out answers with integer kernels), a
    1-thread session of each (and of float, for paired latency), and each model."""
    float_path, _, search, heldout, _, builder, int8, _ = setup
    fl = session(str(float_path))
    refs = {k: run_all(fl, [{"input": x}])[0].argmax(1) for k, x in (("search", search), ("heldout", heldout))}
    sessions = {"float": session(str(float_path), threads=1)}
    found, models = {}, {}
    for name, part in runs.items():
        m = builder.build({**int8, **dict.fromkeys(part, "float")})[0]
        kernels = session(m, "kernels")
        lost = {
            k: len(x) - int(sum(batched_agreement(kernels, x, refs[k])))
            for k, x in (("search", search), ("heldout", heldout))
        }
        found[name], models[name] = (len(part), lost), m
        sessions[name] = session(m, threads=1)
        print(f"{name}: {len(part)} float, lost search {lost['search']}, held-out {lost['heldout']}", flush=True)
    return found, sessions, models


def spans(args: argparse.Namespace) -> None:
    """What one contiguous float run alone buys on the base: float prefixes (the target's float stem extended
    through block k), single blocks, pairs of blocks and suffixes (block k to the classifier), each counted in lost
    search answers and held-out answers (kernels), with its latency paired against float in one interleaved run
    and what the fitted run cost predicts it adds."""
    s = span_setup(args)
    float_path, calib, search, heldout, model, builder, int8, able = s
    last = max(block(n) for n in able)
    runs: dict[str, list[str]] = {"int8": []}
    for k in range(0, 8):
        runs[f"prefix 0-{k}"] = [n for n in able if block(n) <= k]
    for b in range(1, last + 1):
        runs[f"block {b}"] = [n for n in able if block(n) == b]
    for b in range(1, last):
        runs[f"blocks {b}-{b + 1}"] = [n for n in able if b <= block(n) <= b + 1]
    for k in range(11, last + 1):
        runs[f"suffix {k}-head"] = [n for n in able if block(n) >= k]
    found, sessions, _ = measure_runs(s, runs)
    cost, _ = fitted_cost(model, builder, calib[:1])
    times = interleaved_latency(sessions, {"input": calib[:1]}, runs=args.rounds, warmup=3)
    ratio = {k: paired_ratio(times, k, "float") for k in sessions}
    float_ms = 1e3 * float(np.median(times["float"]))
    print(f"\nfloat {float_ms:.2f} ms/crop, 1 thread, {args.rounds} paired rounds; int8 {ratio['int8']:.3f}x\n")
    print(
        "| float run | layers | lost search answers (of 128) | lost held-out (of 256) | latency vs float | fit adds |"
    )
    print("|---|---|---|---|---|---|")
    for name, (n, lost) in found.items():
        fit_adds = (cost.ms({**int8, **dict.fromkeys(runs[name], "float")}) - cost.ms(int8)) / float_ms
        print(
            f"| {name} | {n} | {lost['search']} | {lost['heldout']} | {ratio[name]:.3f}x | {fit_adds:+.3f}x |",
            flush=True,
        )


def fitted_cost(model: onnx.ModelProto, builder, x: np.ndarray):
    """The run cost auto fits (runcost.py), from the same profiles `auto` takes (int8, float, float runs)."""
    from lowbit.auto.profile import profile
    from lowbit.auto.runcost import elements, fit, fitting_assignments
    from lowbit.auto.search import CostModel

    feeds = {"input": x}
    latency, totals = {}, []
    for p in ("int8", "float"):
        a = builder.everywhere(p)
        times, conv = profile(builder.build(a)[0], builder.layers, feeds)
        latency[p] = times
        totals.append((a, sum(times.values()) + sum(conv.values())))
    cost = CostModel(builder.layers, latency, {}, frozenset({"input"}), frozenset(o.name for o in model.graph.output))
    floats = [x.node for x in builder.layers if "float" in builder.precisions(x)]
    for a in fitting_assignments(floats, builder.everywhere):
        times, conv = profile(builder.build(a)[0], builder.layers, feeds)
        totals.append((a, sum(times.values()) + sum(conv.values())))
    sizes = elements(model, sorted({t for x in builder.layers for t in x.tensors} | cost.sources | cost.sinks), feeds)
    found = fit(cost, sizes, totals)
    if found is not None:
        cost.edge, cost.constant = found.price(sizes), found.constant
    return cost, found


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def save(out: Path, name: str, model: onnx.ModelProto, info: dict) -> None:
    onnx.save(model, str(out / f"{slug(name)}.onnx"))
    (out / f"{slug(name)}.json").write_text(json.dumps({"name": name, **info}, indent=1, default=str))


def table(args: argparse.Namespace) -> None:
    """Every saved model, measured in one run: search and held-out agreement (kernels and simulation), size,
    float layers, and latency paired against float at 1 thread (interleaved rounds)."""
    float_path, _, search = data(args)
    heldout = photo_crops(args.heldout, "eval")
    found = sorted(p for p in args.out.glob("*.json") if p.with_suffix(".onnx").exists())
    infos = [json.loads(p.read_text()) for p in found]
    models = {i["name"]: onnx.load(str(p.with_suffix(".onnx"))) for i, p in zip(infos, found)}
    batches = [{"input": heldout[i : i + 32]} for i in range(0, len(heldout), 32)]
    sbatches = [{"input": search[i : i + 32]} for i in range(0, len(search), 32)]
    ref = run_all(session(str(float_path)), batches)[0]
    sref = run_all(session(str(float_path)), sbatches)[0]
    sessions = {"float": session(str(float_path), threads=1)}
    rows = []
    for info in infos:
        m = models[info["name"]]
        held = run_all(session(m, "kernels"), batches)[0]
        kern = fidelity(ref, held)
        sim = fidelity(ref, run_all(session(m, "simulate"), batches)[0])
        sout = run_all(session(m, "kernels"), sbatches)[0]
        skern = fidelity(sref, sout)
        rows.append(
            {
                "tool": info["name"],
                "search_top1": skern["top1_agreement"],
                # what `auto` reports as expected on new samples, from the search crops alone
                "search_expected_drop": 100.0 * expected_lost(sref, sout) / len(search),
                "heldout_top1_kernels": kern["top1_agreement"],
                "heldout_top1_simulation": sim["top1_agreement"],
                "heldout_cosine": kern["cosine"],
                "heldout_lost": int(np.sum(held.argmax(1) != ref.argmax(1))),
                # output noise per crop, |int8 - float|^2 / |float|^2: continuous, so it separates models whose
                # lost answers differ by chance
                "heldout_noise": float(np.mean(noise_per_sample([ref], [held]))),
                "mb": m.ByteSize() / 1e6,
                "seconds": info.get("seconds", 0.0),
                "float_nodes": float_compute(m),
            }
        )
        sessions[info["name"]] = session(m, threads=1)
    times = interleaved_latency(sessions, {"input": heldout[:1]}, runs=args.rounds, warmup=3)
    for row in rows:
        row["latency_ratio"] = paired_ratio(times, row["tool"], "float")
        row["ms"] = 1e3 * float(np.median(times[row["tool"]]))
    float_ms = 1e3 * float(np.median(times["float"]))
    out = {"rows": rows, "float_ms": float_ms, "cpu": machine()["cpu"], "rounds": args.rounds}
    (args.out / "table.results").write_text(json.dumps(out, indent=1))
    print(f"CPU {out['cpu']}; float {float_ms:.2f} ms/crop at 1 thread; {args.rounds} paired rounds\n")
    print(
        f"| tool | top-1 agreement, search data (kernels) | expected drop from the search data | held-out, kernels "
        f"(lost of {len(heldout)}) | held-out noise (1e-3) | held-out, simulation | latency vs float (1 thread) | "
        "size MB | Conv/Gemm left float | time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tool']} | {r['search_top1']:.1%} | {r['search_expected_drop']:.1f} points | "
            f"{r['heldout_top1_kernels']:.1%} ({r['heldout_lost']}) | "
            f"{1e3 * r['heldout_noise']:.2f} | "
            f"{r['heldout_top1_simulation']:.1%} | {r['latency_ratio']:.3f}x ({r['ms']:.2f} ms) | {r['mb']:.2f} | "
            f"{r['float_nodes']} | {r['seconds']:.0f} s |"
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["lowbit", "nncf", "table", "bases", "points", "grouping", "spans"])
    ap.add_argument("--out", type=Path, default=ART, help="folder of the saved models (default: %(default)s)")
    ap.add_argument("--name", help="the row's name (default: the tool's)")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--search", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=1024)
    ap.add_argument("--max-drop", type=float, default=1.0, help="points of top-1 agreement (both tools)")
    ap.add_argument("--latency-budget", type=float, help="lowbit: a latency budget instead of --max-drop")
    ap.add_argument("--ranking-subset", type=int, default=64, help="NNCF: ranking_subset_size")
    ap.add_argument("--max-iterations", type=int, default=40, help="NNCF: max_num_iterations (groups reverted)")
    ap.add_argument("--rounds", type=int, default=60, help="table: paired latency rounds")
    ap.add_argument("--base", default="default", choices=sorted(BASES), help="lowbit: auto's base recipe")
    ap.add_argument("--runs", type=int, default=3, help="lowbit: auto's --runs (0: per-tensor cost, single moves)")
    ap.add_argument("--repair-steps", type=int, default=30, help="lowbit: auto's repair_steps (models measured)")
    ap.add_argument("--edge-steps", type=int, default=60, help="lowbit: auto's edge_steps (float runs from the edges)")
    ap.add_argument("--save-bases", action="store_true", help="bases: save each model as a row of the table")
    ap.add_argument("--bases", default=",".join(BASES), help="bases: the base recipes to measure (comma-separated)")
    ap.add_argument("--regions", default="0-2,4-7,12-15", help="grouping: block ranges (first-last, comma-separated)")
    ap.add_argument("--of", help="points: the lowbit row whose points to save")
    ap.add_argument("--steps", default="0", help="points: the step ids to save (comma-separated)")
    args = ap.parse_args()
    {
        "lowbit": run_lowbit,
        "nncf": run_nncf,
        "table": table,
        "bases": bases,
        "points": points,
        "grouping": grouping,
        "spans": spans,
    }[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
