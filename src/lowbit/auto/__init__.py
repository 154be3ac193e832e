"""`lowbit auto`: a per-layer precision (int8, 16-bit activations, int4 weights, float) chosen from measurements
on this machine: each layer's error alone and its latency in ONNX Runtime, searched against a budget."""

from .run import AutoResult, auto

__all__ = ["AutoResult", "auto"]
