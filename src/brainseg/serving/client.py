"""The HTTP client of the API for the Streamlit pages (``streamlit_app.py`` and ``pages/``): one request function,
the API key header, and one wording of every failure the user sees. httpx only: no model, no server code here.

A page cannot import another page (importing ``streamlit_app.py`` runs it), so the pages share this module.
"""

from __future__ import annotations

import os

import httpx


class ApiError(Exception):
    """A message for the user: the API is unreachable or refused the request."""


def api_key() -> str:
    """The key the page sends as ``X-API-Key``: the first of ``BRAINSEG_API_KEY`` (the API's own list), or none."""
    return os.environ.get("BRAINSEG_API_KEY", "").split(",")[0].strip()


def api_request(base: str, method: str, path: str, timeout: float = 30.0, **kwargs) -> httpx.Response:
    """``method`` ``base + path``; the answer when its status is below 400, else ``ApiError`` with a message for the user."""
    key = api_key()
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
        raise ApiError(refusal(r))
    return r


def refusal(r: httpx.Response) -> str:
    """What an answer of status 400 or more tells the user: the API's detail, the error id of a server fault."""
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
    return f"{what} (HTTP {r.status_code}): {detail}"
