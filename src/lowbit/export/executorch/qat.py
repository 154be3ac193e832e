"""A `lowbit.torch` QAT module in PT2E: its learned activation scales and its on-grid weights, no calibration.

The module's frozen float form (`lowbit.torch.export._frozen_copy`, what `export_onnx` exports: BatchNorm folded,
weights on their quantization grid, each activation quantizer a fake-quantize op with its learned uint8 scale and
zero point) is captured by torch.export. Each fake-quantize op is taken out of the graph and its parameters
are kept by the name of the tensor it quantized, as int8 (the uint8 grid shifted by 128: the same values).
The quantizer then gives those tensors fixed observers (`quantizer.use_learned`); XNNPACK quantizes the
on-grid weights to the same integers (scale max|w| / 127 per channel, as the module trained with).
As in `export_onnx`, no overflow guard and no bias correction: both would move weights off the trained grid.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import LowbitError
from ...torch.fakequant import ActFakeQuant

FAKE_QUANT = torch.ops.aten.fake_quantize_per_tensor_affine.default


def is_qat(module: torch.nn.Module) -> bool:
    return any(isinstance(m, ActFakeQuant) for m in module.modules())


def learned_graph(module: torch.nn.Module, example: tuple, capture: Any) -> tuple[torch.fx.GraphModule, dict]:
    """The QAT module captured without its fake quantizers, and tensor name -> learned (scale, int8 zero point)."""
    from ...torch.export import _frozen_copy

    clone, bits, markers = _frozen_copy(module)
    if markers:
        raise LowbitError(
            "--to executorch runs 8-bit activations (XNNPACK int8); this QAT module trained 16-bit ones: "
            "export it with lowbit.torch.export_onnx"
        )
    other = sorted(name for name, b in bits.items() if b != 8)
    if other:
        raise LowbitError(
            f"--to executorch takes QAT modules with int8 weights in every layer; {other[0]} is "
            f"{'float' if bits[other[0]] is None else f'int{bits[other[0]]}'}: export it with lowbit.torch.export_onnx"
        )
    gm = capture(clone.eval(), example).module()
    learned: dict[str, tuple[float, int]] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != FAKE_QUANT:
            continue
        src, scale, zero_point, qmin, qmax = node.args
        assert isinstance(src, torch.fx.Node) and (qmin, qmax) == (0, 255)  # ActFakeQuant's export form
        learned[src.name] = (float(scale), int(zero_point) - 128)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, learned
