"""Streamlit page: follow-up comparison of two studies of one patient (``POST /v1/compare``).

A page of ``streamlit run streamlit_app.py`` (Streamlit's multipage ``pages/`` folder). It talks to the
brainseg API over HTTP (``BRAINSEG_API_URL``, default http://127.0.0.1:8000; ``BRAINSEG_API_KEY`` when
the API has a key), through the main page's client (``brainseg.serving.client``: a page cannot import
streamlit_app.py, which would run that page). Decision support, not a diagnosis: the page says so above and below the result.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import streamlit as st

try:
    from brainseg.serving.client import ApiError, api_request
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from brainseg.serving.client import ApiError, api_request

DEFAULT_API = os.environ.get("BRAINSEG_API_URL", "http://127.0.0.1:8000").rstrip("/")
UPLOAD_TYPES = ["nii", "gz", "zip", "dcm"]
COMPARE_TIMEOUT_S = 900.0  # two volumes segmented and registered on a small CPU server
DISCLAIMER = "Decision support, not a diagnosis: every lesion, match and the response category must be checked by a qualified reader."
CATEGORY_STYLE = {"CR": st.success, "PR": st.success, "SD": st.info, "PD": st.error, "NE": st.warning}


def study_files(field: str, uploaded) -> list[tuple[str, tuple[str, bytes, str]]]:
    """One study's uploads as multipart parts of ``field``; several .dcm files go as one zip."""
    files = [(f.name, f.getvalue()) for f in uploaded]
    dcm = [f for f in files if f[0].lower().endswith(".dcm")]
    if len(dcm) > 1:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for name, data in dcm:
                zf.writestr(name, data)
        files = [f for f in files if f not in dcm] + [(f"{field}_dicom.zip", buf.getvalue())]
    return [(field, (name, data, "application/octet-stream")) for name, data in files]


def fmt(v, unit: str = "", digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}{unit}"


def signed(v, unit: str = "") -> str:
    return "–" if v is None else f"{v:+.1f}{unit}"


def lesion_rows(res: dict) -> list[dict]:
    """One row per matched group, new lesion and vanished lesion."""
    targets = set(res["response"]["baseline_target_ids"])
    follow = {r["id"]: r for r in res["followup"]["lesions"]}
    base = {r["id"]: r for r in res["baseline"]["lesions"]}
    rows = []
    for m in res["matches"]:
        rows.append(
            {
                "Baseline lesion": ", ".join(map(str, m["baseline_ids"])),
                "Follow-up lesion": ", ".join(map(str, m["followup_ids"])),
                "Status": m["kind"] + (" (by centroid)" if m["matched_by"] == ["centroid"] else ""),
                "Target": "yes" if targets & set(m["baseline_ids"]) else "no",
                "Volume (mL)": f"{fmt(m['baseline_volume_ml'], digits=2)} → {fmt(m['followup_volume_ml'], digits=2)}",
                "Volume change": signed(m["volume_change_pct"], " %"),
                "Longest diameter (mm)": f"{fmt(m['baseline_longest_diameter_mm'])} → {fmt(m['followup_longest_diameter_mm'])}",
                "Diameter change": signed(m["diameter_change_pct"], " %"),
            }
        )
    for i in res["new_lesion_ids"]:
        r = follow[i]
        rows.append(
            {
                "Baseline lesion": "–",
                "Follow-up lesion": f"N{i}",
                "Status": "new" + (" (measurable)" if r.get("measurable") else ""),
                "Target": "no",
                "Volume (mL)": f"– → {fmt(r.get('volume_ml'), digits=2)}",
                "Volume change": "new",
                "Longest diameter (mm)": f"– → {fmt(r.get('longest_diameter_mm'))}",
                "Diameter change": "new",
            }
        )
    for i in res["vanished_lesion_ids"]:
        r = base[i]
        rows.append(
            {
                "Baseline lesion": str(i),
                "Follow-up lesion": "–",
                "Status": "vanished",
                "Target": "yes" if i in targets else "no",
                "Volume (mL)": f"{fmt(r.get('volume_ml'), digits=2)} → 0",
                "Volume change": "-100.0 %",
                "Longest diameter (mm)": f"{fmt(r.get('longest_diameter_mm'))} → 0",
                "Diameter change": "-100.0 %",
            }
        )
    return rows


def show_result(res: dict) -> None:
    r = res["response"]
    CATEGORY_STYLE.get(r["category"], st.info)(f"**RANO-BM response: {r['category']} — {r['category_name']}**. {r['reason']}")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Baseline sum of target diameters", fmt(r["baseline_sum_mm"], " mm"))
    c2.metric(
        "Follow-up sum (same targets)", fmt(r["followup_sum_mm"], " mm"), None if r["change_mm"] is None else f"{r['change_mm']:+.1f} mm", delta_color="inverse"
    )
    c3.metric("Change", signed(r["change_pct"], " %"))
    c4.metric("Lesions (baseline → follow-up)", f"{res['baseline']['lesion_count']} → {res['followup']['lesion_count']}")
    reg = res["registration"]
    if reg["applied"]:
        st.caption(
            f"Registration: the follow-up was registered rigidly to the baseline (rotation {reg['rotation_deg']:.2f}°, "
            f"shift {sum(v * v for v in reg['shift_mm']) ** 0.5:.1f} mm, correlation {fmt(reg['correlation'], digits=3)}). Model: {res['model']['display_name']}."
        )
    else:
        st.caption(f"Registration skipped: {reg['reason']}. Model: {res['model']['display_name']}.")
    st.image(base64.b64decode(res["picture_png"]), caption=f"Baseline | follow-up registered to it, slice {res['picture_slice']}", width=960)
    st.subheader("Lesions")
    st.dataframe(lesion_rows(res), hide_index=True, width="stretch")
    st.caption(
        f"New: {', '.join(f'N{i}' for i in res['new_lesion_ids']) or 'none'} · vanished: {', '.join(map(str, res['vanished_lesion_ids'])) or 'none'} · "
        f"lesions are one when they overlap after registration, or when their centroids lie within {res['match_tolerance_mm']:g} mm."
    )
    with st.expander("The rule applied"):
        st.write(r["rule"])
    if res.get("report_html"):
        st.download_button("Report (HTML)", res["report_html"], "compare_report.html", "text/html")
    st.download_button(
        "compare.json", json.dumps({k: v for k, v in res.items() if k not in ("picture_png", "report_html")}, indent=2), "compare.json", "application/json"
    )
    st.warning(res["disclaimer"])


def main() -> None:
    st.set_page_config(page_title="brainseg · follow-up comparison", layout="wide")
    st.title("Follow-up comparison")
    st.caption(DISCLAIMER + " Research software, not a medical device.")
    base = (
        st.sidebar.text_input("API URL", value=DEFAULT_API, key="compare_api_url", help="Where the brainseg API runs (env BRAINSEG_API_URL)")
        .strip()
        .rstrip("/")
    )
    register = st.sidebar.checkbox("Register the follow-up to the baseline", value=True, help="Skipped anyway when both are on one grid (atlas space)")
    left, right = st.columns(2)
    baseline = left.file_uploader("Baseline study: one NIfTI, the BraTS files (t1n, t2f, t1c) or a DICOM .zip", type=UPLOAD_TYPES, accept_multiple_files=True)
    followup = right.file_uploader("Follow-up study of the same patient", type=UPLOAD_TYPES, accept_multiple_files=True)
    if st.button("Compare", type="primary", disabled=not (baseline and followup)):
        files = study_files("baseline", baseline) + study_files("followup", followup)
        with st.spinner("Segmenting both studies, registering and matching lesions…"):
            try:
                answer = api_request(base, "POST", "/v1/compare", timeout=COMPARE_TIMEOUT_S, files=files, data={"register": str(register).lower()})
                st.session_state.compare = answer.json()
                st.session_state.compare_error = None
            except ApiError as exc:
                st.session_state.compare, st.session_state.compare_error = None, str(exc)
    if st.session_state.get("compare_error"):
        st.error(st.session_state.compare_error)
    elif st.session_state.get("compare"):
        show_result(st.session_state.compare)
    else:
        st.info("Upload a baseline and a follow-up study of one patient, then press **Compare**.")


try:
    main()
except Exception as exc:  # never a stack trace on the page
    st.error(f"Something went wrong in the page ({type(exc).__name__}: {exc}). Reload the page; if it persists, check the server log.")
