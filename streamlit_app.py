"""Streamlit front end: ``streamlit run streamlit_app.py`` from the repository root.

It talks to the brainseg API over HTTP (``BRAINSEG_API_URL``, default http://127.0.0.1:8000,
editable in the sidebar; ``BRAINSEG_API_KEY`` when the API has a key) and never loads a network itself: no torch, no onnxruntime here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import cv2
import numpy as np
import streamlit as st
from pydantic import ValidationError

try:
    from brainseg.display.review import heatmap, window_level
    from brainseg.io.synthetic import SYNTHETIC_LABEL, synthetic_png
    from brainseg.serving.client import ApiError, api_request
    from brainseg.serving.schemas import parse_answer
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from brainseg.display.review import heatmap, window_level
    from brainseg.io.synthetic import SYNTHETIC_LABEL, synthetic_png
    from brainseg.serving.client import ApiError, api_request
    from brainseg.serving.schemas import parse_answer

DEFAULT_API = os.environ.get("BRAINSEG_API_URL", "http://127.0.0.1:8000").rstrip("/")
CHANNELS = {"Pre-contrast": 0, "FLAIR": 1, "Post-contrast": 2}
PRECISIONS = {"fp32": "fp32", "int8": "INT8"}  # the API's ``precision`` field
# What a grey slice or a single volume is (the API's ``sequence`` field; brainseg.io.channels.SEQUENCES).
SEQUENCES = {"flair": "FLAIR (default)", "t1": "Pre-contrast T1", "t1c": "T1 post-contrast", "t2": "T2"}
UPLOAD_TYPES = ["tif", "tiff", "png", "jpg", "jpeg", "nii", "nii.gz", "gz", "zip", "dcm"]
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".zip", ".dcm")
AUTO_WINDOW = "Auto (the window the model saw)"
CUSTOM_WINDOW = "Custom"
METRIC_NAMES = {
    "per_patient_dice": "Per-patient Dice",
    "positive_slice_dice": "Dice on lesion slices",
    "lesion_sensitivity": "Lesion sensitivity",
    "fp_slice_rate": "False-positive slice rate",
    "hd95": "HD95 (px)",
}


@st.cache_data(ttl=10, show_spinner=False)
def fetch_models(base: str) -> dict:
    api_request(base, "GET", "/health", timeout=5)
    return api_request(base, "GET", "/v1/models", timeout=60).json()


@st.cache_data(ttl=600, max_entries=300, show_spinner=False)
def fetch_bytes(base: str, path: str) -> bytes:
    return api_request(base, "GET", path, timeout=120).content


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def fmt_params(n) -> str:
    if not n:
        return "n/a"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


# ---------------------------------------------------------------- sidebar


def fmt_threshold(t: float) -> str:
    """The threshold as the API uses it (0.225, not a rounded 0.23)."""
    return f"{t:.4g}"


def sidebar() -> dict:
    sb = st.sidebar
    sb.header("Settings")
    base = sb.text_input("API URL", value=DEFAULT_API, key="api_url", help="Where the brainseg API runs (env BRAINSEG_API_URL)").strip().rstrip("/")
    opts = {"base": base, "ok": False, "model": None, "threshold": None, "tta": False, "compare": None}
    try:
        info = fetch_models(base)
    except ApiError as exc:
        sb.error("API not reachable")
        st.error(str(exc))
        return opts
    models = {m["name"]: m for m in info["models"]}
    names = list(models)
    default = info["default"] if info["default"] in models else names[0]
    sb.success(f"Connected · {len(names)} models")

    sb.subheader("Model")
    name = sb.selectbox(
        "Model",
        names,
        index=names.index(default),
        format_func=lambda n: models[n]["display_name"] + ("  (default)" if n == default else ""),
        key="model",
        label_visibility="collapsed",
    )
    m = models[name]
    # the TTA box is drawn below, but its state (or the model's default) decides the precision preselected here
    precision = precision_choice(sb, m, name, st.session_state.get(f"tta_{name}", bool((m.get("tta") or {}).get("default", False))))
    model_details(sb, m, models, info, precision)

    sb.subheader("Segmentation")
    tta = tta_choice(sb, m, name)
    threshold = threshold_choice(sb, m, name, tta)
    opts.update(ok=True, model=name, threshold=threshold, tta=tta, precision=precision, models=models, compare=compare_choice(sb, models, name))
    return opts


def tta_choice(sb, m: dict, name: str) -> bool:
    """Flip test-time augmentation, preset to the model's shipped default (on where it was shown to pay: the model
    card's "Flip TTA"); kept per model."""
    default = bool((m.get("tta") or {}).get("default", False))
    return sb.checkbox(
        "Test-time augmentation (flip)" + ("  (default)" if default else ""),
        value=default,
        key=f"tta_{name}",
        help="Averages with the horizontally flipped image, at the threshold calibrated for it; about twice as slow. "
        + ("On by default for this model: it gained on validation patients and passed the test release check (model card)." if default else ""),
    )


def threshold_choice(sb, m: dict, name: str, tta: bool = False) -> float | None:
    """The model's calibrated threshold (the one calibrated for TTA when it runs), or the user's own: kept per model
    (keys carry its name), so a custom threshold is never carried silently to another model. None: the API applies
    the calibrated one."""
    calibrated = float(((m.get("tta") or {}) if tta else m).get("threshold") or m.get("threshold") or 0.5)
    use_cal = sb.checkbox(
        f"Calibrated threshold ({fmt_threshold(calibrated)})",
        value=True,
        key=f"use_calibrated_{name}",
        help="Chosen on validation patients when the model was trained",
    )
    if use_cal:
        return None
    return sb.slider(f"Probability threshold for {m['display_name']}", 0.01, 0.99, value=calibrated, step=0.005, format="%.3f", key=f"threshold_{name}")


def compare_choice(sb, models: dict, name: str) -> str | None:
    """A second model run on the same input (at its own calibrated threshold, served precision and TTA default), shown beside the first."""
    others = [n for n in models if n != name]
    if not others or not sb.checkbox("Compare with a second model", key="compare", help="Segments the input with both models (two API requests)"):
        return None
    return sb.selectbox("Second model", others, format_func=lambda n: models[n]["display_name"], key="model_b")


def model_details(sb, m: dict, models: dict, info: dict, precision: str) -> None:
    """Test metrics, size, backend, version (of the precision that will run), ensemble members and model card."""
    metrics = m.get("metrics") or {}
    if metrics:
        sb.caption(
            "Metrics on held-out test patients (one pass, without TTA; with TTA: the model card)",
            help=f"Default model chosen by {info['selected_by']}" if info.get("selected_by") else None,
        )
        sb.markdown("\n".join(f"- {METRIC_NAMES.get(k, k)}: **{fmt(v)}**" for k, v in metrics.items()))
    else:
        sb.caption("No metrics recorded for this model.")
    version = (m.get("versions") or {}).get(precision, m.get("version"))
    sb.caption(f"{fmt_params(m.get('parameters'))} parameters · backend {m.get('backend')} · version `{version}`")
    if m.get("members"):
        sb.caption("Averages the probabilities of " + " and ".join(models[x]["display_name"] for x in m["members"] if x in models) + ".")
    if m.get("card"):
        with sb.expander("Model card"):
            st.markdown(m["card"])


def served_precision(m: dict, tta: bool) -> str:
    """What the API runs for this model with / without TTA when no precision is named (GET /v1/models)."""
    precisions = m.get("precisions") or ["fp32"]
    served = (m.get("tta") or {}).get("precision") if tta else m.get("default_precision_without_tta")
    served = served or m.get("default_precision")  # an API from before per-TTA precisions
    return served if served in precisions else precisions[0]


def precision_choice(sb, m: dict, name: str, tta: bool = False) -> str:
    """fp32 / INT8 where the model has both; the model's served default for the TTA setting preselected (kept per
    model and TTA setting: INT8 may be served without TTA and fp32 with it, see the model card)."""
    precisions = m.get("precisions") or ["fp32"]
    served = served_precision(m, tta)
    precision = sb.radio(
        "Precision",
        precisions,
        index=precisions.index(served),
        key=f"precision_{name}{'_tta' if tta else ''}",
        horizontal=True,
        format_func=lambda p: PRECISIONS.get(p, p) + ("  (served default)" if p == served else ""),
        help="INT8 is the quantised network: faster on a CPU, Dice within 0.005 of fp32 on the test patients (see the model card)",
    )
    return precision


# ---------------------------------------------------------------- input and request


def current_input() -> tuple[list[tuple[str, bytes, str]] | None, str, bool]:
    """(files, label, synthetic) from the uploader or the synthetic example button."""
    up_col, ex_col = st.columns([3, 1], vertical_alignment="center")
    uploaded = up_col.file_uploader(
        "Upload one slice (TIFF, PNG, JPEG), one NIfTI volume, the three BraTS files (t1n, t2f, t1c), "
        "or a DICOM MR series or study (a .zip of the folder, or its .dcm files)",
        type=UPLOAD_TYPES,
        accept_multiple_files=True,
        key="uploads",
        on_change=lambda: st.session_state.update(source="upload"),
    )
    if ex_col.button("Try the synthetic example", key="synthetic", icon=":material/science:", width="stretch"):
        st.session_state.source = "synthetic"
    ex_col.caption("A drawn brain-like slice with one bright blob — not a real MRI.")
    if st.session_state.get("source") == "synthetic":
        return [("synthetic_example.png", synthetic_png(), "image/png")], SYNTHETIC_LABEL, True
    if not uploaded:
        return None, "", False
    files = zip_dicom_files([(f.name, f.getvalue(), f.type or "application/octet-stream") for f in uploaded])
    if carries_its_sequences(files):
        st.session_state.pop("sequence", None)  # a 3-channel slice or a BraTS set: the choice would be ignored
    else:
        up_col.selectbox(
            "Sequence of a grey slice or a single volume",
            list(SEQUENCES),
            format_func=SEQUENCES.get,
            key="sequence",
            help="A grey (one-channel) slice or one NIfTI volume (or one DICOM series) is given to the model in all 3 channels, the "
            "FLAIR-only condition it was trained for. Say here if it is another sequence: T1, T1 post-contrast and T2 are outside "
            "what the model was trained for, so you get a warning. A DICOM series whose description names its sequence carries its own.",
        )
    if not any(n.lower().endswith(VOLUME_SUFFIXES) for n, _, _ in files):
        up_col.text_input(
            "Pixel spacing of the slice (mm)",
            key="pixel_spacing",
            placeholder="unknown: diameters in pixels",
            help="TIFF, PNG and JPEG files carry no pixel size. Give one number (square pixels) or row,col (the spacing between "
            "rows, then between columns, as DICOM PixelSpacing) to have areas and lesion diameters in mm, and the RANO-BM "
            "measurable flags (longest diameter of 10 mm or more). Volumes take theirs from the file's header.",
        )
    return files, ", ".join(f[0] for f in files), False


def carries_its_sequences(files: list[tuple[str, bytes, str]]) -> bool:
    """True where the sequence picker would be ignored: several NIfTI files (a BraTS set), or one 3-channel image."""
    if sum(n.lower().endswith((".nii", ".nii.gz", ".gz")) for n, _, _ in files) > 1:
        return True
    if len(files) != 1 or files[0][0].lower().endswith(VOLUME_SUFFIXES + (".gz",)):
        return False
    img = cv2.imdecode(np.frombuffer(files[0][1], np.uint8), cv2.IMREAD_UNCHANGED)
    return img is not None and img.ndim == 3 and img.shape[2] >= 3


def zip_dicom_files(files: list[tuple[str, bytes, str]]) -> list[tuple[str, bytes, str]]:
    """Several .dcm files go to the API as one zip (it takes at most a few files per request)."""
    dcm = [f for f in files if f[0].lower().endswith(".dcm")]
    if len(dcm) < 2:
        return files
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, data, _ in dcm:
            zf.writestr(name, data)
    return [f for f in files if f not in dcm] + [(f"{len(dcm)}_dicom_files.zip", buf.getvalue(), "application/zip")]


def slice_count(files: list[tuple[str, bytes, str]]) -> int | None:
    """Slices the API will segment, read from the upload without decoding it: the NIfTI header's third
    dimension, or a DICOM zip's files per folder (one folder a series); None where unknown."""
    for name, data, _ in files:
        low = name.lower()
        try:
            if low.endswith((".nii", ".nii.gz")):
                head = gzip.GzipFile(fileobj=io.BytesIO(data)).read(348) if data[:2] == b"\x1f\x8b" else data[:348]
                import nibabel as nib

                shape = nib.Nifti1Header.from_fileobj(io.BytesIO(head)).get_data_shape()
                return int(shape[2]) if len(shape) >= 3 else None
            if low.endswith(".zip"):
                members = [n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if not n.endswith("/")]
                return max(1, len(members) // max(1, len({Path(n).parent for n in members})))
        except Exception:  # an estimate only: the API says what is wrong with the file
            return None
    return sum(n.lower().endswith(".dcm") for n, _, _ in files) or None


SECONDS_PER_SLICE = 0.05  # first guess (2 CPU cores, ONNX fp32); each volume answered measures the real one
SECONDS_PER_VOLUME = 2.0  # decoding, windowing, storing the result


def segment(opts: dict, files: list[tuple[str, bytes, str]], sequence: str | None = None, pixel_spacing: str | None = None) -> None:
    """Send the input to the API (once for each model compared) unless this exact request was already answered."""
    volume = any(n.lower().endswith(VOLUME_SUFFIXES) for n, _, _ in files)
    pixel_spacing = None if volume else ((pixel_spacing or "").strip() or None)  # a widget no longer shown leaves None, not ""
    h = hashlib.sha1()
    for name, data, _ in files:
        h.update(name.encode() + hashlib.sha1(data).digest())
    key = json.dumps(
        [h.hexdigest(), opts["base"], opts["model"], opts["threshold"], opts["tta"], opts.get("precision"), sequence, pixel_spacing, opts.get("compare")]
    )
    if st.session_state.get("request_key") == key:
        return
    # the second model runs as it is served: its calibrated threshold, its precision and its TTA default
    runs = [(opts["model"], opts["threshold"], opts.get("precision"), opts["tta"])] + ([(opts["compare"], None, None, None)] if opts.get("compare") else [])
    forms = [request_form(model, threshold, precision, tta, sequence, pixel_spacing) for model, threshold, precision, tta in runs]
    known = st.session_state.setdefault("answers", {})  # answers of this session by input and form: ticking Compare sends one request, not two
    keys = [json.dumps([h.hexdigest(), opts["base"], form]) for form in forms]
    todo = [(k, form) for k, form in zip(keys, forms, strict=False) if k not in known]

    def send() -> list[dict]:
        return [
            checked(api_request(opts["base"], "POST", "/v1/segment", timeout=600, files=[("files", f) for f in files], data=form).json()) for _, form in todo
        ]

    try:
        fresh = with_progress(send, slice_count(files) if volume else None, len(todo)) if todo else []
        learn_speed(fresh)
        for (k, _), answer in zip(todo, fresh, strict=False):
            known[k] = answer
        for old in list(known)[: max(0, len(known) - 8)]:
            del known[old]
        answers = [known[k] for k in keys]
        st.session_state.result, st.session_state.result_b, st.session_state.error = answers[0], (answers[1:] or [None])[0], None
    except ApiError as exc:
        st.session_state.result, st.session_state.result_b, st.session_state.error = None, None, str(exc)
    st.session_state.request_key = key


def checked(answer: dict) -> dict:
    """An answer read through its model (``serving.schemas``): one the page does not understand is said so, not half shown."""
    try:
        parse_answer(answer)
    except ValidationError as exc:
        raise ApiError(f"the API's answer does not match the answer this page reads (an API of another version?): {exc.errors()[0]['loc']}") from None
    return answer


def request_form(model: str, threshold: float | None, precision: str | None, tta: bool | None, sequence: str | None, pixel_spacing: str | None) -> dict:
    """The form of one /v1/segment request; None leaves a field to the API (the model's default)."""
    form = {"model": model, "return": "none"}  # the page draws from viewer.npz: no inline PNGs
    if tta is not None:
        form["tta"] = str(tta).lower()
    if precision:
        form["precision"] = precision
    if threshold is not None:
        form["threshold"] = str(threshold)
    if sequence and sequence != "flair":  # FLAIR is the API's default; a 3-channel slice is not told it is ignored
        form["sequence"] = sequence
    if pixel_spacing:
        form["pixel_spacing_mm"] = pixel_spacing
    return form


def learn_speed(answers: list[dict]) -> None:
    """Seconds per slice measured on the volumes just answered: the next volume's estimate."""
    vols = [a for a in answers if a.get("kind") == "volume" and a.get("slices")]
    if vols:
        st.session_state.seconds_per_slice = sum(a["timings_ms"]["total"] / 1000 for a in vols) / sum(a["slices"] for a in vols)


def with_progress(send, slices: int | None, requests: int):
    """``send()`` in a thread; a slice gets a spinner, a volume a progress bar that advances with the elapsed time
    against an estimate (slices x seconds per slice of the last volume, or a first guess), with the time left."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(send)
        if slices is None:
            with st.spinner("Segmenting…"):
                return future.result()
        per_slice = st.session_state.get("seconds_per_slice", SECONDS_PER_SLICE)
        estimate = requests * (SECONDS_PER_VOLUME + slices * per_slice)
        bar, t0 = st.progress(0.0, text=f"Segmenting {slices} slices · 0 s · about {estimate:.0f} s left (estimate {estimate:.0f} s)"), time.perf_counter()
        try:
            while True:
                try:
                    return future.result(timeout=0.25)
                except FutureTimeout:
                    elapsed = time.perf_counter() - t0
                    left = f"about {estimate - elapsed:.0f} s left" if elapsed < estimate else "taking longer than estimated"
                    bar.progress(min(elapsed / estimate, 0.97), text=f"Segmenting {slices} slices · {elapsed:.0f} s · {left} (estimate {estimate:.0f} s)")
        finally:
            bar.empty()


# ---------------------------------------------------------------- result


def yes_no(v) -> str:
    return "n/a" if v is None else ("yes" if v else "no")


def diameter_columns(les: dict) -> dict:
    """RANO-BM columns: the longest axial diameter and its perpendicular (mm, or px where the pixel spacing is unknown),
    measurable, and the model's mean probability inside the lesion."""
    unit = "mm" if les.get("longest_diameter_mm") is not None else "px"
    if f"longest_diameter_{unit}" not in les:  # an answer from an API without measurements
        return {}
    return {
        f"Longest diameter ({unit})": les[f"longest_diameter_{unit}"],
        f"Perpendicular ({unit})": les[f"perpendicular_diameter_{unit}"],
        "Measurable (≥ 10 mm)": yes_no(les.get("measurable")),
        "Confidence": les.get("confidence"),
        **({"TTA disagreement": les["tta_disagreement"]} if "tta_disagreement" in les else {}),
    }


def lesion_rows(res: dict) -> list[dict]:
    rows = []
    for les in res["lesions"]:
        b = les["bbox"]
        if res["kind"] == "slice":
            area_mm2 = {"Area (mm²)": les["area_mm2"]} if les.get("area_mm2") is not None else {}
            rows.append(
                {
                    "Lesion": les["id"],
                    "Area (px)": les["area_px"],
                    **area_mm2,
                    **diameter_columns(les),
                    "Centroid (row, col)": ", ".join(map(str, les["centroid"])),
                    "Bounding box (row, col → row, col)": f"{b[0]}, {b[1]} → {b[2]}, {b[3]}",
                }
            )
        else:
            rows.append(
                {
                    "Lesion": les["id"],
                    **({"Volume (mL)": les["volume_ml"]} if les.get("volume_ml") is not None else {}),
                    **diameter_columns(les),
                    "Slices": f"{b[0]}–{b[3] - 1}",
                    **({"Diameters on slice": les["diameter_slice"]} if "diameter_slice" in les else {}),
                    "Voxels": les["voxels"],
                    "Volume (mm³)": les["volume_mm3"],
                    "Centroid (z, row, col)": ", ".join(map(str, les["centroid"])),
                    "Bounding box (z, row, col → z, row, col)": f"{b[0]}, {b[1]}, {b[2]} → {b[3]}, {b[4]}, {b[5]}",
                }
            )
    return rows


def show_read_as(inp: dict) -> None:
    """How the API read the channels: one line, its notes, a warning where the input is outside the training,
    and for a volume the sequence each channel was read as (and from which DICOM series)."""
    if not inp.get("read_as"):
        return
    notes = inp.get("notes") or []
    st.markdown("  \n".join([f"**Read as:** {inp['read_as']}", *notes]))
    for w in inp.get("warnings") or []:
        st.warning(w, icon=":material/warning:")
    dicom = inp.get("dicom")
    if inp.get("channels_read_as") and (dicom or inp.get("sequences_present")):
        sources = dicom["channel_sources"] if dicom else [None] * 3
        rows = [
            {"Channel": ch, "Read as": seq, **({"From": src} if src else {})} for ch, seq, src in zip(CHANNELS, inp["channels_read_as"], sources, strict=False)
        ]
        st.dataframe(rows, hide_index=True, width="content", key="channels_table")
    if dicom:
        with st.expander(f"DICOM series in the upload ({len(dicom['series'])})", expanded=False):
            st.dataframe(dicom["series"], hide_index=True, width="stretch")


def result_header(res: dict, label: str, synthetic: bool) -> None:
    model, inp, t = res["model"], res["input"], res["timings_ms"]
    if synthetic:
        st.warning(f"**{SYNTHETIC_LABEL}.** The lesion is drawn by the program; use it to see how the page works.", icon=":material/science:")
    if res["kind"] == "volume" and inp.get("dicom"):
        label = f"{inp['name']} (DICOM: {len(inp['dicom']['series'])} series)"
    elif res["kind"] == "volume" and len(res["files"]) > 1:
        label = f"{inp['name']} (BraTS set: {', '.join(inp.get('sequences_present') or ['t1n', 't2f', 't1c'])})"
    st.subheader(f"Result · {label}")
    show_read_as(inp)
    st.caption(
        f"{model['display_name']} · version `{model['version']}` · {model['backend']} {PRECISIONS.get(model.get('precision'), '')} · "
        f"threshold {fmt_threshold(res['threshold'])} · min. size {res['min_size']} {'voxels' if res.get('components') == '3D' else 'px'} ({res.get('components', '2D')}) · TTA {'on' if res['tta'] else 'off'} · "
        f"decode {t['decode']:.0f} ms, inference {t['inference']:.0f} ms, total {t['total']:.0f} ms · result `{res['id']}`"
    )


def show_lesions(res: dict) -> None:
    st.markdown("##### Lesions")
    rows = lesion_rows(res)
    if not rows:
        st.info("No lesion found at this threshold.")
        return
    note = f" (the {len(rows)} largest)" if res.get("lesions_truncated") else ""
    st.caption(
        f"Connected components of the predicted mask, largest first{note}. Diameters: the longest axial one over the lesion's slices "
        "and the longest perpendicular to it on the same slice. Confidence: the model's mean probability inside the lesion. "
        "Boxes are end-exclusive, in the displayed orientation."
    )
    st.dataframe(rows, hide_index=True, width="stretch", height=min(38 + 35 * len(rows), 320))
    rano = res.get("rano_bm")
    if rano:
        st.markdown(rano_line(rano))


def rano_line(rano: dict) -> str:
    """RANO-BM in one line: the measurable lesions, the targets and the sum of their longest diameters."""
    if rano.get("sum_longest_diameters_mm") is None:
        return "**RANO-BM:** not assessed: the pixel spacing is unknown, so diameters are in pixels (give it below the upload)."
    targets = ", ".join(f"#{i}" for i in rano["target_lesion_ids"]) or "none"
    return (
        f"**RANO-BM:** {rano['measurable_count']} measurable lesion(s) (longest diameter ≥ {rano['measurable_min_mm']:g} mm); "
        f"target lesions {targets}: **sum of longest diameters {rano['sum_longest_diameters_mm']:g} mm**."
    )


def download_stem(res: dict) -> str:
    return res["input"].get("name") or (Path(res["files"][0]).name.split(".")[0] if res["files"] else "result")


REPORT_FILES = {  # urls of the answer -> (label, file suffix, MIME type), offered where the API has them
    "report.html": ("Report (.html)", "_report.html", "text/html"),
    "sr.dcm": ("DICOM SR (.dcm)", "_sr.dcm", "application/dicom"),
    "sc.zip": ("Secondary captures (.zip)", "_sc.zip", "application/zip"),
}


def download_files(base: str, res: dict) -> list[tuple]:
    """(label, url, file name, MIME type, key, help) of the result's files: NIfTI mask, DICOM SEG, reports."""
    stem, urls = download_stem(res), res.get("urls") or {}
    files = []
    if res["kind"] == "volume":
        files.append(
            ("NIfTI mask (.nii.gz)", res["mask_url"], f"{stem}_mask.nii.gz", "application/gzip", "dl_nifti", "Same voxel grid and affine as the input")
        )
    if urls.get("seg_dicom"):
        help_seg = (
            "A DICOM Segmentation referencing the source series: open it with the study in a DICOM viewer or send it to PACS. "
            "It carries the study's patient identifiers."
        )
        files.append(("DICOM SEG (.dcm)", urls["seg_dicom"], f"{stem}_seg.dcm", "application/dicom", "dl_seg", help_seg))
    for key, url in urls.items():
        for ending, (label, suffix, mime) in REPORT_FILES.items():
            if isinstance(url, str) and url.split("?")[0].endswith(ending):
                files.append((label, url, stem + suffix, mime, f"dl_{key}", None))
    return files


def show_downloads(base: str, res: dict) -> None:
    """The result's files, each fetched from the API only when its button is pressed (and then cached),
    and the answer as JSON."""
    st.markdown("##### Downloads")
    for label, url, name, mime, key, help_text in download_files(base, res):
        st.download_button(
            label,
            lambda url=url: fetch_bytes(base, url),
            name,
            mime,
            key=key,
            icon=":material/download:",
            width="stretch",
            type="primary",
            help=help_text,
            on_click="ignore",
        )
    summary = {k: v for k, v in res.items() if k not in ("mask_png", "overlay_png", "preview_png")}
    st.download_button(
        "Lesions JSON",
        json.dumps(summary, indent=2),
        f"{download_stem(res)}_lesions.json",
        "application/json",
        key="dl_json",
        icon=":material/download:",
        width="stretch",
        on_click="ignore",
    )


def result_metrics(res: dict) -> None:
    """The metric row: lesions, their area or volume, and the image or the slices with lesion."""
    cols, t, inp = st.columns(4), res["timings_ms"], res["input"]
    cols[0].metric("Lesions", res["lesion_count"])
    if res["kind"] != "volume":
        if res.get("lesion_area_mm2") is not None:
            help_area = f"{res['lesion_area_px']:,} px of {inp['spacing_mm'][0]:g} × {inp['spacing_mm'][1]:g} mm"
            cols[1].metric("Lesion area", f"{res['lesion_area_mm2']:,.1f} mm²", help=help_area)
        else:
            cols[1].metric(
                "Lesion area", f"{res['lesion_area_px']:,} px", help="Pixel spacing is unknown for image files, so no mm² (give it below the upload)"
            )
        cols[2].metric("Image", f"{inp['width']} × {inp['height']}", help=f"pixel type {inp['dtype']}")
        cols[3].metric("Inference", f"{t['inference']:.0f} ms")
        return
    sp = " × ".join(f"{v:g}" for v in inp["spacing_mm"])
    cols[1].metric("Lesion volume", f"{res['lesion_volume_mm3']:,.0f} mm³", help=f"{res['lesion_voxels']:,} voxels of {sp} mm")
    cols[2].metric("Slices with lesion", f"{len(res['slices_with_lesion'])} / {res['slices']}")
    cols[3].metric("Inference", f"{t['inference'] / 1000:.1f} s")
    st.caption(f"Volume {' × '.join(map(str, inp['shape']))} voxels of {sp} mm")  # a metric box cut it off at narrower widths


def show_result(opts: dict, results: list[dict], label: str, synthetic: bool) -> None:
    res = results[0]
    result_header(res, label, synthetic)
    result_metrics(res)
    viewer(opts["base"], results)
    table_col, dl_col = st.columns([3, 1])
    with table_col:
        show_lesions(res)
    with dl_col:
        show_downloads(opts["base"], res)


# ---------------------------------------------------------------- viewer: arrays fetched once, drawn here


class ReferenceMismatch(ValueError):
    """A reference mask that does not fit the result (wrong file, shape or grid): one line for the user."""


@st.cache_resource(max_entries=4, ttl=3600, show_spinner="Loading the result for the viewer…")
def viewer_data(base: str, rid: str) -> dict:
    """The result's arrays from ``/v1/results/{rid}/viewer.npz``, downloaded once per result and shared by every
    rerun (not copied: the arrays are read-only): every view, zoom and overlay is drawn from them here."""
    data = api_request(base, "GET", f"/v1/results/{rid}/viewer.npz", timeout=300).content
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "meta.json"}
    display = arrays["display"]
    mask = np.unpackbits(arrays["mask_bits"], axis=-1, count=display.shape[2]).astype(bool)
    prob = arrays.get("prob")
    out = {"display": display, "mask": mask, "prob": prob, "spacing": tuple(float(v) for v in arrays["spacing_mm"]), "affine": arrays["affine"]}
    for arr in (display, mask, prob):
        if arr is not None:
            arr.flags.writeable = False
    return out


PLANES = ("Axial", "Coronal", "Sagittal")
RED, TP_COLOUR, FP_COLOUR, FN_COLOUR = (230, 40, 40), (250, 210, 40), (235, 50, 50), (40, 140, 255)
CURSOR_COLOUR = (80, 220, 120)
VIEW_PX = 420  # the longer side of a drawn view; the page scales it to its column


def spacing_rc(spacing: tuple, plane: str) -> tuple[float, float]:
    """(row, column) pixel size in mm of a plane; a slice without a known spacing has square pixels."""
    sx, sy, sz = (1.0 if not np.isfinite(v) or v <= 0 else v for v in spacing)
    return {"Axial": (sy, sx), "Coronal": (sz, sx), "Sagittal": (sz, sy)}[plane]


def plane_of(arr: np.ndarray, plane: str, cursor: tuple[int, int, int]) -> np.ndarray:
    """The 2-D cut of a (Z, H, W[, C]) display-oriented array (slices S, rows P, columns L) through the cursor
    (z, y, x): coronal and sagittal cuts with the top slice up."""
    z, y, x = cursor
    if plane == "Axial":
        return arr[z]
    return (arr[:, y] if plane == "Coronal" else arr[:, :, x])[::-1]


def cursor_rc(plane: str, cursor: tuple[int, int, int], n_slices: int) -> tuple[int, int]:
    z, y, x = cursor
    return {"Axial": (y, x), "Coronal": (n_slices - 1 - z, x), "Sagittal": (n_slices - 1 - z, y)}[plane]


def crop_box(shape: tuple[int, int], centre: tuple[int, int], zoom: float) -> tuple[slice, slice]:
    """Rows and columns of a 1/zoom window around ``centre``, kept inside the image."""
    h, w = shape
    ch, cw = max(2, round(h / zoom)), max(2, round(w / zoom))
    r0 = int(np.clip(centre[0] - ch // 2, 0, h - ch))
    c0 = int(np.clip(centre[1] - cw // 2, 0, w - cw))
    return slice(r0, r0 + ch), slice(c0, c0 + cw)


def render_view(layers: dict, mode: str, alpha: float, spacing: tuple[float, float], centre: tuple[int, int], zoom: float, crosshair: bool) -> np.ndarray:
    """One view as RGB uint8: ``layers`` holds 2-D ``grey`` (uint8), ``mask`` (bool), ``prob`` (uint8 or None) and
    ``ref`` (bool or None); cropped around ``centre`` by ``zoom``, scaled to the true aspect from the pixel size,
    then overlaid (fill, contour, probability heat map, difference to the reference, or nothing) and cross-haired."""
    rows, cols = crop_box(layers["grey"].shape, centre, zoom)
    h, w = rows.stop - rows.start, cols.stop - cols.start
    scale = VIEW_PX / max(h * spacing[0], w * spacing[1])
    size = (max(1, round(w * spacing[1] * scale)), max(1, round(h * spacing[0] * scale)))  # (width, height) for OpenCV

    def scaled(a, interp=cv2.INTER_NEAREST):
        return cv2.resize(np.ascontiguousarray(a[rows, cols]).astype(np.uint8), size, interpolation=interp)

    grey = scaled(layers["grey"], cv2.INTER_LINEAR)
    img = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    mask = scaled(layers["mask"]) > 0
    if mode == "Probability" and layers.get("prob") is not None:
        img = blend(img, heatmap(scaled(layers["prob"], cv2.INTER_LINEAR)), np.ones(mask.shape, bool), alpha)
    elif mode == "Fill":
        img = blend(img, RED, mask, alpha)
    elif mode == "Contour":
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, RED, max(1, VIEW_PX // 280))
    elif mode == "Difference" and layers.get("ref") is not None:
        ref = scaled(layers["ref"]) > 0
        for colour, where in ((TP_COLOUR, mask & ref), (FP_COLOUR, mask & ~ref), (FN_COLOUR, ~mask & ref)):
            img = blend(img, colour, where, max(alpha, 0.5))
    if crosshair:
        r, c = (centre[0] - rows.start + 0.5) * size[1] / h, (centre[1] - cols.start + 0.5) * size[0] / w
        lines = img.copy()
        cv2.line(lines, (0, int(r)), (size[0] - 1, int(r)), CURSOR_COLOUR, 1)
        cv2.line(lines, (int(c), 0), (int(c), size[1] - 1), CURSOR_COLOUR, 1)
        img = cv2.addWeighted(img, 0.4, lines, 0.6, 0)
    return img


def blend(img: np.ndarray, colour, where: np.ndarray, alpha: float) -> np.ndarray:
    """``img`` with ``colour`` (an RGB triple or an image) mixed in at ``alpha`` where ``where`` is set."""
    out = img.copy()
    tint = np.broadcast_to(np.asarray(colour, np.float32), img.shape)
    out[where] = (img[where] * (1 - alpha) + tint[where] * alpha + 0.5).astype(np.uint8)
    return out


def colour_bar(threshold: float, width: int = VIEW_PX) -> np.ndarray:
    """The probability scale under the heat maps: fixed 0 to 1 (inferno, perceptually uniform), ticks every 0.25
    and the threshold marked."""
    bar_h, pad = 16, 12
    img = np.full((bar_h + 34, width + 2 * pad, 3), 255, np.uint8)
    img[4 : 4 + bar_h, pad : pad + width] = heatmap(np.linspace(0, 255, width).round().astype(np.uint8)[None].repeat(bar_h, 0))
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = pad + round(v * (width - 1))
        cv2.line(img, (x, 4 + bar_h), (x, 8 + bar_h), (0, 0, 0), 1)
        label = f"{v:g}"
        tw = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0]
        cv2.putText(img, label, (int(np.clip(x - tw // 2, 0, img.shape[1] - tw)), bar_h + 22), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    x = pad + round(threshold * (width - 1))
    cv2.line(img, (x, 1), (x, 6 + bar_h), (0, 200, 255), 2)
    cv2.putText(img, f"threshold {fmt_threshold(threshold)}", (min(x + 4, img.shape[1] - 110), bar_h + 32), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 90, 160), 1)
    return img


def window_lut(res: dict, channel: int) -> np.ndarray | None:
    """A lookup table on the display values for the chosen window / level (auto, DICOM presets, custom);
    None for the automatic window (the one the model saw). Drawn here: no request to the API."""
    inp = res["input"]
    window = inp.get("display_window")
    if not window:
        return None
    presets = ((inp.get("dicom") or {}).get("window_presets") or [[], [], []])[channel]
    named = {f"{p['name']}: centre {p['center']:g}, width {p['width']:g}": (p["center"], p["width"]) for p in presets}
    c1, c2, c3 = st.columns([3, 1, 1], vertical_alignment="bottom")
    choice = c1.selectbox(
        "Window / level of the displayed sequence",
        [AUTO_WINDOW, *named, CUSTOM_WINDOW],
        key="window_choice",
        help="Presets come from the DICOM header (WindowCenter / WindowWidth) where present; values are in the input's units. "
        "Values outside the automatic window were clipped when the result was stored, so a wider window shows them saturated.",
    )
    if choice == AUTO_WINDOW:
        return None
    lo, hi = window["low"][channel], window["high"][channel]
    centre, width = named.get(choice, ((lo + hi) / 2, max(hi - lo, 1.0)))
    if choice == CUSTOM_WINDOW:
        centre = c2.number_input("Centre", value=float(centre), key="window_center")
        width = c3.number_input("Width", value=float(width), min_value=1e-3, key="window_width")
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # (256, 1, 3): every display value
    return window_level(levels, window, centre, width, (channel,))[:, 0, channel]


# ---------------------------------------------------------------- reference mask


def reference_mask(name: str, data: bytes, data_view: dict, kind: str) -> np.ndarray:
    """A reference mask uploaded by the user, on the result's displayed grid (bool, like the predicted mask).

    A volume's NIfTI is reoriented from its own affine to the result's display affine (axis order and flips, no
    interpolation): its grid must be the input's (same shape, origin and voxel axes within half a voxel). A slice's
    PNG / TIFF must have the image's rows and columns. ReferenceMismatch (one line naming the file) otherwise."""
    shape = data_view["mask"].shape
    if kind == "slice":
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ReferenceMismatch(f"{name}: not a PNG / TIFF / JPEG image")
        ref = (img.max(axis=2) if img.ndim == 3 else img) > 0
        if ref.shape != shape[1:]:
            raise ReferenceMismatch(f"{name}: {ref.shape[0]} × {ref.shape[1]} pixels, the result has {shape[1]} × {shape[2]}")
        return ref[None]
    return reference_volume(name, data, data_view["affine"], shape)


def reference_volume(name: str, data: bytes, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    import nibabel as nib
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    try:
        img = nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise ReferenceMismatch(f"{name}: not a readable NIfTI file ({type(exc).__name__})") from None
    arr = arr.reshape(arr.shape[:3]) if arr.ndim == 4 and arr.shape[3] == 1 else arr
    if arr.ndim != 3:
        raise ReferenceMismatch(f"{name}: a 3-D mask is needed, this one has shape {arr.shape}")
    t = ornt_transform(io_orientation(img.affine), io_orientation(affine))
    ref = apply_orientation(np.asarray(arr) > 0, t)
    if ref.shape != tuple(shape):
        raise ReferenceMismatch(f"{name}: its grid is {' × '.join(map(str, arr.shape))} voxels, the input's {' × '.join(map(str, shape[::-1]))}")
    moved = img.affine @ inv_ornt_aff(t, arr.shape)
    corners = np.array([[0, 0, 0, 1], [shape[0] - 1, shape[1] - 1, shape[2] - 1, 1]], float).T
    off = np.abs((moved @ corners) - (affine @ corners))[:3].max()
    if off > 0.5 * min(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))):
        raise ReferenceMismatch(f"{name}: same size as the input but placed {off:.1f} mm away from it (another grid); resample it to the input first")
    return np.ascontiguousarray(ref)


def overlap_stats(pred: np.ndarray, ref: np.ndarray, voxel_mm3: float | None) -> dict:
    """Dice, true / false positives and negatives, and the volumes (mm³ where the voxel size is known, else voxels)."""
    tp, fp, fn = int((pred & ref).sum()), int((pred & ~ref).sum()), int((~pred & ref).sum())
    unit = voxel_mm3 or 1.0
    return {
        "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "pred": (tp + fp) * unit,
        "ref": (tp + fn) * unit,
        "unit": "mm³" if voxel_mm3 else "px",
    }


def show_reference(data_view: dict, res: dict) -> np.ndarray | None:
    """The optional reference upload and its comparison with the prediction; the reference on the result's grid, or None."""
    volume = res["kind"] == "volume"
    up = st.file_uploader(
        "Reference mask (optional): " + ("a NIfTI on the input's grid" if volume else "a PNG / TIFF of the slice's size"),
        type=["nii", "gz"] if volume else ["png", "tif", "tiff", "jpg", "jpeg"],
        key=f"reference_{res['id']}",
        help="A mask drawn by a reader (any value above 0 is lesion). Shows Dice, the volume difference and a difference map. "
        "Read here in the page: nothing is sent to the API.",
    )
    if up is None:
        return None
    try:
        ref = reference_mask(up.name, up.getvalue(), data_view, res["kind"])
    except ReferenceMismatch as exc:
        st.error(str(exc))
        return None
    sp = data_view["spacing"]
    voxel = float(np.prod(sp)) if volume and all(np.isfinite(sp)) else (float(sp[0] * sp[1]) if np.isfinite(sp[0]) else None)
    s = overlap_stats(data_view["mask"], ref, voxel)
    diff = s["pred"] - s["ref"]
    c = st.columns(3)
    c[0].metric("Dice with the reference", f"{s['dice']:.3f}")
    c[1].metric("Reference " + ("volume" if volume else "area"), f"{s['ref']:,.0f} {s['unit']}")
    c[2].metric("Predicted − reference", f"{diff:+,.0f} {s['unit']}", help=f"{100 * diff / s['ref']:+.1f} % of the reference" if s["ref"] else None)
    what = "voxels" if volume else "pixels"
    st.caption(f"{s['tp']:,} {what} in both, {s['fp']:,} predicted only (false positive), {s['fn']:,} in the reference only (false negative).")
    return ref


# ---------------------------------------------------------------- the viewer fragment

OVERLAYS = ("Fill", "Contour", "Probability", "Difference", "Off")


@st.fragment
def viewer(base: str, results: list[dict]) -> None:
    """Views, cursor, zoom, overlay, window and the reference comparison of one result (or two models' results of
    the same input). A fragment: its controls rerun only this function, which draws from the arrays fetched once
    per result (``viewer_data``), so looking around never calls the API nor reruns the upload and segment steps."""
    try:
        data = [viewer_data(base, r["id"]) for r in results]
    except ApiError as exc:
        st.error(f"{exc}  \nThe server keeps only recent results (and may have forgotten this one).")
        if st.button("Segment again", key="resegment", icon=":material/refresh:"):
            st.session_state.request_key, st.session_state.answers = None, {}
            st.rerun(scope="app")
        return
    res, volume = results[0], results[0]["kind"] == "volume"
    ctl = display_controls(res)
    cursor = cursor_controls(res, data[0]) if volume else zoom_centre(res, data[0], ctl["zoom"])
    lut = window_lut(res, ctl["channel"])
    ref = show_reference(data[0], res)
    if ctl["mode"] == "Difference" and ref is None:
        st.info("Upload a reference mask above to see the difference map (true positives, false positives, false negatives).")
    if len(results) > 1:
        draw_comparison(results, data, ref, ctl, cursor, lut)
    else:
        (draw_volume if volume else draw_slice)(res, data[0], ref, ctl, cursor, lut)
    if ctl["mode"] == "Probability":
        st.image(colour_bar(float(res["threshold"])), caption="Lesion probability, fixed scale 0 → 1 (inferno)", width=VIEW_PX + 24)
    if ctl["mode"] == "Difference" and ref is not None:
        st.html(difference_legend())  # fixed markup, nothing of the user's
    slice_downloads(res, data[0], cursor[0], ctl)


def difference_legend(labels=("both (true positive)", "predicted only (false positive)", "reference only (false negative)")) -> str:
    swatch = "<span style='display:inline-block;width:0.9em;height:0.9em;background:rgb{};margin:0 0.3em 0 1em'></span>"
    return "<div>" + "".join(swatch.format(c) + label for label, c in zip(labels, (TP_COLOUR, FP_COLOUR, FN_COLOUR), strict=False)) + "</div>"


def draw_comparison(results: list[dict], data: list[dict], ref, ctl: dict, cursor: tuple[int, int, int], lut) -> None:
    """Two models side by side in one plane through the shared cursor, and where they agree: the Dice between
    them and a map of the voxels both found, only the first found, only the second found."""
    volume = results[0]["kind"] == "volume"
    c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
    s = overlap_stats(data[0]["mask"], data[1]["mask"], None)
    c1.metric("Dice between the two models", f"{s['dice']:.3f}", help=f"voxels found by the first only: {s['fp']:,}, by the second only: {s['fn']:,}")
    plane = c2.radio("Plane", PLANES, horizontal=True, key="compare_plane") if volume else "Axial"
    n = data[0]["mask"].shape[0]
    centre, sp = cursor_rc(plane, cursor, n), spacing_rc(data[0]["spacing"], plane)
    where = {"Axial": f"slice {cursor[0]}", "Coronal": f"row {cursor[1]}", "Sagittal": f"column {cursor[2]}"}[plane] if volume else "slice"
    cols = st.columns(3)
    for col, r, d in zip(cols, results, data, strict=False):
        img = render_view(layers_of(d, ref, plane, cursor, ctl["channel"], lut), ctl["mode"], ctl["alpha"], sp, centre, ctl["zoom"], ctl["crosshair"])
        col.image(img, caption=f"{r['model']['display_name']} · {plane} · {where} · {ctl['mode'].lower()}", width="stretch")
        col.caption(f"version `{r['model']['version']}` · threshold {fmt_threshold(r['threshold'])} · {r['lesion_count']} lesion(s) · result `{r['id']}`")
    agree = layers_of(data[0], data[1]["mask"], plane, cursor, ctl["channel"], lut)
    img = render_view(agree, "Difference", ctl["alpha"], sp, centre, ctl["zoom"], ctl["crosshair"])
    cols[2].image(img, caption=f"Agreement · {plane} · {where}", width="stretch")
    names = [r["model"]["display_name"] for r in results]
    cols[2].html(difference_legend(("both", f"{names[0]} only", f"{names[1]} only")))


def display_controls(res: dict) -> dict:
    """Overlay mode, opacity, zoom, channel and cross-hair: display only."""
    c1, c2, c3, c4 = st.columns([4, 2, 2, 3], vertical_alignment="bottom")
    mode = c1.radio("Overlay", OVERLAYS, horizontal=True, key="overlay", help="Contour: the mask's outline only; Difference: against a reference mask")
    alpha = c2.slider("Opacity", 0.0, 1.0, 0.4, 0.05, key="alpha")
    zoom = c3.slider("Zoom", 1.0, 4.0, 1.0, 0.25, key="zoom", format="%.2fx", help="Around the cursor (the cross-hair)")
    channel = c4.radio(
        "Channel",
        list(CHANNELS),
        index=1,
        key="channel",
        horizontal=True,
        help="LGG slices hold pre-contrast, FLAIR and post-contrast; BraTS t1n, t2f, t1c map to them",
    )
    crosshair = res["kind"] == "volume" and st.session_state.get("crosshair", True)
    return {"mode": mode, "alpha": alpha, "zoom": zoom, "channel": CHANNELS[channel], "channel_name": channel, "crosshair": crosshair}


def start_cursor(res: dict, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The slice with the most lesion and the largest lesion's centre (the image centre without one)."""
    z = int(res.get("preview_slice", 0))
    if res["lesions"]:
        c = res["lesions"][0]["centroid"]
        return z, int(round(c[-2])), int(round(c[-1]))
    return z, shape[1] // 2, shape[2] // 2


def cursor_controls(res: dict, data: dict) -> tuple[int, int, int]:
    """The shared cursor of a volume: axial slice (with the lesion slice jumps), coronal row and sagittal column."""
    n, h, w = data["mask"].shape
    if st.session_state.get("cursor_for") != res["id"]:
        st.session_state.z, st.session_state.y, st.session_state.x = start_cursor(res, (n, h, w))
        st.session_state.cursor_for = res["id"]
    c1, c2, c3 = st.columns(3)
    with c1:
        z = slice_navigation(res)
    c2.slider(f"Coronal: row (0–{h - 1})", 0, h - 1, key="y")
    c3.slider(f"Sagittal: column (0–{w - 1})", 0, w - 1, key="x")
    c3.checkbox("Cross-hair", value=True, key="crosshair")
    return z, int(st.session_state.y), int(st.session_state.x)


def zoom_centre(res: dict, data: dict, zoom: float) -> tuple[int, int, int]:
    """A slice's zoom centre: the largest lesion's centre, movable once zoomed in."""
    _, h, w = data["mask"].shape
    if st.session_state.get("cursor_for") != res["id"]:
        _, st.session_state.y, st.session_state.x = start_cursor(res, (1, h, w))
        st.session_state.cursor_for = res["id"]
    if zoom > 1:
        c1, c2 = st.columns(2)
        c1.slider(f"Zoom centre: row (0–{h - 1})", 0, h - 1, key="y")
        c2.slider(f"Zoom centre: column (0–{w - 1})", 0, w - 1, key="x")
    return 0, int(st.session_state.y), int(st.session_state.x)


def slice_navigation(res: dict) -> int:
    n, areas, with_lesion = res["slices"], res["slice_lesion_area_px"], res["slices_with_lesion"]

    def jump():
        if st.session_state.get("jump") is not None:
            st.session_state.z = st.session_state.jump

    def step(direction: int):
        z = st.session_state.z
        cands = [s for s in with_lesion if (s > z if direction > 0 else s < z)]
        if cands:
            st.session_state.z = cands[0] if direction > 0 else cands[-1]

    st.slider(f"Axial slice (0–{n - 1})", 0, n - 1, key="z")
    if with_lesion:
        c2, c3, c4 = st.columns([4, 1, 1], vertical_alignment="bottom")
        c2.selectbox(
            "Jump to a slice with lesion",
            with_lesion,
            index=None,
            key="jump",
            on_change=jump,
            placeholder=f"{len(with_lesion)} slices with lesion",
            format_func=lambda z: f"slice {z} — {areas[z]} px",
            label_visibility="collapsed",
        )
        c3.button("◀", key="prev_lesion", help="Previous slice with lesion", on_click=step, args=(-1,), width="stretch")
        c4.button("▶", key="next_lesion", help="Next slice with lesion", on_click=step, args=(1,), width="stretch")
    else:
        st.caption("No slice with lesion")
    return int(st.session_state.z)


def layers_of(data: dict, ref: np.ndarray | None, plane: str, cursor: tuple[int, int, int], channel: int, lut) -> dict:
    grey = plane_of(data["display"], plane, cursor)[..., channel]
    return {
        "grey": grey if lut is None else lut[grey],
        "mask": plane_of(data["mask"], plane, cursor),
        "prob": None if data["prob"] is None else plane_of(data["prob"], plane, cursor),
        "ref": None if ref is None else plane_of(ref, plane, cursor),
    }


def draw_volume(res: dict, data: dict, ref, ctl: dict, cursor: tuple[int, int, int], lut) -> None:
    """Axial, coronal and sagittal views through the cursor, each at its true aspect."""
    n = data["mask"].shape[0]
    o = res["input"].get("orientation")
    where = {"Axial": f"slice {cursor[0]}", "Coronal": f"row {cursor[1]}", "Sagittal": f"column {cursor[2]}"}
    cols = st.columns(3)
    for col, plane in zip(cols, PLANES, strict=False):
        layers = layers_of(data, ref, plane, cursor, ctl["channel"], lut)
        img = render_view(layers, ctl["mode"], ctl["alpha"], spacing_rc(data["spacing"], plane), cursor_rc(plane, cursor, n), ctl["zoom"], ctl["crosshair"])
        edge = f" · left {o['left']}, right {o['right']}" if o and plane != "Sagittal" else ""
        col.image(img, caption=f"{plane} · {where[plane]} · {ctl['channel_name']} · {ctl['mode'].lower()}{edge}", width="stretch")
    area = res["slice_lesion_area_px"][cursor[0]]
    lesion = f"lesion area {area:,} px = {res['slice_lesion_area_mm2'][cursor[0]]:,.0f} mm²" if area else "no lesion on this slice"
    st.caption(f"Axial slice {cursor[0]} of {res['slices']} · {lesion} · threshold {fmt_threshold(res['threshold'])}")


def draw_slice(res: dict, data: dict, ref, ctl: dict, cursor: tuple[int, int, int], lut) -> None:
    """A slice: the original, the chosen overlay and the probability heat map, zoomed alike."""
    layers = layers_of(data, ref, "Axial", (0, *cursor[1:]), ctl["channel"], lut)
    sp = spacing_rc(data["spacing"], "Axial")

    def view(mode, alpha):
        return render_view(layers, mode, alpha, sp, cursor[1:], ctl["zoom"], False)

    c1, c2, c3 = st.columns(3)
    c1.image(view("Off", 0), caption=f"Original ({ctl['channel_name']})", width="stretch")
    mode = ctl["mode"] if ctl["mode"] != "Probability" else "Fill"
    c2.image(
        view(mode, ctl["alpha"]), caption=f"{mode} (lesion in red, opacity {ctl['alpha']:.2f}, threshold {fmt_threshold(res['threshold'])})", width="stretch"
    )
    if data["prob"] is not None:
        c3.image(view("Probability", 1.0), caption="Probability (inferno, fixed scale 0 → 1)", width="stretch")
        c3.image(colour_bar(float(res["threshold"]), 300), width="stretch")


def slice_downloads(res: dict, data: dict, z: int, ctl: dict) -> None:
    """The mask and overlay of the shown slice as PNG, drawn here from the viewer's arrays."""
    is_volume = res["kind"] == "volume"
    stem = download_stem(res)
    mask = data["mask"][z].astype(np.uint8) * 255
    grey = cv2.cvtColor(np.ascontiguousarray(data["display"][z][..., ctl["channel"]]), cv2.COLOR_GRAY2RGB)
    overlay = blend(grey, RED, data["mask"][z], ctl["alpha"])
    cols = st.columns(4)
    for col, (what, img) in zip(cols, (("mask", mask), ("overlay", overlay[..., ::-1])), strict=False):
        png = cv2.imencode(".png", img)[1].tobytes()
        label = f"{what.capitalize()} PNG" + (f" (slice {z})" if is_volume else "")
        suffix = f"_z{z}" if is_volume else ""
        col.download_button(label, png, f"{stem}_{what}{suffix}.png", "image/png", key=f"dl_{what}", icon=":material/download:", on_click="ignore")


# ---------------------------------------------------------------- page


def favicon():
    """The tab's icon, drawn here (a grey brain outline with a red lesion): a Material icon name would make
    the browser fetch its picture from fonts.gstatic.com, and the page asks nothing of the internet."""
    import numpy as np

    y, x = np.mgrid[:64, :64] + 0.5
    brain = ((x - 32) / 27) ** 2 + ((y - 33) / 23) ** 2 <= 1
    lesion = (x - 41) ** 2 + (y - 27) ** 2 <= 7.5**2
    icon = np.zeros((64, 64, 4), np.uint8)
    icon[brain] = (170, 178, 190, 255)
    icon[brain & (((x - 32) / 23) ** 2 + ((y - 33) / 19) ** 2 <= 1)] = (92, 100, 112, 255)
    icon[lesion] = (225, 45, 45, 255)
    from PIL import Image  # a Streamlit dependency

    return Image.fromarray(icon, "RGBA")


HOW_TO = (
    "1. Upload **one slice** (TIFF/PNG/JPEG, 8 or 16 bit, grey or 3 channels: pre-contrast, FLAIR, post-contrast, "
    "like the LGG kaggle_3m slices), **one NIfTI volume**, the **BraTS files** `*-t1n`, `*-t2f`, `*-t1c` together "
    "(`*-t2f` is needed; a missing `*-t1n` or `*-t1c` is filled with FLAIR), or a **DICOM MR series or study** as a .zip "
    "(FLAIR, pre- and post-contrast T1 are recognised from the series descriptions). A grey slice or a single volume is read "
    "as FLAIR; say below the upload if it is another sequence.\n"
    "2. Pick a model and threshold in the sidebar (the default is the better model on the validation patients, at its calibrated "
    "threshold); tick **Compare with a second model** to see two models side by side.\n"
    "3. Look around: axial, coronal and sagittal views through one cursor (the sliders, or jump to the slices with lesion), zoom, "
    "the mask filled, as a contour or off, the model's probability with its colour scale, window / level (DICOM header presets "
    "where present). Upload a reference mask to see Dice and a difference map. None of this asks the API again.\n"
    "4. Download the mask (PNG, NIfTI with the input's affine, DICOM SEG for DICOM input) and the lesion table."
)


def how_to_use(has_result: bool) -> None:
    """Open until there is a result, then collapsed (a new key: the browser would keep the old one open)."""
    with st.expander("How to use", expanded=not has_result, key=f"how_to_use_{has_result}"):
        st.markdown(HOW_TO)


def main() -> None:
    st.set_page_config(page_title="brainseg · brain MRI lesion segmentation", page_icon=favicon(), layout="wide")
    st.html("<style>[data-testid='stMainBlockContainer']{padding-top:2.2rem;padding-bottom:2rem}</style>")
    st.title("Brain MRI lesion segmentation")
    st.caption("Research software — not a medical device and not for diagnosis. Results must be reviewed by a qualified reader.")
    opts = sidebar()
    help_box = st.container()
    files, label, synthetic = current_input()
    if not opts["ok"] or files is None:
        with help_box:
            how_to_use(False)
        if opts["ok"]:
            st.info("Upload a file above, or press **Try the synthetic example** to see the page at work.")
        return
    segment(opts, files, None if synthetic else st.session_state.get("sequence"), None if synthetic else st.session_state.get("pixel_spacing"))
    with help_box:
        how_to_use(bool(st.session_state.get("result")))
    if st.session_state.get("error"):
        st.error(st.session_state.error)
        return
    if st.session_state.get("result"):
        results = [st.session_state.result] + ([st.session_state.result_b] if st.session_state.get("result_b") else [])
        show_result(opts, results, label, synthetic)


try:
    main()
except Exception as exc:  # never a stack trace on the page
    st.error(f"Something went wrong in the page ({type(exc).__name__}: {exc}). Reload the page; if it persists, check the server log.")
