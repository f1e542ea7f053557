"""Results kept on disk for download and slice browsing, shared by every worker that sees the folder.

One result is one file, ``<id>.npz`` in the result folder (``BRAINSEG_RESULT_DIR``), written to
a temporary file and renamed into place, so a reader sees a whole result or none. The folder is
the only truth: no process keeps an index, so ``uvicorn app:app --workers N``, a restarted
server, or N replicas on one shared filesystem all read the same results.

The file is an ordinary ``.npz`` (``np.load`` opens it)::

    meta.json           kind, name, owner, summary, affine, orientation, shapes
    mask_bits.npy       (Z, H, ceil(W / 8)) uint8, the mask packed along W (np.packbits)
    display_0000.npy    (H, W, 3) uint8, one member per slice
    prob_0000.npy       (H, W) uint8, the lesion probability x 255, one member per slice (optional)
    seg.dcm             the DICOM SEG of a DICOM input (optional; it carries the study's identifiers)

Writing is off the request's critical path but never after its answer: ``put`` writes the members
stored, not compressed (a 256x256 slice in 0.5 ms instead of 3.7 ms deflating it), so the result
is whole on disk, and readable by every worker, before its id is returned; a crash after that loses
nothing. Results larger than ``compact_above`` bytes (volumes) are then deflated (level 1) by a
background thread (``Compactor``: a bounded queue; when it is full, ``put`` deflates itself) and
renamed over the stored file with its modification time kept, so the TTL is unchanged; the file is
replaced only while it is still the one ``put`` wrote (a result deleted meanwhile stays deleted).
A 240x240x155 BraTS result takes about 5 MB on disk once compacted (36 MB stored, 33 MB as arrays). A result read back
holds only its metadata and packed mask in memory; display slices are read one at a time
from the open file when a route asks for them, so browsing a volume never loads all of it.

Expiry (``ttl_s``, from the file's modification time) and the caps (``max_items``,
``max_bytes``; oldest go first, the newest result always stays) are applied by whichever
process writes or lists the folder next; orphaned temporary files of a crashed writer go too.

Results hold patients' images (and a DICOM SEG their names), so the folder must be private:
files are created 0600 and a folder that group or others may read or write is refused at start
(``StartupError``), unless ``shared`` (``BRAINSEG_RESULT_DIR_SHARED``: one folder for several
machines' service accounts in a dedicated group): then group access is allowed, files are 0660,
and others still may not read or write the folder. ``.owner-secret`` in the folder is the
generated HMAC key of the owners (``owner_secret``), shared by every worker that uses the folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import re
import secrets
import stat
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .settings import StartupError
from .uploads import UploadError

log = logging.getLogger("brainseg.serving")

_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: 122 random bits, and never a path
_ENTRY = re.compile(r"([0-9a-f]{32})\.npz")
_TEMP = re.compile(r"\.[0-9a-f]{32}\.npz\..+\.tmp")  # ResultStore._write's temporary name
ORPHAN_AGE_S = 600.0  # a temporary file this old belongs to a writer that died
FORMAT = 1
SECRET_FILE = ".owner-secret"
COMPACT_ABOVE = 4 << 20  # array bytes above which a result is deflated in the background (a volume; not a slice)
COMPACT_QUEUE = 8  # results waiting for compaction at most; beyond it put() deflates itself


def default_result_dir() -> Path:
    """``<system temp>/brainseg-results-<uid>``: one folder per user, shared by that user's workers."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"brainseg-results-{uid}"


@dataclass
class StoredResult:
    kind: str  # "slice" or "volume"
    display: np.ndarray  # (Z, H, W, 3) uint8, windowed for display (Z = 1 for a slice); read lazily once stored
    mask: np.ndarray  # (Z, H, W) bool; unpacked slice by slice once stored
    summary: dict  # the JSON answer without its images
    affine: np.ndarray | None = None  # (4, 4) of the input volume
    orientation: np.ndarray | None = None  # (3, 2) ``Volume.stored_orientation``: how the file stored the displayed slices
    name: str = "result"
    owner: str | None = None  # which API key made it (a hash); only that key reads it back
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)  # seconds since the epoch
    prob: np.ndarray | None = None  # (Z, H, W) uint8, lesion probability x 255 (``review.probability_u8``); read lazily once stored
    seg_dicom: bytes | None = None  # the DICOM SEG (DICOM input only); once stored, read from the file by ``dicom_seg()``
    _member: object = field(default=None, repr=False, compare=False)  # reads a member of the stored file by name

    def dicom_seg(self) -> bytes | None:
        """The DICOM SEG of a DICOM input, None for any other result."""
        if self.seg_dicom is None and self._member is not None:
            return self._member("seg.dcm")
        return self.seg_dicom

    def nifti(self) -> bytes:
        """The mask as .nii.gz on the input's voxel grid and affine (volumes only)."""
        from ..io.volumes import from_display, mask_to_volume, nifti_bytes

        if self.affine is None:
            raise ValueError("only volume results have a NIfTI mask")
        return nifti_bytes(mask_to_volume(from_display(np.asarray(self.mask), self.orientation)), self.affine)


# ---------------------------------------------------------------- the file format


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def raw_bytes(result: StoredResult) -> int:
    """The bytes of a result's arrays as stored uncompressed (display and probability)."""
    prob = 0 if result.prob is None else int(np.prod(np.shape(result.prob)))
    return int(np.prod(np.shape(result.display))) + prob


def encode_result(result: StoredResult, compress: bool = True) -> bytes:
    """One result as the bytes of an ``.npz`` file (see the module docstring); ``compress=False``:
    the members stored as they are (fast to write, several times larger for volumes)."""
    display, mask = np.asarray(result.display), np.asarray(result.mask, dtype=bool)
    if display.dtype != np.uint8 or mask.ndim != 3 or display.shape[:3] != mask.shape:
        raise ValueError(f"display (Z, H, W[, C]) uint8 and mask (Z, H, W) must match: {display.shape} {display.dtype} vs {mask.shape}")
    meta = {
        "format": FORMAT,
        "kind": result.kind,
        "name": result.name,
        "owner": result.owner,
        "summary": result.summary,
        "affine": None if result.affine is None else np.asarray(result.affine, float).tolist(),
        "orientation": None if result.orientation is None else np.asarray(result.orientation, float).tolist(),
        "mask_shape": list(mask.shape),
        "display_shape": list(display.shape),
        "prob_shape": None if result.prob is None else list(np.shape(result.prob)),
    }
    if result.prob is not None and (np.shape(result.prob) != mask.shape or np.asarray(result.prob[:1]).dtype != np.uint8):
        raise ValueError(f"prob must be (Z, H, W) uint8 like the mask {mask.shape}")
    buf = io.BytesIO()
    # Level 1: nearly the size of level 6 on these images at two thirds of the time.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED, compresslevel=1 if compress else None) as zf:
        zf.writestr("meta.json", json.dumps(meta, default=_json_default))
        zf.writestr("mask_bits.npy", _npy(np.packbits(mask, axis=-1)))
        for z in range(display.shape[0]):
            zf.writestr(f"display_{z:04d}.npy", _npy(display[z]))
        for z in range(mask.shape[0] if result.prob is not None else 0):
            zf.writestr(f"prob_{z:04d}.npy", _npy(np.asarray(result.prob[z])))
        seg = result.dicom_seg()
        if seg is not None:
            zf.writestr("seg.dcm", seg)
    return buf.getvalue()


class LazySlices:
    """(Z, ...) uint8 slices of a stored result, each read from the open file when indexed.

    Supports what the routes use: ``shape``, ``len``, ``[z]`` and ``np.asarray`` (all slices).
    The file stays open while this object lives, so an eviction meanwhile does not break a reader.
    """

    def __init__(self, zf: zipfile.ZipFile, rid: str, shape: tuple[int, ...], gone, prefix: str = "display_"):
        self._zf, self._rid, self.shape, self._gone, self._prefix = zf, rid, shape, gone, prefix
        self.dtype, self.ndim = np.dtype(np.uint8), len(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, z):
        if not isinstance(z, (int, np.integer)):
            return np.asarray(self)[z]
        z = int(z) + (self.shape[0] if z < 0 else 0)
        if not 0 <= z < self.shape[0]:
            raise IndexError(f"slice {z} out of range 0..{self.shape[0] - 1}")
        try:
            arr = np.load(io.BytesIO(self._zf.read(f"{self._prefix}{z:04d}.npy")), allow_pickle=False)
        except Exception:  # CRC error, missing member, bad header: the file was damaged after it was written
            arr = None
        if arr is None or arr.shape != self.shape[1:] or arr.dtype != np.uint8:
            self._gone(self._rid)
            raise UploadError(404, "result not readable: it was damaged on the server and has been removed")
        return arr

    def __array__(self, dtype=None, copy=None):
        out = np.stack([self[z] for z in range(self.shape[0])])
        return out if dtype is None else out.astype(dtype)


class PackedMask:
    """(Z, H, W) bool mask held packed (1 bit a voxel); ``[z]`` unpacks one slice."""

    def __init__(self, bits: np.ndarray, width: int):
        self._bits, self._width = bits, width
        self.shape = (bits.shape[0], bits.shape[1], width)
        self.dtype, self.ndim = np.dtype(bool), 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, z):
        if not isinstance(z, (int, np.integer)):
            return np.asarray(self)[z]
        return np.unpackbits(self._bits[z], axis=-1, count=self._width).astype(bool)

    def __array__(self, dtype=None, copy=None):
        out = np.unpackbits(self._bits, axis=-1, count=self._width).astype(bool)
        return out if dtype is None else out.astype(dtype)

    def any(self) -> bool:
        return bool(self._bits.any())


def decode_result(rid: str, zf: zipfile.ZipFile, created: float, gone=lambda rid: None) -> StoredResult:
    """A result from its open ``.npz``; raises (ValueError, KeyError, zipfile.BadZipFile, ...) if it is not whole."""
    meta = json.loads(zf.read("meta.json"))
    if meta.get("format") != FORMAT or meta["kind"] not in ("slice", "volume"):
        raise ValueError("not a result of this format")
    mshape, dshape = tuple(meta["mask_shape"]), tuple(meta["display_shape"])
    bits = np.load(io.BytesIO(zf.read("mask_bits.npy")), allow_pickle=False)
    if len(mshape) != 3 or dshape[:3] != mshape or bits.shape != (mshape[0], mshape[1], (mshape[2] + 7) // 8):
        raise ValueError("shapes in the result do not agree")
    if sum(n.startswith("display_") for n in zf.namelist()) != dshape[0]:
        raise ValueError("display slices missing")
    affine = None if meta["affine"] is None else np.asarray(meta["affine"], float)
    pshape = meta.get("prob_shape")
    if pshape is not None and (tuple(pshape) != mshape or sum(n.startswith("prob_") for n in zf.namelist()) != mshape[0]):
        raise ValueError("probability slices missing")
    names = set(zf.namelist())
    return StoredResult(
        meta["kind"],
        LazySlices(zf, rid, dshape, gone),
        PackedMask(bits, mshape[2]),
        meta["summary"],
        affine=affine,
        orientation=None if meta.get("orientation") is None else np.asarray(meta["orientation"], float),
        name=meta["name"],
        owner=meta["owner"],
        id=rid,
        created=created,
        prob=None if pshape is None else LazySlices(zf, rid, tuple(pshape), gone, prefix="prob_"),
        _member=lambda name: zf.read(name) if name in names else None,
    )


# ---------------------------------------------------------------- the store


class ResultStore:
    """Results as files in ``directory``, safe for several processes (and machines) sharing it.

    ``max_items`` / ``max_bytes``: caps on the folder (oldest results go first; the one just
    written always stays). ``ttl_s``: a result older than this is gone (None: kept until evicted).
    ``compact_above``: results with more array bytes than this are written stored and deflated
    in the background (None: every result is deflated by ``put`` itself, the old way).
    """

    def __init__(
        self,
        directory: os.PathLike | str,
        max_items: int = 16,
        max_bytes: int = 1 << 30,
        ttl_s: float | None = None,
        shared: bool = False,
        compact_above: int | None = COMPACT_ABOVE,
    ):
        self.dir = Path(directory)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.shared = shared
        self.file_mode = 0o660 if shared else 0o600
        self.compact_above = compact_above
        self._replace_lock = threading.Lock()  # a compaction's check-and-rename vs this process's deletes
        self.compactor = Compactor(self) if compact_above is not None else None
        self.dir.mkdir(mode=0o770 if shared else 0o700, parents=True, exist_ok=True)  # results hold the images: this user (group) only
        self.check_private()

    @classmethod
    def from_settings(cls, settings) -> "ResultStore":
        """The store ``BRAINSEG_RESULT_DIR`` / ``_MAX_RESULTS`` / ``_RESULT_STORE_MB`` / ``_RESULT_TTL_S`` / ``_RESULT_DIR_SHARED`` describe."""
        directory = Path(settings.result_dir) if settings.result_dir else default_result_dir()
        if not settings.result_dir and directory.exists() and hasattr(os, "getuid") and directory.stat().st_uid != os.getuid():
            raise StartupError(f"{directory} belongs to another user; set BRAINSEG_RESULT_DIR to a folder of your own")
        return cls(directory, settings.max_results, int(settings.result_store_mb * 2**20), ttl_s=settings.result_ttl_s, shared=settings.result_dir_shared)

    def check_private(self) -> None:
        """``StartupError`` when others (or, unless ``shared``, the group) may read or write the folder."""
        mode = stat.S_IMODE(self.dir.stat().st_mode)
        others, group = mode & 0o006, mode & 0o060
        if others or (group and not self.shared):
            who = "other users" if others else "its group"
            fix = f"chmod o-rwx {self.dir}" if self.shared else f"chmod 700 {self.dir}"
            also = (
                " (BRAINSEG_RESULT_DIR_SHARED lets a dedicated group share the folder, never other users: chmod 2770)"
                if self.shared
                else ", or, for one folder shared by several machines' service accounts, put them in a dedicated group, chmod 2770 and set BRAINSEG_RESULT_DIR_SHARED=1"
            )
            raise StartupError(
                f"the result folder {self.dir} can be read or written by {who} (mode {mode:03o}); results hold patients' images, "
                f"so the service does not start: run `{fix}`{also}"
            )

    def owner_secret(self) -> bytes:
        """The HMAC key of result owners kept in the folder (``SECRET_FILE``, mode 0600 / 0660),
        made once by whichever worker comes first; every worker on the folder reads the same one."""
        path = self.dir / SECRET_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), self.file_mode)
                f.write(secrets.token_hex(32) + "\n")
        for _ in range(100):  # another worker may have created it an instant ago and still be writing
            try:
                with open(path, "rb") as f:
                    text = f.read(4096).decode("ascii", "replace").strip()
            except OSError as exc:
                raise StartupError(f"{path} cannot be read ({exc.strerror}); set BRAINSEG_OWNER_SECRET or fix its permissions") from None
            if text:
                break
            time.sleep(0.05)
        if not re.fullmatch(r"[0-9a-f]{64}", text):
            raise StartupError(f"{path} is not an owner secret (64 hex digits); remove it (results kept so far become unreadable) or set BRAINSEG_OWNER_SECRET")
        return text.encode()

    def _write(self, path: Path, data: bytes, replaces: os.stat_result | None = None) -> bool:
        """``data`` to a temporary file beside ``path`` (``self.file_mode`` from its creation on:
        mkstemp makes it 0600), renamed into place: a reader sees a whole result or none.

        ``replaces``: only if ``path`` is still that file (same inode), and with its modification
        time (a compaction); False, and nothing written, when it was deleted or replaced meanwhile.
        """
        self.dir.mkdir(mode=0o770 if self.shared else 0o700, parents=True, exist_ok=True)  # removed under us: made again
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                if self.file_mode != 0o600:
                    os.fchmod(f.fileno(), self.file_mode)
                f.write(data)
            if replaces is None:
                os.replace(tmp, path)
                return True
            os.utime(tmp, ns=(replaces.st_atime_ns, replaces.st_mtime_ns))
            with self._replace_lock:
                if not _same_file(path, replaces):
                    Path(tmp).unlink(missing_ok=True)
                    return False
                os.replace(tmp, path)
            return True
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _path(self, rid: str) -> Path | None:
        return self.dir / f"{rid}.npz" if isinstance(rid, str) and _ID.fullmatch(rid) else None

    def _expired(self, mtime: float, now: float) -> bool:
        return self.ttl_s is not None and mtime < now - self.ttl_s

    def put(self, result: StoredResult) -> str:
        path = self._path(result.id)
        if path is None:
            raise ValueError("a result id is 32 lowercase hex digits")
        self._write(path, encode_result(result, compress=self.compactor is None))
        if self.compactor is not None and raw_bytes(result) > self.compact_above:
            try:
                written = os.stat(path)
            except FileNotFoundError:  # already evicted by another process: nothing to compact
                written = None
            if written is not None and not self.compactor.submit(result.id, written):
                self._write(path, encode_result(result))  # the queue is full: deflated here, as before
        self._sweep(keep=result.id)
        return result.id

    def compact(self, rid: str, written: os.stat_result) -> bool:
        """Deflate the stored result ``rid`` in place (the file ``put`` wrote, ``written``); False
        when it is gone, was replaced, or is not a whole result any more."""
        path = self._path(rid)
        if path is None or not _same_file(path, written):
            return False
        try:
            with zipfile.ZipFile(path) as src:
                buf = io.BytesIO()
                with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
                    for info in src.infolist():
                        dst.writestr(info.filename, src.read(info))
        except (OSError, zipfile.BadZipFile):
            return False
        return self._write(path, buf.getvalue(), replaces=written)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the background compactions queued so far are done (for tests and shutdown)."""
        return self.compactor is None or self.compactor.flush(timeout)

    def get(self, rid: str) -> StoredResult | None:
        """The result, or None if it does not exist, expired, or is not a whole result (then it is removed)."""
        path = self._path(rid)
        if path is None:
            return None
        try:
            zf = zipfile.ZipFile(path)  # holds the file open: an eviction from now on does not break this reader
        except FileNotFoundError:
            return None
        except zipfile.BadZipFile:  # empty, truncated or not a zip: never becomes whole (writes are atomic)
            log.warning("result %s on disk is damaged; removed", rid)
            self._remove(path)
            return None
        except OSError:  # unreadable (permissions, I/O): not ours to remove
            log.warning("result %s on disk cannot be read", rid)
            return None
        try:
            mtime = os.fstat(zf.fp.fileno()).st_mtime
            if self._expired(mtime, time.time()):
                zf.close()
                self._remove(path)
                return None
            return decode_result(rid, zf, mtime, gone=self.delete)
        except Exception:
            zf.close()
            log.warning("result %s on disk is damaged; removed", rid)
            self._remove(path)
            return None

    def delete(self, rid: str) -> bool:
        path = self._path(rid)
        with self._replace_lock:  # not between a compaction's check and its rename
            return path is not None and self._remove(path)

    def __len__(self) -> int:
        return len(self._sweep())

    # ------------------------------------------------------------ housekeeping

    @staticmethod
    def _remove(path: Path) -> bool:
        try:
            path.unlink()
            return True
        except FileNotFoundError:  # another process was first
            return False
        except OSError as exc:
            log.warning("cannot remove a stored result: %s", exc.strerror)
            return False

    def _sweep(self, keep: str | None = None) -> list[tuple[float, str, int]]:
        """Remove expired results, orphaned temporary files and, beyond the caps, the oldest results.

        Returns the results left as (mtime, id, bytes), oldest first. Every step tolerates
        files vanishing under it: other processes sweep the same folder.
        """
        now = time.time()
        live = []
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:  # the folder was removed under us; put() makes it again
            return []
        for entry in entries:
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            m = _ENTRY.fullmatch(entry.name)
            if m and self._expired(st.st_mtime, now) and m[1] != keep:
                self._remove(Path(entry.path))
            elif m:
                live.append((st.st_mtime, m[1], st.st_size))
            elif _TEMP.fullmatch(entry.name) and st.st_mtime < now - ORPHAN_AGE_S:
                self._remove(Path(entry.path))
        live.sort()
        total = sum(size for _, _, size in live)
        i = 0
        while len(live) - i > 1 and (len(live) - i > self.max_items or total > self.max_bytes):
            mtime, rid, size = live[i]
            if rid == keep:  # written this instant, maybe with an older clock: never the one to go
                live.append(live.pop(i))
                continue
            self._remove(self.dir / f"{rid}.npz")
            total -= size
            i += 1
        return live[i:]


def _same_file(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


class Compactor:
    """One daemon thread deflating stored results in place, fed through a bounded queue.

    Not on any request's critical path; a result waiting here is already whole on disk (stored),
    so a crash only leaves it larger. Compaction errors are logged and the stored file kept.
    """

    def __init__(self, store: ResultStore, size: int = COMPACT_QUEUE):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self.done = 0  # results compacted (for tests and logs)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, rid: str, written: os.stat_result) -> bool:
        """Queue ``rid`` for compaction; False when the queue is full."""
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="brainseg-compactor", daemon=True)
                self._thread.start()
        try:
            self.queue.put_nowait((rid, written))
            return True
        except queue.Full:
            return False

    def flush(self, timeout: float | None = None) -> bool:
        """True once every queued result is done (within ``timeout`` seconds, if given)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.queue.all_tasks_done:
            while self.queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.queue.all_tasks_done.wait(left)
        return True

    def _loop(self) -> None:
        while True:
            rid, written = self.queue.get()
            try:
                self.done += bool(self.store.compact(rid, written))
            except Exception as exc:  # the stored file stays as put() wrote it: whole, only larger
                log.warning("result compaction failed: %r", exc)
            finally:
                self.queue.task_done()
