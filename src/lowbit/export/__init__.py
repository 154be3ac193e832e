"""Exporters: lowbit's models in other runtimes' formats."""

from .ort import OrtExportResult, export_ort
from .tflite import ExportResult, export_tflite

__all__ = ["export_tflite", "ExportResult", "export_ort", "OrtExportResult"]
