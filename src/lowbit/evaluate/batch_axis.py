"""Before calibrating: does the data's first axis look like a batch of samples to the model?

lowbit stacks samples on each input's axis 0 unless told otherwise. Audio models converted from other frameworks
often take one whole sequence, time first ([frames, features], madmom's converter), with no batch axis at all:
stacking files there reads frames as samples, and calibration runs without an error on data that means nothing
(cut into batches of 8 frames). A batch of n samples should come back with n somewhere in every output; when no
output of the float model has an axis of size n, say so before the long run, with the option that takes each
file whole. Only inputs of rank 1 or 2 are considered: image models whose outputs drop the batch (detectors with
NMS built in) take rank-4 inputs, and a false alarm there would teach users to ignore the warning.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data import input_specs
from ..errors import LowbitError
from ..runtimes.ort import is_large, run_batch, session


def batch_axis_doubt(model: Any, batch: dict[str, np.ndarray], axes: dict[str, int | None] | None = None) -> str | None:
    """A warning when `batch` (samples on axis 0 of each low-rank input with a symbolic first axis) gives no output
    with an axis of that many samples; None when it looks right, cannot tell, or the model fails (calibration then
    says why, in its own words)."""
    axes = axes or {}
    specs = input_specs(model)
    suspects = [s.name for s in specs if 1 <= len(s.shape) <= 2 and not isinstance(s.shape[0], int)]
    suspects = [name for name in suspects if axes.get(name, 0) == 0]
    rows = {int(batch[n].shape[0]) for n in suspects if n in batch and batch[n].ndim}
    # A large model is not loaded twice for a warning (a language model's ids are [batch, tokens] anyway).
    if not suspects or len(rows) != 1 or (n := rows.pop()) < 2 or is_large(model):
        return None
    try:
        sess = session(model, "kernels", threads=1, spin=False)
    except Exception:  # a model ONNX Runtime cannot load: the load stage says why, in its own words
        return None
    try:
        outs = run_batch(sess, None, batch, n, "the float model")
    except LowbitError:
        return None
    if any(n in np.shape(o) for o in outs):
        return None
    return (
        f"a batch of {n} samples of {', '.join(suspects)} gave no output with {n} of anything: their first axis may "
        f"not be a batch of samples (a time-first [frames, features] input); if so, rerun with --batch-axis "
        f"{suspects[0]}=none, which takes each file whole as one sample"
    )


__all__ = ["batch_axis_doubt"]
