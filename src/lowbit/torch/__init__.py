"""PyTorch side of lowbit: modules as input to `lowbit.quantize`, and quantization-aware training.

Imported only on request (`import lowbit.torch`), so `import lowbit` never loads torch.
"""

import warnings as _warnings

from .checkpoint import load_checkpoint
from .export import export_onnx
from .onnx_export import module_to_onnx
from .qat import calibrate_qat, freeze_bn, prepare_qat


def export(*args, **kwargs):
    """Deprecated name of `export_onnx`: beside `lowbit.export_tflite` it did not say what it writes."""
    _warnings.warn(
        "lowbit.torch.export is deprecated; use lowbit.torch.export_onnx (same arguments)",
        DeprecationWarning,
        stacklevel=2,
    )
    return export_onnx(*args, **kwargs)


__all__ = ["prepare_qat", "export_onnx", "calibrate_qat", "freeze_bn", "load_checkpoint", "module_to_onnx"]
