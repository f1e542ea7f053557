"""ASGI middleware of the service, outermost first: ServerErrors -> BodyTimeout -> CORS -> ApiKey
-> RateLimit -> Shed -> UploadLimit -> routes (``install_middleware`` adds them in that order).

Each one answers early, before a request body is read where it can: a 401 without a key, a 429
after too many wrong keys or over the rate limit, a 503 with Retry-After when too many segmentations
are in the server, a 413 for a body over the upload limit, a 408 for a body that takes too long to
arrive. A fault nothing else handled becomes a 500 with an error id.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import time
import uuid

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .docs import ASSET_PATHS  # the docs pages' own Swagger UI / ReDoc files
from .errors import error
from .settings import Settings

log = logging.getLogger("brainseg.serving")

MULTIPART_SLACK = 1 << 20  # boundaries and form fields around the files
MODEL_PATHS = frozenset({"/v1/segment", "/v1/compare"})  # POSTs that run the models: shed and rate-limited


class ServerErrors:
    """ASGI middleware, outermost: an exception nothing else handled is a server fault.

    It is logged once, with its traceback and a short id, and the client gets a 500 with
    ``{"detail": "internal error", "error_id": ID}``: nothing of the exception itself.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            eid = uuid.uuid4().hex[:12]
            log.exception("internal error %s on %s %s", eid, scope.get("method"), scope.get("path"))
            if not started:
                await error(500, "internal error; quote the error id to the operator", error_id=eid)(scope, receive, send)


async def answer_instead_once_tripped(app, scope, app_receive, receive, send, tripped, answer) -> None:
    """Run ``app`` with ``app_receive``; once ``tripped()`` is true, what the app sends is dropped and
    the ASGI response ``answer()`` goes out once in its place. An exception the app raises after the
    trip is the expected end of a cut-off request, not a fault (raised otherwise)."""
    sent = False

    async def guarded_send(msg):
        nonlocal sent
        if not tripped():
            return await send(msg)
        if not sent:
            sent = True
            await answer()(scope, receive, send)

    try:
        await app(scope, app_receive, guarded_send)
    except Exception:
        if not tripped():
            raise
        await guarded_send({})


class UploadLimit:
    """ASGI middleware: answers 413 to a POST whose body is larger than ``max_bytes``.

    Checks Content-Length first; a body sent without it (chunked) is counted as it arrives
    and the request is cut off once over the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.max_bytes + MULTIPART_SLACK
        message = f"upload is larger than the limit of {self.max_bytes / 2**20:.0f} MiB (BRAINSEG_MAX_UPLOAD_MB)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _drain(receive, limit)
            return await error(413, message)(scope, receive, send)
        state = {"seen": 0, "over": False}

        async def counted_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                state["seen"] += len(msg.get("body", b""))
                if state["seen"] > limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return msg

        await answer_instead_once_tripped(self.app, scope, counted_receive, receive, send, lambda: state["over"], lambda: error(413, message))


class BodyTimeout:
    """ASGI middleware: a request's whole body must arrive within ``timeout_s`` of its head;
    otherwise the app reads the end of the body (as if the client had gone) and the client gets a
    408 with ``Connection: close``. So a client trickling its upload cannot hold a place among the
    segmentations (``Shed``) for long. Once the body is in, the request may take as long as it takes.
    """

    def __init__(self, app, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = anyio.current_time() + self.timeout_s
        state = {"in": False, "late": False}

        async def timed_receive():
            if state["late"]:
                return {"type": "http.disconnect"}
            if state["in"]:
                return await receive()
            msg = None
            with anyio.move_on_after(deadline - anyio.current_time()):
                msg = await receive()
            if msg is None:
                state["late"] = True
                log.warning("a request body did not arrive within %.0f s (BRAINSEG_BODY_TIMEOUT_S); answered 408", self.timeout_s)
                return {"type": "http.disconnect"}
            state["in"] = msg["type"] != "http.request" or not msg.get("more_body", False)
            return msg

        text = "the request body did not arrive in time (BRAINSEG_BODY_TIMEOUT_S); send it faster or in smaller files"
        await answer_instead_once_tripped(
            self.app, scope, timed_receive, receive, send, lambda: state["late"], lambda: error(408, text, headers={"Connection": "close"})
        )


OPEN_PATHS = frozenset({"/", "/health", "/health/live", "/health/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}) | ASSET_PATHS


def key_owner(key: str, secret: bytes) -> str:
    """What a result remembers of the key that made it: HMAC-SHA256 of the key under the server's
    secret (``BRAINSEG_OWNER_SECRET`` or the generated one), never the key or its bare hash, so a
    stolen result file does not lead back to the key by a dictionary of hashes."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:32]


def client_address(scope) -> str:
    """Who a request comes from, for counting: its IP address; an IPv6 address by its /64 network
    (one host usually holds a whole /64). Behind a reverse proxy this is the proxy, unless uvicorn
    runs with ``--proxy-headers --forwarded-allow-ips=<the proxy>``."""
    host = (scope.get("client") or ("?",))[0] or "?"
    if ":" in host:
        try:
            return str(ipaddress.ip_network(f"{host}/64", strict=False))
        except ValueError:
            return host
    return host


class FailureCounter:
    """Times of failed attempts per client in a sliding window; bounded: idle clients are
    forgotten, and past ``max_clients`` the least recently failing ones go first."""

    def __init__(self, limit: int, window_s: float = 60.0, max_clients: int = 10_000):
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self.seen: dict[str, list[float]] = {}

    def recent(self, who: str, now: float) -> list[float]:
        times = [t for t in self.seen.get(who, ()) if t > now - self.window_s]
        if times:
            self.seen[who] = times
        else:
            self.seen.pop(who, None)
        return times

    def blocked_for(self, who: str, now: float) -> float:
        """Seconds until ``who`` may try again (0: not blocked)."""
        times = self.recent(who, now)
        if len(times) < self.limit:
            return 0.0
        return times[-self.limit] + self.window_s - now

    def add(self, who: str, now: float) -> int:
        """Count a failure; the failures of ``who`` in the window."""
        if who not in self.seen and len(self.seen) >= self.max_clients:
            self.seen = {k: v for k, v in self.seen.items() if v and v[-1] > now - self.window_s}
            while len(self.seen) >= self.max_clients:  # still full of active clients: drop the stalest
                del self.seen[min(self.seen, key=lambda k: self.seen[k][-1])]
        times = self.recent(who, now) + [now]
        self.seen[who] = times[-self.limit :]
        return len(times)


class ApiKey:
    """ASGI middleware: with keys configured, every route but OPEN_PATHS needs one of them
    (``X-API-Key: KEY`` or ``Authorization: Bearer KEY``); otherwise 401. The matching key's
    owner (``key_owner``) goes into ``request.state.owner`` so results stay with the key that made them.

    Guessing is slowed down: a client (``client_address``) that sent ``failures_per_min`` wrong keys
    within 60 s gets 429 with Retry-After for every protected request until the oldest of them is a
    minute old, without its key being looked at. A request without any key is a 401 but not a guess.
    """

    def __init__(self, app, keys: dict[str, str], failures_per_min: int = 10):
        self.app = app
        self.keys = [(k.encode(), owner) for k, owner in keys.items()]
        self.failures = FailureCounter(failures_per_min)

    def _match(self, headers: dict) -> tuple[bool, str | None]:
        """(whether a key was sent, the owner of the key that matched or None)."""
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if given is None:
            return False, None
        found = None
        for k, owner in self.keys:  # compare with every key, in constant time each
            if hmac.compare_digest(given, k):
                found = owner
        return True, found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        who, now = client_address(scope), time.monotonic()
        wait = self.failures.blocked_for(who, now)
        if wait > 0:
            await _drain(receive, 1 << 20)
            msg = (
                f"too many wrong API keys from this address: at most {self.failures.limit} a minute (BRAINSEG_AUTH_FAILURES_PER_MIN); "
                "retry after the time in the Retry-After header"
            )
            return await error(429, msg, headers={"Retry-After": str(max(1, math.ceil(wait)))})(scope, receive, send)
        sent, owner = self._match(dict(scope["headers"]))
        if owner is None:
            if sent and self.failures.add(who, now) == self.failures.limit:
                log.warning("a client sent %d wrong API keys within a minute; its requests get 429 for a while", self.failures.limit)
            await _drain(receive, 1 << 20)
            msg = "missing or wrong API key: send it in the X-API-Key header (or Authorization: Bearer)"
            return await error(401, msg, headers={"WWW-Authenticate": 'Bearer realm="brainseg"'})(scope, receive, send)
        scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)


class Shed:
    """ASGI middleware: at most ``capacity`` segment / compare requests (``MODEL_PATHS``) in the server at once (running,
    waiting for a worker, or still sending their body); the next gets 503 with Retry-After at
    once, before its body is read. One event loop: a plain counter is enough."""

    def __init__(self, app, capacity: int, retry_after_s: int):
        self.app = app
        self.capacity = capacity
        self.retry_after = str(int(retry_after_s))
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in MODEL_PATHS:
            return await self.app(scope, receive, send)
        if self.active >= self.capacity:
            log.warning("shed a segment request: %d in progress", self.active)
            await _drain(receive, 1 << 20)
            msg = "the server is busy: too many segmentations queued; retry after the time in the Retry-After header"
            return await error(503, msg, headers={"Retry-After": self.retry_after})(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class RateLimit:
    """ASGI middleware: at most ``per_min`` segment / compare requests (``MODEL_PATHS``) per client in any 60 s (a sliding
    window); the client is its API key (hash) when keys are set, else its IP address."""

    WINDOW_S = 60.0

    def __init__(self, app, per_min: int):
        self.app = app
        self.per_min = per_min
        self.seen: dict[str, list[float]] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.per_min or scope["method"] != "POST" or scope["path"] not in MODEL_PATHS:
            return await self.app(scope, receive, send)
        who = scope.get("state", {}).get("owner") or (scope.get("client") or ("?",))[0]
        now = time.monotonic()
        if len(self.seen) > 10_000:  # forget clients idle for a window
            self.seen = {k: v for k, v in self.seen.items() if v and v[-1] > now - self.WINDOW_S}
        times = [t for t in self.seen.get(who, []) if t > now - self.WINDOW_S]
        if len(times) >= self.per_min:
            self.seen[who] = times
            wait = max(1, int(times[0] + self.WINDOW_S - now + 1))
            await _drain(receive, 1 << 20)
            msg = f"rate limit: at most {self.per_min} segmentations per minute per client (BRAINSEG_RATE_PER_MIN); retry after the time in Retry-After"
            return await error(429, msg, headers={"Retry-After": str(wait)})(scope, receive, send)
        self.seen[who] = times + [now]
        await self.app(scope, receive, send)


async def _drain(receive, limit: int) -> None:
    """Read (and drop) a little of an oversized body so clients see the 413, not a reset."""
    seen = 0
    while seen < min(limit, 1 << 20):
        msg = await receive()
        if msg["type"] != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body"):
            return


def install_middleware(app: FastAPI, settings: Settings, key_owners: dict[str, str] | None = None) -> None:
    """Added innermost first: ServerErrors -> BodyTimeout -> CORS -> ApiKey -> RateLimit -> Shed -> UploadLimit -> routes.

    ``key_owners``: each API key and the owner its results are kept under (``key_owner``); none: no keys.
    """
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(Shed, capacity=settings.max_concurrent + settings.max_queue, retry_after_s=settings.retry_after_s)
    app.add_middleware(RateLimit, per_min=settings.rate_per_min)
    app.add_middleware(ApiKey, keys=key_owners or {}, failures_per_min=settings.auth_failures_per_min)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"])
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout_s)
    app.add_middleware(ServerErrors)  # outermost: added last
