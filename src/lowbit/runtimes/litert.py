"""Run a .tflite file in LiteRT (XNNPACK, the CPU interpreter's default delegate) behind the small part of the
onnxruntime.InferenceSession interface that evaluation and benchmarking use.

lowbit's .tflite export declares 4-D inputs and outputs NHWC, and can give full-integer models int8/uint8 inputs
and outputs. This adapter hides both, so the same NCHW float data, labels and reference model work for the ONNX
file and its .tflite: 4-D inputs are transposed to NHWC and quantized with the input tensor's scale and zero
point; outputs are dequantized and 4-D ones transposed back to NCHW. Files written by other tools (no lowbit
metadata) are fed in their own layout, as declared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import InputSpec
from ..errors import LowbitError

TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)


def is_tflite(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".tflite"


@dataclass(frozen=True)
class NodeArg:
    """Name and shape of an input or output, as ORT's NodeArg (NCHW for lowbit's 4-D tensors)."""

    name: str
    shape: tuple[int | None, ...]
    type: str


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class LiteRTSession:
    """A .tflite model in LiteRT's CPU interpreter; `run(None, feeds)` works as ORT's does."""

    def __init__(self, path: str | os.PathLike, threads: int = 0, xnnpack: bool = True) -> None:
        """`threads` 0: LiteRT's default; `xnnpack` False: LiteRT's built-in kernels only (to compare them)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise LowbitError(f"model not found: {self.path}; check the path")
        self.data = self.path.read_bytes()
        # A flatbuffer names its schema at bytes 4..8; checking first gives a clear error for a wrong file.
        if len(self.data) < 8 or self.data[4:8] != b"TFL3":
            raise LowbitError(f"{self.path} is not a TFLite model (no TFL3 identifier); re-export it")
        self.threads = threads
        self.xnnpack = xnnpack
        self.nchw, self.as_onnx = self._lowbit_layout()
        self._it = self._interpreter()
        self._inputs = self._it.get_input_details()
        self._outputs = self._it.get_output_details()
        for d in (*self._inputs, *self._outputs):
            if len(d["quantization_parameters"]["scales"]) > 1:
                raise LowbitError(
                    f"{self.path}: tensor '{d['name']}' has per-channel quantization at the model's "
                    "edge; lowbit can only feed per-tensor quantized inputs and outputs"
                )
        self._batch = int(self._inputs[0]["shape"][0]) if self._inputs and len(self._inputs[0]["shape"]) else 1
        self._per_sample = False  # set when the graph cannot be resized to another batch
        self._shapes = [tuple(int(v) for v in d["shape"]) for d in self._inputs]  # as allocated now

    # -- loading ------------------------------------------------------------------------------------
    def _lowbit_layout(self) -> tuple[bool, set[str]]:
        """Whether lowbit wrote the file from an NCHW ONNX model (its metadata says 4-D edges are NHWC), and the
        edges it declared as the ONNX model has them (channels-last there already: fed and read as they are)."""
        try:
            from ..export.tflite.writer import read_metadata

            meta = json.loads(read_metadata(self.data).get("lowbit", b"{}") or b"{}")
        except Exception:  # a file without (valid) lowbit metadata is simply not ours
            return False, set()
        return "NHWC" in str(meta.get("layout", "")), set(meta.get("layout_as_onnx", []))

    def _moved(self, d: dict, rank: int) -> bool:
        """Whether this 4-D edge is NHWC in the file and NCHW in the ONNX model."""
        return self.nchw and rank == 4 and d["name"] not in self.as_onnx

    def _interpreter(self) -> Any:
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError:
            raise LowbitError("running .tflite files needs LiteRT: pip install ai-edge-litert") from None
        resolver = OpResolverType.AUTO if self.xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            it = Interpreter(
                model_content=self.data, num_threads=self.threads or None, experimental_op_resolver_type=resolver
            )
            it.allocate_tensors()
        except Exception as e:  # LiteRT raises ValueError/RuntimeError with multi-line C++ logs
            raise LowbitError(
                f"LiteRT cannot load {self.path} ({_one_line(e)}); check or re-export the model"
            ) from None
        return it

    def delegate_partitions(self) -> int | None:
        """How many parts of the graph a delegate (XNNPACK on CPU) took over; None if LiteRT does not say."""
        try:
            inner = self._it._interpreter  # no public API tells; the execution plan lists delegate kernels
            return sum(inner.NodeName(i) == "DELEGATE" for i in range(inner.NumNodes()))
        except Exception:
            return None

    # -- the ORT-like interface ---------------------------------------------------------------------
    def _logical_shape(self, d: dict, batch_free: bool) -> tuple[int | None, ...]:
        shape = [int(x) for x in d["shape"]]
        if self._moved(d, len(shape)):
            shape = [shape[i] for i in TO_NCHW]
        out: list[int | None] = list(shape)
        if batch_free and out and self._batch == 1:
            out[0] = None  # a batch-1 file runs any batch (resized, or one sample at a time)
        return tuple(out)

    @staticmethod
    def _logical_dtype(d: dict) -> np.dtype:
        scale = d["quantization"][0]
        return np.dtype(np.float32) if scale and np.issubdtype(d["dtype"], np.integer) else np.dtype(d["dtype"])

    def get_inputs(self) -> list[NodeArg]:
        return [NodeArg(d["name"], self._logical_shape(d, True), str(self._logical_dtype(d))) for d in self._inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [NodeArg(d["name"], self._logical_shape(d, True), str(self._logical_dtype(d))) for d in self._outputs]

    def input_specs(self) -> list[InputSpec]:
        return [InputSpec(d["name"], self._logical_dtype(d), self._logical_shape(d, True)) for d in self._inputs]

    def prepare(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Feeds (by input name, or in input order for unnamed single inputs) as the file's own tensors."""
        native = []
        for d in self._inputs:
            if d["name"] in feeds:
                x = np.asarray(feeds[d["name"]])
            elif len(self._inputs) == 1 and len(feeds) == 1:
                x = np.asarray(next(iter(feeds.values())))
            else:
                raise LowbitError(
                    f"no data for input '{d['name']}' of {self.path}; the data has {', '.join(feeds) or 'nothing'}"
                )
            want = self._logical_shape(d, True)
            if x.ndim != len(want) or any(w is not None and w != s for w, s in zip(want, x.shape)):
                shown = ", ".join("N" if w is None else str(w) for w in want)
                raise LowbitError(f"input '{d['name']}' of {self.path} takes shape ({shown}), got {tuple(x.shape)}")
            if self._moved(d, x.ndim):
                x = x.transpose(TO_NHWC)
            scale, zero = d["quantization"]
            if scale and np.issubdtype(d["dtype"], np.integer):
                info = np.iinfo(d["dtype"])
                # rint (half to even) as ONNX QuantizeLinear rounds, so both runtimes see the same integers
                x = np.clip(np.rint(x.astype(np.float32) / np.float32(scale)) + zero, info.min, info.max)
            native.append(np.ascontiguousarray(x, dtype=d["dtype"]))
        return native

    def invoke(self, native: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run prepared inputs; outputs as the file stores them (NHWC, possibly int8)."""
        n = int(native[0].shape[0]) if native and native[0].ndim else self._batch
        if n != self._batch and self._batch == 1 and self._per_sample:
            parts = [self._invoke_once([x[i : i + 1] for x in native]) for i in range(n)]
            return [np.concatenate(p) for p in zip(*parts)]
        try:
            outs = self._invoke_once(native)
        except LowbitError:
            if n == self._batch or self._batch != 1:
                raise
        else:
            if n == self._batch or all(o.ndim and o.shape[0] == n for o in outs):
                return outs
        # Some batch-1 graphs (a RESHAPE to a fixed shape) fail or mix samples at another batch size: run them
        # one sample at a time instead.
        self._it = self._interpreter()
        self._shapes = [tuple(int(v) for v in d["shape"]) for d in self._inputs]
        self._per_sample = True
        return self.invoke(native)

    def _invoke_once(self, native: Sequence[np.ndarray]) -> list[np.ndarray]:
        it = self._it
        try:
            shapes = [tuple(x.shape) for x in native]
            if shapes != self._shapes:
                for d, x in zip(self._inputs, native):
                    it.resize_tensor_input(d["index"], list(x.shape))
                it.allocate_tensors()
                self._shapes = shapes
            for d, x in zip(self._inputs, native):
                it.set_tensor(d["index"], x)
            it.invoke()
            return [it.get_tensor(d["index"]) for d in self._outputs]
        except LowbitError:
            raise
        except Exception as e:
            raise LowbitError(f"LiteRT failed to run {self.path} ({_one_line(e)})") from None

    def finish(self, raw: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs dequantized to float32, 4-D ones back in NCHW."""
        outs = []
        for d, y in zip(self._outputs, raw):
            scale, zero = d["quantization"]
            if scale and np.issubdtype(d["dtype"], np.integer):
                y = ((y.astype(np.int32) - zero) * np.float32(scale)).astype(np.float32)
            if self._moved(d, y.ndim):
                y = np.ascontiguousarray(y.transpose(TO_NCHW))
            outs.append(y)
        return outs

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self.finish(self.invoke(self.prepare(feeds)))
        if output_names is None:
            return outs
        by_name = {d["name"]: o for d, o in zip(self._outputs, outs)}
        return [by_name[n] for n in output_names]
