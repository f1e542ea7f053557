"""Analysis only: the 2.5D Attention U-Net (round 4) with flip TTA against the served default (2D with flip TTA), on
the 12 validation patients under the shipping rules: both calibrated with TTA within the one-pass default's pooled
FP budget (``pipeline.calibrate_against``), the 2.5D model judged by ``champion_challenger`` against the 2D one.
Run from the repository root: ``python docs/ablations/round9_ctx_tta.py`` (about 5 min on 2 CPU cores)."""

import json
from dataclasses import asdict
from pathlib import Path

from brainseg import pipeline
from brainseg.inference import predictor
from brainseg.inference.registry import read
from brainseg.io.datasets import discover, labelled

reg = read("models")
val = [labelled(discover("../shared/data/lgg/kaggle_3m")).patient(p) for p in reg.split["val"]]
two_d = predictor.load("attention_unet")
plain = pipeline.calibrate_against(two_d, val, None, progress=False)
print("2D one pass", plain.post, plain.fp_summary(), round(plain.val_score, 4), flush=True)
with_tta = pipeline.calibrate_against(two_d, val, plain, progress=False, tta=True)
print("2D + TTA", with_tta.post, with_tta.fp_summary(), round(with_tta.val_score, 4), flush=True)
ctx = predictor.load(checkpoint="runs/ctx/attention_unet/best.pt")
ctx_tta = pipeline.calibrate_against(ctx, val, plain, progress=False, tta=True)
ctx_tta.verdict = pipeline.champion_challenger(with_tta, ctx_tta)
print("2.5D + TTA", ctx_tta.post, ctx_tta.fp_summary(), round(ctx_tta.val_score, 4), ctx_tta.verdict["reason"], flush=True)
out = {
    name: {"post": asdict(c.post), "val_score": c.val_score, "fp_slices": c.fp_slices, "verdict": c.verdict}
    for name, c in (("2d", plain), ("2d_tta", with_tta), ("ctx_tta", ctx_tta))
}
Path("docs/ablations/round9_ctx_tta.json").write_text(json.dumps(out, indent=1, default=str))
