"""The op registry: for each mode and op, how a node is decided and how it is rewritten.

Each op family's module calls `register` at import time. The planner asks `decide` for every node; the rewrite stage
calls each taken node's `rewrite`. Static nodes have no rewrite of their own: their OpSpec says what the generic QDQ
rewrite does to them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from ..decision import Reason
from ..plan import Plan
from ..recipe import Scheme
from .base import Decided, Skip, name_of

ANY = "*"
MODES = ("static", "dynamic", "weight_only", "float16")


@dataclass
class RewriteContext:
    """What rewrite functions share: the model, the plan they record weights in, and per-run caches."""

    model: ir.Model
    plan: Plan
    # Values computed once and shared by several nodes (e.g. one DynamicQuantizeLinear per input tensor).
    shared: dict[str, Any] = field(default_factory=dict)
    # Whole-region rewrites that need every node of their kind at once (float16 casts), run after the per-node ones.
    deferred: dict[Callable[[ir.Model, list[str]], Any], list[str]] = field(default_factory=dict)

    def defer(self, fn: Callable[[ir.Model, list[str]], Any], node: ir.Node) -> None:
        self.deferred.setdefault(fn, []).append(name_of(node))

    def run_deferred(self) -> None:
        for fn, names in self.deferred.items():
            fn(self.model, names)


Decide = Callable[[ir.Node, Scheme], Decided]
Rewrite = Callable[[RewriteContext, ir.Node, Scheme], None]


@dataclass(frozen=True)
class Entry:
    decide: Decide
    rewrite: Rewrite | None = None  # None: static QDQ by the generic rewrite (or nothing to rewrite)


_TABLE: dict[tuple[str, str, str], Entry] = {}


def register(
    modes: str | Iterable[str],
    op_types: Iterable[str],
    decide: Decide,
    rewrite: Rewrite | None = None,
    domain: str = "",
) -> None:
    """Register `decide` (and `rewrite`) for these ops in these modes. `domain` ANY matches every domain, and
    op_types (ANY,) every op of the mode not registered by name."""
    for mode in (modes,) if isinstance(modes, str) else modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode}")
        for op in op_types:
            key = (mode, domain, op)
            if key in _TABLE:
                raise ValueError(f"{key} is registered twice")
            _TABLE[key] = Entry(decide, rewrite)


def _domain(node: ir.Node) -> str:
    return "" if node.domain == "ai.onnx" else node.domain


def entry_for(mode: str, node: ir.Node) -> Entry | None:
    """The most specific entry: this domain and op, any domain and this op, then the mode's catch-all."""
    for key in ((mode, _domain(node), node.op_type), (mode, ANY, node.op_type), (mode, ANY, ANY)):
        if key in _TABLE:
            return _TABLE[key]
    return None


def decide(mode: str, node: ir.Node, scheme: Scheme) -> Decided:
    """What `mode` does with `node`. Static mode screens what no static handler can quantize first."""
    if mode == "static":
        specific = _TABLE.get((mode, _domain(node), node.op_type))
        if specific is None and _domain(node) != "":
            return Skip(Reason.CUSTOM_DOMAIN, {"domain": node.domain, "op": node.op_type})
        if node.outputs and all(o.dtype is not None and o.dtype != ir.DataType.FLOAT for o in node.outputs):
            other = next((o.dtype for o in node.outputs if o.dtype is not None and o.dtype.is_floating_point()), None)
            if other is not None:  # float16, bfloat16, double
                return Skip(Reason.OTHER_FLOAT, {"op": node.op_type, "dtype": other.name.lower()})
            return Skip(Reason.INTEGER_ONLY, {"op": node.op_type})
    entry = entry_for(mode, node)
    if entry is None:
        return Skip(Reason.NO_QUANTIZED_FORM, {"op": node.op_type})
    return entry.decide(node, scheme)


def registered(mode: str) -> frozenset[str]:
    """Op types with an entry of their own in `mode` (default domain or any)."""
    return frozenset(op for m, d, op in _TABLE if m == mode and d in ("", ANY) and op != ANY)
