"""Options several commands share, so one image folder is read the same way by all of them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import LowbitError

if TYPE_CHECKING:  # data.py loads numpy, onnx and Pillow: not before a command runs
    from ..data import ImagePreprocess


def add_image_args(parser: argparse.ArgumentParser) -> None:
    i = parser.add_argument_group("image folders")
    i.add_argument("--image-size", type=int, default=256, help="resize the shorter side to this (default 256)")
    i.add_argument("--crop", type=int, default=224, help="center crop (default 224)")
    i.add_argument("--mean", type=float, nargs=3, default=(0.485, 0.456, 0.406))
    i.add_argument("--std", type=float, nargs=3, default=(0.229, 0.224, 0.225))
    i.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW")
    i.add_argument("--bgr", action="store_true", help="feed channels as BGR")


def image_preprocess(args: argparse.Namespace) -> ImagePreprocess:
    from ..data import ImagePreprocess

    return ImagePreprocess(
        size=args.image_size,
        crop=args.crop,
        mean=tuple(args.mean),
        std=tuple(args.std),
        layout=args.layout,
        channels="BGR" if args.bgr else "RGB",
    )


def add_ray_args(p: argparse.ArgumentParser, work: str) -> None:
    """--workers and --ray-address (`shard.py`; pip install 'lowbit[ray]')."""
    r = p.add_argument_group("scale (pip install 'lowbit[ray]'; the results are the same as in one process)")
    r.add_argument("--workers", type=int, default=1, metavar="N", help=f"{work} with N Ray workers (default 1)")
    r.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join a running Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local one",
    )


def add_batch_axis_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--batch-axis",
        nargs="+",
        default=[],
        metavar="INPUT=AXIS",
        help=f"the axis an input's {what} samples are stacked on when it is not 0 (recurrent state "
        "[2, B, 64]: state=1), or INPUT=none for an input constant across samples (a sample rate; 0-d inputs are "
        "constant without saying)",
    )


def batch_axes(given: list[str]) -> dict[str, int | None]:
    """`--batch-axis state=1 sr=none` as {"state": 1, "sr": None}; the names and ranges are checked against the
    model's inputs by `quantize`."""
    out: dict[str, int | None] = {}
    for item in given:
        name, sep, axis = item.rpartition("=")
        if not sep or not name or not (axis.lower() == "none" or axis.lstrip("-").isdigit()):
            raise LowbitError(
                f"--batch-axis takes INPUT=AXIS (e.g. state=1) or INPUT=none, got {item!r}; write it as name=axis"
            )
        out[name] = None if axis.lower() == "none" else int(axis)
    return out
