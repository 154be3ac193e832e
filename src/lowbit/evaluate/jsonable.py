"""JSON for lowbit's results, with ONE policy for numbers JSON cannot hold: non-finite floats become null.

Metrics are legitimately infinite or undefined: the SQNR of a model against itself is +inf (no noise), a layer
whose float output is all zeros gives -inf, an empty tensor NaN. JSON has no such numbers. Python's `json` would
write `Infinity`/`NaN`, which JSON.parse, jq and most other parsers reject; strings ("inf") would make a number
field sometimes a string. So they are written as null: valid everywhere, and a field is a number or null. In an
SQNR field null almost always means exact (+inf). The result objects keep the real floats, so Python callers
lose nothing; `to_dict()` is the JSON form (the same dict `to_json()` writes), for embedding in other JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """`x` as plain JSON types: non-finite floats None, numpy scalars and arrays as Python numbers and lists."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def dumps(x: Any, indent: int | None = 1) -> str:
    """Strict JSON text (never Infinity/NaN) of `x` after `jsonable`."""
    return json.dumps(jsonable(x), indent=indent, allow_nan=False)


class JsonResult:
    """Base of the dataclass results: `to_dict()` gives the JSON form of the fields, `to_json()` its text."""

    _skip: tuple[str, ...] = ()  # fields kept out of the JSON form (bytes, paths of written files)

    def to_dict(self) -> dict[str, Any]:
        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name not in self._skip
        }
        return jsonable(fields)

    def to_json(self, indent: int | None = 1) -> str:
        return dumps(self.to_dict(), indent=indent)
