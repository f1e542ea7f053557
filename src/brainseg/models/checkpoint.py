"""Checkpoints: a dict holding the weights and the resolved configuration.

Like nanoGPT's ``model_args``, ``config`` is enough to rebuild the model and its
preprocessing: ``model_from_checkpoint(load_checkpoint(path))``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ..config import ExperimentConfig
from ..io.files import write_bytes_atomic
from . import build_model


def save_checkpoint(path: os.PathLike | str, ckpt: dict) -> None:
    """torch.save to memory, then an atomic rename: a crash never leaves half a file."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    write_bytes_atomic(path, buf.getvalue())


def load_checkpoint(path: os.PathLike | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a brainseg checkpoint (needs 'config' and 'model')")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    cfg = ExperimentConfig.from_dict(ckpt["config"])
    model = build_model(cfg.model)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    return model.eval()
