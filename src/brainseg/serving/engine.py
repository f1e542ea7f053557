"""The inference engine behind the service: each model loaded once, reused by every request.

Models come from the registry through the one loader (``predictor.load_member``), so the backend
rules are the CLI's (``predictor.pick_backend``: ONNX Runtime on CPU, PyTorch where a CUDA GPU is
present or no ``.onnx`` file exists; ``BRAINSEG_BACKEND`` = auto | onnx | torch overrides). Each
(model, precision) pair is loaded once; ``ensemble`` averages the probabilities of every registered
model (``Registry.ensemble_members``), reusing the same loaded members. Thread-safe: requests run
in worker threads, ONNX Runtime sessions may be run concurrently, loading happens once under a lock.

Slices of concurrent requests are micro-batched (``batching.MicroBatcher``; ``BRAINSEG_BATCH_SIZE``
rows at most, ``BRAINSEG_BATCH_WAIT_MS``): each request preprocesses and post-processes its own
slice, and the network runs once for all of them. Volumes run their own batches directly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from ..config import DISPLAY_NAMES, PostprocessConfig
from ..inference import predictor, registry
from ..inference.backends import Ensemble, Segmenter
from ..inference.predict import SliceResult, VolumeResult, segment_slice, segment_volume
from ..inference.registry import PrecisionUnavailable, Registry, RegistryError, file_version
from ..io.volumes import Volume
from .allocator import keep_freed, limit_arenas
from .batching import BatchedBackend, MicroBatcher
from .cancel import cancellable
from .settings import Settings

log = logging.getLogger(__name__)

__all__ = ["DISPLAY_NAMES", "Engine", "ModelUnavailable", "PrecisionUnavailable", "file_version"]


class ModelUnavailable(RuntimeError):
    """No registry, or a registered model file is missing or unreadable (a server problem, 503)."""


class Engine:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self._models: dict[tuple[str, str], Segmenter] = {}
        self._versions: dict[tuple[str, str], str] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.RLock()  # get() -> registry() re-enters
        self._registry: Registry | None = None
        self._registry_mtime: float | None = None
        s = self.settings
        limit_arenas(s.malloc_arenas)  # before the worker threads exist: see allocator.py
        keep_freed(s.malloc_keep_mb)
        self.batcher = MicroBatcher(s.batch_size, s.batch_wait_ms / 1000, max_pending=4 * s.batch_size) if s.batch_size > 1 else None
        self.wrap_backend = None  # (backend, name, precision) -> backend, applied to each model loaded (metrics.install_metrics times them)

    def close(self) -> None:
        """Stops the batcher's thread (requests still waiting get an error)."""
        if self.batcher is not None:
            self.batcher.close()

    # ------------------------------------------------------------ registry

    @property
    def model_dir(self) -> Path:
        return Path(self.settings.model_dir) if self.settings.model_dir else registry.default_model_dir()

    def registry(self) -> Registry:
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
                    self._registry = registry.read(self.model_dir)
                except (RegistryError, OSError) as exc:
                    log.warning("unreadable registry %s: %s", path, exc)
                    raise ModelUnavailable("the model registry (registry.json) is unreadable; see the server log") from None
                if self._registry_mtime is not None:
                    self._models.clear()
                    self._versions.clear()
                self._registry_mtime = mtime
            return self._registry

    def names(self) -> list[str]:
        return self.registry().names

    def default_name(self) -> str:
        return self.registry().default

    def resolve(self, name: str | None) -> str:
        """A registry name (``None`` -> the default); KeyError with the choices if unknown."""
        reg = self.registry()
        members = reg.resolve(name)
        return registry.ENSEMBLE if name == registry.ENSEMBLE else members[0]

    def default_precision(self, name: str | None, tta: bool | None = None) -> str:
        """What a request that names no precision gets, with / without TTA (None: the model's TTA default;
        ``predictor.served_precision``)."""
        return predictor.served_precision(self.registry(), name, self.settings.backend, tta)

    def require_precision(self, name: str, precision: str) -> None:
        """PrecisionUnavailable when ``name`` (or a member of the ensemble) has no file of that precision."""
        if precision == "fp32":
            return
        reg = self.registry()
        for member in reg.resolve(name):
            predictor.choose_file(reg, member, self.settings.backend, precision)

    # ------------------------------------------------------------ loading

    def _load_one(self, name: str, precision: str) -> Segmenter:
        reg = self.registry()
        backend = self.settings.backend
        t0 = time.perf_counter()
        try:
            seg = predictor.load_member(reg, name, backend, precision, self.settings.onnx_intra_threads, self.settings.onnx_spinning, self.settings.onnx_device)
        except (PrecisionUnavailable, KeyError):
            raise
        except FileNotFoundError:
            path, kind = predictor.choose_file(reg, name, backend, precision)
            what = ".onnx (INT8)" if precision == "int8" else (".onnx" if kind == "onnx" else ".pt")
            log.warning("model %s: no %s file in %s (backend %s)", name, what, self.model_dir, backend)
            raise ModelUnavailable(f"model {name!r}: no {what} file in the model folder (backend {backend})") from None
        except RegistryError as exc:  # the registry and the file disagree (``predictor.check_tta_default``)
            log.warning("model %s (%s): %s", name, precision, exc)
            raise ModelUnavailable(f"model {name!r}: registry.json and its model file disagree; see the server log") from None
        except Exception as exc:
            log.warning("model %s (%s): cannot load it: %r", name, precision, exc)
            raise ModelUnavailable(f"model {name!r}: cannot load its model file; see the server log") from exc
        self._versions[(name, precision)] = self.file_version_of(name, precision, seg.path)
        log.info("loaded %s (%s) from %s (%s) in %.2f s", name, precision, seg.path, seg.backend.kind, time.perf_counter() - t0)
        return seg

    def get(self, name: str | None = None, precision: str = "fp32"):
        """The loaded Segmenter (or an Ensemble of the loaded members) for a registry name.

        KeyError for an unknown name, PrecisionUnavailable when a model has no file of that
        precision (both the client's doing), ModelUnavailable when a file is missing or broken.
        """
        name = self.resolve(name)
        if name == registry.ENSEMBLE:
            return Ensemble([self.get(n, precision) for n in self.registry().ensemble_members])
        with self._lock:
            seg = self._models.get((name, precision))
            if seg is None:
                seg = self._load_one(name, precision)
                if self.wrap_backend is not None:
                    seg.backend = self.wrap_backend(seg.backend, name, precision)
                self._models[(name, precision)] = seg
            return seg

    def loaded(self) -> list[str]:
        return sorted({name for name, _ in self._models})

    def file_version_of(self, name: str, precision: str, path=None) -> str:
        """The version a result of ``name`` in ``precision`` reports, without loading it (``predictor.weights_version``:
        fp32 the registry's version or the checkpoint's hash, INT8 its own file's hash). ``/v1/models`` and the answers
        both use it, so the two never disagree."""
        return predictor.weights_version(precision, path, reg=self.registry(), name=name, backend=self.settings.backend, hasher=self._hash)

    def _hash(self, path) -> str:
        """``file_version``, remembered per (path, size, mtime): /v1/models asks on every call."""
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_version(path)
        return self._hashes[key]

    def version(self, model) -> str:
        if isinstance(model, Ensemble):
            return "+".join(f"{m.name}:{self.version(m)}" for m in model.members)
        return self._versions.get((model.name, model.precision), "?")

    def backend_kind(self, model) -> str:
        if isinstance(model, Ensemble):
            return "+".join(sorted({m.backend.kind for m in model.members}))
        return model.backend.kind

    # ------------------------------------------------------------ describing

    def describe(self, name: str) -> dict:
        """Name, parameters, metrics, calibrated post-processing, version and model card of one model."""
        reg = self.registry()
        if name == registry.ENSEMBLE:
            return self._describe_ensemble(reg)
        entry = reg.entry(name)
        seg = self.get(name)
        params = seg.backend.info.get("parameters") or entry.parameters or _onnx_parameters(seg.path)
        card = Path(reg.directory) / (entry.card or f"{name}.md")
        return {
            "name": name,
            "display_name": DISPLAY_NAMES.get(name, name),
            "parameters": int(params) if params else None,
            "threshold": seg.postprocess.threshold,
            "min_size": seg.postprocess.min_size,
            # flip TTA: whether a request that does not say runs it, and the post-processing calibrated for it
            "tta": {
                "default": seg.with_tta(None),
                "threshold": seg.postprocess_for(True).threshold,
                "min_size": seg.postprocess_for(True).min_size,
                "precision": self.default_precision(name, True),  # what a request with TTA and no precision runs
            },
            "default_precision_without_tta": self.default_precision(name, False),
            "input_size": seg.config.preprocess.input_size,
            "metrics": entry.metrics,
            "backend": seg.backend.kind,
            # the version of what a request naming no precision runs (an answer's model.version), and of each precision
            "version": self.file_version_of(name, self.default_precision(name)),
            "versions": {p: self.file_version_of(name, p) for p in (["fp32", "int8"] if entry.onnx_int8 else ["fp32"])},
            "precisions": ["fp32", "int8"] if entry.onnx_int8 else ["fp32"],
            "default_precision": self.default_precision(name),
            "card": card.read_text(errors="replace") if card.is_file() else None,
        }

    def _describe_ensemble(self, reg: Registry) -> dict:
        members = [self.describe(n) for n in reg.ensemble_members]
        params = [m["parameters"] for m in members]
        post = self.get(registry.ENSEMBLE).postprocess
        ensemble_precisions = ["fp32", "int8"] if all("int8" in m["precisions"] for m in members) else ["fp32"]
        return {
            "name": registry.ENSEMBLE,
            "display_name": DISPLAY_NAMES[registry.ENSEMBLE],
            "members": [m["name"] for m in members],
            "parameters": sum(params) if all(p is not None for p in params) else None,
            "threshold": round(post.threshold, 4),
            "min_size": post.min_size,
            "tta": {
                "default": False,
                "threshold": round(post.threshold, 4),
                "min_size": post.min_size,
                "precision": self.default_precision(registry.ENSEMBLE, True),
            },
            "default_precision_without_tta": self.default_precision(registry.ENSEMBLE, False),
            "metrics": reg.ensemble.metrics if reg.ensemble else {},
            "backend": "+".join(sorted({m["backend"] for m in members})),
            "version": "+".join(f"{m['name']}:{m['versions'][self.default_precision(registry.ENSEMBLE)]}" for m in members),
            "versions": {p: "+".join(f"{m['name']}:{m['versions'][p]}" for m in members) for p in ensemble_precisions},
            "precisions": ensemble_precisions,
            "default_precision": self.default_precision(registry.ENSEMBLE),
            "card": None,
        }

    # ------------------------------------------------------------ running

    def postprocess(self, model, threshold: float | None, tta: bool = False) -> PostprocessConfig:
        """The model's calibrated post-processing for a run with or without flip TTA, ``threshold`` overriding its own."""
        return predictor.override(model.postprocess_for(tta), threshold)

    def run_slice(
        self, model, image: np.ndarray, threshold: float | None = None, tta: bool | None = None, pixel_spacing_mm: tuple[float, float] | None = None
    ) -> tuple[SliceResult, PostprocessConfig]:
        """One slice; its network input is batched with those of concurrent requests (same model, precision, TTA).
        ``tta`` None: the model's shipped default (``Segmenter.with_tta``; the caller resolves it to report it).
        ``pixel_spacing_mm`` (row, col): for areas and diameters in mm (None: pixels only)."""
        tta = model.with_tta(tta)
        post = self.postprocess(model, threshold, tta)
        if self.batcher is None:
            return segment_slice(model, image, post, tta=tta, pixel_spacing_mm=pixel_spacing_mm), post
        with self.batcher.expecting():
            return segment_slice(self.batched(model, tta), image, post, tta=tta, pixel_spacing_mm=pixel_spacing_mm), post

    def batched(self, model, tta: bool):
        """``model`` with its backend calls going through the batcher (an Ensemble: each member's)."""
        if isinstance(model, Ensemble):
            return Ensemble([self.batched(m, tta) for m in model.members])
        key = (model.name, model.precision, tta, id(model.backend))
        return Segmenter(BatchedBackend(model.backend, self.batcher, key), model.name, model.path)

    def run_volume(
        self, model, vol: Volume, threshold: float | None = None, tta: bool | None = None, cancel: threading.Event | None = None
    ) -> tuple[VolumeResult, PostprocessConfig]:
        """Every slice of ``vol`` (``tta`` as in ``run_slice``); once ``cancel`` is set, the next batch raises
        ``cancel.Cancelled`` instead of running."""
        tta = model.with_tta(tta)
        post = self.postprocess(model, threshold, tta)
        return segment_volume(model if cancel is None else cancellable(model, cancel), vol, post, tta=tta), post


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
