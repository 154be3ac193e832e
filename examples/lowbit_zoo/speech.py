"""Spoken words from Debian's espeak-ng, background noise and log-mel features, for the keyword-spotting
example and tests. Nothing is downloaded: espeak-ng synthesizes the audio locally.

A "speaker" is an espeak-ng voice (accent) plus a variant (pitch, formants, breathiness); each utterance also
gets its own speed and pitch, so no two recordings of a word are the same.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly

from lowbit.errors import LowbitError

RATE = 16000
ESPEAK_RATE = 22050
# English accents espeak-ng ships with.
VOICES = ("en-us", "en", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc", "en-gb-scotland", "en-029")
PAUSE_MS = 500  # between the words of one synthesis call; the gaps inside words are < 100 ms


@dataclass(frozen=True)
class Take:
    voice: str
    variant: str
    speed: int  # words per minute
    pitch: int  # 0..99


def espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise LowbitError("espeak-ng is not installed: run `make speech` (Debian package espeak-ng)")
    return exe


def variants() -> list[str]:
    """espeak-ng voice variants (the files in espeak-ng-data/voices/!v), sorted; names with spaces are skipped
    (they cannot be given as voice+variant)."""
    out = subprocess.run([espeak(), "--version"], capture_output=True, text=True, check=True).stdout
    data = Path(out.split("Data at:", 1)[-1].strip()) / "voices" / "!v"
    names = sorted(p.name for p in data.glob("*") if p.is_file() and " " not in p.name)
    if not names:
        raise LowbitError(f"espeak-ng has no voice variants in {data}; is espeak-ng-data complete?")
    return names


def _run(take: Take, text: str, ssml: bool) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "out.wav"
        cmd = (
            [
                espeak(),
                "-v",
                f"{take.voice}+{take.variant}",
                "-s",
                str(take.speed),
                "-p",
                str(take.pitch),
                "-w",
                str(wav),
            ]
            + (["-m"] if ssml else [])
            + [text]
        )
        subprocess.run(cmd, check=True, capture_output=True)
        rate, x = wavfile.read(wav)
    if rate != ESPEAK_RATE:
        raise LowbitError(f"espeak-ng wrote {rate} Hz audio, expected {ESPEAK_RATE}")
    return x.astype(np.float32) / 32768.0


def _trim(x: np.ndarray, level: float = 2e-3) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > level)
    return x[loud[0] : loud[-1] + 1] if len(loud) else x[:0]


def _split(x: np.ndarray, n: int, level: float = 2e-3) -> list[np.ndarray] | None:
    """Cut a recording of n words separated by PAUSE_MS breaks at its n - 1 longest quiet runs."""
    quiet = np.abs(x) <= level
    edges = np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    inner = [(s, e) for s, e in zip(starts, ends) if s > 0 and e < len(x) and e - s > 0.25 * ESPEAK_RATE]
    if len(inner) != n - 1:
        return None
    cuts = [0] + [(s + e) // 2 for s, e in inner] + [len(x)]
    words = [_trim(x[a:b], level) for a, b in zip(cuts[:-1], cuts[1:])]
    return words if all(len(w) > 0.05 * ESPEAK_RATE for w in words) else None


def synthesize(take: Take, words: list[str]) -> list[np.ndarray]:
    """Each word spoken by `take`, 16 kHz float32, silence trimmed. One espeak-ng call for all the words
    (SSML breaks between them); if the pauses cannot be found, one call per word."""
    text = "<speak>" + f'<break time="{PAUSE_MS}ms"/>'.join(words) + "</speak>"
    parts = _split(_run(take, text, ssml=True), len(words))
    if parts is None:
        parts = [_trim(_run(take, w, ssml=False)) for w in words]
    return [resample_poly(p, 320, 441).astype(np.float32) for p in parts]  # 22050 -> 16000 Hz


# --- background noise ---


def colored_noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """white, pink (1/f power) or brown (1/f^2) noise, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    spec *= {"white": 1.0, "pink": f**-0.5, "brown": 1.0 / f}[kind]
    x = np.fft.irfft(spec, n)
    return (x / (np.sqrt(np.mean(x**2)) + 1e-12)).astype(np.float32)


def hum(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mains hum with harmonics (50 or 60 Hz), unit RMS."""
    t = np.arange(n) / RATE
    base = rng.choice([50.0, 60.0])
    x = sum(rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3, 5))
    x = x + 0.1 * rng.standard_normal(n)
    return (x / np.sqrt(np.mean(x**2))).astype(np.float32)


def mix(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """speech + noise scaled to the given signal-to-noise ratio (power of the speech part vs the noise)."""
    loud = speech[np.abs(speech) > 1e-3]
    p_s = float(np.mean(loud**2)) if len(loud) else 1e-4
    p_n = float(np.mean(noise**2)) + 1e-12
    return speech + noise * np.float32(np.sqrt(p_s / (p_n * 10 ** (snr_db / 10))))


def place(word: np.ndarray, rng: np.random.Generator, n: int = RATE) -> np.ndarray:
    """The word at a random offset in an n-sample window (its middle n samples if longer)."""
    out = np.zeros(n, np.float32)
    if len(word) >= n:
        start = (len(word) - n) // 2
        out[:] = word[start : start + n]
    else:
        at = int(rng.integers(0, n - len(word) + 1))
        out[at : at + len(word)] = word
    return out


# --- log-mel features ---


def mel_filterbank(
    n_mels: int = 40, n_fft: int = 512, rate: int = RATE, fmin: float = 20.0, fmax: float = 7600.0
) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale."""

    def to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def to_hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = to_hz(np.linspace(to_mel(fmin), to_mel(fmax), n_mels + 2))
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def log_mel(audio: np.ndarray, n_mels: int = 40, win: int = 480, hop: int = 320, n_fft: int = 512) -> np.ndarray:
    """(batch, samples) -> (batch, frames, n_mels) log mel energies: 30 ms Hann windows every 20 ms (49 frames
    a second: half the LSTM steps of a 10 ms hop, enough for single words)."""
    audio = np.atleast_2d(audio).astype(np.float32)
    frames = 1 + (audio.shape[1] - win) // hop
    bank = mel_filterbank(n_mels, n_fft).T
    window = np.hanning(win).astype(np.float32)
    out = np.empty((audio.shape[0], frames, n_mels), np.float32)
    for i in range(0, audio.shape[0], 128):  # batches small enough to stay in cache
        x = np.lib.stride_tricks.sliding_window_view(audio[i : i + 128], win, axis=1)[:, ::hop][:, :frames] * window
        spec = np.fft.rfft(x, n_fft, axis=-1)
        out[i : i + 128] = np.log((spec.real**2 + spec.imag**2) @ bank + 1e-6)
    return out
