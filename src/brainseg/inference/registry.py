"""The model registry: its written schema, the one writer, the one reader. Nothing here loads a model.

``registry.json`` lives in a model folder (the shipped ``models/``, or a training run's folder);
paths in it are relative to that folder. ``pipeline.train_models`` and ``scripts/ship_models.py``
write it with ``write_registry``; everything reads it with ``read``. Models are loaded by
``predictor`` (the one loader, with the backend rules) from what this module reads. No torch import here.

Schema, version 1 (``Registry``; a file without ``schema_version`` was written before the
version existed and has the same keys, so it is read as version 1)::

    {"schema_version": 1,
     "default": "attention_unet",                 # a key of "models"; chosen on validation
     "selected_by": "...", "brainseg_version": "0.1.0",
     "split": {"train": [...], "val": [...], "test": [...]},
     "ensemble": {"metrics": {...}, "conditions": {...}, "postprocess": {...}},
     "models": {"unetpp": {"checkpoint": "unetpp.pt", "onnx": "unetpp.onnx",
                           "onnx_int8": "unetpp_int8.onnx",   # optional
                           "card": "unetpp.md", "parameters": 2291969,
                           "val_selection_score": 0.71, "metrics": {"per_patient_dice": 0.61, ...},
                           "conditions": {"all": {...}, ...}, "postprocess": {...},
                           "default_precision": "fp32", "int8": {...}}, ...}}

Only ``default`` and ``models`` are required. Training runs add facts of their own to an entry
(``train_wall_seconds``, ``epochs``, ...); unknown keys are kept and ignored.

The ensemble is every registered model (``ensemble_members``), their probabilities averaged,
with the post-processing rule of ``inference.Ensemble.postprocess``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import Environment, PostprocessConfig
from ..io.files import write_json_atomic

REGISTRY = "registry.json"
ENSEMBLE = "ensemble"
SCHEMA_VERSION = 1

Precision = Literal["fp32", "int8"]


class RegistryError(ValueError):
    """registry.json cannot be used: unreadable, of an unknown schema version, or not this schema."""


class PrecisionUnavailable(ValueError):
    """The asked precision does not exist for a model (no ``onnx_int8`` file registered)."""


class ModelEntry(BaseModel):
    """One registered model. Paths are relative to the registry's folder."""

    model_config = ConfigDict(extra="allow")

    checkpoint: str | None = None  # PyTorch weights + resolved configuration (.pt)
    onnx: str | None = None  # fp32 ONNX, configuration embedded as metadata
    onnx_int8: str | None = None  # INT8 (quantised) ONNX, for precision "int8"
    card: str | None = None  # model card (Markdown)
    parameters: int | None = None
    version: str | None = None  # names the weights; None: a hash of the file (``file_version``)
    val_selection_score: float | None = None  # what the default is chosen by (validation patients)
    metrics: dict[str, float | None] = Field(default_factory=dict)  # test patients, all sequences
    conditions: dict[str, dict[str, Any]] = Field(default_factory=dict)  # test patients, per input condition
    postprocess: PostprocessConfig | None = None  # as calibrated; a copy of what the model file carries
    default_precision: Precision | None = None  # what the INT8 measurement recommends serving (None: fp32)
    int8: dict[str, Any] | None = None  # how the INT8 file was made and what it costs (scripts/ship_int8.py)
    tta: dict[str, Any] | None = None  # flip TTA's calibration, its checks and whether it is on by default (scripts/ship_tta.py)

    @property
    def tta_default(self) -> bool:
        """Whether a run that does not say uses flip TTA: a copy of the model file's ``inference.tta`` (loading the model
        checks that they agree: ``predictor.check_tta_default``)."""
        return bool(self.tta and self.tta.get("default"))

    def int8_recommended(self, tta: bool) -> bool:
        """INT8 for a run with / without TTA: ``default_precision`` (``scripts/ship_int8.py``, one pass) and, with TTA,
        the INT8 check with TTA at its calibration (``tta.int8.holds``: ``scripts/ship_tta.py``, ``scripts/ship_int8.py``)."""
        if self.default_precision != "int8":
            return False
        return not tta or bool(((self.tta or {}).get("int8") or {}).get("holds"))


class EnsembleEntry(BaseModel):
    """What was measured for the ensemble of every registered model."""

    model_config = ConfigDict(extra="allow")

    metrics: dict[str, float | None] = Field(default_factory=dict)
    conditions: dict[str, dict[str, Any]] = Field(default_factory=dict)
    postprocess: PostprocessConfig | None = None


class Registry(BaseModel):
    """registry.json. ``directory`` is where it was read from (not written)."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    default: str
    selected_by: str | None = None
    brainseg_version: str | None = None
    split: dict[str, Any] | None = None
    ensemble: EnsembleEntry | None = None
    models: dict[str, ModelEntry]
    directory: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _default_is_registered(self) -> Registry:
        if not self.models:
            raise ValueError("registers no models")
        if ENSEMBLE in self.models:
            raise ValueError(f"'{ENSEMBLE}' is reserved for the mean of the registered models")
        if self.default not in self.models:
            raise ValueError(f"default {self.default!r} is not one of the registered models")
        return self

    @property
    def names(self) -> list[str]:
        return sorted(self.models)

    @property
    def ensemble_members(self) -> list[str]:
        """The ensemble is every registered model, in name order."""
        return self.names

    def entry(self, name: str) -> ModelEntry:
        if name not in self.models:
            raise KeyError(f"unknown model {name!r}; choose one of {', '.join(self.names + [ENSEMBLE])}")
        return self.models[name]

    def file(self, name: str, key: Literal["checkpoint", "onnx", "onnx_int8", "card"]) -> Path | None:
        """Absolute path of one of a model's files, or None when it is not registered or not on disk."""
        rel = getattr(self.entry(name), key)
        if not rel:
            return None
        path = Path(self.directory or ".") / rel
        return path if path.is_file() else None

    def tta_default(self, name: str | None) -> bool:
        """Whether a run of ``name`` (None: the default; the ensemble: never) that does not say uses flip TTA."""
        return name != ENSEMBLE and self.entry(name or self.default).tta_default

    def resolve(self, name: str | None) -> list[str]:
        """``None`` / ``""`` -> [the default]; ``ensemble`` -> its members; else [that model] (KeyError if unknown)."""
        if name in (None, ""):
            return [self.default]
        if name == ENSEMBLE:
            return self.ensemble_members
        self.entry(name)
        return [name]

    def to_json(self) -> dict:
        """The dict ``write_registry`` writes: ``schema_version`` first, then the keys that were set."""
        body = self.model_dump(mode="json", exclude_unset=True, exclude={"schema_version", "directory"})
        return {"schema_version": SCHEMA_VERSION, **body}


# ---------------------------------------------------------------- reading and writing


def default_model_dir() -> Path:
    """``$BRAINSEG_MODEL_DIR``, else the repository's ``models/`` folder."""
    env = Environment.read().model_dir
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "models"
    return repo if (repo / REGISTRY).is_file() else Path("models")


def parse(data: Any, source: str = REGISTRY) -> Registry:
    """A registry from its JSON value; RegistryError naming ``source`` if it is not one this code reads."""
    if not isinstance(data, dict):
        raise RegistryError(f"{source}: not a registry (expected a JSON object)")
    version = data.get("schema_version", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:
        raise RegistryError(
            f"{source}: schema_version {version!r} is not one this brainseg reads (it reads {SCHEMA_VERSION}); "
            "use the brainseg that wrote it, or write the registry again"
        )
    try:
        return Registry.model_validate(data)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'registry'}: {e['msg']}" for e in exc.errors()[:3])
        raise RegistryError(f"{source}: not a valid registry ({where})") from None


def read(model_dir: os.PathLike | str | None = None) -> Registry:
    """The registry of ``model_dir`` (default: ``default_model_dir()``), checked against the schema.

    FileNotFoundError when there is none; RegistryError when it is unreadable or of another schema.
    """
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    path = model_dir / REGISTRY
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model registry (train with `brainseg train` or pass --checkpoint)")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: not valid JSON ({exc})") from None
    reg = parse(data, str(path))
    reg.directory = model_dir
    return reg


def write_registry(model_dir: os.PathLike | str, reg: Registry | dict) -> Path:
    """The one writer: check ``reg`` against the schema and write ``registry.json`` atomically."""
    if isinstance(reg, dict):
        reg = parse(reg, "registry")
    path = Path(model_dir) / REGISTRY
    write_json_atomic(path, reg.to_json())
    return path


def file_version(path: os.PathLike | str) -> str:
    """First 12 hex digits of the file's SHA-256: names the exact weights a result came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]
