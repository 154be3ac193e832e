"""What `lowbit auto` checks and reads before any work: the budget, the evaluation batches, the files it writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..data import ImagePreprocess, input_specs, open_data
from ..errors import LowbitError
from ..pipeline import outputs


def recipe_path(output: str | Path) -> Path:
    p = Path(output)
    return p.with_name(p.stem + ".recipe.json")


def report_path(output: str | Path) -> Path:
    p = Path(output)
    return p.with_name(p.stem + ".auto.json")


def auto_writes(output: str | Path) -> list[tuple[str, str | Path]]:
    """What `auto(..., output)` writes, labelled for error messages."""
    return [*outputs(output), ("recipe (beside -o)", recipe_path(output)), ("report (beside -o)", report_path(output))]


def check_budget(max_drop: float | None, latency_budget: float | None) -> dict[str, Any]:
    if max_drop is not None and latency_budget is not None:
        raise LowbitError("give one budget: --max-drop (accuracy) or --latency-budget (speed), not both")
    if latency_budget is not None:
        if isinstance(latency_budget, bool) or not isinstance(latency_budget, (int, float)) or latency_budget <= 0:
            raise LowbitError(
                f"--latency-budget must be a ratio to float latency > 0 (e.g. 0.6), got {latency_budget!r}"
            )
        return {"kind": "latency", "ratio": float(latency_budget)}
    drop = 1.0 if max_drop is None else max_drop
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 100:
        raise LowbitError(f"--max-drop must be points of the metric in [0, 100) (e.g. 1), got {drop!r}")
    return {"kind": "accuracy", "max_drop": float(drop)}


def batches_of(data: Any, model: onnx.ModelProto, preprocess: ImagePreprocess | None, limit: int | None) -> list:
    specs = input_specs(model)
    src = open_data(data, specs, batch_size=32, preprocess=preprocess, limit=limit, what="evaluation data")
    batches = [dict(b) for b in src]
    if not batches:
        raise LowbitError("the evaluation data holds no samples; give at least a few dozen")
    return batches


def head(batches: list[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    out, left = [], n
    for b in batches:
        k = min(left, len(next(iter(b.values()))))
        out.append({name: v[:k] for name, v in b.items()})
        left -= k
        if left <= 0:
            break
    return out


def take(batches: list[dict[str, np.ndarray]], rows: np.ndarray, size: int = 32) -> list[dict[str, np.ndarray]]:
    """The samples at `rows` (indices over all batches, samples first), in batches of `size`."""
    whole = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return [{k: v[rows[i : i + size]] for k, v in whole.items()} for i in range(0, len(rows), size)]
