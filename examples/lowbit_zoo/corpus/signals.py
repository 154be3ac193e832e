"""Realistic inputs for the third-party corpus models, prepared the way each package prepares them.

Every generator takes (n, seed) and returns n feeds (dicts of numpy arrays, batch 1): calibration and evaluation
use different seeds, and where a pool of real items exists (names), disjoint halves of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

Feed = dict[str, np.ndarray]

# captcha-whisperer: 36 symbols (blank is index 36), images 3x60x160 BGR in 0..255, no scaling.
CAPTCHA_LABELS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def captcha_images(n: int, seed: int) -> list[Feed]:
    return [feed for _, feed in captcha_samples(n, seed)]


def captcha_samples(n: int, seed: int) -> list[tuple[str, Feed]]:
    """Rendered 4-6 character captchas (text, feed): jittered glyphs, noise lines and pixel noise, as captcha
    generators draw them."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        text = "".join(rng.choice(list(CAPTCHA_LABELS), size=int(rng.integers(4, 7))))
        bg = tuple(int(v) for v in rng.integers(200, 256, 3))
        img = Image.new("RGB", (160, 60), bg)
        draw = ImageDraw.Draw(img)
        x = int(rng.integers(4, 14))
        for ch in text:
            font = ImageFont.load_default(size=int(rng.integers(26, 34)))
            fg = tuple(int(v) for v in rng.integers(0, 120, 3))
            draw.text((x, int(rng.integers(2, 16))), ch, fill=fg, font=font)
            x += int(rng.integers(20, 26))
        for _ in range(int(rng.integers(2, 5))):
            pts = [tuple(int(v) for v in rng.integers(0, [160, 60])) for _ in range(2)]
            draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=int(rng.integers(1, 3)))
        rgb = np.asarray(img, dtype=np.float32)
        rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.float32)
        bgr = rgb[:, :, ::-1].transpose(2, 0, 1)  # the package feeds OpenCV's BGR order
        feeds.append((text, {"image": np.ascontiguousarray(bgr)[None]}))
    return feeds


def eeg(n_samples: int, fs: float, rng: np.random.Generator, spindles: bool = False) -> np.ndarray:
    """Band-limited 1/f-like noise with an alpha rhythm, occasional spikes and (optionally) 12-14 Hz spindles."""
    f = np.fft.rfftfreq(n_samples, 1 / fs)
    spec = (rng.normal(size=f.size) + 1j * rng.normal(size=f.size)) / np.maximum(f, 0.5)
    spec[f > 0.45 * fs] *= 0.05  # the acquisition's anti-alias filter
    x = np.fft.irfft(spec, n_samples)
    t = np.arange(n_samples) / fs
    x += 0.3 * x.std() * np.sin(2 * np.pi * rng.uniform(8, 12) * t + rng.uniform(0, 6.3))
    for at in rng.integers(0, n_samples - int(0.2 * fs), int(rng.integers(0, 6))):
        width = int(0.07 * fs)
        x[at : at + width] += rng.uniform(3, 8) * x.std() * np.hanning(width) * rng.choice([-1, 1])
    if spindles:
        for at in rng.integers(0, n_samples - int(2 * fs), int(rng.integers(1, 5))):
            width = int(rng.uniform(0.5, 2.0) * fs)
            burst = np.sin(2 * np.pi * rng.uniform(11.5, 14.5) * t[:width]) * np.hanning(width)
            x[at : at + width] += rng.uniform(1, 2.5) * x.std() * burst
    return x


def seizure_spectrograms(n: int, seed: int, fs: int = 500, seconds: int = 15) -> list[Feed]:
    """brainmaze seizure models: z-scored signal -> 1 s / 0.5 s-hop spectrogram, first 100 bins, z-scored per bin."""
    from scipy.signal import spectrogram

    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        x = eeg(fs * seconds, fs, rng)
        x = (x - x.mean()) / x.std()
        _, _, sxx = spectrogram(x, fs, nperseg=fs, noverlap=fs - fs // 2)
        sxx = sxx[:100]
        sxx = (sxx - sxx.mean(axis=1, keepdims=True)) / np.maximum(sxx.std(axis=1, keepdims=True), 1e-12)
        feeds.append({"x": sxx[None].astype(np.float32)})
    return feeds


def _zscore(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(axis=-1, keepdims=True)) / np.maximum(a.std(axis=-1, keepdims=True), 1e-12)


def spindle_windows(n: int, seed: int, fs: float = 250.0, window: int = 7500) -> list[Feed]:
    """OpenSpindleNet inputs: the z-scored 30 s window and a z-scored 15-scale complex-wavelet scalogram.

    The package uses pywt's 'shan6-13' wavelet at scales geomspace(135, 270) (12-24 Hz); here a complex Gaussian
    wavelet with the same centre frequencies stands in for it (same band, similar time resolution).
    """
    rng = np.random.default_rng(seed)
    freqs = 13.0 * fs / np.geomspace(135, 270, num=15)
    t = (np.arange(-int(fs), int(fs) + 1)) / fs
    kernels = [np.exp(2j * np.pi * f * t) * np.exp(-0.5 * (t * f / 3.0) ** 2) for f in freqs]
    feeds = []
    for _ in range(n):
        x = eeg(window, fs, rng, spindles=True)
        x = x - x.mean()
        scal = np.stack([np.abs(np.convolve(x, k / np.abs(k).sum(), mode="same")) for k in kernels])
        feeds.append(
            {
                "raw_signal": _zscore(x)[None, None].astype(np.float32),
                "spectrogram": _zscore(scal)[None].astype(np.float32),
            }
        )
    return feeds


# Common Arabic given names and family names (Arabic script); calibration and evaluation use disjoint halves.
ARABIC_NAMES = (
    "محمد أحمد علي حسن حسين فاطمة عائشة خديجة مريم زينب عبدالله عمر يوسف إبراهيم خالد سعيد سارة ليلى نور هدى "
    "كريم سليمان رشيد منصور عثمان طارق ياسين حمزة بلال سلمى رنا جميلة نادية سامي ماجد فيصل ناصر الحسيني المصري "
    "العلي الخطيب النجار الحداد الشامي البغدادي القاسم التميمي الزهراني عبدالرحمن مصطفى جمال وليد هشام رامي "
    "منى أسماء رقية حليمة صفاء إيمان عادل نبيل مروان زياد"
).split()
COUNTRIES = ("EG", "SA", "IQ", "JO", "LB", "MA", "SY", "TN", "AE", "YE", None)
ROLES = ("<ROLE_GIVEN>", "<ROLE_SURNAME>", "<ROLE_UNKNOWN>")


def _vocab(folder: Path) -> dict[str, int]:
    tokens = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))["tokens"]
    return {t: i for i, t in enumerate(tokens)}


def name_tokens(folder: Path, n: int, seed: int, split: str) -> list[list[int]]:
    """Source ids as arabic-name-romanizer encodes them: <country> <role> characters <EOS>."""
    vocab = _vocab(folder)
    half = len(ARABIC_NAMES) // 2
    pool = ARABIC_NAMES[:half] if split == "calib" else ARABIC_NAMES[half:]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        country = COUNTRIES[int(rng.integers(len(COUNTRIES)))]
        prefix = [vocab[f"<{country}>" if country else "<UNK_COUNTRY>"], vocab[ROLES[int(rng.integers(3))]]]
        name = str(pool[int(rng.integers(len(pool)))])
        out.append(prefix + [vocab.get(ch, vocab["<UNK>"]) for ch in name] + [vocab["<EOS>"]])
    return out


def encoder_feeds(folder: Path, n: int, seed: int, split: str) -> list[Feed]:
    feeds = []
    for ids in name_tokens(folder, n, seed, split):
        src = np.array([ids], dtype=np.int64)
        feeds.append({"src": src, "src_mask": src == 0})
    return feeds


def decoder_feeds(folder: Path, n: int, seed: int, split: str, steps: int = 6) -> list[Feed]:
    """Decoder steps of a greedy float decode: encoder state, the prefix so far, the GRU hidden state."""
    import onnxruntime as ort

    enc = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(folder / "decoder.onnx"), providers=["CPUExecutionProvider"])
    feeds: list[Feed] = []
    for feed in encoder_feeds(folder, max(1, -(-n // steps)), seed, split):
        memory, mask, hidden = enc.run(None, feed)
        prefix = np.array([[1]], dtype=np.int64)  # <BOS>
        for _ in range(steps):
            step = {"prefix": prefix, "memory": memory, "src_mask": mask, "hidden": hidden}
            feeds.append(step)
            logprobs, hidden = dec.run(None, step)
            prefix = np.concatenate([prefix, logprobs.argmax(-1).reshape(1, 1)], axis=1)
    return feeds[:n]
