"""lowbit: quantize trained neural networks for phones and edge devices, and prove what it did."""

from ._version import __version__
from .data import ImagePreprocess
from .errors import LowbitError
from .plan import Plan
from .quantize import QuantizeResult, quantize
from .recipe import Recipe, Rule, Scheme

__all__ = [
    "__version__",
    "quantize",
    "QuantizeResult",
    "Recipe",
    "Rule",
    "Scheme",
    "Plan",
    "ImagePreprocess",
    "LowbitError",
]
