"""Measuring what quantization did: fidelity metrics and latency."""
