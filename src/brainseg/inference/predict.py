"""Segmenting slices and volumes, and lesion statistics; shared by the CLI and the server.

No torch import: with an ONNX model this runs in a torch-free process.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..config import PostprocessConfig
from ..display.visualize import display_channel, overlay, save_png
from ..evaluation.measure import measure_components, plane_metric, rano_bm, spacing_metric
from ..evaluation.metrics import connected_components
from ..io.channels import describe_slice, describe_volume, stored_channels
from ..io.datasets import IMAGE_SUFFIXES, MASK_TAG, DataError, read_slice, to_three_channels
from ..io.dicom import is_dicom_input, load_dicom_path, write_seg
from ..io.files import write_bytes_atomic, write_json_atomic
from ..io.volumes import SEQ_ORDER, Volume, brats_sequence, is_nifti, load_volume, save_mask_nifti
from .backends import binarize, binarize_stack, bounding_box, volume_to_uint8, window_for_volume

# ---------------------------------------------------------------- lesion statistics


def lesion_table(
    mask: np.ndarray,
    pixel_area_mm2: float | None = None,
    voxel_volume_mm3: float | None = None,
    *,
    metric: np.ndarray | None = None,
    prob: np.ndarray | None = None,
    slice_spacing_mm: float | None = None,
    spread: np.ndarray | None = None,
) -> list[dict]:
    """Connected components of a (H, W) or (Z, H, W) bool mask, largest first.

    2-D: area in pixels (and mm^2); 3-D: volume in voxels (and mm^3, mL). Bounding boxes are
    ``[row0, col0, row1, col1]`` (2-D) or ``[z0, row0, col0, z1, row1, col1]`` (3-D),
    end-exclusive, in the slice orientation. Each row also has the RANO-BM measurements of
    ``measure.measure_components``: longest axial and perpendicular diameters (mm with ``metric``,
    the in-plane pixel geometry; else pixels), ``measurable``, the slice range and, with ``prob``,
    ``confidence``; with ``spread`` (TTA ran), ``tta_disagreement``.
    """
    crop = bounding_box(mask)  # labelled inside the box around the lesion voxels, positions shifted back
    if crop is None:
        return []
    origin = np.array([s.start for s in crop])
    labels, n = connected_components(mask[crop])
    coords = np.nonzero(labels)
    which = labels[coords]
    sizes = np.bincount(which, minlength=n + 1)[1:]
    boxes = [tuple(slice(s.start + o, s.stop + o) for s, o in zip(b, origin, strict=False)) for b in ndimage.find_objects(labels)]
    centroids = np.stack([np.bincount(which, weights=c, minlength=n + 1)[1:] for c in coords], axis=1) / sizes[:, None] + origin
    measured = measure_components(
        labels, n, metric, None if prob is None else prob[crop], slice_spacing_mm, offset=tuple(origin), spread=None if spread is None else spread[crop]
    )
    rows = []
    for i in range(n):
        box = boxes[i]
        row = {"bbox": [int(s.start) for s in box] + [int(s.stop) for s in box], "centroid": [round(float(c), 1) for c in centroids[i]]}
        if mask.ndim == 2:
            row["area_px"] = int(sizes[i])
            row["area_mm2"] = round(float(sizes[i]) * pixel_area_mm2, 2) if pixel_area_mm2 else None
        else:
            row["voxels"] = int(sizes[i])
            row["volume_mm3"] = round(float(sizes[i]) * voxel_volume_mm3, 2) if voxel_volume_mm3 else None
            row["volume_ml"] = round(float(sizes[i]) * voxel_volume_mm3 / 1000, 3) if voxel_volume_mm3 else None
        row.update(measured[i])
        rows.append(row)
    key = "area_px" if mask.ndim == 2 else "voxels"
    rows.sort(key=lambda r: -r[key])
    for i, r in enumerate(rows, 1):
        r["id"] = i
    return rows


# ---------------------------------------------------------------- results


@dataclass
class SliceResult:
    image: np.ndarray  # (H, W, 3) input
    prob: np.ndarray  # (H, W) float32
    mask: np.ndarray  # (H, W) bool
    lesions: list[dict]
    seconds: float
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, col) as given; None: unknown, diameters in pixels
    rano_bm: dict | None = None  # ``measure.rano_bm`` of the lesions

    def summary(self) -> dict:
        return {
            "lesion_count": len(self.lesions),
            "lesion_area_px": int(self.mask.sum()),
            "lesion_area_mm2": round(float(self.mask.sum()) * self.pixel_spacing_mm[0] * self.pixel_spacing_mm[1], 2) if self.pixel_spacing_mm else None,
            "lesions": self.lesions,
            "rano_bm": self.rano_bm,
            "height": int(self.mask.shape[0]),
            "width": int(self.mask.shape[1]),
        }


@dataclass
class VolumeResult:
    volume: Volume
    prob: np.ndarray  # (Z, H, W) float32; 0 on skipped slices
    mask: np.ndarray  # (Z, H, W) bool
    lesions: list[dict]
    seconds: float
    slice_areas: list[int] = field(default_factory=list)
    display: np.ndarray | None = None  # (Z, H, W, 3) uint8: the volume in the volume-wide window the model saw
    window: tuple | None = None  # that window (``inference.window_for_volume``; None for uint8 input)
    skipped: list[int] = field(default_factory=list)  # background slices not sent to the network
    rano_bm: dict | None = None  # ``measure.rano_bm`` of the lesions

    def summary(self) -> dict:
        v = self.volume
        return {
            "lesion_count": len(self.lesions),
            "lesion_voxels": int(self.mask.sum()),
            "lesion_volume_mm3": round(float(self.mask.sum()) * v.voxel_volume_mm3, 1),
            "spacing_mm": list(v.spacing),
            "shape": list(v.shape),
            "slices": int(self.mask.shape[0]),
            "slice_lesion_area_px": self.slice_areas,
            "slices_with_lesion": [i for i, a in enumerate(self.slice_areas) if a > 0],
            "background_slices_skipped": self.skipped,
            "lesions": self.lesions,
            "rano_bm": self.rano_bm,
        }


def segment_slice(segmenter, image: np.ndarray, post: PostprocessConfig, tta: bool = False, pixel_spacing_mm: tuple[float, float] | None = None) -> SliceResult:
    """One (H, W[, C]) slice of any dtype -> probabilities, mask and lesion table; ``pixel_spacing_mm``: (row, col)
    spacing (DICOM PixelSpacing order), None when unknown (areas and diameters in pixels only)."""
    t0 = time.perf_counter()
    img = to_three_channels(image)
    if not np.issubdtype(img.dtype, np.integer) and not np.isfinite(img).all():
        raise DataError("image", "image contains NaN or infinite values")
    spread: list = []
    prob = segmenter.probabilities([img], tta=tta, spread=spread)[0]
    mask = binarize(prob, post)
    spacing = None if pixel_spacing_mm is None else (float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1]))
    metric = None if spacing is None else spacing_metric(*spacing)
    lesions = lesion_table(mask, None if spacing is None else spacing[0] * spacing[1], metric=metric, prob=prob, spread=spread[0] if spread else None)
    return SliceResult(img, prob, mask, lesions, time.perf_counter() - t0, spacing, rano_bm(lesions, spacing_known=spacing is not None))


# A slice with fewer non-zero pixels than this share of its area (after the volume's intensity
# window) holds no brain worth segmenting: the empty slices above and below a skull-stripped
# brain. It is not sent to the network; its probability is 0 and answers list it.
BACKGROUND_MAX_FRACTION = 0.005
VOLUME_BATCH = 16  # slices per network call


def background_slices(display: np.ndarray, max_fraction: float = BACKGROUND_MAX_FRACTION) -> np.ndarray:
    """(Z, H, W, C) uint8 -> (Z,) bool: slices whose non-zero pixels (any channel) cover less than ``max_fraction``."""
    z, h, w = display.shape[:3]
    channels = [display[..., c] for c in range(display.shape[3])] if display.ndim == 4 else [display]
    anything = functools.reduce(np.bitwise_or, channels)  # not .any(axis=-1): a reduction over a short last axis is slow
    return np.count_nonzero(anything.reshape(z, h * w), axis=1) < max_fraction * h * w


def segment_volume(segmenter, vol: Volume, post: PostprocessConfig, tta: bool = False, skip_background: bool = True) -> VolumeResult:
    """Every axial slice of a volume, with one intensity window for the whole volume.

    The volume is windowed to uint8 once (kept as ``display``); background slices
    (``background_slices``) are skipped unless ``skip_background`` is False; the others go to
    the network in batches and back into one preallocated (Z, H, W) array.
    """
    t0 = time.perf_counter()
    window = window_for_volume(vol.slices)
    display = volume_to_uint8(vol.slices, window)
    skipped = background_slices(display) if skip_background else np.zeros(len(display), bool)
    keep = np.flatnonzero(~skipped)
    probs = np.zeros(display.shape[:3], np.float32)
    spread: list = []
    for k, prob in zip(keep, segmenter.probabilities(display, tta=tta, batch_size=VOLUME_BATCH, stacked=True, only=keep, spread=spread), strict=False):
        probs[k] = prob
    spreads = None
    if spread:
        spreads = np.zeros(display.shape[:3], np.float32)
        spreads[keep] = spread
    mask = binarize_stack(probs, post)
    metric = plane_metric(vol.display_affine)
    lesions = lesion_table(mask, voxel_volume_mm3=vol.voxel_volume_mm3, metric=metric, prob=probs, slice_spacing_mm=vol.spacing[2], spread=spreads)
    areas = np.count_nonzero(mask.reshape(len(mask), -1), axis=1).tolist()
    rano = rano_bm(lesions, slice_spacing_mm=vol.spacing[2])
    return VolumeResult(vol, probs, mask, lesions, time.perf_counter() - t0, areas, display, window, np.flatnonzero(skipped).tolist(), rano)


# ---------------------------------------------------------------- files in, files out


def expand_inputs(inputs: list[str], on_error=None) -> list[list[Path]]:
    """Group inputs into jobs: one slice, or one volume (a NIfTI file, a BraTS set, or a DICOM folder / .zip).

    An input that is missing, of an unsupported type, yields nothing, or a BraTS set without FLAIR, is
    a ``DataError``: raised, or given to ``on_error(exc)`` (the other inputs are grouped all the same).
    """

    def fail(exc: DataError) -> None:
        if on_error is None:
            raise exc
        on_error(exc)

    jobs: list[list[Path]] = []
    brats: dict[tuple[str, str], list[Path]] = {}
    for raw in inputs:
        p = Path(raw)
        before = len(jobs) + sum(map(len, brats.values()))
        try:
            if not p.exists():
                raise DataError(p, "input not found")
            if is_dicom_input(p):  # a .zip, or a folder of DICOM files (recognised by content): one series or study
                jobs.append([p])
                continue
            for f in sorted(p.iterdir()) if p.is_dir() else [p]:
                _file_job(f, p.is_dir(), jobs, brats)
            if len(jobs) + sum(map(len, brats.values())) == before:
                raise DataError(p, "no slices or volumes found")
        except DataError as exc:
            fail(exc)
    for files in brats.values():
        _brats_job(files, jobs, fail)
    if not jobs and not inputs:
        raise DataError(".", "no slices or volumes found")
    return jobs


def _file_job(f: Path, in_folder: bool, jobs: list[list[Path]], brats: dict[tuple[str, str], list[Path]]) -> None:
    """One file of an input: a job of its own, a member of a BraTS set (grouped by folder and stem), or skipped
    (a folder, a mask, another type inside a folder); a file of another type given by itself is a DataError."""
    if f.is_dir():
        return
    if is_nifti(f):
        tag = brats_sequence(f)
        if tag:
            brats.setdefault((str(f.parent), tag[0]), []).append(f)
        else:
            jobs.append([f])
    elif f.suffix.lower() in IMAGE_SUFFIXES and not f.stem.endswith(MASK_TAG):
        jobs.append([f])
    elif not in_folder:
        raise DataError(f, f"unsupported file type (use {', '.join(IMAGE_SUFFIXES)}, .nii or .nii.gz, or a DICOM folder or .zip)")


def _brats_job(files: list[Path], jobs: list[list[Path]], fail) -> None:
    """One set per (folder, stem): read together when it has FLAIR (t2f), missing t1n / t1c filled with FLAIR by
    load_volume; a lone file is one grey volume of the sequence its name says; several files without FLAIR cannot
    be segmented (``fail``)."""
    seqs = {brats_sequence(f)[1]: f for f in files}
    if len(files) == 1:
        jobs.append(files)
    elif "t2f" in seqs:
        jobs.append(sorted(files, key=lambda f: SEQ_ORDER.index(brats_sequence(f)[1])))
    else:
        got = ", ".join(sorted(seqs, key=SEQ_ORDER.index))
        fail(
            DataError(
                files[0],
                f"BraTS-style set {brats_sequence(files[0])[0]} has no FLAIR (t2f) file (got {got}); the models need FLAIR (t1n and t1c may be left out)",
            )
        )


def _is_dicom_job(job: list[Path]) -> bool:
    """``expand_inputs`` makes a folder or a .zip a job only when it is DICOM."""
    return len(job) == 1 and (job[0].is_dir() or job[0].suffix.lower() == ".zip")


def model_version(segmenter) -> str:
    """``predictor.version``: the one rule that names the weights a result came from."""
    from .predictor import version

    return version(segmenter)


@dataclass
class Batch:
    """What ``predict_inputs`` did: the files written, how many inputs (jobs) it had, and one line per input that failed."""

    written: list[Path] = field(default_factory=list)
    inputs: int = 0
    failures: list[str] = field(default_factory=list)


def failure_line(exc: BaseException, label: str, quote: bool = True) -> str:
    """One line naming the input: a ``DataError`` as it reads ("PATH: message"), anything else as
    "LABEL: unexpected TypeName" (with its first message line when ``quote``; never for DICOM, whose
    library messages may quote header values)."""
    if isinstance(exc, DataError):
        return " ".join(str(exc).split())
    text = " ".join(str(exc).split())[:200] if quote else ""
    return f"{label}: unexpected {type(exc).__name__}" + (f": {text}" if text else "")


@dataclass
class Study:
    """One input (a job of ``expand_inputs``) segmented by ``predict_job``: ``name`` as reported (a slice's file
    name, a volume's name), ``stem`` the prefix of its output files, how it was read, the files written and the
    lesion figures of its ``X_lesions.json``."""

    name: str
    stem: str
    read_as: dict
    written: list[Path]
    lesion_count: int
    lesion_volume_mm3: float | None  # volumes only
    seconds: float


class JobFailed(Exception):
    """``predict_job``'s failure: ``line`` names the input (``failure_line``), ``exc`` is what was raised,
    ``written`` the files written before it."""

    def __init__(self, line: str, exc: BaseException, written: list[Path]):
        super().__init__(line)
        self.line, self.exc, self.written = line, exc, written


def predict_job(
    job: list[Path],
    out: Path,
    segmenter,
    post: PostprocessConfig,
    tta: bool = False,
    sequence: str | None = None,
    pixel_spacing_mm: tuple[float, float] | None = None,
    reports: bool = False,
) -> Study:
    """Read, segment and write one job of ``expand_inputs`` into ``out`` (every file atomically): what
    ``brainseg predict`` and ``brainseg batch`` do per input. Anything that fails is a ``JobFailed``.
    ``pixel_spacing_mm`` (row, col) is a slice's pixel spacing (volumes take theirs from the header); ``reports``: also
    ``X_report.html`` (and ``X_sr.dcm``, ``X_sc.zip`` for DICOM, ``report.write_volume_reports``)."""
    t0 = time.perf_counter()
    from_dicom = _is_dicom_job(job)
    label = str(job[0])
    written: list[Path] = []
    try:
        if is_nifti(job[0]) or from_dicom:
            vol = load_dicom_path(job[0]) if from_dicom else load_volume(job)
            label = vol.sources[0] if from_dicom else label  # a DICOM path that names the patient is not repeated
            name = stem = vol.name
            read_as, summary = _predict_volume(vol, job, from_dicom, out, segmenter, post, tta, sequence, written, reports)
        else:
            name, stem = job[0].name, job[0].stem
            read_as, summary = _predict_slice(job[0], out, segmenter, post, tta, sequence, written, pixel_spacing_mm, reports)
    except Exception as exc:  # one input's failure, reported by name
        raise JobFailed(failure_line(exc, label, quote=not from_dicom), exc, written) from exc
    return Study(name, stem, read_as, written, summary["lesion_count"], summary.get("lesion_volume_mm3"), time.perf_counter() - t0)


def predict_inputs(
    inputs: list[str],
    out_dir: os.PathLike | str,
    segmenter,
    post: PostprocessConfig,
    tta: bool = False,
    sequence: str | None = None,
    report=None,
    on_error=None,
    pixel_spacing_mm: tuple[float, float] | None = None,
    reports: bool = False,
) -> Batch:
    """Write masks, overlays and lesion JSON for every input; returns the ``Batch`` (files written, failures).

    ``sequence`` (``channels.SEQUENCES``): what a grey slice or a single volume is (None: FLAIR,
    or what a BraTS file name says). Each ``X_lesions.json`` holds how the input was read
    (``read_as``: condition, channels, sequence, warnings); ``report(name, read_as)`` is
    called for each input as well. An input that fails (bad data, or anything unexpected) is
    reported to ``on_error(line, exc)`` (``failure_line``) and the others go on; without
    ``on_error`` the first failure is raised. A DICOM SEG that cannot be written is a warning
    in ``read_as`` (the mask is written all the same), not a failure. ``pixel_spacing_mm`` (row, col): the
    pixel spacing of slice inputs (their areas and diameters in mm); volumes take theirs from their headers. ``reports``:
    also each input's ``X_report.html`` (DICOM: ``X_sr.dcm`` and ``X_sc.zip`` too; ``report``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batch = Batch()
    from tqdm import tqdm

    def failed(exc: BaseException, line: str) -> None:
        if on_error is None:
            raise exc
        batch.failures.append(line)
        on_error(line, exc)

    jobs = expand_inputs(inputs, on_error=None if on_error is None else lambda exc: failed(exc, failure_line(exc, exc.path)))
    batch.inputs = len(jobs) + len(batch.failures)
    for job in tqdm(jobs, desc="predict", unit="input", disable=len(jobs) < 2):
        try:
            study = predict_job(job, out, segmenter, post, tta, sequence, pixel_spacing_mm, reports)
        except JobFailed as err:  # the others go on
            batch.written += err.written
            failed(err.exc, err.line)
            continue
        batch.written += study.written
        if report is not None:
            report(study.name, study.read_as)
    return batch


def _predict_volume(
    vol: Volume, job: list[Path], from_dicom: bool, out: Path, segmenter, post: PostprocessConfig, tta: bool, sequence, written: list, reports: bool = False
) -> tuple[dict, dict]:
    read_as = describe_volume(vol, sequence)
    if from_dicom:
        read_as["dicom"] = vol.dicom.block()
    res = segment_volume(segmenter, vol, post, tta)
    mask_path = save_mask_nifti(out / f"{vol.name}_mask.nii.gz", res.mask, vol)
    z = int(np.argmax(res.slice_areas)) if res.mask.any() else res.mask.shape[0] // 2
    ov = out / f"{vol.name}_overlay.png"
    save_png(ov, overlay(display_channel(vol.slices[z]), res.mask[z]))
    written += [mask_path, ov]
    seg = None
    if from_dicom:  # the mask as a DICOM SEG beside the NIfTI one, referencing the source series; a failure is a warning
        seg, warning = write_seg(vol.dicom, vol.to_stored(res.mask), segmenter.name, model_version(segmenter), post.threshold)
        if warning:
            read_as["warnings"] = [*read_as.get("warnings", []), warning]
    stats = {
        "input": list(vol.sources) if from_dicom else [str(f) for f in job],  # DICOM: the path, unless it names the patient
        "read_as": read_as,
        "model": segmenter.name,
        "version": model_version(segmenter),
        "precision": segmenter.precision,
        "postprocess": {"threshold": post.threshold, "min_size": post.min_size},
        "overlay_slice": z,
        **res.summary(),
    }
    js = out / f"{vol.name}_lesions.json"
    write_json_atomic(js, stats)
    written.append(js)
    if seg is not None:
        write_bytes_atomic(out / f"{vol.name}_seg.dcm", seg)
        written.append(out / f"{vol.name}_seg.dcm")
    if reports:
        from ..display.report import write_volume_reports

        read_as["warnings"] = list(read_as.get("warnings", []))
        written += write_volume_reports(out, vol, res, stats, model_version(segmenter), seg, read_as["warnings"])
    return read_as, stats


def _predict_slice(
    f: Path, out: Path, segmenter, post: PostprocessConfig, tta: bool, sequence, written: list, pixel_spacing_mm=None, reports: bool = False
) -> tuple[dict, dict]:
    image = read_slice(f)  # the API's decoder too
    img3 = to_three_channels(image, f)
    read_as = describe_slice(img3, stored_channels(image), sequence)
    res = segment_slice(segmenter, img3, post, tta, pixel_spacing_mm)
    mp, op, js = out / f"{f.stem}_mask.png", out / f"{f.stem}_overlay.png", out / f"{f.stem}_lesions.json"
    save_png(mp, res.mask.astype(np.uint8) * 255)
    save_png(op, overlay(res.image, res.mask))
    stats = {
        "input": str(f),
        "read_as": read_as,
        "model": segmenter.name,
        "version": model_version(segmenter),
        "precision": segmenter.precision,
        "postprocess": {"threshold": post.threshold, "min_size": post.min_size},
        **res.summary(),
    }
    write_json_atomic(js, stats)
    written += [mp, op, js]
    if reports:
        from ..display.report import write_slice_report

        written += write_slice_report(out, f.stem, res, stats, model_version(segmenter))
    return read_as, stats
