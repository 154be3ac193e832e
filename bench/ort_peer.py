"""The peer every bench script measures against: ONNX Runtime's `quantize_static` in its QDQ, per-channel form
(uint8 activations, int8 weights), fed one calibration feed at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def ort_static(model: Path, feeds: list[dict[str, np.ndarray]], out: Path, method: str = "MinMax") -> Path:
    """quantize_static(model) -> out, calibrated on `feeds` with CalibrationMethod `method` (MinMax, Percentile)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    quantize_static(
        str(model),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=False,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    return out
