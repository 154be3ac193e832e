"""Loading, saving and inspecting ONNX graphs through onnx-ir."""

from .io import load_model, model_size, save_model

__all__ = ["load_model", "save_model", "model_size"]
