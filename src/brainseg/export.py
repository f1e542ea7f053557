"""ONNX export with the resolved configuration embedded as metadata."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import write_bytes_atomic
from .inference import ONNX_METADATA_KEY


def export_onnx(checkpoint: os.PathLike | str, out: os.PathLike | str, opset: int = 17) -> Path:
    """Export ``checkpoint`` to ONNX (dynamic batch, fixed input size from its config)."""
    import onnx

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    size = ckpt["config"]["preprocess"]["input_size"]
    x = torch.zeros(1, ckpt["config"]["model"]["in_channels"], size, size)
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
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
