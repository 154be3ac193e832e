"""Fixed input sizes, and every value's shape and element type at those sizes (one ONNX Runtime run on zeros)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...errors import LowbitError


def static_shapes(
    proto: onnx.ModelProto, batch: int, fixed: dict[str, tuple[int, ...]]
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    inits = {t.name for t in proto.graph.initializer}
    names = [vi.name for vi in proto.graph.input if vi.name not in inits]
    for name in fixed:
        if name not in names:
            raise LowbitError(f"--shape {name}: the model has no input {name} (inputs: {', '.join(names)})")
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if vi.name in fixed:
            if len(fixed[vi.name]) != len(dims):
                raise LowbitError(f"--shape {vi.name}: {len(fixed[vi.name])} sizes for an input of rank {len(dims)}")
            for d, size in zip(dims, fixed[vi.name]):
                d.dim_value = int(size)
        for i, d in enumerate(dims):
            if not d.HasField("dim_value"):
                if i != 0:
                    # Spelled from the input's own dims: a graph network's [2, num_edges] has no batch of 1 first.
                    example = "x".join(
                        str(e.dim_value) if e.HasField("dim_value") else "1" if k == 0 else e.dim_param or "SIZE"
                        for k, e in enumerate(dims)
                    )
                    raise LowbitError(
                        f"input {vi.name} has a symbolic dimension {d.dim_param!r} past the batch axis;"
                        f" TFLite needs fixed sizes: pass --shape {vi.name}={example} with every name replaced by"
                        " the size to export"
                    )
                d.dim_value = batch
    return probe(proto)


def probe(proto: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Shape and element type of every value, from one ONNX Runtime run on zeros at the fixed input sizes:
    exact where shape inference gives up (exporters' shape arithmetic around masks and positions)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    del probe.graph.value_info[:]
    inits = {t.name for t in proto.graph.initializer}
    inputs = [vi for vi in proto.graph.input if vi.name not in inits]
    names = [vi.name for vi in inputs] + list(dict.fromkeys(o for n in proto.graph.node for o in n.output if o))
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    feeds = {
        vi.name: np.zeros(
            [d.dim_value for d in vi.type.tensor_type.shape.dim],
            helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type),
        )
        for vi in inputs
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every value
    options.log_severity_level = 3
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - ORT raises several unrelated types for a bad model
        raise LowbitError(
            f"ONNX Runtime cannot run the model at the fixed input sizes, so tensor shapes are "
            f"unknown ({str(e).splitlines()[0][:200]}); check --shape / --batch"
        ) from None
    shapes = {n: tuple(int(d) for d in np.shape(v)) for n, v in zip(names, values)}
    dtypes: dict[str, int] = {n: helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype) for n, v in zip(names, values)}
    return shapes, dtypes
