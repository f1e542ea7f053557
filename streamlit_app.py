"""Streamlit front end: ``streamlit run streamlit_app.py`` from the repository root.

It talks to the brainseg API over HTTP (``BRAINSEG_API_URL``, default http://127.0.0.1:8000,
editable in the sidebar; ``BRAINSEG_API_KEY`` when the API has a key) and never loads a network itself: no torch, no onnxruntime here.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import httpx
import streamlit as st

try:
    from brainseg.synthetic import SYNTHETIC_LABEL, synthetic_png
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from brainseg.synthetic import SYNTHETIC_LABEL, synthetic_png

DEFAULT_API = os.environ.get("BRAINSEG_API_URL", "http://127.0.0.1:8000").rstrip("/")
CHANNELS = {"Pre-contrast": 0, "FLAIR": 1, "Post-contrast": 2}
PRECISIONS = {"fp32": "fp32", "int8": "INT8"}  # the API's ``precision`` field
# What a grey slice or a single volume is (the API's ``sequence`` field; brainseg.channels.SEQUENCES).
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


class ApiError(Exception):
    """A message for the user: the API is unreachable or refused the request."""


def api_request(base: str, method: str, path: str, timeout: float = 30.0, **kwargs) -> httpx.Response:
    key = os.environ.get("BRAINSEG_API_KEY", "").split(",")[0].strip()  # the API's key, when it has one
    if key:
        kwargs["headers"] = {**kwargs.get("headers", {}), "X-API-Key": key}
    try:
        r = httpx.request(method, base + path, timeout=timeout, **kwargs)
    except httpx.ConnectError:
        raise ApiError(
            f"Cannot reach the API at {base}. Start it with `uvicorn app:app` from the repository root (or `scripts/run_app.sh`), "
            "or correct the API URL in the sidebar."
        ) from None
    except httpx.TimeoutException:
        raise ApiError(f"The API at {base} did not answer within {timeout:.0f} s.") from None
    except (httpx.HTTPError, ValueError) as exc:
        raise ApiError(f"Cannot talk to the API at {base}: {exc}") from None
    if r.status_code >= 400:
        error_id = None
        try:
            body = r.json()
            detail, error_id = body.get("detail", r.text), body.get("error_id")
        except (ValueError, AttributeError):
            detail = r.text[:300] or r.reason_phrase
        if error_id:  # a server fault: the id the server log files its traceback under
            detail = f"{detail} (error id: {error_id})"
        if r.status_code == 401:
            detail += " (the page sends the key in its own environment variable BRAINSEG_API_KEY)"
        what = "The API failed on the request" if r.status_code >= 500 else "The API refused the request"
        raise ApiError(f"{what} (HTTP {r.status_code}): {detail}")
    return r


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


def sidebar() -> dict:
    sb = st.sidebar
    sb.header("Settings")
    base = sb.text_input("API URL", value=DEFAULT_API, key="api_url", help="Where the brainseg API runs (env BRAINSEG_API_URL)").strip().rstrip("/")
    opts = {"base": base, "ok": False, "model": None, "threshold": None, "tta": False}
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
    model_details(sb, m, models, info)

    sb.subheader("Segmentation")
    calibrated = float(m.get("threshold") or 0.5)
    use_cal = sb.checkbox(
        f"Calibrated threshold ({calibrated:.2f})", value=True, key="use_calibrated", help="Chosen on validation patients when the model was trained"
    )
    threshold = None if use_cal else sb.slider("Probability threshold", 0.01, 0.99, value=calibrated, step=0.01, key="threshold")
    tta = sb.checkbox("Test-time augmentation (flip)", value=False, key="tta", help="Averages with the horizontally flipped image; about twice as slow")
    precision = precision_choice(sb, m, name)

    sb.subheader("Display")
    channel = sb.radio(
        "Channel",
        list(CHANNELS),
        index=1,
        key="channel",
        horizontal=True,
        help="LGG slices hold pre-contrast, FLAIR and post-contrast; BraTS t1n, t2f, t1c map to them",
    )
    alpha = sb.slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05, key="alpha")
    opts.update(
        ok=True, model=name, threshold=threshold, tta=tta, precision=precision, channel=CHANNELS[channel], channel_name=channel, alpha=alpha, models=models
    )
    return opts


def model_details(sb, m: dict, models: dict, info: dict) -> None:
    """Test metrics, size, backend, version, ensemble members and model card of the chosen model."""
    metrics = m.get("metrics") or {}
    if metrics:
        sb.caption("Metrics on held-out test patients", help=f"Default model chosen by {info['selected_by']}" if info.get("selected_by") else None)
        sb.markdown("\n".join(f"- {METRIC_NAMES.get(k, k)}: **{fmt(v)}**" for k, v in metrics.items()))
    else:
        sb.caption("No metrics recorded for this model.")
    sb.caption(f"{fmt_params(m.get('parameters'))} parameters · backend {m.get('backend')} · version `{m.get('version')}`")
    if m.get("members"):
        sb.caption("Averages the probabilities of " + " and ".join(models[x]["display_name"] for x in m["members"] if x in models) + ".")
    if m.get("card"):
        with sb.expander("Model card"):
            st.markdown(m["card"])


def precision_choice(sb, m: dict, name: str) -> str:
    """fp32 / INT8 where the model has both; the model's served default preselected."""
    precisions = m.get("precisions") or ["fp32"]
    served = m.get("default_precision") if m.get("default_precision") in precisions else precisions[0]
    precision = sb.radio(
        "Precision",
        precisions,
        index=precisions.index(served),
        key=f"precision_{name}",
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
    if uploaded:
        up_col.selectbox(
            "Sequence of a grey slice or a single volume",
            list(SEQUENCES),
            format_func=SEQUENCES.get,
            key="sequence",
            help="A grey (one-channel) slice or one NIfTI volume (or one DICOM series) is given to the model in all 3 channels, the "
            "FLAIR-only condition it was trained for. Say here if it is another sequence: T1, T1 post-contrast and T2 are outside "
            "what the model was trained for, so you get a warning. A 3-channel slice (pre-contrast T1, FLAIR, post-contrast T1), "
            "a BraTS set or a DICOM series whose description names its sequence carries its own and ignores this.",
        )
        files = zip_dicom_files([(f.name, f.getvalue(), f.type or "application/octet-stream") for f in uploaded])
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
    return None, "", False


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


def segment(opts: dict, files: list[tuple[str, bytes, str]], sequence: str | None = None, pixel_spacing: str | None = None) -> None:
    """Send the input to the API unless this exact request was already answered."""
    volume = any(n.lower().endswith(VOLUME_SUFFIXES) for n, _, _ in files)
    pixel_spacing = None if volume else ((pixel_spacing or "").strip() or None)  # a widget no longer shown leaves None, not ""
    h = hashlib.sha1()
    for name, data, _ in files:
        h.update(name.encode() + hashlib.sha1(data).digest())
    key = json.dumps([h.hexdigest(), opts["base"], opts["model"], opts["threshold"], opts["tta"], opts.get("precision"), sequence, pixel_spacing])
    if st.session_state.get("request_key") == key:
        return
    form = {"model": opts["model"], "tta": str(opts["tta"]).lower()}
    if opts.get("precision"):
        form["precision"] = opts["precision"]
    if opts["threshold"] is not None:
        form["threshold"] = str(opts["threshold"])
    if sequence and sequence != "flair":  # FLAIR is the API's default; a 3-channel slice is not told it is ignored
        form["sequence"] = sequence
    if pixel_spacing:
        form["pixel_spacing_mm"] = pixel_spacing
    with st.spinner("Segmenting the volume, slice by slice…" if volume else "Segmenting…"):
        try:
            r = api_request(opts["base"], "POST", "/v1/segment", timeout=600, files=[("files", f) for f in files], data=form)
            st.session_state.result, st.session_state.error = r.json(), None
        except ApiError as exc:
            st.session_state.result, st.session_state.error = None, str(exc)
    st.session_state.request_key = key


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


def slice_navigation(res: dict) -> int:
    n, areas, with_lesion = res["slices"], res["slice_lesion_area_px"], res["slices_with_lesion"]
    if st.session_state.get("z_for") != res["id"]:
        st.session_state.z, st.session_state.z_for = res["preview_slice"], res["id"]

    def jump():
        if st.session_state.get("jump") is not None:
            st.session_state.z = st.session_state.jump

    def step(direction: int):
        z = st.session_state.z
        cands = [s for s in with_lesion if (s > z if direction > 0 else s < z)]
        if cands:
            st.session_state.z = cands[0] if direction > 0 else cands[-1]

    c1, c2, c3, c4 = st.columns([6, 3, 1, 1], vertical_alignment="bottom")
    c1.slider(f"Axial slice (0–{n - 1})", 0, n - 1, key="z")
    if with_lesion:
        c2.selectbox(
            "Jump to a slice with lesion",
            with_lesion,
            index=None,
            key="jump",
            on_change=jump,
            placeholder=f"{len(with_lesion)} slices with lesion",
            format_func=lambda z: f"slice {z} — {areas[z]} px",
        )
        c3.button("◀", key="prev_lesion", help="Previous slice with lesion", on_click=step, args=(-1,), width="stretch")
        c4.button("▶", key="next_lesion", help="Next slice with lesion", on_click=step, args=(1,), width="stretch")
    else:
        c2.caption("No slice with lesion")
    return int(st.session_state.z)


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
        rows = [{"Channel": ch, "Read as": seq, **({"From": src} if src else {})} for ch, seq, src in zip(CHANNELS, inp["channels_read_as"], sources)]
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
        f"threshold {res['threshold']} · min. size {res['min_size']} px ({res.get('components', '2D')}) · TTA {'on' if res['tta'] else 'off'} · "
        f"decode {t['decode']:.0f} ms, inference {t['inference']:.0f} ms, total {t['total']:.0f} ms"
    )


def result_metrics(res: dict) -> int:
    """The metric row (and, for a volume, the slice navigation); returns the slice to show."""
    cols, t, inp = st.columns(4), res["timings_ms"], res["input"]
    cols[0].metric("Lesions", res["lesion_count"])
    if res["kind"] != "volume":
        if res.get("lesion_area_mm2") is not None:
            cols[1].metric(
                "Lesion area",
                f"{res['lesion_area_mm2']:,.1f} mm²",
                help=f"{res['lesion_area_px']:,} px of {inp['spacing_mm'][0]:g} × {inp['spacing_mm'][1]:g} mm",
            )
        else:
            cols[1].metric(
                "Lesion area", f"{res['lesion_area_px']:,} px", help="Pixel spacing is unknown for image files, so no mm² (give it below the upload)"
            )
        cols[2].metric("Image", f"{inp['width']} × {inp['height']}", help=f"pixel type {inp['dtype']}")
        cols[3].metric("Inference", f"{t['inference']:.0f} ms")
        return 0
    sp = " × ".join(f"{v:g}" for v in inp["spacing_mm"])
    cols[1].metric("Lesion volume", f"{res['lesion_volume_mm3']:,.0f} mm³", help=f"{res['lesion_voxels']:,} voxels of {sp} mm")
    cols[2].metric("Slices with lesion", f"{len(res['slices_with_lesion'])} / {res['slices']}")
    cols[3].metric("Volume", " × ".join(map(str, inp["shape"])), help=f"voxel size {sp} mm")
    return slice_navigation(res)


def window_query(res: dict, channel: int) -> str:
    """Window / level for the displayed channel: auto, the DICOM header's presets, or custom; as query parameters."""
    inp = res["input"]
    window = inp.get("display_window")
    if not window:
        return ""
    presets = ((inp.get("dicom") or {}).get("window_presets") or [[], [], []])[channel]
    named = {f"{p['name']}: centre {p['center']:g}, width {p['width']:g}": (p["center"], p["width"]) for p in presets}
    c1, c2, c3 = st.columns([3, 1, 1], vertical_alignment="bottom")
    choice = c1.selectbox(
        "Window / level of the displayed sequence",
        [AUTO_WINDOW, *named, CUSTOM_WINDOW],
        key="window_choice",
        help="Presets come from the DICOM header (WindowCenter / WindowWidth) where present; values are in the input's units",
    )
    if choice == AUTO_WINDOW:
        return ""
    lo, hi = window["low"][channel], window["high"][channel]
    centre, width = named.get(choice, ((lo + hi) / 2, max(hi - lo, 1.0)))
    if choice == CUSTOM_WINDOW:
        centre = c2.number_input("Centre", value=float(centre), key="window_center")
        width = c3.number_input("Width", value=float(width), min_value=1e-3, key="window_width")
    return f"&wc={centre:g}&ww={width:g}"


def fetch_views(opts: dict, res: dict, z: int, window: str) -> dict | None:
    """The four PNGs of one slice (original, overlay, mask, probability); None (and a message) when the result is gone."""
    base, rid = opts["base"], res["id"]
    q = f"channel={opts['channel']}&alpha={opts['alpha']}{window}"
    try:
        views = {v: fetch_bytes(base, f"/v1/results/{rid}/slice/{z}.png?view={v}&{q}") for v in ("image", "overlay")}
        views["mask"] = fetch_bytes(base, f"/v1/results/{rid}/slice/{z}.png?view=mask")
        views["probability"] = fetch_bytes(base, f"/v1/results/{rid}/slice/{z}.png?view=probability")
        return views
    except ApiError as exc:
        st.error(f"{exc}  \nThe server keeps only recent results (and may have forgotten this one).")
        if st.button("Segment again", key="resegment", icon=":material/refresh:"):
            st.session_state.request_key = None
            st.rerun()
        return None


def show_images(opts: dict, res: dict, z: int, views: dict) -> None:
    where = f" · slice {z}" if res["kind"] == "volume" else ""
    if res["kind"] == "volume":
        area, o = res["slice_lesion_area_px"][z], res["input"].get("orientation")
        orient = f" · orientation from the header: top {o['top']}, left {o['left']}, right {o['right']}" if o else ""
        lesion = f"lesion area {area:,} px = {res['slice_lesion_area_mm2'][z]:,.0f} mm²" if area else "no lesion on this slice"
        st.markdown(f"**Slice {z}** of {res['slices']} · {lesion}{orient}")
    c1, c2, c3, c4 = st.columns(4)
    c1.image(views["image"], caption=f"Original ({opts['channel_name']}){where}", width="stretch")
    c2.image(views["overlay"], caption=f"Overlay (lesion in red, opacity {opts['alpha']:.2f}){where}", width="stretch")
    c3.image(views["mask"], caption=f"Predicted mask (threshold {res['threshold']}){where}", width="stretch")
    c4.image(views["probability"], caption=f"Probability (black 0 → purple → yellow 1){where}", width="stretch")
    if res["kind"] == "volume":
        with st.expander("Lesion area per slice", expanded=False):
            st.bar_chart({"lesion area (px)": res["slice_lesion_area_px"]}, height=160, x_label="slice", y_label="px")


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


def download_volume_files(base: str, res: dict, stem: str) -> None:
    """The NIfTI mask, and the DICOM SEG for DICOM input."""
    files = [("NIfTI mask (.nii.gz)", res["mask_url"], f"{stem}_mask.nii.gz", "application/gzip", "dl_nifti", "Same voxel grid and affine as the input")]
    if res["urls"].get("seg_dicom"):
        help_seg = (
            "A DICOM Segmentation referencing the source series: open it with the study in a DICOM viewer or send it to PACS. "
            "It carries the study's patient identifiers."
        )
        files.append(("DICOM SEG (.dcm)", res["urls"]["seg_dicom"], f"{stem}_seg.dcm", "application/dicom", "dl_seg", help_seg))
    for label, url, name, mime, key, help_text in files:
        try:
            data = fetch_bytes(base, url)
        except ApiError as exc:
            st.error(str(exc))
            continue
        st.download_button(label, data, name, mime, key=key, icon=":material/download:", width="stretch", type="primary", help=help_text)


def show_downloads(opts: dict, res: dict, z: int, views: dict) -> None:
    st.markdown("##### Downloads")
    is_volume = res["kind"] == "volume"
    stem = res["input"].get("name") or (Path(res["files"][0]).name.split(".")[0] if res["files"] else "result")
    suffix = f"_z{z}" if is_volume else ""
    if is_volume:
        download_volume_files(opts["base"], res, stem)
    mask_png = base64.b64decode(res["mask_png"]) if res.get("mask_png") else views["mask"]  # large slices' answers link to it instead
    for what, data in (("mask", mask_png), ("overlay", views["overlay"])):
        label = f"{what.capitalize()} PNG" + (f" (slice {z})" if is_volume else "")
        st.download_button(label, data, f"{stem}_{what}{suffix}.png", "image/png", key=f"dl_{what}", icon=":material/download:", width="stretch")
    summary = {k: v for k, v in res.items() if k not in ("mask_png", "overlay_png", "preview_png")}
    st.download_button(
        "Lesions JSON", json.dumps(summary, indent=2), f"{stem}_lesions.json", "application/json", key="dl_json", icon=":material/download:", width="stretch"
    )


def show_result(opts: dict, res: dict, label: str, synthetic: bool) -> None:
    result_header(res, label, synthetic)
    z = result_metrics(res)
    views = fetch_views(opts, res, z, window_query(res, opts["channel"]))
    if views is None:
        return
    show_images(opts, res, z, views)
    table_col, dl_col = st.columns([3, 1])
    with table_col:
        show_lesions(res)
    with dl_col:
        show_downloads(opts, res, z, views)


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


def main() -> None:
    st.set_page_config(page_title="brainseg · brain MRI lesion segmentation", page_icon=favicon(), layout="wide")
    st.html("<style>[data-testid='stMainBlockContainer']{padding-top:2.2rem;padding-bottom:2rem}</style>")
    st.title("Brain MRI lesion segmentation")
    st.caption("Research software — not a medical device and not for diagnosis. Results must be reviewed by a qualified reader.")
    opts = sidebar()
    with st.expander("How to use", expanded=not st.session_state.get("result")):
        st.markdown(
            "1. Upload **one slice** (TIFF/PNG/JPEG, 8 or 16 bit, grey or 3 channels: pre-contrast, FLAIR, post-contrast, "
            "like the LGG kaggle_3m slices), **one NIfTI volume**, the **BraTS files** `*-t1n`, `*-t2f`, `*-t1c` together "
            "(`*-t2f` is needed; a missing `*-t1n` or `*-t1c` is filled with FLAIR), or a **DICOM MR series or study** as a .zip "
            "(FLAIR, pre- and post-contrast T1 are recognised from the series descriptions). A grey slice or a single volume is read "
            "as FLAIR; say below the upload if it is another sequence.\n"
            "2. Pick a model and threshold in the sidebar (the default is the better model on the validation patients, at its calibrated threshold).\n"
            "3. Compare original, overlay, mask and the model's probability; set the window / level (DICOM header presets where "
            "present); for a volume move through the slices or jump to the slices with lesion. Download the mask (PNG, NIfTI with "
            "the input's affine, DICOM SEG for DICOM input) and the lesion table."
        )
    files, label, synthetic = current_input()
    if not opts["ok"]:
        return
    if files is None:
        st.info("Upload a file above, or press **Try the synthetic example** to see the page at work.")
        return
    segment(opts, files, None if synthetic else st.session_state.get("sequence"), None if synthetic else st.session_state.get("pixel_spacing"))
    if st.session_state.get("error"):
        st.error(st.session_state.error)
        return
    if st.session_state.get("result"):
        show_result(opts, st.session_state.result, label, synthetic)


try:
    main()
except Exception as exc:  # never a stack trace on the page
    st.error(f"Something went wrong in the page ({type(exc).__name__}: {exc}). Reload the page; if it persists, check the server log.")
