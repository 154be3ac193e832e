"""The quantization plan: every quantized tensor's parameters and every node's fate, as JSON beside the model.

A plan can be re-applied to a retrained model of the same structure: activation ranges come from the plan
(no calibration), weights are quantized afresh from the new values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .errors import LowbitError
from .graph.io import atomic_write_bytes

PLAN_VERSION = 1


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


@dataclass
class NodeEntry:
    op_type: str
    quantized: bool
    reason: str
    rule: str


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        atomic_write_bytes(self.to_json().encode(), path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
            if data.get("version") != PLAN_VERSION:
                raise LowbitError(f"plan {p} has version {data.get('version')}, this lowbit reads {PLAN_VERSION}")
            return cls(
                recipe=data["recipe"],
                tensors={k: TensorParams(**v) for k, v in data["tensors"].items()},
                nodes={k: NodeEntry(**v) for k, v in data["nodes"].items()},
                overflow_guard=data.get("overflow_guard", {}),
                channel_means=data.get("channel_means", {}),
                calibration_samples=data.get("calibration_samples", 0),
                version=data["version"],
                lowbit_version=data.get("lowbit_version", "?"),
            )
        except FileNotFoundError:
            raise LowbitError(f"plan file not found: {p}") from None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise LowbitError(f"{p} is not a lowbit plan file ({type(e).__name__}: {e})") from None


def plan_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_suffix(".plan.json")
