"""Streamlit front end: ``streamlit run streamlit_app.py`` from the repository root.

It talks to the brainseg API over HTTP (``BRAINSEG_API_URL``, default http://127.0.0.1:8000,
editable in the sidebar; ``BRAINSEG_API_KEY`` when the API has a key) and never loads a network itself: no torch, no onnxruntime here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
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
# What a grey slice or a single volume is (the API's ``sequence`` field; brainseg.channels.SEQUENCES).
SEQUENCES = {"flair": "FLAIR (default)", "t1": "Pre-contrast T1", "t1c": "T1 post-contrast", "t2": "T2"}
UPLOAD_TYPES = ["tif", "tiff", "png", "jpg", "jpeg", "nii", "nii.gz", "gz"]
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
            f"Cannot reach the API at {base}. Start it with `uvicorn app:app` from the repository root (or `scripts/run_app.sh`), or correct the API URL in the sidebar."
        ) from None
    except httpx.TimeoutException:
        raise ApiError(f"The API at {base} did not answer within {timeout:.0f} s.") from None
    except (httpx.HTTPError, ValueError) as exc:
        raise ApiError(f"Cannot talk to the API at {base}: {exc}") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text[:300] or r.reason_phrase
        if r.status_code == 401:
            detail += " (the page sends the key in its own environment variable BRAINSEG_API_KEY)"
        raise ApiError(f"The API refused the request (HTTP {r.status_code}): {detail}")
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

    sb.subheader("Segmentation")
    calibrated = float(m.get("threshold") or 0.5)
    use_cal = sb.checkbox(
        f"Calibrated threshold ({calibrated:.2f})", value=True, key="use_calibrated", help="Chosen on validation patients when the model was trained"
    )
    threshold = None if use_cal else sb.slider("Probability threshold", 0.01, 0.99, value=calibrated, step=0.01, key="threshold")
    tta = sb.checkbox("Test-time augmentation (flip)", value=False, key="tta", help="Averages with the horizontally flipped image; about twice as slow")

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
    opts.update(ok=True, model=name, threshold=threshold, tta=tta, channel=CHANNELS[channel], channel_name=channel, alpha=alpha, models=models)
    return opts


# ---------------------------------------------------------------- input and request


def current_input() -> tuple[list[tuple[str, bytes, str]] | None, str, bool]:
    """(files, label, synthetic) from the uploader or the synthetic example button."""
    up_col, ex_col = st.columns([3, 1], vertical_alignment="center")
    uploaded = up_col.file_uploader(
        "Upload one slice (TIFF, PNG, JPEG), one NIfTI volume, or the three BraTS files (t1n, t2f, t1c)",
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
            help="A grey (one-channel) slice or one NIfTI volume is given to the model in all 3 channels, the FLAIR-only condition "
            "it was trained for. Say here if it is another sequence: T1, T1 post-contrast and T2 are outside what the model was "
            "trained for, so you get a warning. A 3-channel slice (pre-contrast T1, FLAIR, post-contrast T1) or a BraTS set "
            "carries its own sequences and ignores this.",
        )
        files = [(f.name, f.getvalue(), f.type or "application/octet-stream") for f in uploaded]
        return files, ", ".join(f[0] for f in files), False
    return None, "", False


def segment(opts: dict, files: list[tuple[str, bytes, str]], sequence: str | None = None) -> None:
    """Send the input to the API unless this exact request was already answered."""
    h = hashlib.sha1()
    for name, data, _ in files:
        h.update(name.encode() + hashlib.sha1(data).digest())
    key = json.dumps([h.hexdigest(), opts["base"], opts["model"], opts["threshold"], opts["tta"], sequence])
    if st.session_state.get("request_key") == key:
        return
    form = {"model": opts["model"], "tta": str(opts["tta"]).lower()}
    if opts["threshold"] is not None:
        form["threshold"] = str(opts["threshold"])
    if sequence and sequence != "flair":  # FLAIR is the API's default; a 3-channel slice is not told it is ignored
        form["sequence"] = sequence
    volume = any(n.lower().endswith((".nii", ".nii.gz")) for n, _, _ in files)
    with st.spinner("Segmenting the volume, slice by slice…" if volume else "Segmenting…"):
        try:
            r = api_request(opts["base"], "POST", "/v1/segment", timeout=600, files=[("files", f) for f in files], data=form)
            st.session_state.result, st.session_state.error = r.json(), None
        except ApiError as exc:
            st.session_state.result, st.session_state.error = None, str(exc)
    st.session_state.request_key = key


# ---------------------------------------------------------------- result


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
                    "Centroid (row, col)": ", ".join(map(str, les["centroid"])),
                    "Bounding box (row, col → row, col)": f"{b[0]}, {b[1]} → {b[2]}, {b[3]}",
                }
            )
        else:
            rows.append(
                {
                    "Lesion": les["id"],
                    "Voxels": les["voxels"],
                    "Volume (mm³)": les["volume_mm3"],
                    "Slices": f"{b[0]}–{b[3] - 1}",
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
    """How the API read the channels: one line, its notes, and a warning where the input is outside the training."""
    if not inp.get("read_as"):
        return
    notes = inp.get("notes") or []
    st.markdown("  \n".join([f"**Read as:** {inp['read_as']}", *notes]))
    for w in inp.get("warnings") or []:
        st.warning(w, icon=":material/warning:")


def show_result(opts: dict, res: dict, label: str, synthetic: bool) -> None:
    base, rid = opts["base"], res["id"]
    model = res["model"]
    is_volume = res["kind"] == "volume"
    if synthetic:
        st.warning(f"**{SYNTHETIC_LABEL}.** The lesion is drawn by the program; use it to see how the page works.", icon=":material/science:")
    inp = res["input"]
    if is_volume and len(res["files"]) > 1:
        label = f"{inp['name']} (BraTS set: {', '.join(inp.get('sequences_present') or ['t1n', 't2f', 't1c'])})"
    st.subheader(f"Result · {label}")
    show_read_as(inp)
    t = res["timings_ms"]
    st.caption(
        f"{model['display_name']} · version `{model['version']}` · {model['backend']} · threshold {res['threshold']} · "
        f"min. size {res['min_size']} px ({res.get('components', '2D')}) · TTA {'on' if res['tta'] else 'off'} · decode {t['decode']:.0f} ms, inference {t['inference']:.0f} ms, total {t['total']:.0f} ms"
    )
    z = 0
    cols = st.columns(4)
    cols[0].metric("Lesions", res["lesion_count"])
    if is_volume:
        sp = res["input"]["spacing_mm"]
        cols[1].metric(
            "Lesion volume", f"{res['lesion_volume_mm3']:,.0f} mm³", help=f"{res['lesion_voxels']:,} voxels of {' × '.join(f'{v:g}' for v in sp)} mm"
        )
        cols[2].metric("Slices with lesion", f"{len(res['slices_with_lesion'])} / {res['slices']}")
        cols[3].metric("Volume", " × ".join(map(str, res["input"]["shape"])), help=f"voxel size {' × '.join(f'{v:g}' for v in sp)} mm")
        z = slice_navigation(res)
    else:
        cols[1].metric("Lesion area", f"{res['lesion_area_px']:,} px", help="Pixel spacing is unknown for image files, so no mm²")
        cols[2].metric("Image", f"{res['input']['width']} × {res['input']['height']}", help=f"pixel type {res['input']['dtype']}")
        cols[3].metric("Inference", f"{t['inference']:.0f} ms")

    q = f"channel={opts['channel']}&alpha={opts['alpha']}"
    try:
        original = fetch_bytes(base, f"/v1/results/{rid}/slice/{z}.png?view=image&{q}")
        over = fetch_bytes(base, f"/v1/results/{rid}/slice/{z}.png?view=overlay&{q}")
        mask = fetch_bytes(base, f"/v1/results/{rid}/slice/{z}.png?view=mask")
    except ApiError as exc:
        st.error(f"{exc}  \nThe server keeps only recent results in memory (and forgets them when it restarts).")
        if st.button("Segment again", key="resegment", icon=":material/refresh:"):
            st.session_state.request_key = None
            st.rerun()
        return
    where = f" · slice {z}" if is_volume else ""
    if is_volume:
        area = res["slice_lesion_area_px"][z]
        o = res["input"].get("orientation")
        orient = f" · orientation from the header: top {o['top']}, left {o['left']}, right {o['right']}" if o else ""
        st.markdown(
            f"**Slice {z}** of {res['slices']} · "
            + (f"lesion area {area:,} px = {res['slice_lesion_area_mm2'][z]:,.0f} mm²" if area else "no lesion on this slice")
            + orient
        )
    c1, c2, c3 = st.columns(3)
    c1.image(original, caption=f"Original ({opts['channel_name']}){where}", width="stretch")
    c2.image(over, caption=f"Overlay (lesion in red, opacity {opts['alpha']:.2f}){where}", width="stretch")
    c3.image(mask, caption=f"Predicted mask (threshold {res['threshold']}){where}", width="stretch")
    if is_volume:
        with st.expander("Lesion area per slice", expanded=False):
            st.bar_chart({"lesion area (px)": res["slice_lesion_area_px"]}, height=160, x_label="slice", y_label="px")

    table_col, dl_col = st.columns([3, 1])
    with table_col:
        st.markdown("##### Lesions")
        rows = lesion_rows(res)
        if rows:
            note = f" (the {len(rows)} largest)" if res.get("lesions_truncated") else ""
            st.caption(f"Connected components of the predicted mask, largest first{note}. Boxes are end-exclusive, in the displayed orientation.")
            st.dataframe(rows, hide_index=True, width="stretch", height=min(38 + 35 * len(rows), 320))
        else:
            st.info("No lesion found at this threshold.")
    with dl_col:
        st.markdown("##### Downloads")
        stem = res["input"].get("name") or (Path(res["files"][0]).name.split(".")[0] if res["files"] else "result")
        suffix = f"_z{z}" if is_volume else ""
        if is_volume:
            try:
                nii = fetch_bytes(base, res["mask_url"])
                st.download_button(
                    "NIfTI mask (.nii.gz)",
                    nii,
                    f"{stem}_mask.nii.gz",
                    "application/gzip",
                    key="dl_nifti",
                    icon=":material/download:",
                    width="stretch",
                    type="primary",
                    help="Same voxel grid and affine as the input",
                )
            except ApiError as exc:
                st.error(str(exc))
        mask_png = mask if is_volume else base64.b64decode(res["mask_png"])
        for what, data in (("mask", mask_png), ("overlay", over)):
            st.download_button(
                f"{what.capitalize()} PNG" + (f" (slice {z})" if is_volume else ""),
                data,
                f"{stem}_{what}{suffix}.png",
                "image/png",
                key=f"dl_{what}",
                icon=":material/download:",
                width="stretch",
            )
        summary = {k: v for k, v in res.items() if k not in ("mask_png", "overlay_png", "preview_png")}
        st.download_button(
            "Lesions JSON",
            json.dumps(summary, indent=2),
            f"{stem}_lesions.json",
            "application/json",
            key="dl_json",
            icon=":material/download:",
            width="stretch",
        )


# ---------------------------------------------------------------- page


def main() -> None:
    st.set_page_config(page_title="brainseg · brain MRI lesion segmentation", page_icon=":material/neurology:", layout="wide")
    st.html("<style>[data-testid='stMainBlockContainer']{padding-top:2.2rem;padding-bottom:2rem}</style>")
    st.title("Brain MRI lesion segmentation")
    st.caption("Research software — not a medical device and not for diagnosis. Results must be reviewed by a qualified reader.")
    opts = sidebar()
    with st.expander("How to use", expanded=not st.session_state.get("result")):
        st.markdown(
            "1. Upload **one slice** (TIFF/PNG/JPEG, 8 or 16 bit, grey or 3 channels: pre-contrast, FLAIR, post-contrast, "
            "like the LGG kaggle_3m slices), **one NIfTI volume**, or the **BraTS files** `*-t1n`, `*-t2f`, `*-t1c` together "
            "(`*-t2f` is needed; a missing `*-t1n` or `*-t1c` is filled with FLAIR). A grey slice or a single volume is read as FLAIR; "
            "say below the upload if it is another sequence.\n"
            "2. Pick a model and threshold in the sidebar (the default is the better model on the validation patients, at its calibrated threshold).\n"
            "3. Compare original, overlay and mask; for a volume move through the slices or jump to the slices with lesion. "
            "Download the mask (PNG, or NIfTI with the input's affine) and the lesion table."
        )
    files, label, synthetic = current_input()
    if not opts["ok"]:
        return
    if files is None:
        st.info("Upload a file above, or press **Try the synthetic example** to see the page at work.")
        return
    segment(opts, files, None if synthetic else st.session_state.get("sequence"))
    if st.session_state.get("error"):
        st.error(st.session_state.error)
        return
    if st.session_state.get("result"):
        show_result(opts, st.session_state.result, label, synthetic)


try:
    main()
except Exception as exc:  # never a stack trace on the page
    st.error(f"Something went wrong in the page ({type(exc).__name__}: {exc}). Reload the page; if it persists, check the server log.")
