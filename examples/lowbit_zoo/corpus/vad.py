"""A Silero-VAD-style stateful voice-activity model: what streaming audio exports look like.

Inputs `input` [B, 512] (one chunk of 16 kHz audio, or 256 samples of 8 kHz), `state` [2, B, 64] (LSTM h and c
stacked on axis 0: the batch axis is 1) and `sr`, a scalar int64 sample rate. The graph branches on `sr` with an
`If` (an 8 kHz front end with half the stride, as Silero's), runs a Conv1d encoder and an LSTM cell, and returns
the speech probability [B, 1] and the new state [2, B, 64]. Weights are random but deterministic.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

CHUNK = 512
HIDDEN = 64


def _vad_module():
    import torch
    from torch import nn

    class Front(nn.Module):
        """A learned STFT-like filter bank: Conv1d with a long kernel and a hop, magnitude via square+sqrt."""

        def __init__(self, hop: int) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 64, 128, stride=hop, padding=64, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x.unsqueeze(1))
            return torch.sqrt(y * y + 1e-6)

    class Vad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.front16 = Front(64)
            self.front8 = Front(32)
            self.enc = nn.Sequential(
                nn.Conv1d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv1d(64, 64, 3, stride=2, padding=1), nn.ReLU()
            )
            self.cell = nn.LSTMCell(64, HIDDEN)
            self.out = nn.Conv1d(HIDDEN, 1, 1)

        def forward(self, x: torch.Tensor, state: torch.Tensor, sr: torch.Tensor):
            if bool(sr == 16000):
                f = self.front16(x)
            else:
                f = self.front8(x)
            f = torch.log(f + 1e-3)
            f = self.enc(f).mean(dim=2)
            h, c = self.cell(f, (state[0], state[1]))
            prob = torch.sigmoid(self.out(torch.relu(h).unsqueeze(2))).squeeze(2)
            return prob, torch.stack([h, c])

    torch.manual_seed(2)
    return torch.jit.script(Vad().eval())


def _center_output(model) -> None:
    """Scale and shift the output layer so that half the chunks of calibration-like audio read as speech (p > 0.5)."""
    import torch

    logits: list[float] = []

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            p, state = model(*(torch.from_numpy(np.asarray(feed[k])) for k in ("input", "state", "sr")))
        logits.append(float(torch.logit(p.clamp(1e-6, 1 - 1e-6))))
        return state.numpy()

    _streams(run, 64, seed=99)
    # Untrained, the logits barely move; scale them to a spread of about 2 (a trained VAD is confident).
    scale = 2.0 / max(float(np.std(logits)), 1e-6)
    with torch.no_grad():
        model.out.weight *= scale
        model.out.bias.copy_((model.out.bias - float(np.median(logits))) * scale)


def vad_onnx(path: str | Path) -> Path:
    import torch

    path = Path(path)
    if path.exists():
        return path
    model = _vad_module()
    _center_output(model)
    args = (torch.zeros(1, CHUNK), torch.zeros(2, 1, HIDDEN), torch.tensor(16000, dtype=torch.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices: chosen on purpose
            torch.onnx.export(
                model,
                args,
                tmp,
                dynamo=False,
                opset_version=16,
                input_names=["input", "state", "sr"],
                output_names=["output", "stateN"],
                dynamic_axes={
                    "input": {0: "batch"},
                    "state": {1: "batch"},
                    "output": {0: "batch"},
                    "stateN": {1: "batch"},
                },
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _speech(rng: np.random.Generator, sr: int, chunks: int = 8) -> np.ndarray:
    """Speech-like audio: voiced harmonics switching on and off over band-limited background noise."""
    from .signals import eeg  # band-limited noise generator, reused for the background

    t = np.arange(CHUNK * chunks) / sr
    f0 = rng.uniform(90, 250)
    voiced = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8)) * 0.3
    on = (np.sin(2 * np.pi * rng.uniform(1, 4) * t + rng.uniform(0, 6.3)) > 0).astype(float)
    return (0.02 * eeg(t.size, sr, rng) + voiced * on).astype(np.float32)


def _streams(run, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """n consecutive 512-sample chunks from streams of 8 chunks, the state carried along by `run(feed) -> state`;
    every fourth stream is 8 kHz audio (the If's other branch)."""
    rng = np.random.default_rng(seed)
    feeds: list[dict[str, np.ndarray]] = []
    stream = 0
    while len(feeds) < n:
        sr = 8000 if stream % 4 == 3 else 16000
        audio = _speech(rng, sr)
        state = np.zeros((2, 1, HIDDEN), np.float32)
        for i in range(len(audio) // CHUNK):
            feed = {"input": audio[None, i * CHUNK : (i + 1) * CHUNK], "state": state, "sr": np.array(sr, np.int64)}
            feeds.append(feed)
            state = run(feed)
        stream += 1
    return feeds[:n]


def vad_feeds(model: str | Path, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Streaming feeds whose state comes from the float model itself, as a deployed VAD loop carries it."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return _streams(lambda feed: sess.run(None, feed)[1], n, seed)


def _spoken(rng: np.random.Generator, sr: int) -> np.ndarray:
    """A phrase spoken by espeak-ng (a random voice, speed and pitch) between stretches of quiet noise."""
    from scipy.signal import resample_poly

    from ..speech import VOICES, Take, colored_noise, synthesize

    words = ["turn", "the", "lights", "on", "please", "seven", "yes", "stop", "music", "tomorrow"]
    take = Take(str(rng.choice(VOICES)), "m3" if rng.random() < 0.5 else "f2", int(rng.integers(130, 190)), 50)
    spoken = synthesize(take, [str(w) for w in rng.choice(words, 3, replace=False)])
    gap = np.zeros(int(0.4 * 16000), np.float32)
    audio = np.concatenate([gap, *[np.concatenate([w, gap]) for w in spoken]])
    audio = audio + 0.003 * colored_noise(rng, audio.size, "pink").astype(np.float32)
    return (audio if sr == 16000 else resample_poly(audio, 1, 2)).astype(np.float32)


def silero_feeds(model: str | Path, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Streams of espeak-ng speech for Silero VAD v5 (silero-vad's wheel: state [2, B, 128]; 512-sample chunks at
    16 kHz, 256 at 8 kHz, each after 64/32 samples of context; every other stream 8 kHz), the state carried by the
    float model as a deployed loop does. Streams are cut to 24 chunks so that a few streams (and rates) make n."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds: list[dict[str, np.ndarray]] = []
    stream = 0
    while len(feeds) < n:
        sr = 8000 if stream % 2 == 1 else 16000
        chunk, context = (256, 32) if sr == 8000 else (CHUNK, 64)
        # Silero's own loop prepends each chunk with the last `context` samples of the one before
        audio = np.concatenate([np.zeros(context, np.float32), _spoken(rng, sr)])
        state = np.zeros((2, 1, 128), np.float32)
        for i in range(min(24, (len(audio) - context) // chunk)):
            x = audio[None, i * chunk : (i + 1) * chunk + context]
            feed = {"input": x, "state": state, "sr": np.array(sr, np.int64)}
            feeds.append(feed)
            state = sess.run(None, feed)[1]
        stream += 1
    return feeds[:n]
