"""The quantization plan: every quantized tensor's parameters and every node's fate, as JSON beside the model.

A plan can be re-applied to a retrained model of the same structure: activation ranges come from the plan
(no calibration), weights are quantized afresh from the new values.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .decision import Decision, Reason
from .errors import LowbitError
from .graph.io import atomic_write_bytes

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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
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
                    f"plan {p} has version {data.get('version')}; this lowbit reads versions "
                    f"{', '.join(map(str, READS))}: re-run calibration with --calib to make a new plan"
                )
            read_node = Decision.from_dict if data["version"] == 2 else _node_v1
            return cls(
                recipe=data["recipe"],
                tensors={k: TensorParams(**v) for k, v in data["tensors"].items()},
                nodes={k: read_node(v) for k, v in data["nodes"].items()},
                overflow_guard=data.get("overflow_guard", {}),
                channel_means=data.get("channel_means", {}),
                calibration_samples=data.get("calibration_samples", 0),
                version=PLAN_VERSION,
                lowbit_version=data.get("lowbit_version", "?"),
            )
        except FileNotFoundError:
            raise LowbitError(f"plan file not found: {p}") from None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise LowbitError(f"{p} is not a lowbit plan file ({type(e).__name__}: {e})") from None


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
