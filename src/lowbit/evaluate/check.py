"""After quantizing: does ONNX Runtime's integer-kernel run agree with the float model and with the float
simulation of the same model? Every output is measured with what fits its kind (outputs.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from ..runtimes.ort import cpu_has_vnni, run_all, session
from .jsonable import jsonable
from .outputs import check_kind_names, output_fidelity, resolve


def runtime_check(
    float_model: str | bytes | onnx.ModelProto,
    quant_model: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    kinds: Mapping[str, str] | None = None,
) -> dict:
    """{"samples", "outputs": [{"name", "kind", "why", "kernels", "simulate", "kernels_vs_simulation"}, ...],
    "cpu_vnni", "cpu_note"}, and the first output's three fidelities at the top level as before.
    `kinds` overrides the guessed kind of outputs by name."""
    batches = list(batches)
    ref_sess = session(float_model, "kernels")
    names = [o.name for o in ref_sess.get_outputs()]
    check_kind_names(dict(kinds or {}), names)
    refs = run_all(ref_sess, batches)
    del ref_sess  # one session alive at a time: a large model's float and quantized weights are never both held
    kerns = run_all(session(quant_model, "kernels"), batches)
    sims = run_all(session(quant_model, "simulate"), batches)
    outputs = []
    for name, ref, kern, sim in zip(names, refs, kerns, sims):
        kind = resolve(ref, name, (kinds or {}).get(name))
        outputs.append(
            {
                "name": name,
                "kind": kind.kind,
                "why": kind.why,
                "kernels": output_fidelity(ref, kern, name, kind),
                "simulate": output_fidelity(ref, sim, name, kind),
                # the same kind as against float: simulation is the reference here, not a different task
                "kernels_vs_simulation": output_fidelity(sim, kern, name, kind),
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
    # JSON-ready (non-finite SQNR -> None, as jsonable.py says): `lowbit quantize --json` prints it as it is.
    return jsonable(
        {
            "samples": len(refs[0]),
            "kernels": first["kernels"],
            "simulate": first["simulate"],
            "kernels_vs_simulation": first["kernels_vs_simulation"],
            "outputs": outputs,
            "cpu_vnni": vnni,
            "cpu_note": note,
        }
    )
