"""Exporters: lowbit's models in other runtimes' formats."""

from .tflite import ExportResult, export_tflite

__all__ = ["export_tflite", "ExportResult"]
