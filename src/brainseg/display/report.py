"""Reports a PACS or a person can open: a DICOM SR of the measurements, a secondary-capture series, an HTML page.

**DICOM SR** (``sr_bytes``): a Comprehensive 3D SR holding a TID 1500 Measurement Report (highdicom), made from the
DICOM SEG that brainseg wrote for the same result. The SEG is the SR's evidence, so the SR belongs to the same
patient and study (the SEG's headers were made fit by ``dicom.seg_headers``: anonymised exports whose Type 2
attributes are missing work). Each lesion (the ``MAX_SR_LESIONS`` largest) is one TID 1411 volumetric group,
tracked as "lesion <id>" of the lesion table, whose ``ReferencedSegment`` points to segment 1 of that SEG and to the
source series (its SeriesInstanceUID, read from the SEG). The SEG has one segment for all lesions, and DICOM lets a
reference name segments or frames, not both (dcmtk warns), so the group does not name frames. Measurements: volume
(SCT 118565006, mm3), longest axial diameter (SCT 103339001 "Long axis", mm) and the longest diameter perpendicular
to it (SCT 131189007 "Perpendicular Axis", mm), method RANO; RANO-BM measurability and target status are
qualitative evaluations (Yes / No) under codes of brainseg's own scheme ``99BRAINSEG`` (DICOM has none for them).
A TID 1501 group of its own holds the number of lesions found, the sum of the target lesions' longest diameters
and the intended use: the template has no free text, so "decision support, not a diagnosis" is a coded
evaluation there, and the SR's series description says it too.

**Secondary capture** (``secondary_capture_series``): one RGB image per slice with lesion (the middle slice when
there is none), the lesion tinted and outlined as brainseg's PNGs show it and a short disclaimer burned in, in the
displayed orientation; same patient and study as the SEG, a new series. For viewers that cannot show a SEG.

**HTML** (``html_report``): one self-contained page (no scripts, images inline) that prints on one A4 page: key
images, the lesion table, the RANO-BM sum, model, version, precision, warnings, the input and the date. It names no
patient. Slices and NIfTI volumes get the page only: an SR and a secondary capture take the study from the SEG.
"""

from __future__ import annotations

import contextlib
import datetime
import html
import io
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .. import __version__
from .visualize import b64png

DISCLAIMER = "Decision support, not a diagnosis: research software; every finding must be checked by a radiologist."
SCHEME = "99BRAINSEG"  # a private coding scheme ("99" prefix, DICOM PS3.16) for what DICOM has no code for
MAX_TABLE_ROWS = 12  # lesions listed in the HTML table (largest first); the rest are counted, so the page stays one page
MAX_KEY_IMAGES = 2
MAX_SR_LESIONS = 100  # lesion groups in a DICOM SR (the largest); the number of lesions found is reported as well


class ReportError(Exception):
    """A report that cannot be made from this result; ``str()`` is a plain sentence."""


# ---------------------------------------------------------------- DICOM SR


@contextlib.contextmanager
def _written(what: str):
    """Writing ``what`` with highdicom: any failure but MemoryError becomes a ReportError naming it
    (highdicom's messages may quote header values, so they are not passed on)."""
    try:
        yield
    except MemoryError:
        raise
    except Exception:
        raise ReportError(f"{what} could not be written from this result's DICOM SEG") from None


def _file_bytes(dataset) -> bytes:
    """A pydicom dataset as DICOM file bytes."""
    buf = io.BytesIO()
    dataset.save_as(buf)
    return buf.getvalue()


def _dataset(seg) -> object:
    import pydicom

    return seg if isinstance(seg, pydicom.Dataset) else pydicom.dcmread(io.BytesIO(seg))


def source_series_uid(seg) -> str:
    """The SeriesInstanceUID of the series a SEG was drawn on: the series holding the source image of its first frame."""
    ds = _dataset(seg)
    try:
        sop = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for series in ds.ReferencedSeriesSequence:
            if any(i.ReferencedSOPInstanceUID == sop for i in series.ReferencedInstanceSequence):
                return str(series.SeriesInstanceUID)
        return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError, KeyError):
        raise ReportError("the DICOM SEG names no source series") from None


def _code(value: str, meaning: str):  # values of at most 16 characters (SH): longer ones become LongCodeValue, which highdicom 0.28 cannot read back
    from pydicom.sr.coding import Code

    return Code(value, SCHEME, meaning)


def _yes_no(flag: bool | None):
    from pydicom.sr.codedict import codes

    return codes.SCT.Yes if flag else codes.SCT.No


def _algorithm(model_name: str, model_version: str):
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(name=f"brainseg {model_name}"[:64], version=str(model_version)[:64], parameters=[f"brainseg {__version__}"])


def _lesion_group(row: dict, seg, series_uid: str, targets: set, algorithm):
    """One lesion: TID 1411 with its ReferencedSegment (segment 1 of ``seg``, the source series)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    method = codes.cid6147.RANO
    measures = [
        (codes.SCT.Volume, row.get("volume_mm3"), codes.UCUM.CubicMillimeter, None),
        (codes.SCT.LongAxis, row.get("longest_diameter_mm"), codes.UCUM.Millimeter, method),
        (codes.SCT.PerpendicularAxis, row.get("perpendicular_diameter_mm"), codes.UCUM.Millimeter, method),
    ]
    measurements = [hd.sr.Measurement(name=n, value=float(v), unit=u, method=m) for n, v, u, m in measures if v is not None]  # the group names the algorithm
    evaluations = [hd.sr.QualitativeEvaluation(_code("RANOBM-TARGET", "Target lesion (RANO-BM)"), _yes_no(row["id"] in targets))]
    if row.get("measurable") is not None:
        evaluations.insert(0, hd.sr.QualitativeEvaluation(_code("RANOBM-MEAS", "Measurable lesion (RANO-BM)"), _yes_no(row["measurable"])))
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=1,
        source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {row['id']}"),
        referenced_segment=segment,
        finding_type=codes.SCT.Lesion,
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Brain)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _summary_group(rano: dict | None, lesion_count: int, algorithm):
    """The report as a whole (TID 1501): the number of lesions found (all of them, also those without a group of their
    own), the RANO-BM sum of the target lesions' longest diameters, and the intended use."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    measurements = [hd.sr.Measurement(codes.SCT.NumberOfLesions, float(lesion_count), codes.UCUM.NoUnits)]
    total = (rano or {}).get("sum_longest_diameters_mm")
    if total is not None:
        sld = _code("RANOBM-SLD", "Sum of longest diameters of target lesions (RANO-BM)")
        measurements.append(hd.sr.Measurement(sld, float(total), codes.UCUM.Millimeter, method=codes.cid6147.RANO))
    use = hd.sr.QualitativeEvaluation(_code("INTENDED-USE", "Intended use"), _code("DECISION-SUPPORT", "Decision support, not a diagnosis"))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="RANO-BM targets"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[use],
    )


def _observer(model_name: str, model_version: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["brainseg", model_name, str(model_version)]),  # the same model is the same device
        name="brainseg",
        manufacturer_name="brainseg",
        model_name=f"brainseg {model_name} {model_version}"[:64],
    )
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def sr_bytes(
    seg,
    lesions: list[dict],
    rano: dict | None,
    model_name: str,
    model_version: str,
    lesion_count: int | None = None,
) -> bytes:
    """A Comprehensive 3D SR (TID 1500) of ``lesions`` (rows of ``predict.lesion_table``, with ``id``, largest first)
    and ``rano`` (``measure.rano_bm``), referencing ``seg`` (the result's DICOM SEG, bytes or a Dataset) and its source
    series. The first ``MAX_SR_LESIONS`` lesions get a group each (highdicom takes some 50 ms a group: a garbage
    mask's thousands would take minutes); ``lesion_count`` (default: ``len(lesions)``) is reported as the number found.

    Raises ``ReportError`` (a plain sentence) when the SR cannot be written."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    seg = _dataset(seg)
    series_uid = source_series_uid(seg)
    algorithm = _algorithm(model_name, model_version)
    targets = set((rano or {}).get("target_lesion_ids") or [])
    count = len(lesions) if lesion_count is None else int(lesion_count)
    number = int(seg.get("SeriesNumber") or 1000)
    with _written("the DICOM SR"):
        groups = [_lesion_group(r, seg, series_uid, targets, algorithm) for r in lesions[:MAX_SR_LESIONS]]
        report = hd.sr.MeasurementReport(
            observation_context=_observer(model_name, model_version),
            procedure_reported=codes.LN.BrainMRI,
            imaging_measurements=[*groups, _summary_group(rano, count, algorithm)],
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=[seg],
            content=report,
            series_instance_uid=hd.UID(),
            series_number=number + 1 if number < 2**31 - 2 else 1001,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="brainseg",
            series_description="brainseg measurements; decision support, not a diagnosis"[:64],
        )
        return _file_bytes(sr)


# ---------------------------------------------------------------- secondary capture


def _burn_label(rgb: np.ndarray, text: str) -> np.ndarray:
    """``text`` in yellow along the bottom edge, scaled to fit the width (a viewer shows it with the image)."""
    import cv2

    h, w = rgb.shape[:2]
    (width, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_PLAIN, 1.0, 1)
    scale = min(1.0, 0.95 * w / max(width, 1))
    cv2.putText(rgb, text, (2, h - 4), cv2.FONT_HERSHEY_PLAIN, scale, (255, 255, 0), 1, cv2.LINE_AA)
    return rgb


def _orientation_codes(orientation: dict | None) -> tuple[str, str] | None:
    """PatientOrientation (towards the right edge, towards the bottom edge) of ``volumes.display_orientation``'s dict."""
    if not orientation or not orientation.get("right") or not orientation.get("bottom"):
        return None
    return (orientation["right"], orientation["bottom"])


def _sc_file(seg, rgb: np.ndarray, series: tuple[str, int], instance: int, orientation: dict | None, comment: str) -> bytes:
    """One Secondary Capture image of ``rgb`` in ``seg``'s patient and study, in ``series`` (uid, number), as file bytes."""
    import highdicom as hd

    with _written("the secondary capture"):
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=seg,
            pixel_array=np.ascontiguousarray(rgb),
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series[0],
            series_number=series[1],
            sop_instance_uid=hd.UID(),
            instance_number=instance,
            manufacturer="brainseg",
            patient_orientation=_orientation_codes(orientation),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        image.SeriesDescription = "brainseg lesion overlay; not a diagnosis"
        image.ImageComments = comment[:10240]
        image.BurnedInAnnotation = "NO"  # the burned-in text names no one
        return _file_bytes(image)


def secondary_capture_series(seg, display, mask, model_name: str, model_version: str, orientation: dict | None = None, alpha: float = 0.4) -> list[bytes]:
    """One Secondary Capture image (RGB) per slice with lesion (the middle slice when there is none), each with the
    lesion burned in, in the same patient and study as ``seg`` (bytes or Dataset), a new series.

    ``display`` (Z, H, W, 3) uint8 and ``mask`` (Z, H, W) bool are display-oriented (indexable slice by slice, as a
    stored result's are); ``orientation``: the answer's ``input.orientation`` (top / bottom / left / right).
    Raises ``ReportError`` (a plain sentence) when the images cannot be written."""
    import highdicom as hd

    from .visualize import render

    seg = _dataset(seg)
    slices = [z for z in range(len(mask)) if np.asarray(mask[z]).any()] or [len(mask) // 2]
    number = int(seg.get("SeriesNumber") or 1000)
    series = (hd.UID(), number + 2 if number < 2**31 - 3 else 1002)
    out = []
    for i, z in enumerate(slices, 1):
        rgb = _burn_label(render(np.asarray(display[z]), np.asarray(mask[z]), "overlay", 1, alpha), "brainseg: decision support, not a diagnosis")
        comment = f"slice {z} of {len(mask)} (display order); brainseg {model_name} {model_version}; {DISCLAIMER}"
        out.append(_sc_file(seg, rgb, series, i, orientation, comment))
    return out


def zip_files(files: list[bytes], prefix: str = "SC") -> bytes:
    """DICOM files as one .zip (``SC0001.dcm``, ...), deflated at level 1 (fast; the grey background packs well)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for i, data in enumerate(files, 1):
            zf.writestr(f"{prefix}{i:04d}.dcm", data)
    return buf.getvalue()


# ---------------------------------------------------------------- HTML / PDF


@dataclass
class ReportInfo:
    """What a human-readable report says, from an API answer or a CLI lesion JSON (``report_info``)."""

    name: str
    kind: str  # "slice" or "volume"
    model: dict  # name, display_name, version, precision
    lesions: list[dict]
    rano: dict | None
    warnings: list[str]
    input_lines: list[str]
    lesion_count: int = 0
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _input_lines(summary: dict, inp: dict) -> list[str]:
    shape, spacing = summary.get("shape") or inp.get("shape"), summary.get("spacing_mm") or inp.get("spacing_mm")
    lines = []
    if inp.get("read_as"):
        lines.append(f"read as {inp['read_as']} (condition {inp.get('condition', 'n/a')})")
    if shape:
        lines.append("shape " + " x ".join(str(s) for s in shape) + (", spacing " + " x ".join(f"{s:g}" for s in spacing) + " mm" if spacing else ""))
    elif summary.get("height"):
        lines.append(f"{summary['height']} x {summary['width']} pixels")
    for ch, src in zip(("pre-contrast", "FLAIR", "post-contrast"), (inp.get("dicom") or {}).get("channel_sources", []), strict=False):
        lines.append(f"{ch}: {src}")
    return lines + [str(n) for n in inp.get("notes", [])]


def report_info(summary: dict, model_version: str | None = None, name: str | None = None) -> ReportInfo:
    """A ``ReportInfo`` from an API answer (``model`` a block, ``input`` a dict) or a CLI ``X_lesions.json``
    (``model`` a name, ``read_as`` a dict; ``model_version`` given by the caller)."""
    from ..config import DISPLAY_NAMES

    model = summary.get("model")
    if not isinstance(model, dict):
        model = {"name": model, "display_name": DISPLAY_NAMES.get(model, model), "version": model_version, "precision": summary.get("precision")}
    inp = summary["input"] if isinstance(summary.get("input"), dict) else summary.get("read_as") or {}
    kind = summary.get("kind") or ("volume" if "lesion_voxels" in summary else "slice")
    return ReportInfo(
        name=name or inp.get("name") or "result",
        kind=kind,
        model=model,
        lesions=list(summary.get("lesions") or []),
        rano=summary.get("rano_bm"),
        warnings=[str(w) for w in inp.get("warnings", [])],
        input_lines=_input_lines(summary, inp),
        lesion_count=int(summary.get("lesion_count", len(summary.get("lesions") or []))),
    )


def key_slices(mask, lesions: list[dict], limit: int = MAX_KEY_IMAGES) -> list[int]:
    """Slices to show: where the largest lesions have their longest diameter (the largest first), else the slice with
    the most lesion, else the middle one."""
    zs = []
    for r in lesions:
        z = r.get("diameter_slice", 0 if len(mask) == 1 else None)
        if z is not None and z not in zs:
            zs.append(int(z))
        if len(zs) >= limit:
            return zs
    if not zs:
        areas = [int(np.count_nonzero(mask[z])) for z in range(len(mask))]
        zs = [int(np.argmax(areas)) if max(areas, default=0) else len(mask) // 2]
    return zs


def key_images(display, mask, lesions: list[dict], limit: int = MAX_KEY_IMAGES) -> list[tuple[str, np.ndarray]]:
    """(caption, RGB overlay with the diameters drawn) for each of ``key_slices``."""
    import cv2

    from .visualize import render

    out = []
    for z in key_slices(mask, lesions, limit):
        rgb = np.ascontiguousarray(render(np.asarray(display[z]), np.asarray(mask[z]), "overlay", 1, 0.4))
        here = [r for r in lesions if r.get("diameter_slice", 0 if len(mask) == 1 else -1) == z]
        for r in here:
            for key, colour in (("longest_diameter_ends", (255, 255, 0)), ("perpendicular_diameter_ends", (0, 255, 255))):
                ends = r.get(key)
                if ends:
                    (r0, c0), (r1, c1) = ([p[-2], p[-1]] for p in ends)
                    cv2.line(rgb, (round(c0), round(r0)), (round(c1), round(r1)), colour, 1, cv2.LINE_AA)
        ids = ", ".join(str(r["id"]) for r in here[:4]) + (f" and {len(here) - 4} more" if len(here) > 4 else "")
        out.append((f"slice {z}" + (f": lesion {ids} (yellow: longest diameter, cyan: perpendicular)" if ids else ""), rgb))
    return out


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(info: ReportInfo) -> str:
    targets = set((info.rano or {}).get("target_lesion_ids") or [])
    volume = info.kind == "volume"
    head = [
        "#",
        "volume (mL)" if volume else "area (mm\u00b2)",
        "longest (mm)",
        "perpendicular (mm)",
        "measurable",
        "target",
        "slices" if volume else "",
        "confidence",
    ]
    rows = []
    for r in info.lesions[:MAX_TABLE_ROWS]:
        size = _fmt(r.get("volume_ml"), 3) if volume else _fmt(r.get("area_mm2"), 1)
        longest = r.get("longest_diameter_mm", r.get("longest_diameter_px"))
        perp = r.get("perpendicular_diameter_mm", r.get("perpendicular_diameter_px"))
        sr = r.get("slice_range")
        cells = [
            r["id"],
            size,
            _fmt(longest),
            _fmt(perp),
            _fmt(r.get("measurable")),
            _fmt(r["id"] in targets),
            f"{sr[0]}-{sr[1]}" if sr else "",
            _fmt(r.get("confidence"), 2),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    more = info.lesion_count - min(len(info.lesions), MAX_TABLE_ROWS)
    foot = f'<p class="small">{more} smaller lesion(s) not listed here: see the lesion JSON.</p>' if more > 0 else ""
    if not rows:
        return "<p>No lesion found.</p>"
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>" + foot


def _rano_text(rano: dict | None) -> str:
    if not rano:
        return "n/a"
    if rano.get("sum_longest_diameters_mm") is None:
        return html.escape(rano.get("note") or "not available")
    ids = ", ".join(str(i) for i in rano.get("target_lesion_ids") or []) or "none"
    return (
        f"sum of longest diameters of the target lesions: <b>{rano['sum_longest_diameters_mm']:.1f} mm</b> "
        f"(targets: {ids}; measurable lesions: {rano.get('measurable_count')}; measurable from {rano.get('measurable_min_mm'):g} mm)"
    )


STYLE = """
@page { size: A4; margin: 10mm; }
body { font: 9pt/1.3 system-ui, sans-serif; margin: 0 auto; max-width: 190mm; color: #111; }
h1 { font-size: 13pt; margin: 0 0 1.5mm; } h2 { font-size: 10pt; margin: 2.5mm 0 1mm; } p { margin: 0.5mm 0; }
.disclaimer { border: 1.5pt solid #b00; color: #b00; padding: 1mm 3mm; font-weight: 600; margin: 1.5mm 0; }
.images { display: flex; gap: 4mm; } figure { margin: 0; width: 55mm; } figure img { width: 55mm; image-rendering: pixelated; }
figcaption, .small { font-size: 7.5pt; color: #444; }
table { border-collapse: collapse; width: 100%; font-size: 8pt; } td, th { border: 0.5pt solid #999; padding: 0.2mm 1.5mm; text-align: right; }
th { background: #eee; } ul { margin: 0; padding-left: 5mm; }
@media print { body { max-width: none; } }
"""


def html_report(info: ReportInfo, images: list[tuple[str, np.ndarray]]) -> str:
    """One self-contained HTML page (inline CSS and PNGs, no scripts) that prints on one A4 page."""
    e = html.escape
    m = info.model
    figures = "".join(f'<figure><img alt="{e(c)}" src="data:image/png;base64,{b64png(img)}"><figcaption>{e(c)}</figcaption></figure>' for c, img in images)
    warnings = "<ul>" + "".join(f"<li>{e(w)}</li>" for w in info.warnings) + "</ul>" if info.warnings else "<p>none</p>"
    model_line = f"{e(str(m.get('display_name') or m.get('name')))} ({e(str(m.get('name')))}), version {e(str(m.get('version') or 'unknown'))}, precision {e(str(m.get('precision') or 'n/a'))}"
    inputs = "".join(f"<li>{e(line)}</li>" for line in info.input_lines)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>brainseg report: {e(info.name)}</title><style>{STYLE}</style></head>
<body>
<h1>brainseg lesion report: {e(info.name)}</h1>
<div class="disclaimer">{e(DISCLAIMER)}</div>
<p class="small">{e(info.created)} &middot; brainseg {e(__version__)} &middot; model {model_line}</p>
<h2>Key images</h2><div class="images">{figures}</div>
<h2>Lesions ({info.lesion_count})</h2>{_table(info)}
<h2>RANO-BM</h2><p>{_rano_text(info.rano)}</p>
<h2>Warnings</h2>{warnings}
<h2>Input ({e(info.kind)})</h2><ul>{inputs}</ul>
</body></html>
"""


# ---------------------------------------------------------------- files beside ``brainseg predict``'s outputs


def write_volume_reports(out, vol, res, stats: dict, model_version: str, seg: bytes | None, warnings: list) -> list:
    """``X_report.html`` for a volume; for a DICOM input with its SEG also ``X_sr.dcm`` and ``X_sc.zip``. Files
    are written atomically; an SR or secondary capture that cannot be written is a warning added to ``warnings``."""
    from pathlib import Path

    from ..io.files import write_bytes_atomic
    from ..io.volumes import display_orientation

    out, stem = Path(out), vol.name
    info = report_info(stats, model_version, name=stem)
    paths = [out / f"{stem}_report.html"]
    write_bytes_atomic(paths[0], html_report(info, key_images(res.display, res.mask, info.lesions)).encode())
    if getattr(vol, "dicom", None) is None:
        return paths
    if seg is None:
        warnings.append("no DICOM SR or secondary capture: they reference the DICOM SEG, which could not be written")
        return paths
    try:
        sr = sr_bytes(seg, info.lesions, info.rano, info.model["name"], model_version, info.lesion_count)
        sc = zip_files(secondary_capture_series(seg, res.display, res.mask, info.model["name"], model_version, display_orientation(vol.display_affine)))
    except ReportError as exc:
        warnings.append(str(exc))
        return paths
    for name, data in ((f"{stem}_sr.dcm", sr), (f"{stem}_sc.zip", sc)):
        write_bytes_atomic(out / name, data)
        paths.append(out / name)
    return paths


def write_slice_report(out, stem: str, res, stats: dict, model_version: str) -> list:
    """``X_report.html`` for one slice (a slice has no DICOM source: no SR, no secondary capture)."""
    from pathlib import Path

    from ..io.files import write_bytes_atomic
    from ..preprocessing import to_uint8

    path = Path(out) / f"{stem}_report.html"
    info = report_info(stats, model_version, name=stem)
    write_bytes_atomic(path, html_report(info, key_images(to_uint8(res.image)[None], res.mask[None], info.lesions)).encode())
    return [path]


# ---------------------------------------------------------------- the follow-up comparison's page


def _num(v, unit: str = "", digits: int = 1, sign: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.{digits}f}{unit}" if sign else f"{v:.{digits}f}{unit}"


def _compare_rows(body: dict) -> str:
    """One row per matched group, then the new and the vanished lesions."""
    e = html.escape
    f_by = {r["id"]: r for r in body["followup"]["lesions"]}
    b_by = {r["id"]: r for r in body["baseline"]["lesions"]}
    rows = []
    for m in body["matches"]:
        ids = f"{', '.join(map(str, m['baseline_ids']))} &rarr; {', '.join(map(str, m['followup_ids']))}"
        rows.append(
            f"<tr><td>{ids}</td><td>{e(m['kind'])}</td><td>{_num(m['baseline_longest_diameter_mm'])}</td>"
            f"<td>{_num(m['followup_longest_diameter_mm'])}</td><td>{_num(m['diameter_change_pct'], '%', sign=True)}</td>"
            f"<td>{_num(m['baseline_volume_ml'], digits=2)}</td><td>{_num(m['followup_volume_ml'], digits=2)}</td>"
            f"<td>{_num(m['volume_change_pct'], '%', sign=True)}</td></tr>"
        )
    for f in body["new_lesion_ids"]:
        r = f_by.get(f, {})
        rows.append(
            f"<tr><td>new &rarr; {f}</td><td>new</td><td></td><td>{_num(r.get('longest_diameter_mm'))}</td><td></td><td></td>"
            f"<td>{_num(r.get('volume_ml'), digits=2)}</td><td></td></tr>"
        )
    for b in body["vanished_lesion_ids"]:
        r = b_by.get(b, {})
        rows.append(
            f"<tr><td>{b} &rarr; gone</td><td>vanished</td><td>{_num(r.get('longest_diameter_mm'))}</td><td></td><td></td>"
            f"<td>{_num(r.get('volume_ml'), digits=2)}</td><td></td><td></td></tr>"
        )
    head = (
        "<tr><th>Lesion (baseline &rarr; follow-up)</th><th>Match</th><th>Longest diameter before (mm)</th><th>after (mm)</th>"
        "<th>change</th><th>Volume before (mL)</th><th>after (mL)</th><th>change</th></tr>"
    )
    return f"<table>{head}{''.join(rows[:MAX_TABLE_ROWS])}</table>" + (
        f'<p class="small">{len(rows) - MAX_TABLE_ROWS} more rows in compare.json</p>' if len(rows) > MAX_TABLE_ROWS else ""
    )


def compare_html(body: dict, picture: np.ndarray) -> str:
    """The follow-up comparison (``compare.Comparison.to_dict`` plus ``model``) on one self-contained HTML page: the
    RANO-BM category and its reason, both sums, the side-by-side picture, the per-lesion changes, the registration,
    the rule and the disclaimer. No patient data: only the studies' names."""
    e = html.escape
    r, reg = body["response"], body["registration"]
    model = body.get("model")
    model_line = e(str(model.get("name"))) + f", version {e(str(model.get('version') or 'unknown'))}" if isinstance(model, dict) else e(str(model))
    reg_line = e(str(reg.get("reason", "")))
    if reg.get("applied"):
        reg_line += f" (rotation {_num(reg.get('rotation_deg'), ' deg', 2)}, shift {_num(np.linalg.norm(reg.get('shift_mm') or [0, 0, 0]), ' mm', 2)})"
    names = f"{e(body['baseline']['name'])} &rarr; {e(body['followup']['name'])}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>brainseg follow-up: {names}</title><style>{STYLE}
.category {{ font-size: 14pt; font-weight: 700; margin: 1mm 0; }} .picture img {{ width: 100%; image-rendering: pixelated; }}</style></head>
<body>
<h1>brainseg follow-up comparison: {names}</h1>
<div class="disclaimer">{e(body["disclaimer"])}</div>
<p class="small">{e(datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))} &middot; brainseg {e(__version__)} &middot; model {model_line}</p>
<p class="category">RANO-BM: {e(r["category"])} ({e(r["category_name"])})</p>
<p>{e(r["reason"])}</p>
<p>Sum of target diameters: baseline {_num(r.get("baseline_sum_mm"), " mm")}, follow-up {_num(r.get("followup_sum_mm"), " mm")}
({_num(r.get("change_mm"), " mm", sign=True)}, {_num(r.get("change_pct"), "%", sign=True)}); targets {e(str(r.get("baseline_target_ids")))};
new measurable lesions {e(str(r.get("new_measurable_ids")))}.</p>
<h2>Baseline | follow-up registered to it (slice {body["picture_slice"]})</h2>
<div class="picture"><img alt="baseline and follow-up side by side" src="data:image/png;base64,{b64png(picture)}"></div>
<h2>Lesions</h2>{_compare_rows(body)}
<h2>Registration</h2><p>{reg_line}</p>
<h2>Rule</h2><p class="small">{e(str(r.get("rule", "")))}</p>
</body></html>
"""
