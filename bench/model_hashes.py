"""sha256 of the quantized model, its plan's tensors and its decisions, for every preset and calibration method on
EfficientNet-Lite0 and all-MiniLM-L6-v2: run it in two checkouts to show a refactor left every output's bytes alone.

Usage: .venv/bin/python bench/model_hashes.py [--out hashes.json] [--workdir /tmp/lowbit_hashes]
Compare: diff <(jq -S . a.json) <(jq -S . b.json)   (or any JSON diff). 32 calibration samples each; ~5 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import lowbit  # noqa: E402
from lowbit.recipe import PRESETS, Recipe, Scheme  # noqa: E402
from lowbit_zoo.zoo import (  # noqa: E402
    efficientnet_lite0_onnx,
    minilm_onnx,
    minilm_tokenize,
    photo_crops,
    text_sentences,
)


def _digest(data: object) -> str:
    text = data if isinstance(data, bytes) else json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="model_hashes.json")
    ap.add_argument("--workdir", default="/tmp/lowbit_hashes")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    models = {"effnet": efficientnet_lite0_onnx(work / "effnet.onnx"), "minilm": minilm_onnx(work / "minilm.onnx")}
    calib = {"effnet": photo_crops(32, "calib"), "minilm": [minilm_tokenize(text_sentences(16, "calib"))]}
    cases: list[tuple[str, str, Recipe]] = []
    for name, recipe in PRESETS.items():
        cases += [(m, name, dataclasses.replace(recipe, calibration_samples=16)) for m in models]
    for method in ("minmax", "percentile", "entropy", "mse"):  # minmax: the default before layer_error_fast
        cases.append(
            ("effnet", f"calibration-{method}", Recipe(default=Scheme(calibration=method), calibration_samples=16))
        )
    cases.append(("effnet", "per-tensor", Recipe(default=Scheme(per_channel=False), calibration_samples=16)))
    out: dict[str, object] = {"lowbit": lowbit.__version__, "numpy": np.__version__}
    warnings.simplefilter("ignore")
    for model, name, recipe in cases:
        key = f"{model}/{name}"
        try:
            r = lowbit.quantize(models[model], calib=calib[model], recipe=recipe, progress=False)
            tensors = {k: dataclasses.asdict(v) for k, v in sorted(r.plan.tensors.items())}
            nodes = {k: [v.quantized, v.reason, v.rule] for k, v in sorted(r.plan.nodes.items())}
            out[key] = {
                "model": _digest(r.model.SerializeToString()),
                "tensors": _digest(tensors),
                "nodes": _digest(nodes),
            }
        except Exception as e:  # a failing case is a result too (it shows what a change fixed)
            out[key] = f"{type(e).__name__}: {str(e)[:200]}"
        print(key, out[key], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
