"""Service settings, read once from the environment (``BRAINSEG_*``); pydantic validates them.

==========================  ===========================================  =========
variable                    meaning                                      default
==========================  ===========================================  =========
BRAINSEG_MODEL_DIR          folder with registry.json                    models/
BRAINSEG_BACKEND            auto (ONNX on CPU, torch with CUDA), onnx,   auto
                            torch
BRAINSEG_MAX_UPLOAD_MB      bytes of one request's files, in MiB         200
BRAINSEG_MAX_PIXELS         pixels of one uploaded slice                 4194304
BRAINSEG_MAX_VOXELS         voxels of one uploaded volume (per channel)  16777216
BRAINSEG_MAX_DECODED_MB     bytes one request's files decode to, as      256
                            stored (every TIFF page, channel and file),
                            checked from the headers before decoding
BRAINSEG_MAX_FORM_FIELDS    form fields besides files, per request       16
BRAINSEG_MAX_FILES          file parts per request                       8
BRAINSEG_RESULT_DIR         folder the results are kept in, one file     <temp>/brainseg-
                            each; every worker and replica that shares   results-<uid>
                            it serves every result (see store.py)
BRAINSEG_MAX_RESULTS        results kept for download (oldest go first)  16
BRAINSEG_RESULT_STORE_MB    disk the kept results may use, in MiB (a     1024
                            240x240x155 volume takes about 5)
BRAINSEG_RESULT_TTL_S       seconds a result stays readable (also        3600
                            DELETE /v1/results/{id})
BRAINSEG_MAX_CONCURRENT     segmentations worked on at once (decoding,   8
                            in the model, answering); the slices among
                            them are run through the network together
BRAINSEG_MAX_CONCURRENT_    of those, volumes (each may take hundreds    2
VOLUMES                     of MB while it runs)
BRAINSEG_MAX_QUEUE          segment requests waiting beyond those; more  8
                            get 503 with Retry-After at once
BRAINSEG_RETRY_AFTER_S      the Retry-After of that 503, in seconds      5
BRAINSEG_HEADER_TIMEOUT_S   seconds a connection has to send a whole     10
                            request head (from connecting, or from its
                            last answer); then 408 and closed. Needs
                            the protocol in protocol.py (uvicorn --http)
BRAINSEG_BODY_TIMEOUT_S     seconds a request has to send its whole      120
                            body once its head is in; then 408 and
                            closed (200 MiB in 120 s: about 14 Mbit/s)
BRAINSEG_RATE_PER_MIN       segment requests one client (API key, else    0 (off)
                            IP address) may send per minute; more get
                            429 with Retry-After
BRAINSEG_API_KEY            if set: the key(s) (comma-separated) every   unset
                            route but /health and the docs needs, in
                            X-API-Key or Authorization: Bearer; a result
                            is readable only with the key that made it.
                            Set but without a usable key: no start
BRAINSEG_API_KEY_FILE       a file of keys, one a line (blank lines and  unset
                            # comments ignored), added to those above;
                            unreadable or without a key: no start
BRAINSEG_AUTH_FAILURES_     wrong keys one client (IP address, IPv6 by   10
PER_MIN                     /64) may send in 60 s; then 429 with
                            Retry-After, its keys are not checked
BRAINSEG_OWNER_SECRET       HMAC key of the owner recorded with a        generated
                            result (at least 16 characters); unset: a    once
                            random one kept in <result dir>/.owner-secret
BRAINSEG_RESULT_DIR_SHARED  1: the result folder may be group-readable   0
                            and -writable (one folder shared by
                            replicas; files 0660); 0: it must be
                            private (0700, files 0600) or no start
BRAINSEG_MEMORY_BUDGET_MB   memory the segmentations in this process     1024
                            may take together, estimated from the
                            headers before decoding; more wait in the
                            queue, one alone above it is a 413
BRAINSEG_INLINE_PNG_MAX_    a slice answer carries its mask and overlay  262144
PIXELS                      as base64 PNG up to this many pixels; a
                            larger slice's answer links to them
BRAINSEG_ONNX_THREADS       ONNX Runtime intra-op threads (0: one per    0
                            CPU this process may use)
BRAINSEG_ONNX_SPINNING      ONNX Runtime threads spin between runs (a    0
                            little faster alone; slower when requests
                            share the CPU)
BRAINSEG_ONNX_DEVICE        auto: ONNX Runtime's TensorRT / CUDA         auto
                            execution providers where it offers them (a
                            GPU and onnxruntime-gpu), else the CPU; cpu:
                            always the CPU; cuda / tensorrt: that one
BRAINSEG_MALLOC_ARENAS      glibc malloc arenas at most (0: glibc's      2
                            default, 8 per core): fewer keep less freed
                            memory; see serving/allocator.py
BRAINSEG_MALLOC_KEEP_MB     freed blocks under this size stay in the     256
                            heap for the next request instead of being
                            unmapped (0: glibc's default); memory is
                            still handed back after each volume or
                            large slice; see serving/allocator.py
BRAINSEG_BATCH_SIZE         slices of concurrent requests run through    16
                            the network together, at most (1: no
                            micro-batching)
BRAINSEG_BATCH_WAIT_MS      how long the first slice of a batch waits    5
                            for others, while more requests are coming
BRAINSEG_CORS_ORIGINS       comma-separated origins, or *                localhost:8501
BRAINSEG_PRELOAD            load the default model at start-up           1
==========================  ===========================================  =========
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from ..config import Environment
from .allocator import KEEP_FREED_MB

log = logging.getLogger("brainseg.serving")


class Settings(Environment):
    """The service's settings: ``config.Environment``'s variables and the table above, read by pydantic-settings
    (``BRAINSEG_<FIELD>``, an empty variable counts as unset)."""

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["http://localhost:8501", "http://127.0.0.1:8501"])
    model_dir: str | None = None  # None: registry.default_model_dir() at use time
    backend: Literal["auto", "onnx", "torch"] = "auto"
    max_upload_mb: float = Field(200.0, gt=0)
    max_pixels: int = Field(2048 * 2048, gt=0)
    max_voxels: int = Field(256 * 256 * 256, gt=0)
    max_decoded_mb: float = Field(256.0, gt=0)
    max_form_fields: int = Field(16, ge=1)
    max_files: int = Field(8, ge=1)
    result_dir: str | None = None  # None: store.default_result_dir() at use time
    max_results: int = Field(16, ge=1)
    result_store_mb: float = Field(1024.0, gt=0)
    result_ttl_s: float = Field(3600.0, gt=0)
    max_concurrent: int = Field(8, ge=1)
    max_concurrent_volumes: int = Field(2, ge=1)
    max_queue: int = Field(8, ge=0)
    retry_after_s: int = Field(5, ge=1)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(120.0, gt=0)
    api_key: str | None = Field(None, repr=False)
    api_key_file: str | None = None
    auth_failures_per_min: int = Field(10, ge=1)
    owner_secret: str | None = Field(None, min_length=16, repr=False)
    result_dir_shared: bool = False
    memory_budget_mb: float = Field(1024.0, gt=0)
    inline_png_max_pixels: int = Field(512 * 512, ge=0)
    rate_per_min: int = Field(0, ge=0)
    onnx_threads: int = Field(0, ge=0)
    onnx_spinning: bool = False
    malloc_arenas: int = Field(2, ge=0)
    malloc_keep_mb: int = Field(KEEP_FREED_MB, ge=0)
    batch_size: int = Field(16, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0, le=1000)
    preload: bool = True

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v):
        if isinstance(v, str):
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @property
    def onnx_intra_threads(self) -> int:
        """``onnx_threads``, or (0) one per CPU this process may run on."""
        if self.onnx_threads:
            return self.onnx_threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mb * 1024 * 1024)

    def load_api_keys(self) -> list[str]:
        """The keys of ``BRAINSEG_API_KEY`` and ``BRAINSEG_API_KEY_FILE`` together; [] when neither is set.

        Fails closed: a variable that is set but yields no usable key, an unreadable key file or a
        key that cannot be sent in an HTTP header raises ``StartupError`` (the service does not
        start) instead of leaving the service open. Messages never repeat a key.
        """
        keys: list[str] = []
        if self.api_key is not None:
            given = [k.strip() for k in self.api_key.split(",") if k.strip()]
            if not given:
                raise StartupError("BRAINSEG_API_KEY is set but holds no key (only commas or spaces); set a key, or unset the variable to run without one")
            keys += _checked_keys(given, "BRAINSEG_API_KEY")
        if self.api_key_file is not None:
            keys += _checked_keys(read_key_file(self.api_key_file), f"the key file {self.api_key_file}")
        return list(dict.fromkeys(keys))

    @property
    def max_decoded_bytes(self) -> int:
        return int(self.max_decoded_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, environ: dict | None = None, **overrides) -> "Settings":
        """Settings from the ``BRAINSEG_<FIELD>`` variables (or ``environ``, a mapping of them, for tests); ``overrides``
        win. A bad value is a StartupError naming the variable."""
        try:
            return cls.read(environ, **overrides)
        except ValueError as exc:
            raise StartupError(f"bad BRAINSEG_* setting: {exc}") from None


class StartupError(ValueError):
    """A setting the service cannot run with safely: it says so and does not start (``api.app``)."""


MAX_KEY_FILE_BYTES = 1 << 20
WEAK_KEY_CHARS = 16


def read_key_file(path: str) -> list[str]:
    """The keys in a key file: one a line, surrounding spaces dropped, blank lines and lines
    starting with ``#`` ignored. Unreadable, too large or without a key: ``StartupError``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_KEY_FILE_BYTES + 1)
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise StartupError(
            f"BRAINSEG_API_KEY_FILE {path} cannot be read ({exc.strerror or type(exc).__name__}); the service does not start without its keys"
        ) from None
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise StartupError(f"BRAINSEG_API_KEY_FILE {path} is larger than 1 MiB; it should hold keys, one a line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StartupError(f"BRAINSEG_API_KEY_FILE {path} is not UTF-8 text; write one key a line") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise StartupError(f"BRAINSEG_API_KEY_FILE {path} holds no key (only blank lines or # comments); the service does not start without one")
    if mode & 0o077:
        log.warning("the key file %s can be read by other users (mode %o); chmod 600 it", path, mode & 0o777)
    return keys


def _checked_keys(keys: list[str], source: str) -> list[str]:
    """Keys a client can send: printable ASCII (spaces inside allowed); a warning for short ones."""
    for i, key in enumerate(keys, 1):
        if not all(32 <= ord(c) < 127 for c in key):
            raise StartupError(
                f"key {i} of {source} has characters an HTTP header cannot carry (only printable ASCII works); no client could send it, so the service does not start"
            )
    short = sum(len(k) < WEAK_KEY_CHARS for k in keys)
    if short:
        log.warning(
            "%d key(s) of %s are shorter than %d characters: easy to guess; use long random keys (e.g. openssl rand -hex 32)", short, source, WEAK_KEY_CHARS
        )
    return keys
