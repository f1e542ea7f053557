"""``brainseg`` command line: each subcommand parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from .config import ARCHITECTURES, EVERY_CONDITION, NORMALIZATIONS, PRECISIONS, SEQUENCES, SPLIT_SEED, ExperimentConfig, default_data_root

log = logging.getLogger("brainseg")

DEFAULT_CACHE = "runs/cache"
SEQUENCE_CHOICES = tuple(SEQUENCES)
DEFAULT_RUN = "runs/train"


def _add_preprocess_args(p: argparse.ArgumentParser) -> None:
    d = ExperimentConfig().preprocess
    p.add_argument("--data", default=None, help="dataset root in the kaggle_3m layout (default: $BRAINSEG_DATA or ../shared/data/lgg/kaggle_3m)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"preprocessed cache folder (default {DEFAULT_CACHE})")
    p.add_argument("--size", type=int, default=d.input_size, help="network input side in pixels (whole slice resized)")
    p.add_argument("--clahe-clip", type=float, default=d.clahe_clip_limit)
    p.add_argument("--clahe-grid", type=int, default=d.clahe_tile_grid)
    p.add_argument("--no-clahe", action="store_true")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default=d.normalization)
    p.add_argument("--val", type=int, default=None, help="validation patients (new split only; default: 15%% of the patients, at least 1)")
    p.add_argument("--test", type=int, default=None, help="test patients (new split only; default: 25%% of the patients, at least 1)")
    p.add_argument("--seed", type=int, default=SPLIT_SEED, help="seed of the patient split (train: of the training run too)")
    p.add_argument("--split", default=None, help="existing split JSON to reuse")


def _preprocess_cfg(args) -> ExperimentConfig:
    base = ExperimentConfig()
    pre = replace(
        base.preprocess,
        input_size=args.size,
        clahe=not args.no_clahe,
        clahe_clip_limit=args.clahe_clip,
        clahe_tile_grid=args.clahe_grid,
        normalization=args.normalization,
    )
    return replace(base, preprocess=pre)


def cmd_stats(args) -> int:
    from .io.datasets import dataset_stats, discover

    print(json.dumps(dataset_stats(discover(args.root)), indent=2))
    return 0


def cmd_split(args) -> int:
    from .io.datasets import discover, labelled, split_patients
    from .io.files import write_json_atomic

    ds = labelled(discover(args.data or default_data_root()))
    split = split_patients([p.id for p in ds.patients], args.val, args.test, args.seed)
    split["seed"] = args.seed
    write_json_atomic(args.out, split)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {len(split[k])}" for k in ("train", "val", "test")))
    return 0


def cmd_preprocess(args) -> int:
    from .pipeline import preprocess

    cfg = _preprocess_cfg(args)
    res = preprocess(args.data or default_data_root(), args.cache, cfg, n_val=args.val, n_test=args.test, seed=args.seed, split_file=args.split)
    print(f"cached {res['slices']} slices of {res['patients']} patients in {res['cache']} ({res['images_without_mask']} images without mask left out)")
    print(f"split {res['split']}: " + ", ".join(f"{k} {v}" for k, v in res["split_sizes"].items()))
    print(f"overview: {Path(res['cache']) / 'preprocessing_overview.png'}")
    return 0


def cache_matches(cache_dir, ds_root, preprocess_cfg) -> bool:
    """``cache.cache_matches``, imported when called (``brainseg --help`` loads no numpy / OpenCV)."""
    from .training.cache import cache_matches as matches

    return matches(cache_dir, ds_root, preprocess_cfg)


# Domain-shift augmentation (``config.AugmentConfig``): flag -> what its probability is of.
DOMAIN_SHIFT_FLAGS = {
    "skull_strip": "training on the skull-stripped slice",
    "zoom_out": "a smaller brain in the canvas (another field of view)",
    "bias_field": "a smooth bias field",
    "low_resolution": "lower resolution",
    "blur": "blur",
}
# ``brainseg train``'s flags for TrainConfig, generated from it: field -> (flag's dest, unit of the config per unit of
# the flag, help). The fields not here are fixed by the protocol (tests/test_cli_contract.py checks both lists).
TRAIN_FLAGS = {
    "epochs": ("epochs", 1, "epochs"),
    "batch_size": ("batch_size", 1, "slices per step"),
    "lr": ("lr", 1, "peak learning rate (AdamW, warm-up then cosine)"),
    "max_steps": ("max_steps", 1, "stop after this many steps (smoke tests; 0: no limit)"),
    "samples_per_epoch": ("samples_per_epoch", 1, "samples per epoch (0: as many as training slices)"),
    "positive_fraction": ("positive_fraction", 1, "share of lesion-positive slices per epoch"),
    "seed": ("seed", 1, "seed"),
    "num_threads": ("threads", 1, "torch threads (0: torch's default)"),
    "workers": ("workers", 1, "DataLoader worker processes for augmentation"),
    "ema_decay": ("ema_decay", 1, "validate and ship an EMA of the weights (0: off)"),
    "time_budget_s": ("time_budget", 1, "seconds: after epoch 2, fewer epochs if --epochs would not fit (0: off)"),
    "checkpoint_every_s": ("checkpoint_every", 60.0, "minutes between checkpoints within an epoch (0: epoch ends only)"),
    "patch_depth": ("patch_depth", 1, "3D (--dims 3): consecutive slices per training sample (odd)"),
    "precise_bn_batches": ("precise_bn", 1, "before each validation, recompute BatchNorm statistics over this many training batches (0: off)"),
}
TRAIN_FIELDS_FIXED = ("weight_decay", "warmup_epochs", "val_every")
# What ``--domain-shift`` switches on (the recipe of the models shipped for other hospitals' data).
DOMAIN_SHIFT_PRESET = {"skull_strip": 0.4, "zoom_out": 0.3, "bias_field": 0.3, "low_resolution": 0.2, "blur": 0.1}


def cmd_train(args) -> int:
    from .models import DISPLAY_NAMES, MODELS
    from .pipeline import preprocess, train_models

    cfg = _preprocess_cfg(args)
    t = cfg.train
    train = replace(t, **{name: getattr(args, dest) * scale for name, (dest, scale, _) in TRAIN_FLAGS.items()})
    if args.dims == 3 and args.context:
        raise SystemExit("brainseg train: --dims 3 reads the neighbouring slices itself; leave --context at 0")
    model = replace(
        cfg.model,
        features=tuple(args.features),
        deep_supervision=args.deep_supervision,
        context=args.context,
        in_channels=3 * (2 * args.context + 1),
        spatial_dims=args.dims,
    )
    shift = {k: getattr(args, k) for k in DOMAIN_SHIFT_FLAGS if getattr(args, k) is not None}
    if args.domain_shift:
        shift = {**DOMAIN_SHIFT_PRESET, **shift}
    context_dropout = args.context_dropout if args.context_dropout is not None else (0.2 if args.context else 0.0)
    augment = replace(cfg.augment, missing_pre=args.missing_pre, missing_post=args.missing_post, context_dropout=context_dropout, **shift)
    cfg = replace(cfg, train=train, model=model, augment=augment)
    data = args.data or default_data_root()
    cache_ok = cache_matches(args.cache, data, cfg.preprocess)
    if not cache_ok:
        log.info("no matching cache in %s: preprocessing %s first", args.cache, data)
        preprocess(data, args.cache, cfg, n_val=args.val, n_test=args.test, seed=args.seed, split_file=args.split, overview=False)
    names = sorted(MODELS) if args.model == "all" else [args.model]
    res = train_models(names, args.cache, args.out, cfg, data_root=args.data, resume=args.resume, progress=not args.quiet, init_from=args.init_from)
    if res:
        n = res["test_patients"]
        for name, rep in res["reports"].items():
            print(f"{DISPLAY_NAMES[name]} DICE Score: {rep['per_patient_dice']:.2f}  (per-patient 3D Dice, {n} test patients never trained or tuned on)")
        print(f"best model: {res['best']} -> {Path(args.out) / 'registry.json'}; comparison: {Path(args.out) / 'comparison.md'}")
    return 0


def _load_model(args):
    """The model of ``_add_model_args``; ``args.tta`` left unsaid (None) becomes the model's shipped default."""
    from .inference.predictor import load

    seg = load(name=args.model, model_dir=args.model_dir, checkpoint=args.checkpoint, prefer_onnx=not args.torch, precision=args.precision)
    if hasattr(args, "tta"):
        args.tta = seg.with_tta(args.tta)
    return seg


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default=None, help="registered model: unetpp, attention_unet or ensemble (default: the registry's best)")
    g.add_argument("--checkpoint", default=None, help="a .pt checkpoint or .onnx file")
    p.add_argument("--model-dir", default=None, help="folder with registry.json (default: the shipped models/)")
    p.add_argument("--torch", action="store_true", help="use PyTorch even where an ONNX file exists")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32, or int8: the quantised ONNX model (the registry's onnx_int8 file, or X.int8.onnx beside --checkpoint X)",
    )
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default: calibrated, saved in the model)")
    p.add_argument("--min-size", type=int, default=None, help="drop predicted components smaller than this many pixels")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average with the horizontally flipped slice, at the post-processing calibrated for it (default: the model's shipped default)",
    )


def _post(args, seg):
    from .inference.predictor import override

    return override(seg.postprocess_for(bool(args.tta)), args.threshold, args.min_size)


def cmd_evaluate(args) -> int:
    from .config import CONDITIONS, DISPLAY_NAMES
    from .evaluation.brats import is_brats_root
    from .evaluation.protocol import conditions_table, markdown_table
    from .io.datasets import read_split
    from .io.files import write_json_atomic, write_text_atomic
    from .pipeline import evaluate

    named = {"every": EVERY_CONDITION, "channels": tuple(CONDITIONS)}
    conditions = tuple(dict.fromkeys(c for arg in args.conditions for c in named.get(arg, (arg,))))
    if is_brats_root(args.data):
        return _evaluate_brats(args, conditions)
    seg = _load_model(args)
    ids = read_split(args.split)[args.subset] if args.split else None
    report = evaluate(seg, args.data, ids, post=_post(args, seg), tta=args.tta, sweep=args.sweep, conditions=conditions)
    report["split"] = f"{args.split}:{args.subset}" if args.split else "all labelled patients in the folder"
    report["precision"] = seg.precision
    write_json_atomic(args.out, report)
    md = markdown_table({DISPLAY_NAMES.get(seg.name, seg.name): report})
    if "conditions" in report:
        md += "\n" + conditions_table({DISPLAY_NAMES.get(seg.name, seg.name): report["conditions"]})
    write_text_atomic(Path(args.out).with_suffix(".md"), md)
    print(md)
    print(
        f"{DISPLAY_NAMES.get(seg.name, seg.name)} DICE Score: {report['per_patient_dice']:.2f}  "
        f"(per-patient 3D Dice, {report['patients']} patients, input: {report['condition']})"
    )
    print(f"report: {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


def _evaluate_brats(args, conditions: tuple[str, ...]) -> int:
    """``brainseg evaluate`` on a BraTS-format root (``evaluation.brats``): whole-tumour Dice per case, under
    ``all`` (t1n + t2f + t1c) and ``flair_only`` (``--conditions`` left at its default: both). Each case is kept in
    ``OUT.partial.jsonl`` as it is done, so the same command after a stop resumes; the file goes once the report is written."""
    from .config import DISPLAY_NAMES
    from .evaluation.brats import BRATS_CONDITIONS, evaluate_brats, markdown
    from .io.files import write_json_atomic, write_text_atomic

    if args.split:
        raise ValueError(f"{args.data}: BraTS-format data has no split; --split is for LGG slice datasets (every labelled case is scored)")
    seg = _load_model(args)
    partial = Path(args.out).with_suffix(".partial.jsonl")  # each case as it is done: a stopped run resumes from it
    wanted = BRATS_CONDITIONS if conditions == ("all",) else conditions
    report = evaluate_brats(seg, args.data, tta=args.tta, post=_post(args, seg), conditions=wanted, progress_file=partial)
    report["precision"] = seg.precision
    write_json_atomic(args.out, report)
    partial.unlink(missing_ok=True)
    if report["resumed"]:
        print(f"resumed: {report['resumed']} cases scored by an earlier run with the same settings ({partial.name})")
    name = DISPLAY_NAMES.get(seg.name, seg.name)
    md = markdown(report, name)
    write_text_atomic(Path(args.out).with_suffix(".md"), md)
    print(md)
    for case, why in report["skipped"].items():
        print(f"skipped {case}: {why}")
    print(
        f"{name} DICE Score: {report['per_patient_dice']:.2f}  (whole-tumour Dice, mean of {report['cases']} BraTS-format cases, input: {report['condition']})"
    )
    print(f"report: {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


def _print_read_as(name: str, read_as: dict) -> None:
    """How one input was read (``channels.input_block``), as plain lines beside the progress bar."""
    from tqdm import tqdm

    seq = f"; sequence {read_as['sequence']}" if read_as.get("sequence") else ""
    lines = [f"{name}: read as {read_as['read_as']} (condition {read_as['condition']}{seq})"]
    if read_as.get("dicom"):
        lines.append(
            f"{name}: channels read from "
            + "; ".join(f"{ch}: {src}" for ch, src in zip(("pre-contrast", "FLAIR", "post-contrast"), read_as["dicom"]["channel_sources"], strict=False))
        )
    lines += [f"{name}: {note}" for note in read_as["notes"]]
    lines += [f"{name}: warning: {w}" for w in read_as["warnings"]]
    for line in lines:
        tqdm.write(line, file=sys.stdout)


def _pixel_spacing(raw: str) -> tuple[float, float]:
    """``--pixel-spacing``: the API's ``pixel_spacing_mm`` rules (one number or row,col; each in (0, 100] mm)."""
    from .evaluation.measure import PIXEL_SPACING_HELP, parse_pixel_spacing

    try:
        spacing = parse_pixel_spacing(raw)
    except ValueError:
        spacing = None
    if spacing is None:
        raise argparse.ArgumentTypeError(PIXEL_SPACING_HELP.replace("pixel_spacing_mm", "--pixel-spacing"))
    return spacing


def cmd_predict(args) -> int:
    """Every input in turn: one that fails is one line on stderr (``brainseg: error: PATH: message``; the
    traceback too with -v) and the others go on; exit status 2 at the end when any failed, with a count
    ("brainseg: 2 of 5 inputs failed") when there was more than one input."""
    import traceback

    from tqdm import tqdm

    from .inference.predict import predict_inputs

    def failed(line: str, exc: BaseException) -> None:
        if args.verbose:
            tqdm.write("".join(traceback.format_exception(exc)).rstrip(), file=sys.stderr)
        tqdm.write(f"brainseg: error: {line}", file=sys.stderr)

    seg = _load_model(args)
    batch = predict_inputs(
        args.inputs,
        args.out,
        seg,
        _post(args, seg),
        tta=args.tta,
        sequence=args.sequence,
        report=_print_read_as,
        on_error=failed,
        pixel_spacing_mm=args.pixel_spacing,
        reports=args.report,
    )
    print(f"wrote {len(batch.written)} files to {args.out}")
    if not batch.failures:
        return 0
    if batch.inputs > 1:
        print(f"brainseg: {len(batch.failures)} of {batch.inputs} inputs failed", file=sys.stderr)
    return 2


def cmd_compare(args) -> int:
    """Follow-up comparison (``compare.compare_paths``): both studies segmented, registered, matched; RANO-BM category."""
    from .evaluation.compare import RegistrationUnavailable, compare_paths

    seg = _load_model(args)
    try:
        compare_paths(args.baseline, args.followup, args.out, seg, _post(args, seg), register=not args.no_register, tta=args.tta)
    except RegistrationUnavailable as exc:
        print(f"brainseg: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    src = Path(args.checkpoint)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: checkpoint not found")
    if src.suffix == ".onnx":
        if not args.int8:
            raise ValueError(f"{src}: already ONNX; pass --int8 to quantise it, or a .pt checkpoint to export")
        onnx_path = src
    else:
        from .inference.export import export_onnx

        onnx_path = export_onnx(src, args.out or src.with_suffix(".onnx"))
        print(f"wrote {onnx_path}")
    if args.int8:
        from .inference.export import export_int8
        from .io.datasets import read_split

        if args.split:
            patients, source = read_split(args.split)["train"], f"the training patients of {args.split}"
        elif src.suffix == ".pt":
            from .models.checkpoint import load_checkpoint

            patients, source = load_checkpoint(src).get("split", {}).get("train"), f"the training patients of {src.name}"
        else:
            patients, source = None, None
        if not patients:
            patients, source = None, "every labelled patient (pass --split to calibrate on training patients only)"
            log.warning("calibrating on every labelled patient in %s: pass --split split.json to use the training patients only", args.data)
        out = export_int8(onnx_path, args.data, patients, n_slices=args.calibration_slices, seed=args.seed, method=args.calibration_method)
        print(f"wrote {out} (INT8, calibrated on {args.calibration_slices} slices of {source} in {args.data})")
    return 0


def cmd_batch(args) -> int:
    """Every study in turn (or on Ray), resumable: finished studies are skipped, a failed one is one line on
    stderr and a row of summary.csv; exit status 2 when any study failed."""
    from .inference.batch import ModelSpec, run_batch

    spec = ModelSpec(
        model=args.model,
        checkpoint=args.checkpoint,
        model_dir=args.model_dir,
        torch=args.torch,
        precision=args.precision,
        threshold=args.threshold,
        min_size=args.min_size,
        tta=args.tta,
        sequence=args.sequence,
        pixel_spacing=args.pixel_spacing,
    )
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise ValueError(f"--threshold must be in (0, 1), got {args.threshold}")

    def report(rec) -> None:
        from tqdm import tqdm

        if rec.status != "ok":
            tqdm.write(f"brainseg: error: {rec.error}", file=sys.stderr)

    run = run_batch(
        args.inputs,
        args.out,
        spec,
        ray=args.ray,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        retry_failed=args.retry_failed,
        progress=not args.quiet,
        on_record=report,
    )
    for rec in run.records:
        if rec.status != "ok" and not rec.key:  # inputs that gave no study (missing, unsupported) fail in every run
            print(f"brainseg: error: {rec.error}", file=sys.stderr)
    ok = len(run.records) - len(run.failed)
    rate = f", {run.done_now / run.seconds * 60:.1f} studies/min" if run.done_now else ""
    print(
        f"batch: {len(run.records)} studies: {ok} ok, {len(run.failed)} failed; {run.done_now} done now in {run.seconds:.1f} s{rate}, {run.skipped} done before"
    )
    if run.nodes():
        print("studies per Ray node: " + ", ".join(f"{node} {n}" for node, n in sorted(run.nodes().items())))
    print(f"summary: {run.summary}")
    return 2 if run.failed else 0


def cmd_dicomweb(args) -> int:
    """Passes over a DICOMweb archive (``dicomweb.Node``): once, or every --poll seconds until interrupted."""
    import time

    from .io.dicomweb import ArchiveUnavailable, Node, client_for, default_state_path, quiet_http_logs
    from .serving.settings import Settings

    quiet_http_logs()
    settings = Settings.from_env()  # the service's reading limits (BRAINSEG_MAX_VOXELS, BRAINSEG_MAX_DECODED_MB)
    seg = _load_model(args)
    state = Path(args.state) if args.state else default_state_path(args.url)
    node = Node(
        client_for(args.url, args.auth, args.timeout),
        seg,
        _post(args, seg),
        state,
        max_voxels=settings.max_voxels,
        max_decoded_bytes=settings.max_decoded_bytes,
        since=args.since,
        tta=args.tta,
    )
    failed = 0
    while True:
        t0 = time.perf_counter()
        try:
            outcomes = node.run_once()
        except ArchiveUnavailable as exc:
            if args.poll is None:
                raise
            log.warning("%s; trying again in %.0f s", exc, args.poll)  # a node that polls outlives an archive's restart
            time.sleep(args.poll)
            continue
        counts = {k: sum(o.status == k for o in outcomes) for k in ("segmented", "skipped", "failed", "done", "known")}
        failed = counts["failed"]
        print(
            f"dicomweb pass: {len(outcomes)} MR studies: {counts['segmented']} segmented, {counts['skipped']} skipped, {failed} failed, "
            f"{counts['done']} had a brainseg SEG, {counts['known']} skipped before ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        if args.poll is None:
            return 2 if failed else 0
        time.sleep(max(0.0, args.poll - (time.perf_counter() - t0)))


def cmd_serve(args) -> int:
    if args.ray is None and (args.replicas or args.autoscale):
        raise ValueError("--replicas and --autoscale are for --ray (Ray Serve); for processes on one machine use uvicorn --workers N")
    if args.ray is not None:
        from .serving.ray_serve import run

        run(args.host, args.port, args.replicas, args.autoscale, None if args.ray == "local" else args.ray, args.cpus_per_replica)
        return 0
    import uvicorn

    from .serving.protocol import SPEC  # uvicorn's h11 protocol with a request-head timeout

    extra = {}
    if args.log_format == "json":  # one JSON object a line, uvicorn's lines and the service's (serving.metrics.log_config)
        from .serving.metrics import log_config

        extra["log_config"] = log_config("json")
    uvicorn.run("brainseg.serving.api:app", host=args.host, port=args.port, log_level="info", http=SPEC, **extra)
    return 0


def _log_format_default() -> str:
    from .config import Environment

    try:
        return Environment.read().log_format
    except ValueError as exc:
        raise SystemExit(f"brainseg: {exc}") from None


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    st = dsub.add_parser("stats", help="patients, slices, lesion-positive slices, lesion sizes")
    st.add_argument("root")
    st.set_defaults(func=cmd_stats)


def _split_parser(sub) -> None:
    sp = sub.add_parser("split", help="write a seeded patient-level split stratified by institution")
    sp.add_argument("--data", default=None)
    sp.add_argument("--out", required=True)
    sp.add_argument("--val", type=int, default=None, help="validation patients (default: 15%% of the patients, at least 1)")
    sp.add_argument("--test", type=int, default=None, help="test patients (default: 25%% of the patients, at least 1)")
    sp.add_argument("--seed", type=int, default=SPLIT_SEED, help="seed of the patient split")
    sp.set_defaults(func=cmd_split)


def _preprocess_parser(sub) -> None:
    pp = sub.add_parser("preprocess", help="CLAHE + resize + cache, split, overview PNG")
    _add_preprocess_args(pp)
    pp.set_defaults(func=cmd_preprocess)


def _train_parser(sub) -> None:
    d = ExperimentConfig()
    tr = sub.add_parser("train", help="train, calibrate on validation, compare on test")
    _add_preprocess_args(tr)
    tr.add_argument("--out", default=DEFAULT_RUN)
    tr.add_argument("--model", choices=[*ARCHITECTURES, "all"], default="all")
    for name, (dest, scale, what) in TRAIN_FLAGS.items():  # generated from TrainConfig: its defaults, its types
        if dest != "seed":  # --seed is a preprocessing flag too (the split's seed)
            value = getattr(d.train, name)
            value = value / scale if scale != 1 else value
            tr.add_argument(f"--{dest.replace('_', '-')}", type=type(value), default=value, help=f"{what} (default {value:g})")
    tr.add_argument("--features", type=int, nargs="+", default=list(d.model.features))
    tr.add_argument("--deep-supervision", action="store_true", help="U-Net++ deep supervision")
    tr.add_argument(
        "--context", type=int, default=d.model.context, choices=range(0, 4), help="2.5D: neighbouring slices on each side as extra channels (0: 2D)"
    )
    tr.add_argument(
        "--dims",
        type=int,
        default=d.model.spatial_dims,
        choices=(2, 3),
        help="3: a true 3D network on stacks of slices (in-plane pooling; see models/blocks.py)",
    )
    tr.add_argument("--context-dropout", type=float, default=None, help="2.5D: probability of training on the lone-slice fallback (default 0.2 with --context)")
    tr.add_argument("--missing-pre", type=float, default=d.augment.missing_pre, help="sequence dropout: probability that pre-contrast is replaced by FLAIR")
    tr.add_argument("--missing-post", type=float, default=d.augment.missing_post, help="sequence dropout: probability that post-contrast is replaced by FLAIR")
    tr.add_argument("--domain-shift", action="store_true", help=f"train for other hospitals' data: {DOMAIN_SHIFT_PRESET} (each flag below overrides)")
    for k, what in DOMAIN_SHIFT_FLAGS.items():
        tr.add_argument(f"--{k.replace('_', '-')}", type=float, default=None, help=f"probability of {what} (default {getattr(d.augment, k)})")
    tr.add_argument("--init-from", default=None, help="start from these weights (a .pt, or a folder with <model>.pt) with a fresh schedule")
    tr.add_argument("--resume", action="store_true", help="continue from RUN/<model>/last.pt")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=cmd_train)


def _evaluate_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="every metric, per patient / slice / lesion")
    ev.add_argument("--data", default=None)
    _add_model_args(ev)
    ev.add_argument("--split", default=None, help="split JSON; default: every labelled patient in --data")
    ev.add_argument("--subset", default="test", choices=["train", "val", "test"])
    ev.add_argument("--sweep", action="store_true", help="also report a threshold x min-size sweep")
    ev.add_argument(
        "--conditions",
        nargs="+",
        default=["all"],
        choices=[*EVERY_CONDITION, "channels", "every"],
        help="input conditions to evaluate: missing sequences as FLAIR copies (all, pre_missing, post_missing, flair_only; 'channels' = these four), "
        "other hospitals' data reproduced on these slices (skull_stripped, skull_stripped_flair_only, brats_like); 'every' = all seven",
    )
    ev.add_argument("--out", required=True, help="REPORT.json (a .md table is written beside it)")
    ev.set_defaults(func=cmd_evaluate)


def _predict_parser(sub) -> None:
    pr = sub.add_parser(
        "predict", help="masks, overlays and lesion statistics for slices, folders, NIfTI volumes or DICOM series (a folder or .zip; also a DICOM SEG)"
    )
    pr.add_argument("inputs", nargs="+")
    pr.add_argument("--out", required=True)
    pr.add_argument(
        "--sequence",
        type=str.lower,
        choices=SEQUENCE_CHOICES,
        default=None,
        help="what a grey (one-channel) slice or a single NIfTI volume is: flair (default), t1 (pre-contrast T1), t1c (T1 post-contrast) or t2; "
        "it is always given to the model in all 3 channels (the FLAIR-only condition), and t1 / t1c / t2 get a warning. "
        "3-channel slices and BraTS sets (named *-t1n, *-t2f, *-t1c) carry their own sequences",
    )
    pr.add_argument(
        "--pixel-spacing",
        type=_pixel_spacing,
        default=None,
        metavar="MM[,MM]",
        help="pixel spacing of slice inputs (TIFF / PNG / JPEG carry none): one number, or row,col (DICOM PixelSpacing order); "
        "their areas and lesion diameters are then in mm (RANO-BM measurable), else diameters are in pixels. Volumes use their header",
    )
    pr.add_argument(
        "--report",
        action="store_true",
        help="also X_report.html (one printable page: key images, lesion table, RANO-BM, model); DICOM inputs also get "
        "X_sr.dcm (a DICOM SR of the measurements, referencing the SEG) and X_sc.zip (a secondary-capture overlay series)",
    )
    _add_model_args(pr)
    pr.set_defaults(func=cmd_predict)


def _compare_parser(sub) -> None:
    co = sub.add_parser(
        "compare", help="follow-up comparison of two studies: registration, lesions matched, per-lesion change, RANO-BM category (decision support)"
    )
    co.add_argument("baseline", help="the baseline study: what predict takes for a volume (NIfTI, a BraTS set or its folder, a DICOM folder / .zip)")
    co.add_argument("followup", help="the follow-up study, of the same patient")
    co.add_argument("--out", required=True, help="folder for compare.json, compare.png and followup_mask_on_baseline.nii.gz")
    co.add_argument("--no-register", action="store_true", help="skip the rigid registration (compare in world coordinates as the files give them)")
    _add_model_args(co)
    co.set_defaults(func=cmd_compare)


def _export_parser(sub) -> None:
    ex = sub.add_parser("export", help="export a checkpoint to ONNX; --int8 also writes the quantised X.int8.onnx")
    ex.add_argument("--checkpoint", required=True, help="a .pt checkpoint (exported to .onnx), or an exported .onnx file to quantise (with --int8)")
    ex.add_argument("--out", default=None, help="fp32 ONNX file (default: the checkpoint's name with .onnx); the INT8 file goes beside it")
    ex.add_argument("--int8", action="store_true", help="static INT8 quantisation (ONNX Runtime, QDQ, per-channel weights), calibrated on training slices")
    ex.add_argument("--data", default=None, help="dataset root for the calibration slices (default: $BRAINSEG_DATA or ../shared/data/lgg/kaggle_3m)")
    ex.add_argument("--split", default=None, help="split JSON: calibrate on its training patients (default: the checkpoint's split, else every patient)")
    # = export.CALIBRATION_SLICES and CALIBRATION_METHODS (not imported here: no numpy for --help)
    ex.add_argument("--calibration-slices", type=int, default=300, help="slices to calibrate on (default 300)")
    ex.add_argument("--calibration-method", choices=["percentile", "minmax"], default="percentile", help="how activation ranges are set (default percentile)")
    ex.add_argument("--seed", type=int, default=0, help="seed of the calibration slice choice")
    ex.set_defaults(func=cmd_export)


def _batch_parser(sub) -> None:
    ba = sub.add_parser(
        "batch", help="predict over many studies (inputs, or a CSV manifest with a 'path' column), in this process or on Ray; resumable, summary.csv"
    )
    ba.add_argument("inputs", nargs="+", help="what predict takes (slices, folders, NIfTI, BraTS sets, DICOM folders / zips), or a .csv manifest")
    ba.add_argument("--out", required=True, help="output folder: predict's files per study, summary.csv, and the records a rerun resumes from")
    ba.add_argument(
        "--ray", default=None, metavar="local|auto|ADDRESS", help="run on Ray: a local instance, the running cluster (auto), or a cluster's address"
    )
    ba.add_argument("--workers", type=int, default=None, help="Ray workers (default: the cluster's CPUs / --cpus-per-worker); each loads the model once")
    ba.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each Ray worker takes (and its ONNX Runtime threads)")
    ba.add_argument("--retry-failed", action="store_true", help="try the studies that failed in an earlier run again (finished ones are always skipped)")
    ba.add_argument("--quiet", action="store_true", help="no progress bar")
    ba.add_argument("--sequence", type=str.lower, choices=SEQUENCE_CHOICES, default=None, help="as for predict")
    ba.add_argument("--pixel-spacing", type=_pixel_spacing, default=None, metavar="MM[,MM]", help="as for predict: the pixel spacing of slice inputs")
    _add_model_args(ba)
    ba.set_defaults(func=cmd_batch)


def _dicomweb_parser(sub) -> None:
    dw = sub.add_parser(
        "dicomweb", help="segment the MR studies of a DICOMweb archive that have no brainseg SEG yet and store the SEG into each study (QIDO / WADO / STOW-RS)"
    )
    dw.add_argument("--url", required=True, help="the archive's DICOMweb root, e.g. http://pacs:8042/dicom-web")
    when = dw.add_mutually_exclusive_group()
    when.add_argument("--once", action="store_true", help="one pass, then exit (the default)")
    when.add_argument("--poll", type=float, default=None, metavar="SECONDS", help="a pass every SECONDS until interrupted")
    dw.add_argument("--auth", default=None, help="USER:PASSWORD (HTTP basic), bearer:TOKEN, or @FILE holding one (default: $BRAINSEG_DICOMWEB_AUTH)")
    dw.add_argument("--state", default=None, help="state file of skipped and failed studies (default: ~/.local/state/brainseg/dicomweb-<url hash>.json)")
    dw.add_argument("--since", default=None, metavar="YYYYMMDD", help="only studies from this StudyDate on")
    dw.add_argument("--timeout", type=float, default=60.0, help="seconds for one HTTP request to the archive")
    _add_model_args(dw)
    dw.set_defaults(func=cmd_dicomweb)


def _serve_parser(sub) -> None:
    se = sub.add_parser("serve", help="start the FastAPI service")
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--log-format", choices=["text", "json"], default=_log_format_default(), help="log lines as text or JSON (BRAINSEG_LOG_FORMAT)")
    se.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="serve on Ray Serve: a Ray instance started here, or join a cluster (auto, HOST:PORT); replicas load the models, results go to BRAINSEG_RESULT_DIR",
    )
    scale = se.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="Ray Serve replicas (default 1)")
    scale.add_argument("--autoscale", default=None, metavar="MIN-MAX", help="Ray Serve autoscaling between MIN and MAX replicas on requests in flight")
    se.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each Ray Serve replica takes (and its ONNX Runtime threads)")
    se.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brainseg", description="Lesion segmentation in brain MRI with U-Net++ and Attention U-Net.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    _data_parser(sub)
    _split_parser(sub)
    _preprocess_parser(sub)
    _train_parser(sub)
    _evaluate_parser(sub)
    _predict_parser(sub)
    _compare_parser(sub)
    _export_parser(sub)
    _batch_parser(sub)
    _dicomweb_parser(sub)
    _serve_parser(sub)
    return p


def _keep_freed() -> None:
    """The server's allocator setting for every command (``BRAINSEG_MALLOC_KEEP_MB``, 256; 0: glibc's
    defaults): glibc then keeps freed activation buffers instead of unmapping and page-faulting them
    again on every step. Training steps on 2 CPU cores, batch 16 at 128 x 128, medians: Attention U-Net
    0.93-1.03 -> 0.82-0.85 s, U-Net++ 2.00-2.04 -> 1.67-1.77 s (docs/ablations.md, round 7)."""
    from .serving.allocator import KEEP_FREED_MB, keep_freed

    try:
        mib = int(os.environ.get("BRAINSEG_MALLOC_KEEP_MB", KEEP_FREED_MB))
    except ValueError:
        raise SystemExit(f"brainseg: BRAINSEG_MALLOC_KEEP_MB must be a whole number of MiB, not {os.environ['BRAINSEG_MALLOC_KEEP_MB']!r}") from None
    keep_freed(mib)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    _keep_freed()
    if getattr(args, "command", None) in ("evaluate", "export") and args.data is None:
        args.data = default_data_root()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("brainseg: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, OSError) as exc:
        if args.verbose:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"brainseg: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
