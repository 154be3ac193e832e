"""ExecuTorch export: a PyTorch module as a `.pte` program for XNNPACK, quantized with lowbit's recipe and ranges.

Imported on request only: it needs torch, torchao and executorch (`pip install 'lowbit[executorch]'`)."""

from .export import INSTALL, ExecutorchExportResult, export_executorch

__all__ = ["export_executorch", "ExecutorchExportResult", "INSTALL"]
