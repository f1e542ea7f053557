"""The model registry: which trained models exist and which one is the default.

``registry.json`` (in the shipped ``models/`` folder, or a training run's folder)::

    {"default": "attention_unet",
     "models": {"unetpp": {"checkpoint": "unetpp.pt", "onnx": "unetpp.onnx", "metrics": {...}}, ...}}

Paths are relative to the registry file. No torch import here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .data import write_json_atomic

REGISTRY = "registry.json"
ENSEMBLE = "ensemble"


def default_model_dir() -> Path:
    """``$BRAINSEG_MODEL_DIR``, else the repository's ``models/`` folder."""
    env = os.environ.get("BRAINSEG_MODEL_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "models"
    return repo if (repo / REGISTRY).is_file() else Path("models")


def read_registry(model_dir: os.PathLike | str | None = None) -> dict:
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    path = model_dir / REGISTRY
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model registry (train with `brainseg train` or pass --checkpoint)")
    reg = json.loads(path.read_text())
    reg["_dir"] = str(model_dir)
    return reg


def write_registry(model_dir: os.PathLike | str, reg: dict) -> None:
    write_json_atomic(Path(model_dir) / REGISTRY, {k: v for k, v in reg.items() if not k.startswith("_")})


def model_path(reg: dict, name: str, prefer_onnx: bool = True) -> Path:
    """Path of a registered model's file (ONNX if present and preferred, else the checkpoint)."""
    if name not in reg["models"]:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(reg['models']))} (or '{ENSEMBLE}')")
    entry = reg["models"][name]
    base = Path(reg["_dir"])
    if prefer_onnx and entry.get("onnx") and (base / entry["onnx"]).is_file():
        return base / entry["onnx"]
    return base / entry["checkpoint"]


def resolve_names(reg: dict, name: str | None) -> list[str]:
    """``None`` -> the default; ``ensemble`` -> every registered model; else that one."""
    if name is None:
        return [reg["default"]]
    if name == ENSEMBLE:
        return sorted(reg["models"])
    if name not in reg["models"]:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(sorted(reg['models']) + [ENSEMBLE])}")
    return [name]


def load(name: str | None = None, model_dir: os.PathLike | str | None = None, checkpoint: os.PathLike | str | None = None, prefer_onnx: bool = True):
    """A ready Segmenter (or Ensemble) by registry name, or from an explicit checkpoint path."""
    from .inference import Ensemble, load_segmenter

    if checkpoint:
        return load_segmenter(checkpoint, prefer_onnx=prefer_onnx)
    reg = read_registry(model_dir)
    names = resolve_names(reg, name)
    members = [load_segmenter(model_path(reg, n, prefer_onnx), n, prefer_onnx) for n in names]
    return members[0] if name != ENSEMBLE else Ensemble(members)
