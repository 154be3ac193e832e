"""Fidelity of a quantized model's outputs against a reference (usually the float model)."""

from __future__ import annotations

import numpy as np


def top1_agreement(ref: np.ndarray, out: np.ndarray) -> float:
    """Fraction of samples whose arg-max over the last axis is the same."""
    return float(np.mean(ref.reshape(len(ref), -1).argmax(1) == out.reshape(len(out), -1).argmax(1)))


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean per-sample cosine similarity."""
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = out.reshape(len(out), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.where(den > 0, den, 1.0)))


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    noise = np.sum((ref.astype(np.float64) - out) ** 2)
    signal = np.sum(ref.astype(np.float64) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    return {
        "top1_agreement": top1_agreement(ref, out),
        "cosine": cosine(ref, out),
        "sqnr_db": sqnr_db(ref, out),
        "max_abs_error": float(np.max(np.abs(ref.astype(np.float64) - out))),
    }
