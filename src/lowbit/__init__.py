"""lowbit: quantize trained neural networks for phones and edge devices, and prove what it did.

Every measuring function returns a dataclass-style result with `.to_dict()` and `.to_json()`; in JSON,
non-finite numbers (an exact SQNR is +inf) are null (see lowbit/evaluate/jsonable.py).
`evaluate_model` is not called `evaluate`: that name is the `lowbit.evaluate` subpackage (`auto_quantize`, the
`lowbit auto` command, likewise: `lowbit.auto` is its subpackage).

The names below are imported on first use: `import lowbit` stays cheap (the `lowbit` command starts without
loading ONNX Runtime, LiteRT or numpy, so Ctrl-C at start-up is handled like anywhere else).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import lazy_sympy
from ._version import __version__
from .errors import LowbitError

lazy_sympy.install()  # onnx_ir imports sympy only when a symbolic dimension's arithmetic needs it

if TYPE_CHECKING:
    from .auto import AutoResult
    from .auto import auto as auto_quantize
    from .data import ImagePreprocess
    from .evaluate.diagnose import DiagnoseResult, diagnose
    from .evaluate.evaluate import EvalResult
    from .evaluate.evaluate import evaluate as evaluate_model
    from .evaluate.lint import Finding, LintResult, lint
    from .evaluate.report_data import ReportResult, report
    from .export.executorch import ExecutorchExportResult, export_executorch
    from .export.ort import OrtExportResult, export_ort
    from .export.tflite import ExportResult, export_tflite
    from .pipeline import QuantizeResult, quantize
    from .plan import Plan
    from .recipe import Recipe, Rule, Scheme

# public name -> (module, attribute)
_LAZY = {
    "quantize": (".pipeline", "quantize"),
    "auto_quantize": (".auto", "auto"),
    "AutoResult": (".auto", "AutoResult"),
    "QuantizeResult": (".pipeline", "QuantizeResult"),
    "evaluate_model": (".evaluate.evaluate", "evaluate"),
    "EvalResult": (".evaluate.evaluate", "EvalResult"),
    "diagnose": (".evaluate.diagnose", "diagnose"),
    "DiagnoseResult": (".evaluate.diagnose", "DiagnoseResult"),
    "lint": (".evaluate.lint", "lint"),
    "LintResult": (".evaluate.lint", "LintResult"),
    "Finding": (".evaluate.lint", "Finding"),
    "report": (".evaluate.report_data", "report"),
    "ReportResult": (".evaluate.report_data", "ReportResult"),
    "export_tflite": (".export.tflite", "export_tflite"),
    "ExportResult": (".export.tflite", "ExportResult"),
    "export_ort": (".export.ort", "export_ort"),
    "OrtExportResult": (".export.ort", "OrtExportResult"),
    "export_executorch": (".export.executorch", "export_executorch"),
    "ExecutorchExportResult": (".export.executorch", "ExecutorchExportResult"),
    "Recipe": (".recipe", "Recipe"),
    "Rule": (".recipe", "Rule"),
    "Scheme": (".recipe", "Scheme"),
    "Plan": (".plan", "Plan"),
    "ImagePreprocess": (".data", "ImagePreprocess"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        try:  # a submodule not imported yet (`lowbit.plan.plan_path`)
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module 'lowbit' has no attribute '{name}'") from None
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "quantize",
    "QuantizeResult",
    "auto_quantize",
    "AutoResult",
    "evaluate_model",
    "EvalResult",
    "diagnose",
    "DiagnoseResult",
    "lint",
    "LintResult",
    "Finding",
    "report",
    "ReportResult",
    "export_tflite",
    "ExportResult",
    "export_ort",
    "OrtExportResult",
    "export_executorch",
    "ExecutorchExportResult",
    "Recipe",
    "Rule",
    "Scheme",
    "Plan",
    "ImagePreprocess",
    "LowbitError",
]
