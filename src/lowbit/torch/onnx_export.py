"""PyTorch module -> ONNX proto with the legacy (TorchScript) exporter, so lowbit's ONNX path takes over.

Tracing records one path through the forward; a branch on tensor values would be silently baked in, so
tracer warnings about that are turned into a one-line LowbitError instead of a wrong model.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import onnx
import torch

from ..errors import LowbitError

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if example_inputs is None:
        raise LowbitError("a PyTorch module needs example_inputs=(x,) (a tuple of input tensors) to be exported")
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    out = []
    for x in items:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        out.append(x)
    return tuple(out)


def _where(e: object) -> str:
    """First line of an exception or warning message."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def module_to_onnx(
    module: torch.nn.Module, example_inputs: Any, opset: int = 17, fold_constants: bool = True
) -> onnx.ModelProto:
    """Export with a dynamic batch axis; inputs are named x (or x0, x1...), outputs y (or y0, y1...).
    Without `fold_constants` BatchNorm stays separate and every weight keeps its parameter name."""
    inputs = as_tuple(example_inputs)
    in_names = ["x"] if len(inputs) == 1 else [f"x{i}" for i in range(len(inputs))]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            outs = module(*inputs)
        n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
        out_names = ["y"] if n_out == 1 else [f"y{i}" for i in range(n_out)]
        buf = io.BytesIO()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                module,
                inputs,
                # The TorchScript exporter (dynamo=False) writes to file-like objects too; torch annotates f as a
                # path only (torch's own call of that exporter ignores the same arg-type error).
                buf,  # type: ignore[arg-type]
                dynamo=False,
                opset_version=opset,
                input_names=in_names,
                output_names=out_names,
                do_constant_folding=fold_constants,
                dynamic_axes={n: {0: "N"} for n in in_names + out_names},
            )
        # torch's own modules warn on their shape checks (nn.LSTM compares input.size(-1)); only user code counts.
        traced = [
            w
            for w in caught
            if issubclass(w.category, torch.jit.TracerWarning) and not str(w.filename).startswith(_TORCH_DIR)
        ]
        if traced:
            w = traced[0]
            raise LowbitError(
                f"cannot export {type(module).__name__} to ONNX: its forward depends on tensor values "
                f"at {w.filename}:{w.lineno} ({_where(w.message).split('. ')[0]}); remove the data-dependent branch "
                "or export the model to ONNX yourself"
            )
    except LowbitError:
        raise
    except Exception as e:  # torch raises many unrelated types here; the user needs the first line only
        raise LowbitError(
            f"cannot export {type(module).__name__} to ONNX ({type(e).__name__}: {_where(e)}); "
            "check example_inputs or export the model to ONNX yourself"
        ) from None
    finally:
        module.train(was_training)
    return onnx.load_from_string(buf.getvalue())


def is_module(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module)
