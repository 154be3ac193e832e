"""PyTorch side of lowbit: modules as input to `lowbit.quantize`, and quantization-aware training.

Imported only on request (`import lowbit.torch`), so `import lowbit` never loads torch.
"""

from .checkpoint import load_checkpoint
from .export import export
from .onnx_export import module_to_onnx
from .qat import calibrate_qat, freeze_bn, prepare_qat

__all__ = ["prepare_qat", "export", "calibrate_qat", "freeze_bn", "load_checkpoint", "module_to_onnx"]
