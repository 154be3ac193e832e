"""One scale for a whole weight, or one per channel, where ONNX Runtime runs the one-scale form faster.

Two kernels pay for per-channel scales at run time: DynamicQuantizeLSTM (measured on the keyword-spotting LSTM:
1.11-1.13x the time of one scale per direction, `bench/RESULTS_KWS.md`) and an embedding lookup, where a scale per
row is a second Gather per id while one scale per table is a single DequantizeLinear after the lookup
(`bench/RESULTS_DLRM.md`). There a `per_channel` scheme means "per channel where it is measurably more accurate":
the weight gets one scale when its signal to quantization-noise ratio (SQNR) with one scale is at least ENOUGH_DB,
or when per-channel scales gain less than GAIN_DB over it (MiniLM's token-type
table of two rows: 29.2 vs 29.3 dB), and a scale per channel otherwise. `per_channel: false` always means one scale.

Why 30 dB (noise at most ~3% of the weight's RMS): in both examples the one-scale form was as accurate end to end
as per-channel (KWS LSTM W 31.8 dB, R 37 dB; DLRM tables 33-40 dB), the LSTMs of the third-party corpus are at
31-36 dB (brainmaze-eeg-models) and 42 dB (the built VAD), while the tables that per-row scales do protect are well
below it: MiniLM's word embeddings 27 dB (a few dimensions hold outliers) and its position embeddings 15 dB
(position 0: 5x the median row norm). Dynamic mode also quantizes these layers' inputs to uint8 at run time (one
scale over the input's range), noise of the same order as int8 weights with one scale, so a weight above the
threshold is not what limits the layer. The threshold is a judgement from these measurements, not a law.

SQNR is over the whole weight, so each row counts by its size: a table whose rare ids kept small rows but whose
popular rows grew large (the DLRM tables) still fits one scale, since what a layer downstream sees is the absolute
error, the same step for every row; a few huge rows (MiniLM's position 0) make the step coarse for all the others
and do not.
"""

from __future__ import annotations

import numpy as np

from ..weights import QuantizedWeight

ENOUGH_DB = 30.0
GAIN_DB = 3.0  # half the noise power: less than that is not measurably more accurate


def dequantized(qw: QuantizedWeight) -> np.ndarray:
    """The real values a quantized weight stands for, (q - zero point) * scale along its axis."""
    shape = [1] * qw.q.ndim
    if qw.axis is not None:
        shape[qw.axis] = -1
    scale = np.asarray(qw.scale, np.float64).reshape(shape)
    return (qw.q.astype(np.float64) - np.asarray(qw.zero_point, np.float64).reshape(shape)) * scale


def sqnr_db(w: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(signal / noise) of `approx` as a copy of `w`; inf when exact (or w is all zeros)."""
    w64 = np.asarray(w, np.float64)
    noise = float(np.sum((np.asarray(approx, np.float64) - w64) ** 2))
    signal = float(np.sum(w64**2))
    if noise == 0.0 or signal == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(signal / noise))


def one_scale_is_enough(one_db: float, per_channel_db: float) -> bool:
    """One scale unless it is below ENOUGH_DB and per-channel scales at least halve the noise (GAIN_DB)."""
    return one_db >= ENOUGH_DB or per_channel_db < one_db + GAIN_DB


def shown(db: float) -> float | str:
    """A JSON value for the plan: dB to 0.1, or "exact"."""
    return round(db, 1) if np.isfinite(db) else "exact"
