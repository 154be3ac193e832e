"""CPU cost of quantizing EfficientNet-Lite0: lowbit's default `quantize` vs onnxruntime's `quantize_static` MinMax.

Each run is a fresh process; CPU = user + sys seconds of that process (all its threads, `time.process_time`)
around the quantization call only (imports, model download and crops are done before). ORT follows
`bench/ort_baseline.py`: `quant_pre_process`, then `quantize_static` (QDQ, QUInt8 activations, QInt8
per-channel weights, MinMax, reduce_range=False) fed one sample at a time; its CPU is reported for both steps.
Both quantizers see the same calibration crops (`photo_crops(64, 'calib', 0)`, saved once as .npz; lowbit reads
the file the way `bench/run.py` does). `--model NAME` takes a model of the real-world corpus instead (`make corpus`)
with its calibration feeds. Runs alternate between the kinds, `--reps` times each.

Kinds (`--kinds`, default all four):
- `lowbit`: `lowbit.quantize()` in process, CPU around the call only (as above);
- `ort`: ORT's `quant_pre_process` + `quantize_static`, CPU around those calls only;
- `cli`: the default command, `lowbit quantize M.onnx -o OUT --calib M.calib.npz --quiet --verbose` (kernels-vs-
  simulation check on 32 samples, speed check, lint, files written), whole process: interpreter start, imports and
  all (user + sys of the child from `wait4`);
- `cli-nospeed`: the same with `--no-speed-check`;
- `cli-base` (not in the default list): the default command of another checkout (`--base DIR`, e.g. a `git archive`
  export of the parent commit), so before and after alternate in one run on a shared machine.
Children read compiled bytecode (each checkout's `__pycache__`, compiled before the first run), as an installed
lowbit and ORT's own modules in site-packages do; `--no-bytecode` leaves PYTHONDONTWRITEBYTECODE as the caller set it
(then every run compiles a checkout's ~100 modules from source, ~0.1 s CPU).
Every kind also reports its whole process's CPU (`proc_cpu_s`: the `lowbit`/`ort` children include their imports
and the crops' loading), which is the like-for-like number for `cli`.
The model and its calibration file are made in a child process, so this process stays small: Linux carries a
parent's resident size into a child's peak RSS (`ru_maxrss` survives fork and exec), and until 2026-12-06 every
`cli` run's "peak RSS" on the YOLO head was this process's 435 MiB. Children get an absolute PYTHONPATH (they run in
the work folder) and the lowbit each kind imports is printed first; before that fix a relative `src:examples`
named nothing there, and `cli` runs measured whatever lowbit was installed.

Usage (from the repository root; lowbit is whatever `import lowbit` finds, so PYTHONPATH picks the checkout):
    PYTHONPATH=src:examples .venv/bin/python bench/cost.py [--reps 3] [--n 64] [--only lowbit|ort] [--model NAME]
        [--out cost.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ort_peer import ort_static  # bench/ is on sys.path: scripts run from it

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(kind: str, work: Path, name: str) -> dict:
    model, calib = work / f"{name}.onnx", work / f"{name}.calib.npz"
    if kind == "lowbit":
        import lowbit
        from lowbit import quantize  # lowbit loads its pipeline lazily: import it before timing

        c0, t0 = time.process_time(), time.perf_counter()
        res = quantize(str(model), calib=str(calib), progress=False)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        return {
            "kind": kind,
            "version": lowbit.__file__,
            "cpu_s": cpu,
            "wall_s": wall,
            "timings": res.timings,
            # The outputs' bytes: the same before and after a speed-up, or the speed-up changed results.
            "model_sha256": hashlib.sha256(res.model.SerializeToString()).hexdigest(),
            "plan_sha256": hashlib.sha256(res.plan.to_json().encode()).hexdigest(),
            "peak_rss_mib": _peak_rss_mib(),
        }
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with np.load(calib) as z:
        x = {k: z[k] for k in z.files}

    n = len(next(iter(x.values())))
    feeds = [{k: v[i : i + 1] for k, v in x.items()} for i in range(n)]

    pre, out = work / "ort.pre.onnx", work / "ort.qdq.onnx"
    c0, t0 = time.process_time(), time.perf_counter()
    try:
        quant_pre_process(str(model), str(pre))
        pre_failed = ""
    except Exception as e:  # it fails on many third-party models (symbolic shape inference): quantize as is
        pre, pre_failed = model, str(e).splitlines()[0]
    c1 = time.process_time()
    ort_static(pre, feeds, out, "MinMax")
    c2, wall = time.process_time(), time.perf_counter() - t0
    return {
        "kind": kind,
        "cpu_s": c2 - c0,
        "cpu_pre_process_s": c1 - c0,
        "cpu_quantize_static_s": c2 - c1,
        "pre_process_failed": pre_failed,
        "wall_s": wall,
        "peak_rss_mib": _peak_rss_mib(),
    }


def prepare_model(name: str, n: int, work: Path) -> None:
    """work/NAME.onnx and work/NAME.calib.npz (one array per input, samples stacked on axis 0)."""
    import shutil

    if name == "efficientnet_lite0":
        from lowbit_zoo import zoo

        zoo.efficientnet_lite0_onnx(work / f"{name}.onnx")
        np.savez(work / f"{name}.calib.npz", input=zoo.photo_crops(n, "calib", 0))
        return
    from lowbit_zoo.corpus.registry import BY_NAME
    from lowbit_zoo.corpus.wheels import ROOT

    entry = BY_NAME[name]
    model = entry.get(ROOT)
    shutil.copyfile(model, work / f"{name}.onnx")
    feeds = entry.calib(model, n)
    np.savez(work / f"{name}.calib.npz", **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})


KINDS = ["lowbit", "ort", "cli", "cli-nospeed"]  # and "cli-base" (--base): the command of another checkout


def run_child(kind: str, work: Path, name: str, base: Path | None = None, bytecode: bool = True) -> dict:
    """One run in a fresh process; adds the whole process's user+sys CPU and peak RSS (from wait4). `cli-base` is
    the default command of the checkout at `base` (its src and examples first on PYTHONPATH)."""
    if kind.startswith("cli"):
        out_model = work / "cli.qdq.onnx"
        cmd = [sys.executable, "-m", "lowbit.cli.main", "quantize", str(work / f"{name}.onnx"), "-o", str(out_model)]
        cmd += ["--calib", str(work / f"{name}.calib.npz"), "--quiet", "--verbose"]
        cmd += ["--no-speed-check"] if kind == "cli-nospeed" else []
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--workdir", str(work), "--model", name]
    env = child_env(kind, base, bytecode)
    t0 = time.perf_counter()
    with open(work / "child.out", "w+") as fo, open(work / "child.err", "w+") as fe:
        # wait4, not Popen.wait: it returns the child's own rusage (RUSAGE_CHILDREN would sum every child so far)
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=work, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
        wall = time.perf_counter() - t0
        fo.seek(0), fe.seek(0)
        out, err = fo.read(), fe.read()
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{err[-2000:]}")
    proc_cpu = usage.ru_utime + usage.ru_stime
    split = {"proc_user_s": usage.ru_utime, "proc_sys_s": usage.ru_stime}
    if not kind.startswith("cli"):
        r = json.loads(out.strip().splitlines()[-1])
        r.update(proc_cpu_s=proc_cpu, proc_peak_rss_mib=usage.ru_maxrss / 1024, **split)
        return r
    stages = next(line for line in out.splitlines() if line.startswith("stages: "))
    timings = {k: float(v.split()[0]) for k, v in map(_stage, stages[len("stages: ") :].split(", "))}
    data = out_model.read_bytes()
    plan = out_model.with_suffix(".plan.json").read_bytes()
    return {
        "kind": kind,
        "cpu_s": proc_cpu,
        "proc_cpu_s": proc_cpu,
        "wall_s": wall,
        "timings": timings,
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "plan_sha256": hashlib.sha256(plan).hexdigest(),
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "summary": out,
        **split,
    }


def absolute_pythonpath() -> list[Path]:
    """PYTHONPATH's entries made absolute (in os.environ too, for every child), from the current folder. Children run
    in the work folder, where a relative PYTHONPATH (`src:examples`) named nothing: they imported whatever lowbit was
    installed (an editable install of another checkout) instead of the one to measure."""
    roots = [Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(map(str, roots))
    return roots


def child_env(kind: str, base: Path | None, bytecode: bool) -> dict[str, str]:
    """Children run in the work folder (see main), with an absolute PYTHONPATH: this checkout's, or the base's."""
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if kind == "cli-base":
        if base is None:
            raise SystemExit("kind cli-base needs --base CHECKOUT (a folder with the src/ and examples/ to compare)")
        paths = [str(base / "src"), str(base / "examples")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(Path(p).resolve()) for p in paths if p)}
    return {**env, **(bytecode_env() if bytecode else {})}


def which_lowbit(kind: str, base: Path | None, bytecode: bool) -> str:
    """The lowbit a kind's children import (printed before the runs: a wrong PYTHONPATH shows here)."""
    cmd = [sys.executable, "-c", "import lowbit; print(lowbit.__file__)"]
    return subprocess.run(cmd, env=child_env(kind, base, bytecode), capture_output=True, text=True).stdout.strip()


def bytecode_env() -> dict[str, str]:
    """Children read and write compiled bytecode (`__pycache__`, git-ignored), as an installed lowbit and ORT's
    tools in site-packages do: with PYTHONDONTWRITEBYTECODE set, a checkout's ~100 modules were compiled from source
    in every run (~0.1 s CPU). (Not PYTHONPYCACHEPREFIX: with it Python ignores every `__pycache__`, site-packages'
    too, and the first run would compile all of numpy, onnx and sympy.)"""
    return {"PYTHONDONTWRITEBYTECODE": ""}  # empty: unset


def compile_sources(roots: list[Path]) -> None:
    """Compile every checkout measured (`roots`: its src and examples) before any timed run."""
    dirs = [str(r) for r in roots if r.is_dir()]
    if not dirs:  # without arguments compileall would compile every folder on sys.path
        return
    env = {**os.environ, **bytecode_env()}
    cmd = [sys.executable, "-m", "compileall", "-q", *dirs]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def _stage(part: str) -> tuple[str, str]:
    """'speed check 1.12 s' -> ('speed check', '1.12 s')."""
    words = part.split()
    return " ".join(words[:-2]), " ".join(words[-2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=64, help="calibration crops")
    ap.add_argument("--only", choices=KINDS, help="one kind only (same as --kinds KIND)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, run in this order each rep")
    ap.add_argument("--workdir", default="/tmp/lowbit_cost")
    ap.add_argument("--out", help="write every run's numbers here (JSON)")
    ap.add_argument(
        "--model",
        default="efficientnet_lite0",
        help="efficientnet_lite0, or a model of the real-world corpus (lowbit_zoo.corpus.registry; `make corpus`)",
    )
    ap.add_argument("--base", help="for kind cli-base: a checkout (or `git archive` export) to measure alongside")
    ap.add_argument(
        "--no-bytecode",
        action="store_true",
        help="children compile the checkouts' sources in every run (PYTHONDONTWRITEBYTECODE as the caller set it)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir).resolve()  # children run in it (run_child)
    if args.worker:
        print(json.dumps(worker(args.worker, work, args.model)))
        return
    if args.prepare:
        work.mkdir(parents=True, exist_ok=True)
        prepare_model(args.model, args.n, work)
        return
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.base).resolve() if args.base else None
    bytecode = not args.no_bytecode
    roots = absolute_pythonpath()  # before the chdir below
    roots += [base / "src", base / "examples"] if base is not None else []
    # Everything runs in the work folder: ORT's tools leave <uuid>.data files in the working directory on some
    # models (DBNet), which would otherwise land in the checkout. Import paths are made absolute first.
    sys.path[:] = [str(Path(p).resolve()) if p else p for p in sys.path]
    os.chdir(work)
    # In a child of its own: a process's peak RSS (`wait4`'s ru_maxrss) starts at its parent's resident size when
    # it is started (Linux carries the high-water mark across fork and exec), so this process stays small. Made
    # here, the YOLO head's crops and corpus imports (435 MiB) were every `cli` run's "peak RSS".
    prep = [sys.executable, str(Path(__file__).resolve()), "--prepare", "--workdir", str(work), "--model", args.model]
    subprocess.run([*prep, "--n", str(args.n)], check=True)
    if bytecode:
        compile_sources(roots)
    kinds = [args.only] if args.only else args.kinds.split(",")
    for kind in kinds:
        print(f"{kind:11s} imports {which_lowbit(kind, base, bytecode)}", flush=True)
    runs: list[dict] = []
    for rep in range(args.reps):
        for kind in kinds:
            r = run_child(kind, work, args.model, base, bytecode)
            runs.append(r)
            extra = (
                f" timings {json.dumps({k: round(v, 2) for k, v in r['timings'].items()})}" if "timings" in r else ""
            )
            print(
                f"rep {rep + 1} {kind:11s} cpu {r['cpu_s']:6.2f} s (process {r['proc_cpu_s']:6.2f} s: user "
                f"{r['proc_user_s']:.2f} sys {r['proc_sys_s']:.2f})  wall "
                f"{r['wall_s']:6.2f} s  peak RSS {r['peak_rss_mib']:.0f} MiB{extra}",
                flush=True,
            )
            if "model_sha256" in r:
                print(f"      model sha256 {r['model_sha256'][:16]}  plan sha256 {r['plan_sha256'][:16]}", flush=True)
    for kind in kinds:
        mine = [r for r in runs if r["kind"] == kind]
        cpu, proc, wall = ([r[k] for r in mine] for k in ("cpu_s", "proc_cpu_s", "wall_s"))
        print(
            f"{kind:11s} cpu {min(cpu):.2f}-{max(cpu):.2f} s  process cpu {min(proc):.2f}-{max(proc):.2f} s  "
            f"wall {min(wall):.2f}-{max(wall):.2f} s  ({len(cpu)} runs)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
