"""lowbit: quantize trained neural networks for phones and edge devices, and prove what it did.

Every measuring function returns a dataclass-style result with `.to_dict()` and `.to_json()`; in JSON,
non-finite numbers (an exact SQNR is +inf) are null (see lowbit/evaluate/jsonable.py).
`evaluate_model` is not called `evaluate`: that name is the `lowbit.evaluate` subpackage.
"""

from ._version import __version__
from .data import ImagePreprocess
from .errors import LowbitError
from .evaluate.diagnose import DiagnoseResult, diagnose
from .evaluate.evaluate import EvalResult
from .evaluate.evaluate import evaluate as evaluate_model
from .evaluate.lint import Finding, LintResult, lint
from .evaluate.report_data import ReportResult, report
from .export.tflite import ExportResult, export_tflite
from .plan import Plan
from .quantize import QuantizeResult, quantize
from .recipe import Recipe, Rule, Scheme

__all__ = [
    "__version__",
    "quantize",
    "QuantizeResult",
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
    "Recipe",
    "Rule",
    "Scheme",
    "Plan",
    "ImagePreprocess",
    "LowbitError",
]
