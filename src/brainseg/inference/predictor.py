"""The one loader: a model name (or a checkpoint / ONNX path), a precision and a backend -> a ready
``backends.Segmenter`` (or ``Ensemble``) with its post-processing.

Every entry point loads models here: the CLI (``brainseg predict``, ``evaluate``, ``compare``,
``batch``), the server (``serving.engine.Engine``), the scripts and the tests, so all follow one
backend rule (``pick_backend``), one precision rule (``choose_file``, ``served_precision``) and one
version rule (``weights_version``).
``registry`` is the schema and the reader it uses; ``backends`` the networks it builds. Neither
imports this module (tests/test_layers.py checks that no module imports upward). No torch import here.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..config import BACKENDS, PRECISIONS, Environment, PostprocessConfig
from . import backends, registry


def requested_backend(backend: str | None = None) -> str:
    """``backend`` if given, else ``$BRAINSEG_BACKEND``, else ``auto``; ValueError if not one of BACKENDS."""
    value = backend or _environment_backend()
    if value not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (BRAINSEG_BACKEND), got {value!r}")
    return value


def _environment_backend() -> str:
    try:
        return Environment.read().backend
    except ValueError as exc:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} ({exc})") from None


def pick_backend(has_onnx: bool, has_checkpoint: bool, backend: str | None = None) -> str:
    """The backend rule, for every entry point (CLI, scripts, server), ``onnx`` or ``torch``:

    - ``auto`` (the default): ONNX Runtime on the CPU when the model's ``.onnx`` file is there and
      no CUDA GPU is present (``backends.gpu_present``; no torch import); PyTorch when a GPU is
      present and the checkpoint is there, or when there is no ``.onnx`` file;
    - ``onnx`` / ``torch``: that one (the caller reports a missing file);
    - ``backend=None`` reads ``$BRAINSEG_BACKEND`` (the server passes its setting of the same name,
      the CLI's ``--torch`` passes ``torch``);
    - precision ``int8`` always runs the ``onnx_int8`` file with ONNX Runtime (see ``choose_file``).
    """
    want = requested_backend(backend)
    if want == "auto":
        want = "torch" if has_checkpoint and (not has_onnx or backends.gpu_present()) else "onnx"
    return want


def choose_file(reg: registry.Registry, name: str, backend: str | None = None, precision: str = "fp32") -> tuple[Path | None, str]:
    """``(path, backend)`` of one registered model under the backend rule (``pick_backend``).

    ``path`` is None when the file the rule picks is missing. ``precision="int8"`` picks the
    ``onnx_int8`` file; PrecisionUnavailable when the model has none, or when ``backend="torch"``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8":
        if requested_backend(backend) == "torch":
            raise registry.PrecisionUnavailable("precision int8 runs with ONNX Runtime only; the torch backend is fp32")
        if not reg.entry(name).onnx_int8:
            raise registry.PrecisionUnavailable(f"model {name!r} has no INT8 version (no onnx_int8 in its registry); use precision fp32")
        return reg.file(name, "onnx_int8"), "onnx"
    onnx, ckpt = reg.file(name, "onnx"), reg.file(name, "checkpoint")
    kind = pick_backend(onnx is not None, ckpt is not None, backend)
    return (onnx if kind == "onnx" else ckpt), kind


def served_precision(reg: registry.Registry, name: str | None, backend: str | None = None, tta: bool | None = None) -> str:
    """The precision a server uses when a request names none.

    ``int8`` where the registry recommends it for the run's TTA setting (``ModelEntry.int8_recommended``:
    ``scripts/ship_int8.py`` and, with TTA, ``scripts/ship_tta.py`` allow it only where the INT8 model's Dice cost
    on the test patients is within its limit), the model has an ``onnx_int8`` file and its fp32 model would run on
    ONNX Runtime (with a GPU, PyTorch fp32 is faster); else ``fp32``. ``tta`` None: the model's TTA default
    (``Registry.tta_default``). An ensemble serves ``int8`` only when every member does.
    """
    with_tta = reg.tta_default(name) if tta is None else tta

    def one(member: str) -> bool:
        entry = reg.entry(member)
        return entry.int8_recommended(with_tta) and bool(entry.onnx_int8) and choose_file(reg, member, backend, "fp32")[1] == "onnx"

    return "int8" if all(one(m) for m in reg.resolve(name)) else "fp32"


def load_member(
    reg: registry.Registry, name: str, backend: str | None = None, precision: str = "fp32", threads: int = 0, spinning: bool = True, device: str | None = None
):
    """One registered model, loaded (a ``Segmenter``; ``threads`` / ``spinning`` / ``device``: ONNX Runtime's, see
    ``backends.OnnxBackend``). FileNotFoundError when its file is missing."""
    path, kind = choose_file(reg, name, backend, precision)
    if path is None:
        key = "onnx_int8" if precision == "int8" else ("onnx" if kind == "onnx" else "checkpoint")
        raise FileNotFoundError(f"model {name!r}: its {key} file is not in {reg.directory} (backend {requested_backend(backend)})")
    seg = backends.load_backend(path, kind, name, threads=threads, spinning=spinning, device=device)
    if precision == "int8" and seg.precision != "int8":
        seg.backend.precision = "int8"  # registered as INT8; a file quantised by other tools carries no marker
    check_tta_default(reg, name, seg, path)
    return seg


def check_tta_default(reg: registry.Registry, name: str, seg, path: Path) -> None:
    """RegistryError when the registry's copy of a model's TTA default (``tta.default``, which chose the precision
    before the file was read) disagrees with the file's own (``inference.tta``, which decides the run): a
    hand-edited registry or a file copied from another release. ``scripts/ship_tta.py`` writes both in one step."""
    in_registry, in_file = reg.entry(name).tta_default, seg.with_tta(None)
    if in_registry != in_file:
        raise registry.RegistryError(
            f"model {name!r}: {registry.REGISTRY} says flip TTA is {'on' if in_registry else 'off'} by default but {path.name} "
            f"says {'on' if in_file else 'off'}; re-run scripts/ship_tta.py on {reg.directory} (it writes both)"
        )


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
    ``precision="int8"`` with a checkpoint ``X.pt`` / ``X.onnx`` runs ``X.int8.onnx`` beside it.
    """
    if not prefer_onnx:
        backend = "torch"
    if checkpoint:
        if precision == "int8":
            checkpoint = _int8_file(checkpoint)
        return load_segmenter(checkpoint, backend=backend)
    reg = registry.read(model_dir)
    members = [load_member(reg, n, backend, precision, threads) for n in reg.resolve(name)]
    return backends.Ensemble(members) if name == registry.ENSEMBLE else members[0]


def load_segmenter(path: os.PathLike | str, name: str | None = None, prefer_onnx: bool = True, *, backend: str | None = None) -> backends.Segmenter:
    """Load a ``.pt`` checkpoint or ``.onnx`` file.

    A ``.pt`` with an ``.onnx`` beside it follows the backend rule of ``pick_backend``
    (ONNX Runtime on CPU-only machines, PyTorch where CUDA is available; ``prefer_onnx=False``
    or ``backend="torch"``: PyTorch). An ``.onnx`` file runs with ONNX Runtime.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    if path.suffix == ".onnx":
        return backends.load_backend(path, "onnx", name)
    onnx_path = path.with_suffix(".onnx")
    kind = pick_backend(onnx_path.is_file(), True, backend if prefer_onnx else "torch")
    return backends.load_backend(onnx_path if kind == "onnx" else path, kind, name)


def _int8_file(checkpoint: os.PathLike | str) -> Path:
    """``X.pt`` / ``X.onnx`` -> the ``X.int8.onnx`` beside it; FileNotFoundError saying how to make it."""
    path = backends.int8_path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no INT8 model beside {checkpoint}; make it with `brainseg export --checkpoint {checkpoint} --int8`")
    return path


def override(post: PostprocessConfig, threshold: float | None = None, min_size: int | None = None) -> PostprocessConfig:
    """The one post-processing override of every interface (CLI ``--threshold`` / ``--min-size``, the API's
    ``threshold`` field, ``brainseg batch``): the model's calibrated rule with the values given; ValueError
    for a threshold outside (0, 1) or a negative minimum size."""
    if threshold is not None:
        threshold = float(threshold)
        if not 0.0 < threshold < 1.0:  # also refuses NaN
            raise ValueError(f"threshold must be between 0 and 1 (exclusive), got {threshold}")
        post = replace(post, threshold=threshold)
    if min_size is not None:
        if int(min_size) < 0:
            raise ValueError(f"min_size must be 0 or more, got {min_size}")
        post = replace(post, min_size=int(min_size))
    return post


def weights_version(
    precision: str,
    path: os.PathLike | str | None = None,
    *,
    reg: registry.Registry | None = None,
    name: str | None = None,
    backend: str | None = None,
    hasher=None,
) -> str:
    """The one version rule: names the weights a result came from, without loading the model. The CLI (``version``),
    the server (``Engine.file_version_of``: ``/v1/models`` and the answers) and every file they write (SEG, SR,
    reports) use it, so the same weights carry one name whichever backend runs them.

    - fp32: the weights the model file was exported from: a registered model's fixed ``version`` if its entry sets
      one, else the hash of its ``checkpoint``; a file outside a registry: the ``X.pt`` beside ``X.onnx``;
    - INT8 (and an fp32 model with no checkpoint): the hash of the file that runs, ``path``, or for a registered
      model the one ``choose_file`` picks. ``"?"`` when there is no such file.

    ``hasher``: ``registry.file_version`` by default (the server passes one that remembers its answers).
    """
    hasher = hasher or registry.file_version
    if precision == "fp32":
        fixed, weights = (reg.entry(name).version, reg.file(name, "checkpoint")) if reg is not None else (None, _checkpoint_beside(path))
        if fixed or weights:
            return fixed or hasher(weights)
    if not path and reg is not None:
        path = choose_file(reg, name, backend, precision)[0]
    return hasher(path) if path else "?"


def _checkpoint_beside(path: os.PathLike | str | None) -> Path | None:
    """``X.pt`` beside an ``X.onnx`` (the checkpoint it was exported from), if it is there."""
    if not path or Path(path).suffix != ".onnx":
        return None
    pt = Path(path).with_suffix(".pt")
    return pt if pt.is_file() else None


def version(segmenter) -> str:
    """``weights_version`` of a loaded Segmenter (the file it runs, in its precision); an ensemble joins its
    members' as ``name:version``; ``unknown`` for a model that came from no file."""
    members = getattr(segmenter, "members", None) or [segmenter]

    def one(m) -> str:
        return weights_version(m.precision, m.path) if m.path else "unknown"

    return "+".join(f"{m.name}:{one(m)}" for m in members) if len(members) > 1 else one(members[0])
