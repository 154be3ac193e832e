"""Models and data for bench/run.py: float models (EfficientNet-Lite0, MobileNetV2-style) and photo crops.

Runs in a worker process (torch is imported here, never in the measuring parent).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def crop_chunks(n: int, split: str, seed: int, chunk: int):
    """Photo crops generated on the fly, `chunk` at a time (same crops as lowbit_zoo.zoo.photo_crops(n, ...))."""
    import numpy as np
    from PIL import Image

    from lowbit_zoo import zoo

    plan = zoo._crop_plan(n, split, seed)
    mean = np.asarray(zoo.IMAGENET_MEAN, np.float32)
    std = np.asarray(zoo.IMAGENET_STD, np.float32)
    for i in range(0, n, chunk):
        out = np.empty((min(chunk, n - i), 224, 224, 3), np.uint8)
        for j, (name, top, left, side, flip) in enumerate(plan[i : i + chunk]):
            patch = zoo.load_photo(name)[top : top + side, left : left + side]
            if flip:
                patch = patch[:, ::-1]
            out[j] = np.asarray(
                Image.fromarray(np.ascontiguousarray(patch)).resize((224, 224), Image.Resampling.BILINEAR)
            )
        x = (out.astype(np.float32) / np.float32(255.0) - mean) / std
        yield np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def build(job: dict) -> dict:
    """Float models + calibration/eval crops (needs torch; kept out of the measuring process)."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from lowbit_zoo import zoo
    from models import mobilenet_v2_onnx

    work = Path(job["work"])
    calib = zoo.photo_crops(job["n_calib"], "calib", seed=0)
    np.save(work / "calib.npy", calib)
    np.save(work / "eval.npy", zoo.photo_crops(job["n_eval"], "eval", seed=0))
    eff = work / "efficientnet_lite0.onnx"
    if not eff.exists():
        art = ROOT / "artifacts" / "efficientnet_lite0.onnx"
        if art.exists():
            shutil.copyfile(art, eff)
        else:
            zoo.efficientnet_lite0_onnx(eff)
    _, params = mobilenet_v2_onnx(work / f"mobilenet_v2_bn{job['n_calib']}.onnx", calib)
    import onnx

    eff_params = sum(int(np.prod(t.dims)) for t in onnx.load(str(eff)).graph.initializer if t.data_type == 1)
    return {"mnv2_params": params, "eff_params": eff_params}
