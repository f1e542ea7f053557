"""The inference engine behind the service: each model loaded once, reused by every request.

Backend per model: ONNX Runtime on CPU by default (no torch import, so the serving process
stays small), PyTorch where a CUDA GPU is present or no ``.onnx`` file exists
(``BRAINSEG_BACKEND`` = auto | onnx | torch). ``ensemble`` averages the probabilities of
every registered model, reusing the same loaded members. Thread-safe: requests run in
worker threads, ONNX Runtime sessions may be run concurrently, loading happens once under a lock.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import registry
from ..config import DISPLAY_NAMES, PostprocessConfig
from ..inference import Ensemble, OnnxBackend, Segmenter, TorchBackend, gpu_present, window_for_volume
from ..predict import SliceResult, VolumeResult, segment_slice, segment_volume
from ..preprocessing import to_uint8
from ..volumes import Volume
from .settings import Settings

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """No registry, or a registered model file is missing or unreadable (a server problem, 503)."""


def file_version(path: Path) -> str:
    """First 12 hex digits of the file's SHA-256: names the exact weights a result came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


class Engine:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self._models: dict[str, Segmenter] = {}
        self._versions: dict[str, str] = {}
        self._lock = threading.RLock()  # get() -> registry() re-enters
        self._registry: dict | None = None
        self._registry_mtime: float | None = None

    # ------------------------------------------------------------ registry

    @property
    def model_dir(self) -> Path:
        return Path(self.settings.model_dir) if self.settings.model_dir else registry.default_model_dir()

    def registry(self) -> dict:
        """registry.json, re-read when the file changes (so a newly trained model is picked up)."""
        path = self.model_dir / registry.REGISTRY
        try:
            mtime = path.stat().st_mtime
        except OSError:
            log.warning("no model registry at %s", path)
            raise ModelUnavailable("no model registry in the model folder: train models (`brainseg train`) or set BRAINSEG_MODEL_DIR") from None
        with self._lock:
            if self._registry is None or mtime != self._registry_mtime:
                try:
                    self._registry = registry.read_registry(self.model_dir)
                except ValueError as exc:
                    log.warning("unreadable registry %s: %s", path, exc)
                    raise ModelUnavailable("the model registry (registry.json) is unreadable; see the server log") from None
                if self._registry_mtime is not None:
                    self._models.clear()
                    self._versions.clear()
                self._registry_mtime = mtime
            return self._registry

    def names(self) -> list[str]:
        return sorted(self.registry()["models"])

    def default_name(self) -> str:
        return self.registry()["default"]

    def resolve(self, name: str | None) -> str:
        """A registry name (``None`` -> the default); KeyError with the choices if unknown."""
        reg = self.registry()
        if name in (None, ""):
            return reg["default"]
        if name == registry.ENSEMBLE or name in reg["models"]:
            return name
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(sorted(reg['models']) + [registry.ENSEMBLE])}")

    # ------------------------------------------------------------ loading

    def _paths(self, name: str) -> tuple[Path | None, Path | None]:
        reg = self.registry()
        entry = reg["models"][name]
        base = Path(reg["_dir"])
        onnx = base / entry["onnx"] if entry.get("onnx") and (base / entry["onnx"]).is_file() else None
        ckpt = base / entry["checkpoint"] if entry.get("checkpoint") and (base / entry["checkpoint"]).is_file() else None
        return onnx, ckpt

    def _load_one(self, name: str) -> Segmenter:
        onnx, ckpt = self._paths(name)
        want = self.settings.backend
        if want == "auto":
            want = "torch" if (ckpt is not None and (onnx is None or gpu_present())) else "onnx"
        path = onnx if want == "onnx" else ckpt
        if path is None:
            log.warning("model %s: no %s file in %s (backend %s)", name, ".onnx" if want == "onnx" else ".pt", self.model_dir, self.settings.backend)
            raise ModelUnavailable(f"model {name!r}: no {'.onnx' if want == 'onnx' else '.pt'} file in the model folder (backend {self.settings.backend})")
        t0 = time.perf_counter()
        try:
            backend = OnnxBackend(path, self.settings.onnx_threads) if want == "onnx" else TorchBackend(path)
        except Exception as exc:
            log.warning("model %s: cannot load %s: %r", name, path, exc)
            raise ModelUnavailable(f"model {name!r}: cannot load its model file; see the server log") from exc
        self._versions[name] = self.registry()["models"][name].get("version") or file_version(ckpt or path)
        log.info("loaded %s from %s (%s) in %.2f s", name, path, want, time.perf_counter() - t0)
        return Segmenter(backend, name, str(path))

    def get(self, name: str | None = None):
        """The loaded Segmenter (or an Ensemble of the loaded members) for a registry name."""
        name = self.resolve(name)
        if name == registry.ENSEMBLE:
            return Ensemble([self.get(n) for n in self.names()])
        with self._lock:
            seg = self._models.get(name)
            if seg is None:
                seg = self._models[name] = self._load_one(name)
            return seg

    def loaded(self) -> list[str]:
        return sorted(self._models)

    def version(self, model) -> str:
        if isinstance(model, Ensemble):
            return "+".join(f"{m.name}:{self._versions.get(m.name, '?')}" for m in model.members)
        return self._versions.get(model.name, "?")

    def backend_kind(self, model) -> str:
        if isinstance(model, Ensemble):
            return "+".join(sorted({m.backend.kind for m in model.members}))
        return model.backend.kind

    # ------------------------------------------------------------ describing

    def describe(self, name: str) -> dict:
        """Name, parameters, metrics, calibrated post-processing, version and model card of one model."""
        reg = self.registry()
        if name == registry.ENSEMBLE:
            members = [self.describe(n) for n in self.names()]
            params = [m["parameters"] for m in members]
            return {
                "name": name,
                "display_name": DISPLAY_NAMES[name],
                "members": [m["name"] for m in members],
                "parameters": sum(params) if all(p is not None for p in params) else None,
                "threshold": round(float(np.mean([m["threshold"] for m in members])), 4),
                "min_size": int(np.median([m["min_size"] for m in members])),
                "metrics": (reg.get("ensemble") or {}).get("metrics") or {},
                "backend": "+".join(sorted({m["backend"] for m in members})),
                "version": "+".join(f"{m['name']}:{m['version']}" for m in members),
                "card": None,
            }
        entry = reg["models"][name]
        seg = self.get(name)
        params = seg.backend.info.get("parameters") or entry.get("parameters") or _onnx_parameters(seg.path)
        card = Path(reg["_dir"]) / (entry.get("card") or f"{name}.md")
        return {
            "name": name,
            "display_name": DISPLAY_NAMES.get(name, name),
            "parameters": int(params) if params else None,
            "threshold": seg.postprocess.threshold,
            "min_size": seg.postprocess.min_size,
            "input_size": seg.config.preprocess.input_size,
            "metrics": entry.get("metrics") or {},
            "backend": seg.backend.kind,
            "version": self._versions.get(name, "?"),
            "card": card.read_text(errors="replace") if card.is_file() else None,
        }

    # ------------------------------------------------------------ running

    def postprocess(self, model, threshold: float | None) -> PostprocessConfig:
        post = model.postprocess
        return replace(post, threshold=float(threshold)) if threshold is not None else post

    def run_slice(self, model, image: np.ndarray, threshold: float | None = None, tta: bool = False) -> tuple[SliceResult, PostprocessConfig]:
        post = self.postprocess(model, threshold)
        return segment_slice(model, image, post, tta=tta), post

    def run_volume(self, model, vol: Volume, threshold: float | None = None, tta: bool = False) -> tuple[VolumeResult, PostprocessConfig]:
        post = self.postprocess(model, threshold)
        return segment_volume(model, vol, post, tta=tta), post


def display_volume(slices: np.ndarray) -> np.ndarray:
    """(Z, H, W, 3) any dtype -> uint8 for display, with the same volume-wide window the model saw.

    Windowed one slice at a time, so the float temporaries stay one slice large.
    """
    window = window_for_volume(slices)
    if window is None:
        return slices
    out = np.empty(slices.shape, np.uint8)
    for k in range(slices.shape[0]):
        out[k] = to_uint8(slices[k], *window)
    return out


def _onnx_parameters(path: str) -> int | None:
    """Weights in an ONNX file (``onnx`` package, if installed; it does not import torch)."""
    if not str(path).endswith(".onnx") or importlib.util.find_spec("onnx") is None:
        return None
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
        return int(sum(int(np.prod(t.dims)) for t in proto.graph.initializer))
    except Exception:
        return None
