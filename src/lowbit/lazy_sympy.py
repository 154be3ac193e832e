"""onnx_ir without importing sympy until a symbolic dimension needs it.

onnx_ir (1.1) imports sympy at module level for its symbolic dimension arithmetic (`SymbolicDim("N") + 1`),
which lowbit never does: it reads and writes dimensions as names. Importing sympy (and mpmath) is 0.25-0.35 CPU s
of every `lowbit` command, ~8% of quantizing the YOLO head, and ONNX Runtime's quantization tool does not pay it.

`install()` (called by `import lowbit`) adds a finder that, when onnx_ir is first imported and sympy is not yet
loaded, puts a stand-in module under the name `sympy` for the length of that import only. onnx_ir's modules keep the
stand-in as their `sympy`; any attribute read from it imports the real sympy then (through the normal import
system, so every other importer gets the real module) and answers from it. The one exception: the five functions
onnx_ir's expression parser puts in a table at import time (`_symbolic_shapes._ALLOWED_FUNCTIONS`) are handed out
as wrappers that import sympy when called. A later onnx_ir reading anything else from sympy at import time only
loses the saving: the stand-in imports the real sympy and answers with it. (`importlib.util.LazyLoader` does not do
this on Python 3.11: onnx_ir's `import sympy` reads the lazy module's `__spec__`, which loads it.)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence
from typing import Any

# What onnx_ir 1.1's `_symbolic_shapes` reads from sympy while it is imported (its parser's table of functions).
DEFERRED_CALLS = frozenset({"Max", "Min", "floor", "sqrt", "Mod"})


def real_sympy() -> types.ModuleType:
    """The sympy module, imported now if it was not (never the stand-in)."""
    module = sys.modules.get("sympy")
    if isinstance(module, StandIn):
        del sys.modules["sympy"]  # mid-import of onnx_ir: the real one replaces the stand-in for everyone
        module = None
    return module if module is not None else importlib.import_module("sympy")


class DeferredCall:
    """A sympy function that imports sympy when first called (a table entry built at onnx_ir's import)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(real_sympy(), self.name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<sympy.{self.name}, imported on first call>"


class StandIn(types.ModuleType):
    """What onnx_ir's `import sympy` binds: reading an attribute imports the real sympy and gives its attribute."""

    def __getattr__(self, name: str) -> Any:
        if name == "__path__":  # `import sympy.core` mid-import: the real package replaces the stand-in first
            return real_sympy().__path__
        if name.startswith("__"):  # import machinery and introspection probing a module: not sympy's business
            raise AttributeError(name)
        loaded = sys.modules.get("sympy")
        if name in DEFERRED_CALLS and (loaded is None or isinstance(loaded, StandIn)):
            return DeferredCall(name)
        return getattr(real_sympy(), name)


class DeferSympyFinder(importlib.abc.MetaPathFinder):
    """Finds onnx_ir as the other finders do, with sympy's stand-in in place while its package executes."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "onnx_ir" or "sympy" in sys.modules:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            if "sympy" in sys.modules:
                return run(module)
            stand_in = StandIn("sympy", "stands in for sympy until an attribute is read (lowbit.lazy_sympy)")
            stand_in.__spec__ = None
            sys.modules["sympy"] = stand_in
            try:
                run(module)
            finally:
                if sys.modules.get("sympy") is stand_in:
                    del sys.modules["sympy"]  # onnx_ir keeps it; nobody else gets it

        loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's loader only
        return spec


def install() -> None:
    """Once per process, before onnx_ir is imported; nothing when it already is."""
    if "onnx_ir" in sys.modules or any(isinstance(f, DeferSympyFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, DeferSympyFinder())
