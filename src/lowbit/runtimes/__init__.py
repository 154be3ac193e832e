"""Adapters that run models: ONNX Runtime (integer kernels or float simulation)."""
