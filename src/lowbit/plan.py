"""The quantization plan: every quantized tensor's parameters and every node's fate, as JSON beside the model.

A plan can be re-applied to a retrained model of the same structure: activation ranges come from the plan
(no calibration), weights are quantized afresh from the new values. "The same structure" is checked: a plan
records `graph_fingerprint`, a hash of the prepared graph's node names, op types and tensor names (never weight
values), and applying it to a graph with another fingerprint is refused unless ranges are reused on purpose.
A saved plan also records `model_sha256`, the hash of the model file written with it, so a model and a plan that
do not belong together are detectable (`Plan.check_model`).
A plan also records `output_ranges`: the calibrated [min, max] of every float graph output, quantized or not, so
an exporter can give int8 parameters to an output lowbit leaves float (a classifier's last Gemm) without data.

Plan values are validated when a plan is loaded or passed in (`Plan.validate`): a bad value is a one-line
LowbitError naming the tensor, never a ValueError deep inside the rewrite.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._version import __version__
from .decision import Decision, Reason
from .errors import LowbitError
from .graph.write import atomic_write_bytes
from .numerics import QTYPES

if TYPE_CHECKING:
    import onnx_ir as ir

# Version 2: node decisions carry a reason code, details and the deciding rule's index (version 1: sentences only).
PLAN_VERSION = 2
READS = (1, 2)


@dataclass
class TensorParams:
    dtype: str
    scale: list[float]
    zero_point: list[int]
    axis: int | None = None
    kind: str = "activation"  # activation | weight | bias
    range: list[float] | None = None  # calibrated [a, b] for activations
    # int4 weights: values per scale along `axis` (scales are stored flat, n_blocks per row)
    block_size: int | None = None
    # Where the target adjusted a calibrated scale (targets/__init__.py): [calibrated scale, zero point, adjusted
    # scale, zero point]. A re-applied plan whose values are still the adjusted ones starts from the calibrated
    # ones and the target adjusts them again, so it rebuilds the same bytes; an edited value is taken as it is.
    adapted: list[float] | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        s = np.asarray(self.scale, np.float32)
        z = np.asarray(self.zero_point)
        return (s.reshape(()) if self.axis is None else s), (z.reshape(()) if self.axis is None else z)


NodeEntry = Decision  # a plan's record of one node


@dataclass
class Plan:
    recipe: dict[str, Any]
    tensors: dict[str, TensorParams] = field(default_factory=dict)
    nodes: dict[str, NodeEntry] = field(default_factory=dict)
    overflow_guard: dict[str, int] = field(default_factory=dict)  # node -> channels changed
    # per-channel means of weighted ops' inputs on the calibration data, for bias correction on re-use
    channel_means: dict[str, list[float]] = field(default_factory=dict)
    calibration_samples: int = 0
    version: int = PLAN_VERSION
    lowbit_version: str = __version__
    # Optional (no version bump; plans without them are read as before): see the module docstring.
    graph_fingerprint: str | None = None
    model_sha256: str | None = None
    # SmoothQuant's per-channel scales by activation name (recipe smooth_quant), so a re-applied plan smooths alike.
    smooth_scales: dict[str, list[float]] = field(default_factory=dict)
    # graph output -> calibrated [min, max] as observed (no clipping); {} in plans from before it
    output_ranges: dict[str, list[float]] = field(default_factory=dict)
    # AdaRound's up/down bits by weight ("node:1"), with the float weight's sha256 (adaround.py); {} when off.
    adaround: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Empirical bias correction: the shift subtracted from each layer's bias, per output channel (recipe
    # empirical_bias_correction; passes/bias_empirical.py), so a re-applied plan corrects alike; {} when off.
    bias_shifts: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for t in out["tensors"].values():
            if t["adapted"] is None:
                del t["adapted"]  # most tensors: kept out of the file
        out["nodes"] = {k: v.to_dict() for k, v in self.nodes.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        atomic_write_bytes(self.to_json().encode(), path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
            if data.get("version") not in READS:
                raise LowbitError(
                    f"plan {p} has version {_short(data.get('version'))}; this lowbit reads versions "
                    f"{', '.join(map(str, READS))}: re-run calibration with --calib to make a new plan"
                )
            read_node = Decision.from_dict if data["version"] == 2 else _node_v1
            plan = cls(
                recipe=data["recipe"],
                tensors={k: TensorParams(**v) for k, v in data["tensors"].items()},
                nodes={k: read_node(v) for k, v in data["nodes"].items()},
                overflow_guard=data.get("overflow_guard", {}),
                channel_means=data.get("channel_means", {}),
                calibration_samples=data.get("calibration_samples", 0),
                version=PLAN_VERSION,
                lowbit_version=data.get("lowbit_version", "?"),
                graph_fingerprint=data.get("graph_fingerprint"),
                model_sha256=data.get("model_sha256"),
                smooth_scales=data.get("smooth_scales", {}),
                output_ranges=data.get("output_ranges", {}),
                adaround=data.get("adaround", {}),
                bias_shifts=data.get("bias_shifts", {}),
            )
        except RecursionError:
            raise LowbitError(f"{p} nests too deeply to be a lowbit plan file") from None
        except FileNotFoundError:
            raise LowbitError(f"plan file not found: {p}") from None
        except IsADirectoryError:
            raise LowbitError(f"plan {p} is a folder; pass the .plan.json file") from None
        except UnicodeDecodeError:
            raise LowbitError(f"{p} is not a lowbit plan file (not text)") from None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise LowbitError(escape_breaks(f"{p} is not a lowbit plan file ({type(e).__name__}: {e})")) from None
        plan.validate(f"plan {p}")
        for t in plan.tensors.values():
            # JSON may spell a scale or range as an integer (1e30 written out in digits): the rewrite needs floats.
            t.scale = [float(v) for v in t.scale]
            t.range = None if t.range is None else [float(v) for v in t.range]
        plan.output_ranges = {k: [float(v) for v in r] for k, r in plan.output_ranges.items()}
        return plan

    def validate(self, where: str = "the plan") -> None:
        """Every value a rewrite will use, checked: one LowbitError naming the tensor and the fix, never a
        ValueError or TypeError later. `where` names the plan in the message."""
        fix = "re-run calibration with --calib to make a new plan"

        def bad(what: str) -> LowbitError:
            return LowbitError(escape_breaks(f"{where}: {what}; {fix}"))

        if not isinstance(self.recipe, dict):
            raise bad(f"its recipe is {type(self.recipe).__name__}, not an object")
        if not isinstance(self.tensors, dict):
            raise bad("its tensors are not an object of tensor name -> parameters")
        for name, t in self.tensors.items():
            if not isinstance(t, TensorParams):
                raise bad(f"tensor '{name}' has no parameters (got {type(t).__name__})")
            problem = _tensor_problem(t)
            if problem:
                raise bad(f"tensor '{name}' {problem}")
        if not isinstance(self.channel_means, dict):
            raise bad("its channel_means are not an object of tensor name -> list of numbers")
        for name, means in self.channel_means.items():
            if not isinstance(means, list) or not all(_finite(v) for v in means):
                raise bad(f"channel means of '{name}' must be a list of finite numbers, got {_short(means)}")
        if not isinstance(self.overflow_guard, dict) or not all(
            _integer(v) and v >= 0 for v in self.overflow_guard.values()
        ):
            raise bad("its overflow_guard must map node names to channel counts")
        if not isinstance(self.nodes, dict) or not all(isinstance(v, Decision) for v in self.nodes.values()):
            raise bad("its nodes must map node names to decisions")
        if not _integer(self.calibration_samples) or self.calibration_samples < 0:
            raise bad(f"calibration_samples must be a count, got {_short(self.calibration_samples)}")
        if not isinstance(self.output_ranges, dict):
            raise bad("its output_ranges are not an object of output name -> [low, high]")
        for name, r in self.output_ranges.items():
            if not isinstance(r, list) or len(r) != 2 or not all(_finite(v) for v in r) or r[0] > r[1]:
                raise bad(f"output '{name}' has range {_short(r)}; a range is two finite numbers [low, high]")
        if not isinstance(self.adaround, dict):
            raise bad("its adaround record is not an object of weight name -> rounding")
        for name, e in self.adaround.items():
            ok = isinstance(e, dict) and isinstance(e.get("up"), str) and isinstance(e.get("weight_sha256"), str)
            if not ok or not isinstance(e.get("shape"), list) or not all(_integer(d) for d in e["shape"]):
                raise bad(f"weight '{name}' has an adaround entry without up bits, shape and weight_sha256")
            try:
                base64.b64decode(e["up"], validate=True)
            except ValueError:
                raise bad(f"weight '{name}' has adaround up bits that are not base64") from None
        if not isinstance(self.bias_shifts, dict):
            raise bad("its bias_shifts are not an object of node name -> list of numbers")
        for name, shifts in self.bias_shifts.items():
            if not isinstance(shifts, list) or not all(_finite(v) for v in shifts):
                raise bad(f"bias shifts of '{name}' must be a list of finite numbers, got {_short(shifts)}")
        for label, value in (("graph_fingerprint", self.graph_fingerprint), ("model_sha256", self.model_sha256)):
            if value is not None and not isinstance(value, str):
                raise bad(f"{label} must be a string, got {_short(value)}")

    def check_model_file(self, model: str | Path) -> None:
        """`check_model` on a model file (a plan and the model it is used with must belong together)."""
        from .graph.io import refuse_ort_format

        refuse_ort_format(model)  # its bytes are never the ONNX file's: say why, not "another sha256"
        if self.model_sha256 is not None:
            self.check_model(Path(model).read_bytes(), model)

    def check_model(self, model_bytes: bytes, model: str | Path) -> None:
        """Refuse a model file that is not the one this plan was saved with (plans from before `model_sha256`
        are not checked)."""
        if self.model_sha256 is not None and hashlib.sha256(model_bytes).hexdigest() != self.model_sha256:
            raise LowbitError(
                f"{model} is not the model its plan was written with (the plan records another sha256); "
                "pass the plan written beside this model, or quantize again"
            )


def _finite(v: Any) -> bool:
    # numbers.Real, not float: a Plan built in memory may hold numpy scalars
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def escape_breaks(text: str) -> str:
    """`text` with every character str.splitlines() breaks at escaped: names from a plan file may hold them."""
    if len(text.splitlines()) <= 1 and not text.endswith(("\n", "\r")):
        return text
    return "".join(c if len(f"a{c}b".splitlines()) == 1 else repr(c)[1:-1] for c in text)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def _tensor_problem(t: TensorParams) -> str | None:
    """What is wrong with one tensor's parameters, or None."""
    q = QTYPES.get(t.dtype) if isinstance(t.dtype, str) else None
    if q is None:
        return f"has dtype {_short(t.dtype)} (valid: {', '.join(QTYPES)})"
    if t.kind not in ("activation", "weight", "bias"):
        return f"has kind {_short(t.kind)} (valid: activation, weight, bias)"
    if not isinstance(t.scale, list) or not t.scale:
        return f"needs a non-empty list of scales, got {_short(t.scale)}"
    if not isinstance(t.zero_point, list) or not t.zero_point:
        return f"needs a non-empty list of zero points, got {_short(t.zero_point)}"
    for s in t.scale:
        if not _finite(s) or s <= 0:
            return f"has scale {_short(s)}; scales must be finite numbers > 0"
        # The rewrite stores scales as float32: 1e39 would become inf, 1e-46 zero.
        if s > _F32_MAX or s < _F32_TINY:
            return f"has scale {s!r}, which float32 cannot represent"
    lo, hi = q.qmin, q.qmax
    if t.kind == "weight" and q.signed:
        hi = q.qmax - q.qmin  # MatMulNBits stores int4 blocks' zero points unsigned (8 = zero)
    for z in t.zero_point:
        if not _integer(z):
            return f"has zero point {_short(z)}; zero points must be integers"
        if not lo <= z <= hi:
            return f"has zero point {z} outside {t.dtype}'s range [{lo}, {hi}]"
    if t.axis is not None and not _integer(t.axis):
        return f"has axis {_short(t.axis)}; an axis must be an integer or null"
    if t.block_size is not None and (not _integer(t.block_size) or t.block_size < 1):
        return f"has block_size {_short(t.block_size)}; it must be a positive integer or null"
    a = t.adapted
    if a is not None and (
        not isinstance(a, list) or len(a) != 4 or not all(_finite(v) for v in a) or not (a[0] > 0 and a[2] > 0)
    ):
        return f"has adapted {_short(a)}; it must be [scale, zero point, adjusted scale, zero point] or null"
    if t.kind == "activation" and t.axis is not None:
        # lowbit quantizes activations per tensor; an axis would reach the graph as a 1-D zero point
        return f"has axis {t.axis}, but activations are per tensor (axis null, one scale and zero point)"
    if t.axis is None and (len(t.scale) != 1 or len(t.zero_point) != 1):
        return f"has {len(t.scale)} scales and {len(t.zero_point)} zero points but no axis (per-tensor: one each)"
    if len(t.zero_point) not in (1, len(t.scale)):
        return f"has {len(t.scale)} scales but {len(t.zero_point)} zero points (one per scale)"
    if t.range is not None and (
        not isinstance(t.range, list) or len(t.range) != 2 or not all(_finite(v) for v in t.range)
    ):
        return f"has range {_short(t.range)}; a range is two finite numbers [low, high]"
    if t.range is not None and t.range[0] > t.range[1]:
        return f"has range {t.range}, low above high"
    return None


def graph_fingerprint(graph: ir.Graph) -> str:
    """sha256 over the prepared graph's structure: inputs, outputs, and each node's name, domain, op type and
    input/output names, in order. Weight values are left out on purpose: a retrained model of the same
    structure has the same fingerprint, so its plan's ranges apply."""
    h = hashlib.sha256()

    def put(*words: str) -> None:
        h.update(json.dumps(words).encode())
        h.update(b"\n")

    put("inputs", *(v.name or "" for v in graph.inputs))
    put("outputs", *(v.name or "" for v in graph.outputs))
    for node in graph:
        ins = [(v.name or "") if v is not None else "" for v in node.inputs]
        outs = [v.name or "" for v in node.outputs]
        put(node.name or "", node.domain, node.op_type, "in", *ins, "out", *outs)
    return h.hexdigest()


_FOLDED_V1 = "folded into the output range of "
_SENTINEL_V1 = re.compile(r"calibrated range reaches (\S+) at '(.*)' \(observed")


def _node_v1(d: dict[str, Any]) -> Decision:
    """A version-1 node kept only its sentence. The decisions later code branches on (a sentinel kept float, a
    folded activation, a shared scale) are recovered as data; the rest keep their sentence."""
    rule = d["rule"]
    index = int(rule.split(" ", 2)[1]) if rule.startswith("rule ") else None
    by = (
        "rule"
        if index is not None
        else "default"
        if rule == "default"
        else "exclude_names"
        if rule == "excluded by name"
        else "exclude_op_types"
    )
    text = d["reason"]
    found = _SENTINEL_V1.match(text) if not d["quantized"] else None
    code: Reason
    details: dict[str, Any]
    if found:
        code, details = Reason.SENTINEL, {"edge": float(found.group(1)), "tensor": found.group(2)}
    elif d["quantized"] and text.startswith(_FOLDED_V1):
        code, details = Reason.FOLDED, {"into": text[len(_FOLDED_V1) :]}
    elif d["quantized"] and text == "shares its input's scale":
        code, details = Reason.SHARES_SCALE, {}
    else:
        code, details = Reason.LEGACY, {"text": d["reason"]}
    return Decision(d["op_type"], bool(d["quantized"]), code, details, "unknown", rule, index, by)


def plan_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_suffix(".plan.json")
