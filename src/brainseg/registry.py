"""The model registry: its written schema, the one writer, the one loader.

``registry.json`` lives in a model folder (the shipped ``models/``, or a training run's folder);
paths in it are relative to that folder. ``pipeline.train_models`` and ``scripts/ship_models.py``
write it with ``write_registry``; the CLI, the scripts and the server (``serving.engine.Engine``)
read it with ``read`` and load models with ``load`` / ``load_member``, so every entry point
follows the same backend rules (``pick_backend``). No torch import here.

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

from .config import PostprocessConfig
from .data import write_json_atomic
from .inference import PRECISIONS

REGISTRY = "registry.json"
ENSEMBLE = "ensemble"
SCHEMA_VERSION = 1
BACKENDS = ("auto", "onnx", "torch")

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
    env = os.environ.get("BRAINSEG_MODEL_DIR")
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


def read_registry(model_dir: os.PathLike | str | None = None) -> dict:
    """``read`` as a plain dict (the keys of the file, and ``_dir``): for scripts and tests that index it.

    ``write_registry`` of this dict (``_dir`` is dropped) writes the same file back.
    """
    reg = read(model_dir)
    return {**reg.to_json(), "_dir": str(reg.directory)}


def write_registry(model_dir: os.PathLike | str, reg: Registry | dict) -> Path:
    """The one writer: check ``reg`` against the schema and write ``registry.json`` atomically."""
    if isinstance(reg, dict):
        reg = parse({k: v for k, v in reg.items() if not k.startswith("_")}, "registry")
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


# ---------------------------------------------------------------- which file, which backend


def requested_backend(backend: str | None = None) -> str:
    """``backend`` if given, else ``$BRAINSEG_BACKEND``, else ``auto``; ValueError if not one of BACKENDS."""
    value = backend or os.environ.get("BRAINSEG_BACKEND") or "auto"
    if value not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (BRAINSEG_BACKEND), got {value!r}")
    return value


def pick_backend(has_onnx: bool, has_checkpoint: bool, backend: str | None = None) -> str:
    """The backend rule, for every entry point (CLI, scripts, server), ``onnx`` or ``torch``:

    - ``auto`` (the default): ONNX Runtime on the CPU when the model's ``.onnx`` file is there and
      no CUDA GPU is present (``inference.gpu_present``; no torch import); PyTorch when a GPU is
      present and the checkpoint is there, or when there is no ``.onnx`` file;
    - ``onnx`` / ``torch``: that one (the caller reports a missing file);
    - ``backend=None`` reads ``$BRAINSEG_BACKEND`` (the server passes its setting of the same name,
      the CLI's ``--torch`` passes ``torch``);
    - precision ``int8`` always runs the ``onnx_int8`` file with ONNX Runtime (see ``choose_file``).
    """
    from .inference import gpu_present

    want = requested_backend(backend)
    if want == "auto":
        want = "torch" if has_checkpoint and (not has_onnx or gpu_present()) else "onnx"
    return want


def choose_file(reg: Registry, name: str, backend: str | None = None, precision: str = "fp32") -> tuple[Path | None, str]:
    """``(path, backend)`` of one registered model under the backend rule (``pick_backend``).

    ``path`` is None when the file the rule picks is missing. ``precision="int8"`` picks the
    ``onnx_int8`` file; PrecisionUnavailable when the model has none, or when ``backend="torch"``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8":
        if requested_backend(backend) == "torch":
            raise PrecisionUnavailable("precision int8 runs with ONNX Runtime only; the torch backend is fp32")
        if not reg.entry(name).onnx_int8:
            raise PrecisionUnavailable(f"model {name!r} has no INT8 version (no onnx_int8 in its registry); use precision fp32")
        return reg.file(name, "onnx_int8"), "onnx"
    onnx, ckpt = reg.file(name, "onnx"), reg.file(name, "checkpoint")
    kind = pick_backend(onnx is not None, ckpt is not None, backend)
    return (onnx if kind == "onnx" else ckpt), kind


def served_precision(reg: Registry, name: str | None, backend: str | None = None) -> str:
    """The precision a server uses when a request names none.

    ``int8`` where the registry recommends it (``default_precision``: ``scripts/ship_int8.py`` sets it
    only where the INT8 model's Dice cost on the test patients is within its limit), the model has an
    ``onnx_int8`` file and its fp32 model would run on ONNX Runtime (with a GPU, PyTorch fp32 is
    faster); else ``fp32``. An ensemble serves ``int8`` only when every member does.
    """

    def one(member: str) -> bool:
        entry = reg.entry(member)
        return entry.default_precision == "int8" and bool(entry.onnx_int8) and choose_file(reg, member, backend, "fp32")[1] == "onnx"

    return "int8" if all(one(m) for m in reg.resolve(name)) else "fp32"


def load_member(
    reg: Registry, name: str, backend: str | None = None, precision: str = "fp32", threads: int = 0, spinning: bool = True, device: str | None = None
):
    """One registered model, loaded (a ``Segmenter``; ``threads`` / ``spinning`` / ``device``: ONNX Runtime's, see
    ``inference.OnnxBackend``). FileNotFoundError when its file is missing."""
    from .inference import load_backend

    path, kind = choose_file(reg, name, backend, precision)
    if path is None:
        key = "onnx_int8" if precision == "int8" else ("onnx" if kind == "onnx" else "checkpoint")
        raise FileNotFoundError(f"model {name!r}: its {key} file is not in {reg.directory} (backend {requested_backend(backend)})")
    seg = load_backend(path, kind, name, threads=threads, spinning=spinning, device=device)
    if precision == "int8" and seg.precision != "int8":
        seg.backend.precision = "int8"  # registered as INT8; a file quantised by other tools carries no marker
    return seg


def load(
    name: str | None = None,
    model_dir: os.PathLike | str | None = None,
    checkpoint: os.PathLike | str | None = None,
    prefer_onnx: bool = True,
    *,
    backend: str | None = None,
    precision: str = "fp32",
    threads: int = 0,
):
    """A ready Segmenter (or Ensemble) by registry name, or from an explicit checkpoint / ONNX path.

    ``prefer_onnx=False`` is ``backend="torch"`` (the CLI's ``--torch``). Backends: ``pick_backend``.
    """
    from .inference import Ensemble, load_segmenter

    if not prefer_onnx:
        backend = "torch"
    if checkpoint:
        if precision == "int8" and Path(checkpoint).suffix != ".onnx":
            raise PrecisionUnavailable(f"{checkpoint}: precision int8 needs an INT8 .onnx file (or a registered model with --model)")
        return load_segmenter(checkpoint, backend=backend)
    reg = read(model_dir)
    members = [load_member(reg, n, backend, precision, threads) for n in reg.resolve(name)]
    return Ensemble(members) if name == ENSEMBLE else members[0]


def model_path(reg: dict, name: str, prefer_onnx: bool = True) -> Path:
    """Path of a registered model's file from ``read_registry``'s dict (ONNX if present and preferred)."""
    typed = parse({k: v for k, v in reg.items() if not k.startswith("_")})
    typed.directory = Path(reg["_dir"])
    onnx = typed.file(name, "onnx")
    return onnx if prefer_onnx and onnx is not None else Path(reg["_dir"]) / typed.entry(name).checkpoint
