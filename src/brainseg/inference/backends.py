"""Inference engine: a model loaded once, the preprocessing saved with it, probabilities out.

Backends: ONNX Runtime (``.onnx``, fp32 or INT8, CPU, no torch import) and PyTorch (``.pt``
checkpoints, CUDA when available); which one runs is decided by ``predictor.pick_backend``.
``Segmenter`` wraps one model, ``Ensemble`` averages the probabilities of several. All return
probabilities in [0, 1] at the input's size.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Environment, ExperimentConfig, PostprocessConfig
from ..evaluation.metrics import remove_small_components
from ..preprocessing import (
    context_indices,
    context_stack,
    intensity_window,
    normalize,
    over_slabs,
    prepare,
    preprocess_slice,
    restore_size,
    to_uint8,
    volume_stats,
)

ONNX_METADATA_KEY = "brainseg_config"
INT8_SUFFIX = ".int8.onnx"
LONE_DEPTH = 5  # a 3D model reads a lone slice as this many copies of it
ONNX_DEVICES = ("auto", "cpu", "cuda", "tensorrt")  # BRAINSEG_ONNX_DEVICE
GPU_PROVIDERS = {"tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}
log = logging.getLogger(__name__)


def onnx_providers(device: str | None = None, available: list[str] | None = None) -> list[str]:
    """The execution providers of an ONNX Runtime session, best first, CPU always last.

    ``device`` (default ``BRAINSEG_ONNX_DEVICE``, else ``auto``): ``auto`` takes TensorRT and CUDA
    where ONNX Runtime offers them (``onnxruntime-gpu`` on a machine with a GPU), ``cpu`` forces the
    CPU, ``cuda`` / ``tensorrt`` ask for one (the CPU, with a warning, where it is not offered).
    ``available``: ``onnxruntime.get_available_providers()`` unless given.
    """
    if device is None:
        try:
            device = Environment.read().onnx_device
        except ValueError:
            raise ValueError(f"BRAINSEG_ONNX_DEVICE must be one of {', '.join(ONNX_DEVICES)}") from None
    device = device.strip().lower()
    if device not in ONNX_DEVICES:
        raise ValueError(f"BRAINSEG_ONNX_DEVICE must be one of {', '.join(ONNX_DEVICES)}, not {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    wanted = GPU_PROVIDERS["tensorrt" if device == "auto" else device]
    chosen = [p for p in wanted if p in available]
    if device != "auto" and not chosen:
        log.warning("ONNX device %s asked for, but ONNX Runtime offers only %s: running on the CPU", device, ", ".join(available))
    return [*chosen, "CPUExecutionProvider"]


def int8_path(path: os.PathLike | str) -> Path:
    """Where the INT8 model of a model file lives: ``X.pt`` / ``X.onnx`` -> ``X.int8.onnx`` beside it."""
    path = Path(path)
    if path.name.endswith(INT8_SUFFIX):
        return path
    return path.with_name(path.name[: -len(path.suffix)] + INT8_SUFFIX if path.suffix else path.name + INT8_SUFFIX)


class OnnxBackend:
    """``threads``: intra-op threads (0: ONNX Runtime's default, one per core). ``spinning=False``: idle
    threads sleep between runs instead of spinning, which leaves the CPU to other work in the process."""

    def __init__(self, path: os.PathLike | str, threads: int = 0, spinning: bool = True, device: str | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # No CPU memory arena: an arena keeps the largest batch's activations for the life of the
        # session (U-Net++ fp32 after two batches of 32: 1.38 GB held, 0.12 GB without), which
        # breaks the server's memory budget; the allocator's own reuse is enough here.
        opts.enable_cpu_mem_arena = False
        if threads:
            opts.intra_op_num_threads = threads
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = onnx_providers(device)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
        self.providers = self.session.get_providers()
        if self.providers[0] != wanted[0]:  # e.g. CUDA offered but its libraries missing: ONNX Runtime fell back
            log.warning("ONNX Runtime could not start %s for %s; running on %s", wanted[0], Path(path).name, self.providers[0])
        log.info("ONNX Runtime session for %s on %s", Path(path).name, ", ".join(self.providers))
        meta = self.session.get_modelmeta().custom_metadata_map
        if ONNX_METADATA_KEY not in meta:
            raise ValueError(f"{path}: ONNX file has no '{ONNX_METADATA_KEY}' metadata (export it with `brainseg export`)")
        payload = json.loads(meta[ONNX_METADATA_KEY])
        self.config = ExperimentConfig.from_dict(payload["config"])
        self.info = payload.get("info", {})
        self.precision = payload.get("precision", "fp32")  # "int8" for a file written by ``export.quantize_int8``
        self.calibration = payload.get("calibration")
        self.input_name = self.session.get_inputs()[0].name
        self.kind = "onnx"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 -> (B, S, S) logits; a 3D model: (B, 3, D, S, S) -> (B, D, S, S)."""
        return self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0][:, 0]


class TorchBackend:
    def __init__(self, path: os.PathLike | str | None = None, checkpoint: dict | None = None, device: str | None = None):
        import torch

        from ..models.checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = checkpoint if checkpoint is not None else load_checkpoint(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model_from_checkpoint(ckpt).to(self.device).eval()
        self.config = ExperimentConfig.from_dict(ckpt["config"])
        self.info = ckpt.get("info", {})
        self.precision = "fp32"
        self.kind = "torch"
        self._torch = torch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self.model(x)[:, 0].float().cpu().numpy()


def _prefetched(fn, items: list):
    """``fn(item)`` for each item, in order, the next one computed in a background thread while the
    caller works on the current one: a batch is preprocessed (OpenCV and numpy release the GIL)
    while the network runs the one before."""
    if len(items) < 2:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(fn, items[0])
        for item in items[1:]:
            current = pending.result()
            pending = pool.submit(fn, item)
            yield current
        yield pending.result()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


@dataclass
class Segmenter:
    """One model with its preprocessing; ``name`` is the registry name (e.g. ``unetpp``)."""

    backend: object
    name: str
    path: str = ""

    @property
    def config(self) -> ExperimentConfig:
        return self.backend.config

    @property
    def postprocess(self) -> PostprocessConfig:
        return self.config.postprocess

    def postprocess_for(self, tta: bool) -> PostprocessConfig:
        """The calibrated post-processing with or without flip TTA (``ExperimentConfig.postprocess_for``)."""
        return self.config.postprocess_for(tta)

    def with_tta(self, tta: bool | None) -> bool:
        """``tta``, or where the caller did not say (None) the model's shipped default (``InferenceConfig.tta``)."""
        return self.config.inference.tta if tta is None else bool(tta)

    @property
    def precision(self) -> str:
        """``fp32`` or ``int8`` (a quantised ONNX file)."""
        return getattr(self.backend, "precision", "fp32")

    @property
    def context(self) -> int:
        """Neighbouring slices a 2.5D model reads on each side (0: a 2D model)."""
        return self.config.model.context

    def probabilities(
        self,
        images: list[np.ndarray],
        tta: bool = False,
        batch_size: int = 16,
        window: tuple | None = None,
        *,
        stacked: bool = False,
        only: list[int] | None = None,
        spread: list | None = None,
    ) -> list[np.ndarray]:
        """Raw (H, W, 3) slices -> (H, W) float32 lesion probabilities, one per slice (of ``only``
        when given: indices into ``images``).

        ``tta`` averages with the horizontally flipped input. ``window`` is a volume-wide
        intensity window for non-uint8 input (see ``preprocessing.to_uint8``). ``stacked``: the
        images are the consecutive slices of one volume, so a 2.5D model reads each slice's
        neighbours; otherwise each image is a lone slice and a 2.5D model repeats it (the fallback).
        ``spread``: with ``tta``, a list that receives each slice's TTA disagreement map (the
        absolute difference of the plain and the flipped prediction, (H, W) float32).
        """
        targets = list(range(len(images))) if only is None else [int(i) for i in only]
        if self.config.model.spatial_dims == 3:
            return self._volume_probabilities(images, targets, tta, window, stacked, spread)
        make = self._inputs(images, window, stacked)
        chunks = [targets[start : start + batch_size] for start in range(0, len(targets), batch_size)]
        out: list[np.ndarray] = []
        for chunk, x in zip(chunks, _prefetched(make, chunks), strict=True):
            prob = _sigmoid(self.backend(x))
            if tta:
                flipped = _sigmoid(self.backend(np.ascontiguousarray(x[..., ::-1])))[..., ::-1]
                if spread is not None:
                    spread.extend(restore_size(np.abs(p - f), images[i].shape[0], images[i].shape[1]) for i, p, f in zip(chunk, prob, flipped, strict=True))
                prob = 0.5 * (prob + flipped)
            for i, p in zip(chunk, prob, strict=True):
                out.append(restore_size(p, images[i].shape[0], images[i].shape[1]))
        return out

    def _volume_probabilities(self, images, targets: list[int], tta: bool, window, stacked: bool, spread: list | None) -> list[np.ndarray]:
        """A 3D model: the stack (3, Z, S, S) through the network in slabs (``preprocessing.over_slabs``:
        bounded memory, each slab's cut edges discarded); a lone slice (``stacked=False``) is the
        slice repeated ``LONE_DEPTH`` times, the 3D model's fallback (as a volume's edge is repeated)."""
        cfg = self.config.preprocess
        if stacked:
            prepared, stats = self._prepared_volume(images, window)
            x = np.stack([normalize(p, cfg, stats) for p in prepared], axis=1)
            net = self._stack_probabilities(x, set(targets), tta)
            rows = [net[i] for i in targets]
        else:  # each lone slice prepared once, then repeated
            mid = LONE_DEPTH // 2
            rows = [
                self._stack_probabilities(np.repeat(preprocess_slice(images[i], cfg, window)[:, None], LONE_DEPTH, axis=1), {mid}, tta)[mid] for i in targets
            ]
        if tta and spread is not None:
            spread.extend(restore_size(r[1], images[i].shape[0], images[i].shape[1]) for i, r in zip(targets, rows, strict=True))
        return [restore_size(r[0], images[i].shape[0], images[i].shape[1]) for i, r in zip(targets, rows, strict=True)]

    def _stack_probabilities(self, x: np.ndarray, wanted: set[int], tta: bool) -> np.ndarray:
        """(3, Z, S, S) network input -> (Z, 2, S, S): each slice's probability (with ``tta``, the mean with
        the flipped input) and its TTA disagreement (zero without ``tta``), on the slabs that keep ``wanted``."""

        def run(start: int, stop: int) -> np.ndarray:
            slab = np.ascontiguousarray(x[None, :, start:stop])
            p = _sigmoid(self.backend(slab))[0]
            f = _sigmoid(self.backend(np.ascontiguousarray(slab[..., ::-1])))[0, ..., ::-1] if tta else p
            return np.stack([0.5 * (p + f), np.abs(p - f)], axis=1)

        return over_slabs(x.shape[1], run, wanted)

    def _inputs(self, images: list[np.ndarray], window: tuple | None, stacked: bool):
        """indices -> the network's input batch. Each slice is prepared (window, CLAHE, resize)
        once, even when it is the neighbour of several others."""
        cfg, k = self.config.preprocess, self.context
        if stacked and cfg.normalization == "zscore_volume":  # every slice prepared first, for the volume's statistics
            whole, stats = self._prepared_volume(images, window)
            return lambda idx: np.stack([normalize(context_stack([whole[j] for j in context_indices(i, len(images), k, stacked)]), cfg, stats) for i in idx])
        if k == 0:
            return lambda idx: np.stack([preprocess_slice(images[i], cfg, window) for i in idx])
        prepared: dict[int, np.ndarray] = {}

        def prep(j: int) -> np.ndarray:
            if j not in prepared:
                prepared[j] = prepare(images[j], cfg, window)
            return prepared[j]

        def make(idx: list[int]) -> np.ndarray:
            batch = np.stack([normalize(context_stack([prep(j) for j in context_indices(i, len(images), k, stacked)]), cfg) for i in idx])
            for j in [j for j in prepared if j < min(idx) - k]:  # slices no later batch reads
                del prepared[j]
            return batch

        return make

    def _prepared_volume(self, images: list[np.ndarray], window: tuple | None) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Every slice of a volume prepared (window, CLAHE, resize), and with ``zscore_volume`` the
        volume's statistics over all of them (``preprocessing.volume_stats``; None otherwise)."""
        cfg = self.config.preprocess
        prepared = [prepare(image, cfg, window) for image in images]
        return prepared, volume_stats(prepared) if cfg.normalization == "zscore_volume" and prepared else None


@dataclass
class Ensemble:
    """Averages the probabilities of several segmenters (each with its own preprocessing)."""

    members: list[Segmenter]
    name: str = "ensemble"

    @property
    def precision(self) -> str:
        return self.members[0].precision

    @property
    def postprocess(self) -> PostprocessConfig:
        """The ensemble's rule, written only here: the mean of the members' thresholds, the median
        of their minimum sizes (3D and single-slice), 3D components when every member uses them."""
        ts = [m.postprocess.threshold for m in self.members]
        ms = [m.postprocess.min_size for m in self.members]
        c3 = all(m.postprocess.components_3d for m in self.members)
        sm = [m.postprocess.slice_min_size if m.postprocess.slice_min_size is not None else m.postprocess.min_size for m in self.members]
        return PostprocessConfig(threshold=float(np.mean(ts)), min_size=int(np.median(ms)), components_3d=c3, slice_min_size=int(np.median(sm)))

    def postprocess_for(self, tta: bool) -> PostprocessConfig:
        """The ensemble has one rule (``postprocess``): with TTA it was not calibrated apart, and did not pass
        the release check (docs/ablations.md, round 9)."""
        return self.postprocess

    def with_tta(self, tta: bool | None) -> bool:
        """``tta``; off where the caller did not say (no ensemble default was shipped with TTA)."""
        return bool(tta)

    @property
    def config(self) -> ExperimentConfig:
        return self.members[0].config

    @property
    def context(self) -> int:
        return max(m.context for m in self.members)

    def probabilities(
        self, images, tta: bool = False, batch_size: int = 16, window=None, *, stacked: bool = False, only=None, spread: list | None = None
    ) -> list[np.ndarray]:
        spreads: list[list] = [[] for _ in self.members]
        per_model = [
            m.probabilities(images, tta, batch_size, window, stacked=stacked, only=only, spread=sp) for m, sp in zip(self.members, spreads, strict=True)
        ]
        if spread is not None and tta:  # the members' mean disagreement
            spread.extend(np.mean(ss, axis=0).astype(np.float32) for ss in zip(*spreads, strict=True))
        return [np.mean(ps, axis=0).astype(np.float32) for ps in zip(*per_model, strict=True)]


def binarize(prob: np.ndarray, post: PostprocessConfig) -> np.ndarray:
    """Probabilities -> bool mask: threshold, then drop small components.

    A (H, W) slice on its own uses ``post.slice_min_size`` where set (the minimum size
    calibrated for single slices); a (Z, H, W) array uses ``post.min_size`` with 3D components.
    """
    min_size = post.slice_min_size if prob.ndim == 2 and post.slice_min_size is not None else post.min_size
    return _clean(prob >= post.threshold, min_size)


def _clean(mask: np.ndarray, min_size: int) -> np.ndarray:
    return remove_small_components(mask, min_size) if min_size > 0 else mask


def binarize_stack(probs: np.ndarray, post: PostprocessConfig) -> np.ndarray:
    """Probabilities of a stack of slices (Z, H, W) -> bool mask.

    Small components are removed by their 3D size when ``post.components_3d``, else slice
    by slice with the same ``min_size``. Components are labelled inside the bounding box of
    the thresholded voxels only (the same components, a fraction of a volume's voxels).
    """
    mask = probs >= post.threshold
    box = bounding_box(mask)
    if box is None:
        return mask
    inside = mask[box]
    mask[box] = _clean(inside, post.min_size) if post.components_3d else np.stack([_clean(m, post.min_size) for m in inside])
    return mask


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) holding every True voxel of ``mask``; None if there is none."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def load_backend(path: os.PathLike | str, kind: str, name: str | None = None, threads: int = 0, spinning: bool = True, device: str | None = None) -> Segmenter:
    """A Segmenter running ``path`` with ``kind`` = ``onnx`` (ONNX Runtime; fp32 or INT8; ``device``: see
    ``onnx_providers``) or ``torch``."""
    backend = OnnxBackend(path, threads, spinning, device) if kind == "onnx" else TorchBackend(path)
    return Segmenter(backend, name or backend.config.model.name, str(path))


def gpu_present() -> bool:
    """A CUDA GPU is probably usable, decided without importing torch (which costs ~300 MB)."""
    if importlib.util.find_spec("torch") is None:
        return False
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def window_for_volume(volume: np.ndarray) -> tuple | None:
    """Intensity window over a whole (Z, H, W, 3) volume, or None for uint8 data."""
    if volume.dtype == np.uint8:
        return None
    return intensity_window(volume)


def volume_to_uint8(volume: np.ndarray, window: tuple | None, chunk: int = 16) -> np.ndarray:
    """(Z, H, W, 3) any dtype -> uint8 with one volume-wide ``window`` (``window_for_volume``).

    ``preprocessing.to_uint8`` on ``chunk`` slices at a time, so the float temporaries stay small;
    uint8 input (``window`` None) is returned as is.
    """
    if window is None:
        return volume
    out = np.empty(volume.shape, np.uint8)
    for start in range(0, len(volume), chunk):
        out[start : start + chunk] = to_uint8(volume[start : start + chunk], *window)
    return out
