"""After quantizing: does ONNX Runtime's integer-kernel run agree with the float simulation of the same model?"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from ..runtimes.ort import cpu_has_vnni, run_all, session
from .jsonable import jsonable
from .metrics import fidelity


def runtime_check(
    float_model: str | bytes | onnx.ModelProto, quant_model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]]
) -> dict:
    batches = list(batches)
    ref = run_all(session(float_model, "kernels"), batches)[0]
    kern = run_all(session(quant_model, "kernels"), batches)[0]
    sim = run_all(session(quant_model, "simulate"), batches)[0]
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
    # JSON-ready (non-finite SQNR -> None, as jsonable.py says): `lowbit quantize --json` prints it as it is.
    return jsonable(
        {
            "samples": len(ref),
            "kernels": fidelity(ref, kern),
            "simulate": fidelity(ref, sim),
            "kernels_vs_simulation": fidelity(sim, kern),
            "cpu_vnni": vnni,
            "cpu_note": note,
        }
    )
