"""`import lowbit` defers onnx_ir's sympy import (lazy_sympy.py): same results, sympy loaded only when used."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Symbolic dimension arithmetic and parsing through onnx_ir, printed as text.
ARITHMETIC = """
import json, sys
import onnx_ir as ir
n, m = ir.SymbolicDim("N"), ir.SymbolicDim("M")
exprs = [n + 1, n * 2 // 3, 5 - n, n % 4, -n, n / 2, ir.SymbolicDim("max(N, M) + min(N, 2)"),
         ir.SymbolicDim("floor(N / 2) + sqrt(M) + mod(N, 3)"), ir.SymbolicDim("Max(N, 1) * Mod(M, 2)")]
texts = [str(e) for e in exprs] + [str(e._expr) for e in exprs[-3:]]
print(json.dumps(texts))
"""


def run(code: str, *, first: str = "") -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", first + code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_lowbit_does_not_import_sympy_and_onnx_ir_still_computes_the_same() -> None:
    state = run(
        "import sys, lowbit.pipeline, lowbit.cli.quantize_cmd\n"
        "print(json.dumps(['sympy' in sys.modules, 'mpmath' in sys.modules, 'onnx_ir' in sys.modules]))",
        first="import json\n",
    )
    assert json.loads(state) == [False, False, True]
    deferred = run(ARITHMETIC, first="import lowbit.pipeline\n")
    plain = run(ARITHMETIC, first="import sympy\n")  # sympy first: the finder stands aside, onnx_ir as shipped
    assert json.loads(deferred) == json.loads(plain)
    assert "N + 1" in json.loads(plain)


def test_sympy_imported_later_is_the_real_module() -> None:
    code = (
        "import sys, lowbit.pipeline, onnx_ir, sympy, sympy.core.numbers\n"
        "from onnx_ir import _core\n"
        "print(sympy is sys.modules['sympy'], hasattr(sympy, '__file__'), _core.sympy.Integer is sympy.Integer)"
    )
    assert run(code) == "True True True"


def test_a_submodule_import_during_onnx_irs_import_gets_the_real_package() -> None:
    """Were a later onnx_ir to `import sympy.core` while the stand-in is in place, it gets the real package."""
    code = (
        "import sys\n"
        "from lowbit.lazy_sympy import StandIn, DeferredCall\n"
        "sys.modules['sympy'] = s = StandIn('sympy')\n"
        "s.__spec__ = None\n"
        "f = s.Max\n"
        "import sympy.core.numbers\n"
        "print(isinstance(f, DeferredCall), sys.modules['sympy'] is not s, str(f(2, 3)), s.Integer(4) + 1)"
    )
    assert run(code) == "True True 3 5"


def test_quantized_bytes_do_not_depend_on_it(tiny_model: Path, tiny_calib: Path, tmp_path: Path) -> None:
    code = (
        "import hashlib, sys, lowbit\n"
        f"r = lowbit.quantize({str(tiny_model)!r}, calib={str(tiny_calib)!r}, progress=False)\n"
        "print(hashlib.sha256(r.model.SerializeToString()).hexdigest(), 'sympy' in sys.modules)"
    )
    deferred = run(code).split()
    plain = run(code, first="import sympy\n").split()
    assert deferred[0] == plain[0] and len(deferred[0]) == len(hashlib.sha256().hexdigest())
    assert (deferred[1], plain[1]) == ("False", "True")
