"""The preprocessed training cache: memory-mapped arrays that training reads fast.

``CACHE/images.npy``  (N, S, S, 3) uint8, output of ``preprocessing.prepare``
``CACHE/images_stripped.npy``  (N, S, S, 3) uint8, the same slices skull-stripped first
                      (``preprocessing.skull_strip``), for training on other hospitals' data
``CACHE/masks.npy``   (N, S, S) bool, masks resized to S
``CACHE/index.json``  patient id and slice number of every row, the preprocessing config,
                      and the fingerprint of the dataset it was built from
``CACHE/split.json``  the patient split reused by every later command

The cache is built in a temporary folder and renamed into place, so an interrupted run
never leaves a half-written cache behind. A folder without ``index.json`` or ``split.json``
(left by an older, failed run) counts as no cache. ``cache_matches`` says whether a cache
was built from this dataset with these settings (otherwise it is rebuilt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import PreprocessConfig
from ..io.datasets import DataError, Dataset, discover, labelled, read_pair, read_split
from ..io.files import write_json_atomic
from ..preprocessing import context_indices, prepare, resize_mask, skull_strip, volume_stats

log = logging.getLogger(__name__)


@dataclass
class Cache:
    images: np.ndarray  # (N, S, S, 3) uint8
    images_stripped: np.ndarray  # (N, S, S, 3) uint8, skull-stripped before CLAHE
    masks: np.ndarray  # (N, S, S) bool
    patients: list[str]  # length N
    slices: list[int]  # length N
    preprocess: PreprocessConfig
    root: str

    def rows(self, patient_ids) -> np.ndarray:
        """Row indices of the given patients, in cache order (slice order within a patient)."""
        wanted = set(patient_ids)
        return np.asarray([i for i, p in enumerate(self.patients) if p in wanted], dtype=np.int64)

    def rows_by_patient(self, rows=None) -> dict[str, list[int]]:
        """{patient: its rows}, in cache order, over ``rows`` (every row if None)."""
        out: dict[str, list[int]] = {}
        for r in range(len(self.patients)) if rows is None else rows:
            out.setdefault(self.patients[r], []).append(int(r))
        return out

    def context_rows(self, context: int) -> np.ndarray:
        """(N, 2 * context + 1) rows of each row's 2.5D input: the same patient's slices below and
        above it in slice order, clamped at the patient's first and last slice."""
        out = np.zeros((len(self.patients), 2 * context + 1), dtype=np.int64)
        for rows in self.rows_by_patient().values():
            rows = sorted(rows, key=lambda r: self.slices[r])
            for k, r in enumerate(rows):
                out[r] = [rows[j] for j in context_indices(k, len(rows), context)]
        return out

    def patient_stats(self, stripped: bool = False, rows=None) -> dict[str, np.ndarray]:
        """Each patient's ``preprocessing.volume_stats`` over all of its cached slices (the skull-stripped
        ones with ``stripped``; of the patients of ``rows`` only, if given): what ``zscore_volume``
        normalises the patient's slices with."""
        images = self.images_stripped if stripped else self.images
        return {p: volume_stats([np.asarray(images[r]) for r in rs]) for p, rs in self.rows_by_patient(rows).items()}


FINGERPRINT_VERSION = 1


def dataset_fingerprint(ds: Dataset) -> str:
    """SHA-256 over the resolved root and, for every labelled slice, the image and mask paths
    (relative to the root) with their sizes and modification times.

    Another folder, an added / removed / replaced slice or mask gives another fingerprint.
    """
    root = Path(ds.root)
    rows = []
    for p in labelled(ds).patients:
        for s in p.slices:
            img, msk = Path(s.image_path), Path(s.mask_path)
            si, sm = img.stat(), msk.stat()
            rows.append((os.path.relpath(img, root), os.path.relpath(msk, root), si.st_size, si.st_mtime_ns, sm.st_size, sm.st_mtime_ns))
    rows.sort()
    payload = json.dumps({"version": FINGERPRINT_VERSION, "root": str(root.resolve()), "slices": rows}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def same_arrays(built: PreprocessConfig, wanted: PreprocessConfig) -> bool:
    """Whether a cache built with ``built`` holds the arrays ``wanted`` needs. The normalisation is
    applied when a row is read (``preprocessing.normalize``), not stored, so it may differ: a z-score
    run and a [0, 1] run share one cache instead of rebuilding it for each other."""
    return replace(built, normalization=wanted.normalization) == wanted


def sized_cache_dir(cache_dir: os.PathLike | str, input_size: int) -> Path:
    """The cache folder for another network input size: ``CACHE`` at the default size
    (``PreprocessConfig.input_size``), ``CACHE_s<size>`` otherwise (``python preprocess.py --size 256
    --cache CACHE_s256``), so that the experiment scripts find one cache per size by one rule."""
    d = Path(cache_dir)
    return d if input_size == PreprocessConfig().input_size else d.with_name(f"{d.name}_s{input_size}")


def cache_complete(cache_dir: os.PathLike | str) -> bool:
    """True if the folder holds a whole cache: arrays, ``index.json`` and ``split.json``."""
    d = Path(cache_dir)
    return all((d / f).is_file() for f in ("index.json", "split.json", "images.npy", "images_stripped.npy", "masks.npy"))


def cache_matches(cache_dir: os.PathLike | str, ds_root: os.PathLike | str, preprocess_cfg: PreprocessConfig) -> bool:
    """Whether ``cache_dir`` is a complete cache built from the dataset at ``ds_root`` (same
    files, sizes and modification times) with ``preprocess_cfg``; False for an incomplete,
    unreadable or older cache (without a fingerprint), or a dataset folder that cannot be read.
    """
    from ..config import _build

    if not cache_complete(cache_dir):
        return False
    try:
        index = json.loads((Path(cache_dir) / "index.json").read_text())
        if not same_arrays(_build(PreprocessConfig, index["preprocess"]), preprocess_cfg) or not index.get("fingerprint"):
            return False
        return index["fingerprint"] == dataset_fingerprint(discover(ds_root))
    except (OSError, ValueError, KeyError, TypeError):  # DataError is a ValueError
        return False


def reusable_split(split_file: os.PathLike | str, patient_ids) -> dict | None:
    """The split in ``split_file`` if it exists, is readable and every patient it names is in
    ``patient_ids``; else None (a split made for another dataset is not reused)."""
    path = Path(split_file)
    if not path.is_file():
        return None
    try:
        split = read_split(path)
    except DataError as exc:
        log.warning("%s; a new split is made", exc)
        return None
    named = set(split["train"]) | set(split["val"]) | set(split["test"])
    unknown = sorted(named - set(patient_ids))
    if unknown:
        log.warning("%s names %d patients that are not in this dataset (e.g. %s): a new split is made", path, len(unknown), unknown[0])
        return None
    extra = set(patient_ids) - named
    if extra:
        log.warning("%s does not name %d patients of this dataset; they are left out of training, validation and test", path, len(extra))
    return {**json.loads(path.read_text()), **split}  # as written (with its seed), checked


def _created_dirs(path: Path) -> list[Path]:
    """Create ``path`` (and parents); return the folders that did not exist before, deepest first."""
    made, p = [], path
    while not p.exists():
        made.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return made


STALE_TEMP_AGE_S = 3600.0  # a temporary folder without an owner pid (older brainseg) this old is a dead build's


def _temp_prefix(out: Path) -> str:
    """``.<cache name>.<pid>.``: a build's temporary folder says which process makes it."""
    return f".{out.name}.{os.getpid()}."


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int, made: float) -> bool:
    """Whether process ``pid`` runs and is the one that made a folder at ``made`` (not a later process given the same pid)."""
    if pid == os.getpid():
        return False  # this process builds one cache at a time; a folder with its pid is an older process's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    started = _process_start(pid)
    return started is None or started <= made + 1.0


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary folders of earlier builds of ``out`` that died without cleaning up (killed,
    or the machine went down): those whose owner pid is gone (or now belongs to a later process), and
    those of older brainseg versions (no pid in the name) older than ``STALE_TEMP_AGE_S``. Returns them."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(?:(\d+)\.)?[a-z0-9_]{8}")
    removed = []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            made = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        stale = not _owner_alive(int(m[1]), made) if m[1] else made < now - STALE_TEMP_AGE_S
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            log.warning("removed %s, left by a cache build that did not finish", entry.path)
            removed.append(Path(entry.path))
    return removed


class _Terminated:
    """While a build runs in the main thread, SIGTERM and SIGHUP (where they would kill the process)
    raise ``SystemExit(128 + signal)`` instead, so the build's cleanup runs; ``hold()`` delays that
    while the new cache is being swapped in."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self):
        self.previous, self.pending, self.holding = {}, None, False

    def _handle(self, signum, frame):
        if self.holding:
            self.pending = signum
            return
        raise SystemExit(128 + signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) == signal.SIG_DFL:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    @contextlib.contextmanager
    def hold(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            if self.pending is not None:
                raise SystemExit(128 + self.pending)


def build_cache(ds: Dataset, cfg: PreprocessConfig, out: os.PathLike | str, progress: bool = True, split: dict | None = None) -> Path:
    """Preprocess every labelled slice of ``ds`` into ``out`` (replaced atomically).

    ``split`` is written as ``split.json`` into the same atomic step; without it, the old
    cache's ``split.json`` is kept if every patient it names is in ``ds``. A build that fails
    leaves neither a partial cache nor folders it created: also when it is stopped by Ctrl-C,
    SIGTERM or SIGHUP (``_Terminated``). Temporary folders of earlier builds that were killed
    outright are removed first (``remove_stale_temporaries``).
    """
    with _Terminated() as terminated:
        return _build_cache(ds, cfg, Path(out), progress, split, terminated)


def _build_cache(ds: Dataset, cfg: PreprocessConfig, out: Path, progress: bool, split: dict | None, terminated: _Terminated) -> Path:
    lab = labelled(ds)
    records = [s for p in lab.patients for s in p.slices]
    n, size = len(records), cfg.input_size
    made = _created_dirs(out.parent)
    try:
        remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_temp_prefix(out)))
    except BaseException:
        _remove_empty(made)
        raise
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        stripped = np.lib.format.open_memmap(tmp / "images_stripped.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.bool_, shape=(n, size, size))
        for i, rec in enumerate(tqdm(records, desc="preprocess", unit="slice", disable=not progress)):
            image, mask = read_pair(rec.image_path, rec.mask_path)
            images[i] = prepare(image, cfg)
            stripped[i] = prepare(skull_strip(image), cfg)
            masks[i] = resize_mask(mask, size)
        for arr in (images, stripped, masks):
            arr.flush()
        del images, stripped, masks
        index = {
            "root": str(ds.root),
            "preprocess": asdict(cfg),
            "fingerprint": dataset_fingerprint(lab),
            "patients": [r.patient for r in records],
            "slices": [r.index for r in records],
        }
        (tmp / "index.json").write_text(json.dumps(index))
        if split is not None:
            write_json_atomic(tmp / "split.json", split)
        else:
            # Keep an existing split (it belongs to the experiment, not to the arrays), but
            # only if it was made for these patients.
            old_split = reusable_split(out / "split.json", [p.id for p in lab.patients])
            if old_split is not None:
                shutil.copy2(out / "split.json", tmp / "split.json")
        with terminated.hold():  # a signal now waits until the new cache is in place
            if out.exists():
                old = out.with_name(f".{out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    return out


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


def load_cache(path: os.PathLike | str) -> Cache:
    path = Path(path)
    index_file = path / "index.json"
    if not index_file.is_file():
        raise DataError(path, "no preprocessed cache here (run `python preprocess.py` / `brainseg preprocess` first)")
    index = json.loads(index_file.read_text())
    from ..config import _build

    return Cache(
        images=np.load(path / "images.npy", mmap_mode="r"),
        images_stripped=np.load(path / "images_stripped.npy", mmap_mode="r"),
        masks=np.load(path / "masks.npy", mmap_mode="r"),
        patients=index["patients"],
        slices=index["slices"],
        preprocess=_build(PreprocessConfig, index["preprocess"]),
        root=index["root"],
    )
