"""After quantizing: does ONNX Runtime's integer-kernel run agree with the float model and with the float
simulation of the same model? Every output is measured with what fits its kind (outputs.py).

The float model and the integer kernels run on every sample. The simulation (every op in float between Q/DQ pairs,
no graph optimizations) costs more than both together, so it runs on the first batch (at least `SIMULATE_FIRST`
samples) and on the rest only when those do not already settle the question the check answers: do the kernels
compute what the simulation does (mean per-sample cosine >= `GAP_COSINE`)? Settled means that even the upper
bound of the per-sample cosine gaps (mean + 3 standard errors) stays inside the threshold for every output.

With `locate_gap`, a check whose kernels and simulation part (any output's cosine below the threshold) also
names where (kernel_gap.py). That pass runs the simulation again with every integer exposed; when the first batch
already parts, it runs instead of simulating the rest, and its simulated outputs (the same values) serve the check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from ..runtimes.ort import cpu_has_vnni, join, pad_to, run_all, session
from .jsonable import jsonable
from .kernel_gap import GAP_COSINE, compare, locate
from .metrics import cosine
from .outputs import check_kind_names, output_fidelity, resolve

SIMULATE_FIRST = 8


def settled(kerns: list[np.ndarray], sims: list[np.ndarray], threshold: float = GAP_COSINE) -> bool:
    """Whether the simulated samples so far (`sims`, samples first; `kerns` cut to the same samples) show the
    kernels agreeing with the simulation beyond doubt: for every output, mean + 3 standard errors of the
    per-sample cosine gaps (1 - cosine) below 1 - threshold, every value finite, at least 2 samples."""
    for k, s in zip(kerns, sims):
        if len(s) < 2:
            return False
        a = k.reshape(len(k), -1).astype(np.float64)
        b = s.reshape(len(s), -1).astype(np.float64)
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(den > 0)):
            return False
        gap = 1.0 - np.sum(a * b, axis=1) / den
        bound = gap.mean() + 3.0 * gap.std(ddof=1) / np.sqrt(len(gap))
        if not bound < 1.0 - threshold:
            return False
    return True


def simulate(
    quant_model: onnx.ModelProto,
    batches: list[dict[str, np.ndarray]],
    kerns: list[np.ndarray],
    threshold: float,
    locate_gap: bool = False,
) -> tuple[list[np.ndarray], dict | None]:
    """The simulation's outputs on the first batches (at least SIMULATE_FIRST samples), or on every batch when
    those do not settle the check (`settled`); samples first, in data order. With `locate_gap`, when those first
    samples do not settle it and their first output's kernels-vs-simulation gap suggests the check will name
    where they part, the rest comes from `kernel_gap.compare` over every batch, whose report is returned too."""
    sess = session(quant_model, "simulate", spin=False)
    used = 0
    sims: list[np.ndarray] = []
    while used < len(batches) and (not sims or len(sims[0]) < SIMULATE_FIRST):
        part = run_all(sess, [batches[used]])  # samples first, so batches join on axis 0
        sims = [join(list(p)) for p in zip(sims, part)] if sims else part
        used += 1
    # Sequences of different lengths: the kernels' outputs were padded to the longest of every batch.
    sims = [pad_to(s, k.shape[1:]) for s, k in zip(sims, kerns)]
    if used == len(batches) or settled([k[: len(s)] for k, s in zip(kerns, sims)], sims, threshold):
        return sims, None
    # A guess whether the check will name a gap: the first samples' mean gap past half the threshold's (MobileNetV3-
    # Small: 0.00096 over the first 8, 0.0011 over 32). A wrong guess costs time (one pass too many, or the plain
    # simulation of the rest), never a different result.
    worst = max(1.0 - cosine(s, k[: len(s)]) for s, k in zip(sims, kerns))
    if locate_gap and not worst < (1.0 - threshold) / 2:
        del sess  # the pass has sessions of its own
        gap, sims = compare(quant_model, batches, threshold, kernels=kerns[0])
        return sims, gap
    rest = run_all(sess, batches[used:])
    return [pad_to(join(list(p)), k.shape[1:]) for p, k in zip(zip(sims, rest), kerns)], None


def runtime_check(
    float_model: str | bytes | onnx.ModelProto,
    quant_model: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    kinds: Mapping[str, str] | None = None,
    threshold: float = GAP_COSINE,
    locate_gap: bool = False,
) -> dict:
    """{"samples", "simulate_samples", "outputs": [{"name", "kind", "why", "kernels", "simulate",
    "kernels_vs_simulation"}, ...], "cpu_vnni", "cpu_note"}, and the first output's three fidelities at the top
    level as before. `kinds` overrides the guessed kind of outputs by name. "simulate" and "kernels_vs_simulation"
    are measured on the first `simulate_samples` samples (see the module docstring; `threshold`: the cosine the
    simulated samples must settle). `locate_gap`: add "kernel_gap" (kernel_gap.locate's report) when any
    output's kernels-vs-simulation cosine is below `threshold` or not finite."""
    batches = list(batches)
    # Sleeping, not spinning, worker threads: these sessions run a few batches, then idle while the next one loads.
    ref_sess = session(float_model, "kernels", spin=False)
    names = [o.name for o in ref_sess.get_outputs()]
    check_kind_names(dict(kinds or {}), names)
    refs = run_all(ref_sess, batches)
    del ref_sess  # one session alive at a time: a large model's float and quantized weights are never both held
    kerns = run_all(session(quant_model, "kernels", spin=False), batches)
    sims, gap = simulate(quant_model, batches, kerns, threshold, locate_gap)
    outputs = []
    for name, ref, kern, sim in zip(names, refs, kerns, sims):
        kind = resolve(ref, name, (kinds or {}).get(name))
        n = len(sim)  # the simulated samples come first in data order: the same samples of ref and kern
        outputs.append(
            {
                "name": name,
                "kind": kind.kind,
                "why": kind.why,
                "kernels": output_fidelity(ref, kern, name, kind),
                "simulate": output_fidelity(ref[:n], sim, name, kind),
                # the same kind as against float: simulation is the reference here, not a different task
                "kernels_vs_simulation": output_fidelity(sim, kern[:n], name, kind),
            }
        )
    vnni = cpu_has_vnni()
    if vnni:
        note = (
            "this CPU has VNNI: u8 x s8 kernels accumulate in int32 here, as phones with dot-product "
            "instructions do; on AVX2 without VNNI the overflow guard keeps them from saturating"
        )
    elif vnni is False:
        note = "this CPU has no VNNI: u8 x s8 kernels add pairs in int16; the overflow guard keeps them exact"
    else:
        note = "CPU features unknown"
    first = outputs[0]
    # Any output, not only the first: a detector's boxes may agree while its mask prototypes part (yolo11n-seg:
    # output0 0.9992, output1 0.9333, and the summary named no op).
    coss = [o["kernels_vs_simulation"]["cosine"] for o in outputs]
    if locate_gap and not all(c is not None and np.isfinite(c) and c >= threshold for c in coss):
        # Where they part (kernel_gap.py): its pass may have run already, in `simulate`.
        gap = gap if gap is not None else locate(quant_model, batches, threshold, kernels=kerns[0])
    else:
        gap = None  # a pass run on a first batch that parted, for a check whose samples together agree
    # JSON-ready (non-finite SQNR -> None, as jsonable.py says): `lowbit quantize --json` prints it as it is.
    return jsonable(
        {
            "samples": len(refs[0]),
            "simulate_samples": len(sims[0]),
            "kernels": first["kernels"],
            "simulate": first["simulate"],
            "kernels_vs_simulation": first["kernels_vs_simulation"],
            "outputs": outputs,
            "cpu_vnni": vnni,
            "cpu_note": note,
            **({"kernel_gap": gap} if gap is not None else {}),
        }
    )
