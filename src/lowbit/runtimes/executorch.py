"""Run a `.pte` file (an ExecuTorch program, `lowbit export --to executorch`) in ExecuTorch's Python runtime,
behind the part of onnxruntime.InferenceSession that evaluation and benchmarking use (as `litert.py` does for
.tflite files).

A program has fixed input shapes (batch 1 as exported for a phone); a batch of another size runs one sample at a
time and the outputs are stacked. lowbit stores the input and output names in the program (a constant method
`lowbit_meta`, JSON as uint8) so the same data and reference ONNX model work for the .pte; a program written by
another tool gets `input`/`output` (or `input_0`, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import InputSpec
from ..errors import LowbitError
from .litert import NodeArg

META_METHOD = "lowbit_meta"
INSTALL = "running .pte files needs ExecuTorch: pip install 'lowbit[executorch]'"
# ExecuTorch's ScalarType codes (runtime/core/portable_type/scalar_type.h) for the types a model takes.
DTYPES = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 5: np.float16, 6: np.float32, 11: np.bool_}


def is_pte(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".pte"


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _default_names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


class ExecutorchSession:
    """A .pte program's `forward` method; `run(None, feeds)` works as ORT's does."""

    def __init__(self, path: str | os.PathLike, threads: int = 0) -> None:
        """`threads` 0: ExecuTorch's default thread pool; otherwise its size (the pool is process-wide)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise LowbitError(f"model not found: {self.path}; check the path")
        data = self.path.read_bytes()
        # An ExecuTorch flatbuffer names its schema ("ET" + version) at bytes 4..8.
        if len(data) < 8 or data[4:6] != b"ET":
            raise LowbitError(f"{self.path} is not an ExecuTorch program (no ET identifier); re-export it")
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError:
            raise LowbitError(INSTALL) from None
        self._torch = torch
        try:
            if threads:
                from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

                _unsafe_reset_threadpool(threads)
            # The method points into the program and its bytes: both live as long as the session.
            self._data = data
            self._program = program = Runtime.get().load_program(data)
            self._method = program.load_method("forward")
            meta = self._method.metadata
            self._in_meta = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
            self._out_meta = [meta.output_tensor_meta(i) for i in range(meta.num_outputs())]
            names = self._names(program)
        except LowbitError:
            raise
        except Exception as e:  # the runtime raises RuntimeError with its error code
            raise LowbitError(f"ExecuTorch cannot load {self.path} ({_one_line(e)}); check or re-export it") from None
        self.input_names = names.get("inputs") or _default_names("input", len(self._in_meta))
        self.output_names = names.get("outputs") or _default_names("output", len(self._out_meta))
        self._shapes = [tuple(int(v) for v in m.sizes()) for m in self._in_meta]
        self._dtypes = [np.dtype(DTYPES.get(m.dtype(), np.float32)) for m in self._in_meta]

    def _names(self, program: Any) -> dict[str, list[str]]:
        if META_METHOD not in program.method_names:
            return {}
        raw = program.load_method(META_METHOD).execute([])[0]
        meta = json.loads(bytes(raw.numpy().astype(np.uint8).tolist()).decode())
        return meta if isinstance(meta, dict) else {}

    def _batch(self) -> int:
        return self._shapes[0][0] if self._shapes and self._shapes[0] else 1

    def _logical(self, shape: tuple[int, ...]) -> tuple[int | None, ...]:
        # A batch-1 program runs any batch (one sample at a time)
        return (None, *shape[1:]) if shape and shape[0] == 1 else shape

    # -- the ORT-like interface ---------------------------------------------------------------------
    def get_inputs(self) -> list[NodeArg]:
        return [NodeArg(n, self._logical(s), str(d)) for n, s, d in zip(self.input_names, self._shapes, self._dtypes)]

    def get_outputs(self) -> list[NodeArg]:
        return [
            NodeArg(n, self._logical(tuple(int(v) for v in m.sizes())), "float32")
            for n, m in zip(self.output_names, self._out_meta)
        ]

    def input_specs(self) -> list[InputSpec]:
        return [InputSpec(n, d, self._logical(s)) for n, s, d in zip(self.input_names, self._shapes, self._dtypes)]

    def delegate_partitions(self) -> int | None:
        return None

    def prepare(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        """Feeds (by input name, or the only one for a one-input program) as tensors, shapes checked."""
        out = []
        for name, shape, dtype in zip(self.input_names, self._shapes, self._dtypes):
            if name in feeds:
                x = np.asarray(feeds[name])
            elif len(self.input_names) == 1 and len(feeds) == 1:
                x = np.asarray(next(iter(feeds.values())))
            else:
                raise LowbitError(
                    f"no data for input '{name}' of {self.path}; the data has {', '.join(feeds) or 'nothing'}"
                )
            if x.shape[1:] != shape[1:] or (shape and shape[0] != 1 and x.shape[0] != shape[0]):
                shown = ", ".join(str(v) for v in self._logical(shape))
                raise LowbitError(f"input '{name}' of {self.path} takes shape ({shown}), got {tuple(x.shape)}")
            out.append(self._torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)))
        return out

    def invoke(self, native: Sequence[Any]) -> list[np.ndarray]:
        n = int(native[0].shape[0]) if native and native[0].dim() else 1
        if self._batch() == 1 and n != 1:
            parts = [self._execute([x[i : i + 1] for x in native]) for i in range(n)]
            return [np.concatenate(p) for p in zip(*parts)]
        return self._execute(native)

    def _execute(self, native: Sequence[Any]) -> list[np.ndarray]:
        try:
            outs = self._method.execute(list(native))
        except Exception as e:
            raise LowbitError(f"ExecuTorch failed to run {self.path} ({_one_line(e)})") from None
        return [o.numpy().copy() for o in outs]

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self.invoke(self.prepare(feeds))
        if output_names is None:
            return outs
        by_name = dict(zip(self.output_names, outs))
        return [by_name[n] for n in output_names]
