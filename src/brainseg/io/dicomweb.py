"""``brainseg dicomweb``: a node that segments the MR studies of a DICOMweb archive and files the SEG back.

Each pass (``Node.run_once``; ``--poll`` repeats it):

1. QIDO-RS: the studies with MR in ``ModalitiesInStudy`` (optionally from a study date on), then each
   study's series. A study that already has a brainseg SEG series (SeriesDescription starting with
   ``brainseg``, as ``dicom.seg_bytes`` writes it) is done.
2. WADO-RS: its MR series (at most ``dicom.MAX_MEMBERS`` instances in all), read by ``dicom.load_dicom``
   with the service's limits (``BRAINSEG_MAX_VOXELS``, ``BRAINSEG_MAX_DECODED_MB``): the same reading rules
   as a DICOM upload (series chosen by sequence, FLAIR required, a lone series read as FLAIR, ...).
3. ``predict.segment_volume`` and ``dicom.write_seg``: the DICOM SEG that ``brainseg predict`` writes,
   referencing the FLAIR series (and the others used), in the same study.
4. STOW-RS: the SEG stored into that study.

Every study gets one audit line (logger ``brainseg.audit``): ``study <tag>`` (the first 12 hex digits
of the SHA-256 of its StudyInstanceUID: the logs carry no UID, name, id or date; ``study_tag`` computes
it from a UID for an operator), the outcome, and lesion count, volume and seconds, or the reason.
A study that cannot be segmented (no FLAIR, not a brain MR series, too large, a SEG that cannot be
written, ...) is recorded as skipped in the state file and not tried again while its series stay the
same; one that failed for another reason (the archive unreachable, a timeout) is tried again on the
next passes, ``MAX_ATTEMPTS`` times in all. The state file holds tags and reasons only, no UIDs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Environment
from .datasets import DataError
from .files import write_json_atomic

log = logging.getLogger("brainseg.io.dicomweb")
audit = logging.getLogger("brainseg.audit")

STUDY_UID, SERIES_UID, MODALITY, SERIES_DESCRIPTION, INSTANCES = "0020000D", "0020000E", "00080060", "0008103E", "00201209"
SEG_PREFIX = "brainseg"  # SeriesDescription of the SEG series brainseg writes: "brainseg lesion SEG (<model>)"
MAX_ATTEMPTS = 3  # tries of a study whose failure was not its data's (network, archive errors)
AUTH_ENV = "BRAINSEG_DICOMWEB_AUTH"
QIDO_PAGE = 200  # studies per QIDO-RS request


def study_tag(uid: str) -> str:
    """What logs and the state file call a study: 12 hex digits of the SHA-256 of its StudyInstanceUID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def _value(item: dict, tag: str, default=None):
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else default


def make_session(auth: str | None = None):
    """A ``requests`` session with ``auth``: ``USER:PASSWORD`` (HTTP basic), ``bearer:TOKEN``, or ``@FILE`` holding
    one of these (so that it is not on the command line); None: ``$BRAINSEG_DICOMWEB_AUTH``, else no authentication."""
    import requests

    session = requests.Session()
    auth = auth or Environment.read().dicomweb_auth or None
    if auth and auth.startswith("@"):
        auth = Path(auth[1:]).read_text().strip()
    if auth:
        kind, sep, rest = auth.partition(":")
        if not sep:
            raise ValueError("--auth must be USER:PASSWORD, bearer:TOKEN or @FILE")
        if kind.lower() == "bearer":
            session.headers["Authorization"] = f"Bearer {rest}"
        else:
            session.auth = (kind, rest)
    return session


def why(exc: BaseException) -> str:
    """A failure as one line without identifiers: an HTTP error by its status (its text would quote the URL, which holds UIDs)."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} from the archive"
    if isinstance(exc, requests.RequestException):
        return f"the archive could not be reached ({type(exc).__name__})"
    return f"unexpected {type(exc).__name__}"


class ArchiveUnavailable(ValueError):
    """The study search (QIDO-RS) failed: no study was looked at."""


@dataclass
class Outcome:
    tag: str
    status: str  # segmented | skipped | failed | done (it has a brainseg SEG) | known (skipped or given up before)
    reason: str = ""
    lesions: int | None = None
    volume_ml: float | None = None
    seconds: float = 0.0


@dataclass
class Node:
    """One archive, one model: ``run_once`` is a pass over the archive's MR studies."""

    client: object  # dicomweb_client.DICOMwebClient
    segmenter: object
    post: object  # config.PostprocessConfig
    state_path: Path
    max_voxels: int | None = None
    max_decoded_bytes: int | None = None
    since: str | None = None  # StudyDate from (YYYYMMDD)
    tta: bool = False
    state: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_path = Path(self.state_path)
        try:
            self.state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            self.state = {}
        except ValueError:
            raise ValueError(f"{self.state_path}: not a brainseg dicomweb state file (JSON)") from None

    # ------------------------------------------------------------ finding

    def studies(self) -> list[str]:
        filters = {"ModalitiesInStudy": "MR"}
        if self.since:
            filters["StudyDate"] = f"{self.since}-"
        uids: dict[str, None] = {}
        while True:  # pages of QIDO_PAGE (dicomweb-client's own get_remaining did not stop against Orthanc 1.10)
            page = [_value(s, STUDY_UID) for s in self.client.search_for_studies(search_filters=filters, fields=[STUDY_UID], limit=QIDO_PAGE, offset=len(uids))]
            new = [uid for uid in page if uid and uid not in uids]
            uids.update(dict.fromkeys(new))
            if len(page) < QIDO_PAGE or not new:
                return list(uids)

    @staticmethod
    def has_brainseg_seg(series: list[dict]) -> bool:
        return any(_value(s, MODALITY) == "SEG" and str(_value(s, SERIES_DESCRIPTION, "")).startswith(SEG_PREFIX) for s in series)

    # ------------------------------------------------------------ one study

    def run_once(self) -> list[Outcome]:
        """Every MR study of the archive, processed; ``ArchiveUnavailable`` when the study search fails."""
        try:
            uids = self.studies()
        except Exception as exc:
            raise ArchiveUnavailable(f"the archive's study search failed: {why(exc)}") from None
        return [self.process(uid) for uid in uids]

    def process(self, uid: str) -> Outcome:
        tag = study_tag(uid)
        t0 = time.perf_counter()
        try:
            series = self.client.search_for_series(uid, fields=[MODALITY, SERIES_DESCRIPTION, INSTANCES])
        except Exception as exc:
            return self._failed(tag, why(exc), "", t0)
        if self.has_brainseg_seg(series):
            return Outcome(tag, "done")
        mr = [s for s in series if _value(s, MODALITY) == "MR" and _value(s, SERIES_UID)]
        fingerprint = hashlib.sha256("\n".join(sorted(str(_value(s, SERIES_UID)) for s in series)).encode()).hexdigest()[:12]
        known = self.state.get(tag)
        if known and known.get("series") == fingerprint and (known["status"] == "skipped" or known.get("attempts", 0) >= MAX_ATTEMPTS):
            return Outcome(tag, "known", known.get("reason", ""))
        if not mr:
            return self._skipped(tag, "no MR series", fingerprint, t0)
        from ..inference.predict import model_version, segment_volume
        from .dicom import MAX_MEMBERS, DicomError, load_dicom, write_seg

        instances = sum(int(_value(s, INSTANCES, 0) or 0) for s in mr)
        if instances > MAX_MEMBERS:
            return self._skipped(tag, f"the MR series hold {instances} images, above the limit of {MAX_MEMBERS}", fingerprint, t0)
        try:
            items = []
            for s in mr:
                for i, ds in enumerate(self.client.retrieve_series(uid, _value(s, SERIES_UID))):
                    buf = io.BytesIO()
                    ds.save_as(buf, enforce_file_format=True)
                    items.append((f"s{len(items)}-{i}.dcm", buf.getvalue()))
            vol = load_dicom(items, f"study {tag}", name=tag, max_voxels=self.max_voxels, max_decoded_bytes=self.max_decoded_bytes)
            del items
            res = segment_volume(self.segmenter, vol, self.post, self.tta)
            seg, warning = write_seg(vol.dicom, vol.to_stored(res.mask), self.segmenter.name, model_version(self.segmenter), self.post.threshold)
            if seg is None:
                return self._skipped(tag, warning.split(";")[0], fingerprint, t0)
            import pydicom

            self.client.store_instances([pydicom.dcmread(io.BytesIO(seg))], study_instance_uid=uid)
        except (DicomError, DataError) as exc:  # the data: not tried again (its message names no patient: load_dicom redacts)
            return self._skipped(tag, str(exc).removeprefix(f"study {tag}: "), fingerprint, t0)
        except MemoryError:
            raise
        except Exception as exc:  # the archive or the network: tried again on the next passes
            return self._failed(tag, why(exc), fingerprint, t0)
        volume_ml = round(float(res.mask.sum()) * vol.voxel_volume_mm3 / 1000.0, 3)
        out = Outcome(tag, "segmented", lesions=len(res.lesions), volume_ml=volume_ml, seconds=time.perf_counter() - t0)
        self._record(tag, {"status": "segmented", "series": fingerprint})
        audit.info(
            "audit: study %s: segmented, SEG stored (%s; %d lesion(s), %.3f mL; %.2f s)",
            tag,
            vol.dicom.channel_sources[1].split(" (")[0],
            out.lesions,
            volume_ml,
            out.seconds,
        )
        return out

    def _skipped(self, tag: str, reason: str, fingerprint: str, t0: float) -> Outcome:
        self._record(tag, {"status": "skipped", "reason": reason, "series": fingerprint})
        audit.info("audit: study %s: skipped, not tried again: %s", tag, reason)
        return Outcome(tag, "skipped", reason, seconds=time.perf_counter() - t0)

    def _failed(self, tag: str, reason: str, fingerprint: str, t0: float) -> Outcome:
        known = self.state.get(tag) or {}
        attempts = (known.get("attempts", 0) if known.get("series") == fingerprint else 0) + 1
        self._record(tag, {"status": "failed", "reason": reason, "series": fingerprint, "attempts": attempts})
        more = "given up" if attempts >= MAX_ATTEMPTS else "tried again on the next pass"
        audit.warning("audit: study %s: failed (attempt %d of %d, %s): %s", tag, attempts, MAX_ATTEMPTS, more, reason)
        return Outcome(tag, "failed", reason, seconds=time.perf_counter() - t0)

    def _record(self, tag: str, entry: dict) -> None:
        self.state[tag] = {**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_path, self.state)


def default_state_path(url: str) -> Path:
    """``$XDG_STATE_HOME/brainseg`` (else ``~/.local/state/brainseg``) / ``dicomweb-<hash of the URL>.json``."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "brainseg"
    return base / f"dicomweb-{hashlib.sha256(url.encode()).hexdigest()[:12]}.json"


def quiet_http_logs() -> None:
    """The HTTP libraries log URLs (which hold UIDs) at debug level: kept at warnings, even with -v."""
    for name in ("dicomweb_client", "urllib3", "requests"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client_for(url: str, auth: str | None = None, timeout: float = 60.0):
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise ValueError("brainseg dicomweb needs dicomweb-client: pip install 'brainseg[scale]' (or -r requirements-dev.txt)") from None
    return DICOMwebClient(url.rstrip("/"), session=make_session(auth), timeout=timeout)
