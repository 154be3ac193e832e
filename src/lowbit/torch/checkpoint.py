"""Checkpoints are loaded with weights_only=True: a file that needs arbitrary unpickling is refused."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import LowbitError


def load_checkpoint(path: str | Path, module: torch.nn.Module | None = None) -> Any:
    """Load a state dict (tensors and plain containers only); with `module`, load it into the module."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LowbitError(
            f"refusing to load {p}: it holds Python objects, not only tensors (loaded with "
            "weights_only=True, as untrusted files must be); save model.state_dict() instead"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"{p} is not a readable PyTorch checkpoint ({first})") from None
    if module is not None:
        if not isinstance(state, dict):
            raise LowbitError(f"{p} does not hold a state dict; save model.state_dict()")
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LowbitError(f"checkpoint {p} does not fit this module ({first})") from None
    return state
