"""Recipes: what to quantize and how, as frozen, versioned data with a JSON round trip.

Every option is validated here, before any model is loaded, so a typo fails in milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, get_args

from .decision import RuleMatch
from .errors import LowbitError

RECIPE_VERSION = 1

ActivationType = Literal["uint8", "int8", "uint16", "int16"]
WeightType = Literal["int8", "uint8", "int4"]
# layer_error: each range is the candidate (min-max, percentiles, MSE, entropy) that least disturbs the outputs of
# the nodes reading the tensor, measured on the first calibration samples (ranges_by_error.py).
# layer_error_fast: the same on 32 samples (8 for a large model), only for tensors whose candidates change the scale
# by 2% or more.
Calibration = Literal["minmax", "percentile", "entropy", "mse", "layer_error", "layer_error_fast"]
# static: calibrated activation ranges (QDQ); dynamic: int8 weights, activation ranges computed per input at run
# time; weight_only: quantized weights, float activations; float16: fp16 weights and compute; float: untouched.
Mode = Literal["static", "dynamic", "weight_only", "float16", "float"]
# Which runtimes the model is for (targets/): "portable" computes the same integers in ONNX Runtime and LiteRT.
TargetName = Literal["portable", "onnxruntime"]
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Scheme:
    """How one node is quantized."""

    mode: Mode = "static"
    activations: ActivationType = "uint8"  # uint8 activations + int8 weights is x86's fast integer path
    weights: WeightType = "int8"
    per_channel: bool = True
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    # layer_error_fast: min-max, except where a clipped range measurably disturbs the layers reading the tensor
    # less (ranges_by_error.py); EfficientNet-Lite0 92.6% top-1 agreement vs 88.3% for plain min-max.
    calibration: Calibration = "layer_error_fast"
    percentile: float = 99.99
    # 7-bit weights everywhere (ORT's reduce_range); lowbit prefers `avoid_overflow`, which does it per channel.
    reduce_range: bool = False
    # Where u8 x s8 pair products could overflow int16 in AVX2 kernels without VNNI, shrink that channel's
    # weight range just enough that no pair can: the integer kernels then agree with the float simulation.
    avoid_overflow: bool = True
    # Subtract from each output channel's bias the mean shift its rounded weights cause on calibration data.
    bias_correction: bool = True
    # int4 weights: values per scale along the reduction axis (weight_only MatMul/Gemm/Gather); None = 32.
    # Static int4 weights are per channel (or per tensor) behind an INT4 DequantizeLinear: a file about half the
    # size of int8, but ONNX Runtime has no integer kernel for them and runs those ops in float.
    block_size: int | None = None
    # AdaRound (adaround.py): learn each Conv/Gemm/MatMul weight's rounding (down or up) on the calibration data,
    # layer by layer, instead of rounding to nearest; static mode. Fashion-MNIST W4A8: bench/RESULTS_RECOVER.md.
    adaround: bool = False

    def __post_init__(self) -> None:
        _check_literal(self, "mode", Mode)
        _check_literal(self, "activations", ActivationType)
        _check_literal(self, "weights", WeightType)
        _check_literal(self, "calibration", Calibration)
        for name in (
            "per_channel",
            "symmetric_activations",
            "symmetric_weights",
            "reduce_range",
            "avoid_overflow",
            "bias_correction",
            "adaround",
        ):
            if not isinstance(getattr(self, name), bool):
                raise LowbitError(f"recipe option '{name}' must be true or false, got {_show(getattr(self, name))}")
        if not isinstance(self.percentile, (int, float)) or not 50.0 < self.percentile <= 100.0:
            raise LowbitError(f"recipe option 'percentile' must be in (50, 100], got {_show(self.percentile)}")
        if self.symmetric_weights and self.weights == "uint8":
            raise LowbitError("conflicting options: symmetric weights need a signed weight type; use weights=int8")
        if self.reduce_range and self.activations in ("uint16", "int16"):
            raise LowbitError("conflicting options: reduce_range is for 8-bit kernels, not 16-bit activations")
        if self.block_size is not None and (isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES):
            raise LowbitError(
                f"recipe option 'block_size' must be one of {', '.join(map(str, BLOCK_SIZES))}, "
                f"got {_show(self.block_size)}"
            )
        if self.block_size is not None and (self.weights != "int4" or self.mode != "weight_only"):
            raise LowbitError(
                "conflicting options: block_size applies to weight_only int4 weights only (static int4 "
                "weights are per channel); set mode=weight_only, weights=int4 or drop block_size"
            )
        if self.weights == "int4" and self.mode not in ("weight_only", "static"):
            raise LowbitError(
                f"conflicting options: int4 weights need mode weight_only or static, not {self.mode}; set weights=int8"
            )
        if self.adaround and self.mode != "static":
            raise LowbitError(
                f"conflicting options: adaround learns weight rounding on calibrated static layers, not mode "
                f"{self.mode}; set mode=static or drop adaround"
            )
        if self.mode == "dynamic" and self.activations != "uint8":
            raise LowbitError(
                "conflicting options: dynamic mode quantizes activations to uint8 at run time "
                f"(DynamicQuantizeLinear), not {self.activations}; drop 'activations' or use mode=static"
            )
        if self.mode == "dynamic" and self.weights != "int8":
            raise LowbitError(
                "conflicting options: dynamic mode needs int8 weights (u8 x s8 integer kernels); use weights=int8"
            )

    @property
    def int4_block(self) -> int:
        return self.block_size or 32


@dataclass(frozen=True)
class Rule:
    """Nodes matching every given criterion get `scheme`, or stay float when scheme is None."""

    names: tuple[str, ...] = ()  # fnmatch patterns on node names
    op_types: tuple[str, ...] = ()
    scheme: Scheme | None = None

    def matches(self, node_name: str, op_type: str) -> bool:
        if self.names and not any(fnmatchcase(node_name, p) for p in self.names):
            return False
        if self.op_types and op_type not in self.op_types:
            return False
        return bool(self.names or self.op_types)

    def describe(self) -> str:
        parts = [
            f"names={list(self.names)}" if self.names else "",
            f"op_types={list(self.op_types)}" if self.op_types else "",
        ]
        return "rule(" + ", ".join(p for p in parts if p) + ")"


@dataclass(frozen=True)
class Recipe:
    """A default scheme, ordered rules (first match wins), exclusions and calibration settings."""

    default: Scheme = field(default_factory=Scheme)
    rules: tuple[Rule, ...] = ()
    exclude_names: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    calibration_samples: int = 256
    batch_size: int = 8
    target: TargetName = "portable"
    # Set subnormal float weights (|w| < 1.2e-38) to zero before quantizing: the ones left float would make every
    # float op reading them slow (passes/subnormals.py); outputs move by less than float32 resolves.
    flush_subnormals: bool = False
    # --- accuracy recovery before calibration (passes/equalize.py, passes/smooth.py) ---
    # Cross-layer equalization: balance per-channel weight ranges of consecutive Conv/Gemm pairs (float unchanged).
    equalize: bool = False
    # SmoothQuant's migration strength alpha in [0, 1]: move activation outliers of MatMul/Gemm inputs into the
    # weights where the producer can absorb the division exactly; None = off. Needs calibration data.
    smooth_quant: float | None = None
    # After the rewrite, subtract from each Conv/ConvTranspose/Gemm bias the mean shift of its output in the quantized
    # model against float, measured on the calibration data in a few passes of every layer at once; shifts no
    # larger than their noise are shrunk away (passes/bias_empirical.py). Reads the calibration data again.
    empirical_bias_correction: bool = False
    # --- end accuracy recovery ---
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        _check_literal(self, "target", TargetName)
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            # "1" (a string) would otherwise read "version 1 is not supported (this lowbit reads version 1)".
            raise LowbitError(f"recipe version must be the number {RECIPE_VERSION}, got {_show(self.version)}")
        if self.version != RECIPE_VERSION:
            raise LowbitError(
                f"recipe version {_show(self.version)} is not supported (this lowbit reads version {RECIPE_VERSION})"
            )
        if not isinstance(self.flush_subnormals, bool):
            raise LowbitError(
                f"recipe option 'flush_subnormals' must be true or false, got {_show(self.flush_subnormals)}"
            )
        _check_recovery(self)
        for name in ("calibration_samples", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LowbitError(f"recipe option '{name}' must be a positive integer, got {_show(value)}")

    def match(self, node_name: str, op_type: str, aliases: tuple[str, ...] = ()) -> tuple[Scheme | None, RuleMatch]:
        """The scheme for a node (None = keep float) and what decided it; name patterns may match the node's
        name or one of its `aliases` (QAT: a layer's module name and its ONNX node name)."""
        names = (node_name, *aliases)
        if any(fnmatchcase(n, p) for n in names for p in self.exclude_names):
            return None, RuleMatch("exclude_names", None, "excluded by name")
        if op_type in self.exclude_op_types:
            return None, RuleMatch("exclude_op_types", None, f"excluded op type {op_type}")
        for i, rule in enumerate(self.rules):
            if any(rule.matches(n, op_type) for n in names):
                return rule.scheme, RuleMatch("rule", i, f"rule {i} {rule.describe()}")
        return self.default, RuleMatch()

    def scheme_for(self, node_name: str, op_type: str, aliases: tuple[str, ...] = ()) -> tuple[Scheme | None, str]:
        """`match`, with what decided said in words."""
        scheme, found = self.match(node_name, op_type, aliases)
        return scheme, found.text

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists, not tuples), so `from_dict(to_dict())` round-trips without a file."""
        out: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(self)))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> Recipe:
        _check_keys(data, cls, where)
        kw = dict(data)
        if "default" in kw:
            kw["default"] = _scheme(kw["default"], f"{where}.default")
        if "rules" in kw:
            if not isinstance(kw["rules"], list):
                raise LowbitError(f"{where}.rules must be a list of rule objects")
            kw["rules"] = tuple(_rule(r, f"{where}.rules[{i}]") for i, r in enumerate(kw["rules"]))
        for key in ("exclude_names", "exclude_op_types"):
            if key in kw:
                kw[key] = tuple(_str_list(kw[key], f"{where}.{key}"))
        return cls(**kw)

    @classmethod
    def load(cls, path: str | Path | dict[str, Any]) -> Recipe:
        """A recipe JSON file; a dict (what `to_dict` gives) is accepted too and read by `from_dict`."""
        if isinstance(path, dict):
            return cls.from_dict(path)
        if not isinstance(path, (str, os.PathLike)):
            raise LowbitError(
                f"recipe must be a Recipe, a dict or a path to a recipe JSON file, got {type(path).__name__}"
            )
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except RecursionError:
            raise LowbitError(f"recipe file {p} nests too deeply to be a recipe; fix the file") from None
        except FileNotFoundError:
            raise LowbitError(f"recipe file not found: {p}") from None
        except OSError as e:
            raise LowbitError(f"cannot read recipe file {p}: {e.strerror}") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            raise LowbitError(
                f"recipe file {p} is not valid JSON ({e}); fix the file or print a preset with "
                "`lowbit recipe --show default`"
            ) from None
        if not isinstance(data, dict):
            raise LowbitError(f"recipe file {p} must hold a JSON object")
        return cls.from_dict(data, where=str(p))


def _check_recovery(recipe: Recipe) -> None:
    """The accuracy-recovery options (equalize, smooth_quant, empirical_bias_correction)."""
    for name in ("equalize", "empirical_bias_correction"):
        if not isinstance(getattr(recipe, name), bool):
            raise LowbitError(f"recipe option '{name}' must be true or false, got {_show(getattr(recipe, name))}")
    alpha = recipe.smooth_quant
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
        raise LowbitError(f"recipe option 'smooth_quant' must be a number in [0, 1] or null, got {_show(alpha)}")


def _show(value: Any) -> str:
    """repr() for a message; a value nested too deeply or an integer too long to print is named by its type."""
    try:
        return repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__} too large to print>"


def _check_literal(obj: Any, name: str, kind: Any) -> None:
    allowed = get_args(kind)
    if getattr(obj, name) not in allowed:
        raise LowbitError(
            f"recipe option '{name}' must be one of {', '.join(allowed)}; got {_show(getattr(obj, name))}"
        )


def _check_keys(data: Any, cls: type, where: str) -> None:
    if not isinstance(data, dict):
        raise LowbitError(f"{where} must be a JSON object")
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise LowbitError(f"unknown recipe key {_show(unknown[0])} in {where} (valid keys: {', '.join(sorted(valid))})")


def _scheme(data: Any, where: str) -> Scheme:
    _check_keys(data, Scheme, where)
    return Scheme(**data)


def _rule(data: Any, where: str) -> Rule:
    _check_keys(data, Rule, where)
    kw = dict(data)
    for key in ("names", "op_types"):
        if key in kw:
            kw[key] = tuple(_str_list(kw[key], f"{where}.{key}"))
    if kw.get("scheme") is not None:
        kw["scheme"] = _scheme(kw["scheme"], f"{where}.scheme")
    return Rule(**kw)


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LowbitError(f"{where} must be a list of strings")
    return value


PRESETS: dict[str, Recipe] = {
    "default": Recipe(),
    # Every tensor's range by the error it causes at each reader, on 32 samples with more candidates
    # (ranges_by_error.py): several times the default's quantization time.
    "accurate": Recipe(default=Scheme(calibration="layer_error")),
    "int16-activations": Recipe(default=Scheme(activations="uint16")),
    "dynamic": Recipe(default=Scheme(mode="dynamic")),
    "weight-only-int8": Recipe(default=Scheme(mode="weight_only")),
    # Convolutions take no int4 form; they keep int8 weights.
    "weight-only-int4": Recipe(
        default=Scheme(mode="weight_only", weights="int4", block_size=32),
        rules=(Rule(op_types=("Conv", "ConvTranspose"), scheme=Scheme(mode="weight_only")),),
    ),
    "float16": Recipe(default=Scheme(mode="float16")),
    # 16-bit activations where dynamic ranges are wide (attention scores, normalisation), int8 weights everywhere.
    "mixed-16x8": Recipe(
        rules=(Rule(op_types=("Softmax", "Add", "Mul", "Concat"), scheme=Scheme(activations="uint16")),),
    ),
}


def preset(name: str) -> Recipe:
    try:
        return PRESETS[name]
    except KeyError:
        raise LowbitError(f"unknown preset '{name}' (valid: {', '.join(PRESETS)})") from None
