"""PyTorch side of lowbit: modules as input to `lowbit.quantize`, and quantization-aware training.

Imported only on request (`import lowbit.torch`), so `import lowbit` never loads torch.
"""

from .onnx_export import module_to_onnx

__all__ = ["module_to_onnx"]
