"""Image folders as calibration and evaluation data: the preprocessing a user states, and reading one image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .errors import LowbitError

if TYPE_CHECKING:
    from .data import InputSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize the shorter side to `size`, center-crop `crop`, scale to [0, 1], normalise by mean/std."""

    size: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR"] = "RGB"

    def __post_init__(self) -> None:
        for field in ("size", "crop"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LowbitError(f"image {field} must be a positive integer, got {value!r}")
        if self.crop > self.size:
            raise LowbitError(f"image crop ({self.crop}) must not exceed resize size ({self.size})")
        for field in ("mean", "std"):
            value = getattr(self, field)
            try:
                values = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                values = ()
            if len(values) != 3:
                raise LowbitError(f"image {field} must be 3 numbers (one per R, G, B), got {value!r}")
            # Lists are accepted (handy for configs) but stored as tuples to keep the class hashable.
            object.__setattr__(self, field, values)
        if not all(s > 0 for s in self.std):
            raise LowbitError(f"image std values must all be > 0, got {self.std}")
        if self.layout not in ("NCHW", "NHWC"):
            raise LowbitError(f"image layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        if self.channels not in ("RGB", "BGR"):
            raise LowbitError(f"image channels must be 'RGB' or 'BGR', got {self.channels!r}")


def image_input(specs: list[InputSpec], pre: ImagePreprocess) -> str:
    """Check that the model takes one 4-D float image tensor matching `pre`; return its name."""
    from .arrays import shape_text

    if len(specs) != 1 or len(specs[0].shape) != 4 or specs[0].dtype.kind != "f":
        got = ", ".join(f"'{s.name}' {shape_text(s.shape)} {s.dtype}" for s in specs)
        raise LowbitError(
            f"an image folder needs a model with one 4-D float input, but it has: {got}; use .npy/.npz data"
        )
    s = specs[0]
    _, c, h, w = s.shape if pre.layout == "NCHW" else (s.shape[0], s.shape[3], s.shape[1], s.shape[2])
    if isinstance(c, int) and c != 3:
        other = "NHWC" if pre.layout == "NCHW" else "NCHW"
        raise LowbitError(
            f"input '{s.name}' {shape_text(s.shape)} is not {pre.layout} with 3 channels; try layout='{other}'"
        )
    for dim in (h, w):
        if isinstance(dim, int) and dim != pre.crop:
            raise LowbitError(
                f"input '{s.name}' expects {h}x{w} images but the image crop is {pre.crop}; set crop to match"
            )
    return s.name


def load_image(path: Path, pre: ImagePreprocess) -> np.ndarray:
    from PIL import Image

    from .arrays import one_line

    try:
        with Image.open(path) as opened:
            im = opened.convert("RGB")
            w, h = im.size
            if w <= h:
                nw, nh = pre.size, max(pre.size, round(h * pre.size / w))
            else:
                nw, nh = max(pre.size, round(w * pre.size / h)), pre.size
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - pre.crop) // 2, (nh - pre.crop) // 2
            im = im.crop((left, top, left + pre.crop, top + pre.crop))
            x: np.ndarray = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LowbitError(f"cannot read image {path} ({one_line(e)}); remove or replace it") from None
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.channels == "BGR":
        x = x[..., ::-1]
    if pre.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x)
