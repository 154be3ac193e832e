"""Accuracy measurements for bench/run.py: fidelity of a quantized model to the float model on the eval crops,
with ONNX Runtime's integer kernels and as float simulation, and under emulated AVX2-without-VNNI kernels."""

from __future__ import annotations

import time

from memory import peak_rss_kib


def fidelity_block(float_path, qpath, evalx):
    """Float logits and the quantized model's fidelity (kernels, simulation, kernels vs simulation), batch 32."""
    from lowbit.evaluate.metrics import fidelity
    from lowbit.runtimes.ort import run_all, session

    bs = 32
    batches = [{"input": evalx[i : i + bs]} for i in range(0, len(evalx), bs)]
    ref = run_all(session(str(float_path), "kernels"), batches)[0]
    kern = run_all(session(str(qpath), "kernels"), batches)[0]
    sim = run_all(session(str(qpath), "simulate"), batches)[0]
    return ref, {"kernels": fidelity(ref, kern), "simulate": fidelity(ref, sim), "kern_vs_sim": fidelity(sim, kern)}


def emulate(job: dict) -> dict:
    """One quantized model under the emulated non-VNNI AVX2 kernels: fidelity against the float logits on the
    first n eval crops (one crop per run), and saturation_report summed over the first n_sat crops.
    Runs in a worker process."""
    import numpy as np
    import onnx

    from lowbit.evaluate.metrics import fidelity
    from lowbit.runtimes.emulate import run_emulated, saturation_report

    model = onnx.load(job["model"])  # loaded once; run_emulated re-plans per call (a few % of a run)
    evalx = np.load(job["eval_npy"], mmap_mode="r")
    ref = np.load(job["ref_npy"])[: job["n"]]
    t = time.perf_counter()
    out = np.concatenate(
        [run_emulated(model, {"input": np.array(evalx[i : i + 1])}, saturate=True)[0] for i in range(job["n"])]
    )
    run_s = time.perf_counter() - t
    t = time.perf_counter()
    rep = saturation_report(model, ({"input": np.array(evalx[i : i + 1])} for i in range(job["n_sat"])))
    sat_s = time.perf_counter() - t
    tot = {k: int(sum(v[k] for v in rep.values())) for k in ("pairs_total", "pairs_saturated", "outputs_affected")}
    worst = sorted(((v["pairs_saturated"], k) for k, v in rep.items() if v["pairs_saturated"]), reverse=True)[:3]
    return {
        "n": job["n"],
        "fid": fidelity(ref, out.reshape(len(ref), -1)),
        "n_sat": job["n_sat"],
        "saturation": tot,
        "int_ops": len(rep),
        "ops_saturating": sum(1 for v in rep.values() if v["pairs_saturated"]),
        "worst_ops": [[k, c] for c, k in worst],
        "run_s": run_s,
        "report_s": sat_s,
        "rss_peak_kib": peak_rss_kib(),
    }
