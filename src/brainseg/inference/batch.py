"""``brainseg batch``: many studies, in this process or on a Ray cluster, resumable.

Each study is one job of ``predict.expand_inputs`` (a slice, a NIfTI volume, a BraTS set, a DICOM
folder or .zip) and is done by ``predict.predict_job``, so its files are exactly those of
``brainseg predict`` (every file written atomically). A study's outcome is recorded in
``OUT/.brainseg-batch/<key>.json`` once its files are written (the key hashes its input paths and the
model settings): a rerun of the same command skips the studies with a record whose files are all
there, so a run killed half way (a crash, Ctrl-C, a lost Ray node) resumes where it stopped. A study
that fails is recorded with its one-line error (``predict.failure_line``) and the others go on;
``retry_failed`` tries the failed ones again. ``summary.csv`` has one row per study.

On Ray (``ray="local"``: a Ray instance of this process; ``"auto"`` or an address: a running cluster),
the studies go to a pool of actors (``Worker``), each of which loads the model once; the studies of
a worker that is lost (its process or its node) go to the others. The inputs and ``OUT`` must be paths
every node sees (a shared filesystem). Ray is imported only then (the ``scale`` extra); without it
nothing here needs Ray.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io.datasets import DataError
from ..io.files import write_bytes_atomic, write_json_atomic
from ..io.volumes import brats_sequence, is_nifti, nifti_stem
from .predict import JobFailed, _is_dicom_job, expand_inputs, failure_line, predict_job

log = logging.getLogger("brainseg.inference.batch")

STATE_DIR = ".brainseg-batch"
SUMMARY = "summary.csv"
COLUMNS = ("id", "status", "error", "lesion_count", "lesion_volume_ml", "seconds")
MANIFEST_COLUMN = "path"
SUMMARY_EVERY_S = 10.0  # summary.csv is rewritten this often while a run goes on (and at its end)
IN_FLIGHT_PER_WORKER = 2  # Ray: studies queued on each actor, so it never waits for the driver
MAX_LOST_PER_STUDY = 2  # Ray: a study whose worker died under it goes to another this often (a study that kills workers stops there)


@dataclass(frozen=True)
class ModelSpec:
    """The model and reading settings of ``brainseg predict`` (its flags), sent to each worker."""

    model: str | None = None
    checkpoint: str | None = None
    model_dir: str | None = None
    torch: bool = False
    precision: str = "fp32"
    threshold: float | None = None
    min_size: int | None = None
    tta: bool | None = None  # None: the model's shipped default (``Segmenter.with_tta``)
    sequence: str | None = None
    pixel_spacing: tuple[float, float] | None = None  # a slice's (row, col) mm, as predict --pixel-spacing

    def load(self, threads: int = 0):
        """The segmenter, loaded through ``predictor.load`` as ``brainseg predict`` loads it; ``threads``: ONNX Runtime's (0: its default)."""
        from .predictor import load

        return load(
            name=self.model, model_dir=self.model_dir, checkpoint=self.checkpoint, prefer_onnx=not self.torch, precision=self.precision, threads=threads
        )

    def with_tta(self, segmenter) -> bool:
        return segmenter.with_tta(self.tta)

    def post(self, segmenter):
        from .predictor import override

        return override(segmenter.postprocess_for(self.with_tta(segmenter)), self.threshold, self.min_size)

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class Record:
    """One study's outcome: a row of summary.csv, plus its key, output files and the node that did it."""

    key: str
    id: str
    status: str  # ok | failed
    error: str = ""
    lesion_count: int | None = None
    lesion_volume_ml: float | None = None
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)  # file names in OUT
    node: str = ""
    kept: bool = True  # False: a failure of the machinery (a lost worker), not of the study; not recorded, so a rerun retries it

    def row(self) -> dict:
        ml = "" if self.lesion_volume_ml is None else f"{self.lesion_volume_ml:.3f}"
        count = "" if self.lesion_count is None else self.lesion_count
        return {"id": self.id, "status": self.status, "error": self.error, "lesion_count": count, "lesion_volume_ml": ml, "seconds": f"{self.seconds:.2f}"}


# ---------------------------------------------------------------- what to do


def read_manifest(path: Path) -> list[str]:
    """The inputs of a CSV manifest: a header row with a ``path`` column, one input (as on the command line)
    per row; a relative path is relative to the manifest's folder; blank rows and other columns are ignored."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or MANIFEST_COLUMN not in [c.strip().lower() for c in reader.fieldnames]:
            raise DataError(path, f"a manifest needs a header row with a '{MANIFEST_COLUMN}' column")
        column = next(c for c in reader.fieldnames if c.strip().lower() == MANIFEST_COLUMN)
        out = []
        for row in reader:
            value = (row.get(column) or "").strip()
            if value:
                p = Path(value)
                out.append(str(p if p.is_absolute() else path.parent / p))
    if not out:
        raise DataError(path, "the manifest lists no inputs")
    return out


def study_stem(job: list[Path]) -> str:
    """The prefix ``predict_job`` gives a job's files (a DICOM study's may be replaced by ``dicom`` if it names the patient)."""
    if _is_dicom_job(job):
        name = job[0].name
        return name[:-4] if name.lower().endswith(".zip") else name
    if is_nifti(job[0]):
        return brats_sequence(job[0])[0] if len(job) > 1 else nifti_stem(job[0])
    return job[0].stem


def job_key(job: list[Path], spec: ModelSpec) -> str:
    """Names a study's record: its input paths (absolute, links not followed: two names of one file are two
    studies with their own outputs) and the model settings; new settings, new key."""
    text = "\n".join([*(os.path.abspath(p) for p in job), spec.fingerprint()])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def plan(inputs: list[str]) -> tuple[list[list[Path]], list[Record]]:
    """The jobs of ``inputs`` (a ``.csv`` is a manifest), and a failed Record for each input that gives none."""
    paths: list[str] = []
    failures: list[Record] = []

    def failed(exc: DataError) -> None:
        failures.append(Record(key="", id=Path(exc.path).name, status="failed", error=failure_line(exc, exc.path), kept=False))

    for raw in inputs:
        if raw.lower().endswith(".csv") and Path(raw).is_file():
            try:
                paths += read_manifest(Path(raw))
            except (DataError, OSError, csv.Error, UnicodeDecodeError) as exc:
                failed(exc if isinstance(exc, DataError) else DataError(raw, f"cannot read the manifest ({type(exc).__name__})"))
        else:
            paths.append(raw)
    jobs = expand_inputs(paths, on_error=failed) if paths else []
    return jobs, failures


# ---------------------------------------------------------------- doing it


class Worker:
    """Loads the model once and runs studies (in this process, or as a Ray actor)."""

    def __init__(self, spec: ModelSpec, out: str, threads: int = 0):
        self.spec = spec
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.segmenter = spec.load(threads)
        self.post = spec.post(self.segmenter)
        self.node = ""
        try:  # inside a Ray actor: the node it runs on
            import ray

            if ray.is_initialized():
                self.node = ray.get_runtime_context().get_node_id()[:12]
        except ImportError:
            pass

    def ready(self) -> str:
        return self.node

    def run(self, key: str, job: list[str]) -> Record:
        paths = [Path(p) for p in job]
        t0 = time.perf_counter()
        try:
            study = predict_job(paths, self.out, self.segmenter, self.post, self.spec.with_tta(self.segmenter), self.spec.sequence, self.spec.pixel_spacing)
        except JobFailed as err:
            exc = err.exc
            name = study_stem(paths)
            if _is_dicom_job(paths):  # a DICOM path may name the patient: the redacted one of the error, if any
                name = Path(exc.path).name.removesuffix(".zip") if isinstance(exc, DataError) else "dicom"
            return Record(key, name, "failed", error=err.line, seconds=time.perf_counter() - t0, node=self.node)
        volume = None if study.lesion_volume_mm3 is None else round(study.lesion_volume_mm3 / 1000.0, 4)
        outputs = [p.name for p in study.written]
        return Record(key, study.stem, "ok", lesion_count=study.lesion_count, lesion_volume_ml=volume, seconds=study.seconds, outputs=outputs, node=self.node)


@dataclass
class BatchRun:
    """What ``run_batch`` did: every study's Record (in input order), how many it did now and how many were done before."""

    records: list[Record]
    done_now: int
    skipped: int
    seconds: float
    summary: Path

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if r.status != "ok"]

    def nodes(self) -> dict[str, int]:
        """Studies done in this run per Ray node (empty in-process)."""
        out: dict[str, int] = {}
        for r in self.records:
            if r.node:
                out[r.node] = out.get(r.node, 0) + 1
        return out


def _load_record(state: Path, key: str, out: Path) -> Record | None:
    try:
        rec = Record(**json.loads((state / f"{key}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if rec.status == "ok" and not all((out / name).is_file() for name in rec.outputs):
        return None  # its files are gone: do it again
    rec.node = ""  # done by an earlier run
    return rec


def write_summary(path: Path, records: list[Record]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow(r.row())
    write_bytes_atomic(path, buf.getvalue().encode())


def _progress(total: int, skipped: int, progress: bool, finished):
    """A progress bar over the studies to do (done, failed, skipped), and the callback that records a study and
    moves the bar."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="batch", unit="study", disable=not progress, dynamic_ncols=True)
    counts = {"ok": 0, "failed": 0}

    def tick(rec: Record) -> None:
        finished(rec)
        counts["ok" if rec.status == "ok" else "failed"] += 1
        bar.set_postfix(ok=counts["ok"], failed=counts["failed"], skipped=skipped, refresh=False)
        bar.update()

    return tick, bar


def _resume(by_key: dict, state: Path, out: Path, retry_failed: bool) -> tuple[dict[str, "Record"], list[tuple[str, list[Path]]]]:
    """The studies an earlier run finished (kept: done, or failed unless ``retry_failed``) and those still to do."""
    records: dict[str, Record] = {}
    pending: list[tuple[str, list[Path]]] = []
    for key, job in by_key.items():
        rec = _load_record(state, key, out)
        if rec is not None and (rec.status == "ok" or not retry_failed):
            records[key] = rec
        else:
            pending.append((key, job))
    return records, pending


def run_batch(
    inputs: list[str],
    out: os.PathLike | str,
    spec: ModelSpec,
    ray: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    retry_failed: bool = False,
    progress: bool = True,
    on_record=None,
) -> BatchRun:
    """Segment every study of ``inputs`` into ``out``; see the module's docstring.

    ``ray``: None (this process), ``"local"``, ``"auto"`` or a cluster address; a Ray already initialised
    in this process is used as it is. ``workers``: Ray actors (default: the cluster's CPUs / ``cpus_per_worker``,
    at most one per study). ``on_record(record)`` is called for each study done now.
    """
    t0 = time.perf_counter()
    out = Path(out)
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    jobs, input_failures = plan(inputs)
    by_key = {job_key(job, spec): job for job in jobs}  # the same input twice is one study
    keys = list(by_key)
    records, pending = _resume(by_key, state, out, retry_failed)
    skipped = len(records)
    summary = out / SUMMARY

    def ordered() -> list[Record]:
        return input_failures + [records[k] for k in keys if k in records]

    last_summary = time.monotonic()

    def finished(rec: Record) -> None:
        nonlocal last_summary
        if rec.kept:
            write_json_atomic(state / f"{rec.key}.json", asdict(rec))
        records[rec.key] = rec
        if on_record is not None:
            on_record(rec)
        if time.monotonic() - last_summary > SUMMARY_EVERY_S:
            write_summary(summary, ordered())
            last_summary = time.monotonic()

    if pending:
        tick, bar = _progress(len(pending), skipped, progress, finished)
        try:
            if ray is None:
                _run_here(pending, out, spec, tick)
            else:
                _run_on_ray(pending, out, spec, ray, workers, cpus_per_worker, tick)
        finally:
            bar.close()
            write_summary(summary, ordered())
    else:
        write_summary(summary, ordered())
    return BatchRun(ordered(), len(pending), skipped, time.perf_counter() - t0, summary)


def _run_here(pending, out: Path, spec: ModelSpec, done) -> None:
    worker = Worker(spec, str(out))
    for key, job in pending:
        done(worker.run(key, [str(p) for p in job]))


def connect(address: str, num_cpus: int | None = None, object_store_mb: int = 200) -> bool:
    """Initialise Ray unless it already is: ``local`` starts an instance of this process (``num_cpus``, a small
    object store: results are a few hundred bytes), ``auto`` or ``HOST:PORT`` / ``ray://...`` joins a cluster.
    True when this call initialised it (the caller shuts it down)."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'brainseg[scale]' (or -r requirements-dev.txt)") from None
    if ray.is_initialized():
        return False
    if address == "local":
        # address="local": a new instance even where this machine already runs a Ray cluster (ray.init() would join it)
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mb << 20, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return True


def _lost(key: str, job: list[Path], why: str) -> Record:
    """A study the machinery could not do (its worker lost): reported, not recorded, so a rerun does it."""
    dicom = _is_dicom_job(job)
    return Record(key, "dicom" if dicom else study_stem(job), "failed", error=f"{'dicom' if dicom else job[0]}: {why}", kept=False)


def _give_up(queue: list, done, why: str) -> None:
    """Every study still queued is answered as lost, ``why``; the queue is emptied."""
    for key, job in queue:
        done(_lost(key, job, why))
    queue.clear()


def _start_workers(ray, spec: ModelSpec, out: Path, studies: int, workers: int | None, cpus_per_worker: float) -> list:
    """The Ray actors (``Worker``), each with its model loaded: ``workers`` of them, else as many as the cluster's
    CPUs hold, never more than there are studies; a model that cannot be loaded is one ValueError saying why."""
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    n = workers or max(1, int(cpus // cpus_per_worker))
    n = max(1, min(n, studies))
    threads = max(1, int(cpus_per_worker))
    # No restarts: a lost actor's studies go to the others at once (a restarted actor could wait forever
    # for the CPUs of a node that is gone, and so would the studies queued on it).
    remote = ray.remote(num_cpus=cpus_per_worker, max_restarts=0, max_task_retries=0)(Worker)
    actors = [remote.remote(spec, str(out), threads) for _ in range(n)]
    try:
        ray.get([a.ready.remote() for a in actors])
    except ray.exceptions.RayError as exc:  # the model could not be loaded (a missing file, ...): say why, once
        why = next((line for line in str(exc).splitlines() if "Error:" in line), type(exc).__name__)
        raise ValueError(f"the Ray workers could not load the model: {why.strip()}") from None
    log.info("batch on Ray: %d workers, %.1f CPUs each, cluster CPUs %.0f", n, cpus_per_worker, cpus)
    return actors


def _run_on_ray(pending, out: Path, spec: ModelSpec, address: str, workers: int | None, cpus_per_worker: float, done) -> None:
    started = connect(address)
    import ray

    try:
        actors = _start_workers(ray, spec, out, len(pending), workers, cpus_per_worker)
        queue = list(pending)
        inflight: dict = {}
        alive = list(actors)
        lost_on: dict[str, int] = {}  # studies whose worker was lost under them, and how often

        def fill() -> None:
            for actor in alive:
                while queue and sum(a is actor for _, _, a in inflight.values()) < IN_FLIGHT_PER_WORKER:
                    key, job = queue.pop(0)
                    inflight[actor.run.remote(key, [str(p) for p in job])] = (key, job, actor)

        fill()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            key, job, actor = inflight.pop(ready[0])
            try:
                done(ray.get(ready[0]))
            except ray.exceptions.RayTaskError as exc:  # raised in run() itself, outside predict_job: this study only
                done(_lost(key, job, f"unexpected {type(exc.cause).__name__ if exc.cause else type(exc).__name__} in a Ray worker"))
            except ray.exceptions.RayError as exc:  # the worker (its process or its node) is gone
                if actor in alive:
                    alive.remove(actor)
                    log.warning("a Ray worker was lost (%s); %d left", type(exc).__name__, len(alive))
                lost_on[key] = lost_on.get(key, 0) + 1
                if alive and lost_on[key] <= MAX_LOST_PER_STUDY:
                    queue.insert(0, (key, job))  # to another worker
                else:
                    why = "no Ray worker left" if not alive else f"its Ray worker was lost {lost_on[key]} times"
                    done(_lost(key, job, f"{why} ({type(exc).__name__})"))
            fill()
            if not alive:
                _give_up(queue, done, "no Ray worker left")
        for actor in alive:
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
