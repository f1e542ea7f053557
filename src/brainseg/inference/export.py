"""ONNX export with the resolved configuration embedded as metadata, and INT8 quantisation.

``export_onnx`` needs torch and onnx (the ``train`` extra). ``quantize_int8`` needs onnx and
ONNX Runtime only: it turns an exported fp32 ``X.onnx`` into ``X.int8.onnx`` by static
quantisation (ONNX Runtime's ``quantize_static``: QDQ format, per-channel int8 weights,
uint8 activations whose ranges come from calibration slices run through the same
``preprocess_slice`` as training and serving).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..config import ExperimentConfig
from ..io.datasets import discover, labelled, read_image
from ..io.files import write_bytes_atomic
from ..preprocessing import apply_condition, normalize, prepare, preprocess_slice, volume_stats
from .backends import ONNX_METADATA_KEY, int8_path

log = logging.getLogger(__name__)

# Share of calibration slices under each input condition: users send complete studies, but
# also FLAIR alone (one grey image) and studies with a sequence missing (a FLAIR copy).
CALIBRATION_MIX = {"all": 0.5, "pre_missing": 1 / 6, "post_missing": 1 / 6, "flair_only": 1 / 6}
CALIBRATION_SLICES = 300
# Slices per calibration batch. Each batch is run and folded into the ranges on its own (ONNX
# Runtime's CalibStridedMinMax, which also serves the histogram calibrators): the percentile
# calibrator otherwise keeps every intermediate tensor of every slice (~36 MB a slice for the
# Attention U-Net: 11 GB for 300 slices) until the end.
CALIBRATION_BATCH = 10
# Activation ranges: "percentile" (the 99.999th percentile of |activation|, from histograms) kept the
# shipped Attention U-Net's masks closer to fp32 than "minmax" on the test slices we compared it on
# (a few patients, FLAIR only); minmax calibrates ~5x faster.
CALIBRATION_METHODS = ("percentile", "minmax")
PERCENTILE = 99.999


def export_onnx(checkpoint: os.PathLike | str, out: os.PathLike | str, opset: int = 17) -> Path:
    """Export ``checkpoint`` to ONNX (dynamic batch, fixed input size from its config; a 3D model
    also takes any number of slices)."""
    import onnx
    import torch

    from ..models.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    size = ckpt["config"]["preprocess"]["input_size"]
    three_d = ckpt["config"]["model"].get("spatial_dims", 2) == 3
    x = torch.zeros(1, ckpt["config"]["model"]["in_channels"], *((4,) if three_d else ()), size, size)
    axes = {0: "batch", 2: "slices"} if three_d else {0: "batch"}
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": axes, "logits": axes},
        opset_version=opset,
        dynamo=False,
    )
    proto = onnx.load_from_string(buf.getvalue())
    meta = proto.metadata_props.add()
    meta.key = ONNX_METADATA_KEY
    meta.value = json.dumps({"config": ckpt["config"], "info": ckpt.get("info", {})})
    out = Path(out)
    write_bytes_atomic(out, proto.SerializeToString())
    return out


def update_onnx_config(path: os.PathLike | str, sections: dict) -> Path:
    """Replace sections of the configuration in an exported (fp32 or INT8) ONNX file's metadata, weights untouched
    (atomic): how a calibration made after export (``scripts/ship_tta.py``) reaches the file that is served."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path))
    props = {p.key: p for p in proto.metadata_props}
    if ONNX_METADATA_KEY not in props:
        raise ValueError(f"{path}: ONNX file has no '{ONNX_METADATA_KEY}' metadata (export it with `brainseg export`)")
    payload = json.loads(props[ONNX_METADATA_KEY].value)
    payload["config"].update(sections)
    props[ONNX_METADATA_KEY].value = json.dumps(payload)
    write_bytes_atomic(path, proto.SerializeToString())
    return path


# ---------------------------------------------------------------- INT8


def calibration_plan(slice_paths: list[str], n: int = CALIBRATION_SLICES, seed: int = 0) -> list[tuple[str, str]]:
    """A seeded choice of ``n`` slices, each with the input condition it is shown under.

    Returns ``(image_path, condition)`` pairs; conditions follow ``CALIBRATION_MIX``.
    """
    if not slice_paths:
        raise ValueError("no calibration slices: the calibration patients have no labelled slices")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(slice_paths), size=min(n, len(slice_paths)), replace=False)
    conds = list(CALIBRATION_MIX)
    drawn = rng.choice(len(conds), size=len(picked), p=list(CALIBRATION_MIX.values()))
    return [(slice_paths[i], conds[c]) for i, c in zip(sorted(picked), drawn, strict=False)]


def calibration_slice_paths(data_root: os.PathLike | str, patient_ids: list[str] | None = None) -> list[str]:
    """Labelled slice files of ``patient_ids`` (the training patients of a split), or of every patient."""
    return list(calibration_volumes(data_root, patient_ids))


def calibration_volumes(data_root: os.PathLike | str, patient_ids: list[str] | None = None) -> dict[str, list[str]]:
    """Each labelled slice file of ``patient_ids`` (every patient if None) -> every slice file of its patient."""
    ds = labelled(discover(data_root))
    patients = [ds.patient(p) for p in patient_ids] if patient_ids else ds.patients
    return {s.image_path: [t.image_path for t in p.slices] for p in patients for s in p.slices}


def calibration_inputs(plan: list[tuple[str, str]], preprocess_cfg, volumes: dict[str, list[str]] | None = None) -> np.ndarray:
    """Network inputs (N, 3, S, S) float32 for a calibration plan, through ``preprocess_slice``. A
    ``zscore_volume`` model's inputs are normalised with their patient's volume under the slice's
    condition (``volumes``: ``calibration_volumes``), as the server normalises a volume's slices."""
    if preprocess_cfg.normalization != "zscore_volume" or volumes is None:
        return np.stack([preprocess_slice(apply_condition(read_image(p), cond), preprocess_cfg) for p, cond in plan])
    seen: dict[tuple[str, str], tuple[dict[str, np.ndarray], np.ndarray]] = {}  # (volume, condition) -> its slices, statistics
    out = []
    for p, cond in plan:
        key = (volumes[p][0], cond)
        if key not in seen:  # each volume read and prepared once per condition; its planned slices come from it
            prepared = {q: prepare(apply_condition(read_image(q), cond), preprocess_cfg) for q in volumes[p]}
            seen[key] = prepared, volume_stats(list(prepared.values()))
        prepared, stats = seen[key]
        out.append(normalize(prepared[p], preprocess_cfg, stats))
    return np.stack(out)


def _calibration_reader(input_name: str, inputs: np.ndarray):
    """ONNX Runtime's calibration reader over ``inputs`` in batches of one size (its histograms need one), at most
    CALIBRATION_BATCH; ``set_range`` selects the batches the next ``collect_data`` call reads."""
    from onnxruntime.quantization import CalibrationDataReader

    batch = next(b for b in range(min(CALIBRATION_BATCH, len(inputs)), 0, -1) if len(inputs) % b == 0)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._batches = [{input_name: inputs[i : i + batch]} for i in range(0, len(inputs), batch)]
            self.set_range(0, len(self._batches))

        def __len__(self):
            return len(self._batches)

        def set_range(self, start_index: int, end_index: int):
            self._feeds = iter(self._batches[start_index:end_index])

        def get_next(self):
            return next(self._feeds, None)

    return Batches()


def _quantisable(src: Path, meta: dict, method: str) -> dict:
    """The fp32 file's brainseg metadata, or ValueError saying why it cannot be quantised."""
    if ONNX_METADATA_KEY not in meta:
        raise ValueError(f"{src}: ONNX file has no '{ONNX_METADATA_KEY}' metadata (export it with `brainseg export`)")
    payload = json.loads(meta[ONNX_METADATA_KEY])
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if payload.get("precision", "fp32") != "fp32":
        raise ValueError(f"{src}: already quantised ({payload['precision']}); quantise the fp32 file")
    if payload["config"]["model"].get("spatial_dims", 2) == 3:
        raise ValueError(f"{src}: a 3D model; INT8 is calibrated and checked for the 2D models only (run it in fp32)")
    return payload


def quantize_int8(
    onnx_path: os.PathLike | str, inputs: np.ndarray, out: os.PathLike | str | None = None, method: str = "percentile", calibration: dict | None = None
) -> Path:
    """Static INT8 quantisation of an exported fp32 ONNX model -> ``X.int8.onnx`` (atomic).

    ``inputs`` are preprocessed calibration inputs (N, 3, S, S) (``calibration_inputs``); the
    activation ranges come from them by ``method`` (``CALIBRATION_METHODS``). Weights are int8
    per output channel, activations uint8 (what ONNX Runtime recommends for x86 CPUs with VNNI),
    QDQ format. The fp32 file's metadata is kept, with ``precision: int8`` and ``calibration``
    (what it was calibrated on) added.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    src = Path(onnx_path)
    out = Path(out) if out else int8_path(src)
    fp32 = onnx.load(str(src))
    meta = {p.key: p.value for p in fp32.metadata_props}
    payload = _quantisable(src, meta, method)
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="brainseg-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # Shape inference + graph optimisation, as the docs recommend before quantising. The symbolic
        # shape pass stops on these graphs ("Incomplete symbolic shape inference"); ONNX's own is enough.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            _calibration_reader(fp32.graph.input[0].name, inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile if method == "percentile" else CalibrationMethod.MinMax,
            extra_options={"CalibStridedMinMax": 1, **({"CalibPercentile": PERCENTILE} if method == "percentile" else {})},
        )
        proto = onnx.load(str(quantized))
    payload["precision"] = "int8"
    payload["calibration"] = {
        "slices": int(len(inputs)),
        "method": method + (f" {PERCENTILE}" if method == "percentile" else ""),
        "format": "QDQ",
        "weights": "int8 per channel",
        "activations": "uint8",
        **(calibration or {}),
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, (json.dumps(payload) if key == ONNX_METADATA_KEY else value)
    write_bytes_atomic(out, proto.SerializeToString())
    log.info("wrote %s (INT8, calibrated on %d slices)", out, len(inputs))
    return out


def export_int8(
    onnx_path: os.PathLike | str,
    data_root: os.PathLike | str,
    patient_ids: list[str] | None = None,
    n_slices: int = CALIBRATION_SLICES,
    seed: int = 0,
    out: os.PathLike | str | None = None,
    method: str = "percentile",
) -> Path:
    """``X.onnx`` -> ``X.int8.onnx``, calibrated on ``n_slices`` seeded slices of ``patient_ids``
    (the split's training patients; every labelled patient in ``data_root`` if None), each
    preprocessed with the model's own settings under a condition drawn from ``CALIBRATION_MIX``."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if ONNX_METADATA_KEY not in meta:
        raise ValueError(f"{onnx_path}: ONNX file has no '{ONNX_METADATA_KEY}' metadata (export it with `brainseg export`)")
    cfg = ExperimentConfig.from_dict(json.loads(meta[ONNX_METADATA_KEY])["config"])
    volumes = calibration_volumes(data_root, patient_ids)
    plan = calibration_plan(list(volumes), n_slices, seed)
    inputs = calibration_inputs(plan, cfg.preprocess, volumes)
    conditions = {c: sum(1 for _, k in plan if k == c) for c in CALIBRATION_MIX}
    info = {"seed": seed, "patients": len(patient_ids) if patient_ids else "all labelled", "conditions": conditions}
    return quantize_int8(onnx_path, inputs, out, method, calibration=info)
