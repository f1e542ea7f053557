"""Analysis only: U-Net++ (one pass, fp32 ONNX) calibrated on validation within the default model's pooled FP
budget (22 of 1,946 lesion-free slices over seven conditions); then its test FP and Dice at that setting and at
its shipped one. Run from the repository root: ``python docs/ablations/round9_unetpp_fp_budget.py`` (about 9 min on
2 CPU cores)."""

import json
from pathlib import Path

from brainseg import pipeline
from brainseg.config import EVERY_CONDITION
from brainseg.evaluation.protocol import evaluate_predictions, predict_patients
from brainseg.inference import predictor
from brainseg.inference.registry import read
from brainseg.io.datasets import discover, labelled

reg = read("models")
ds = labelled(discover("../shared/data/lgg/kaggle_3m"))
val = [ds.patient(p) for p in reg.split["val"]]
test = [ds.patient(p) for p in reg.split["test"]]
att = predictor.load("attention_unet")
upp = predictor.load("unetpp")
base = pipeline.calibrate_against(att, val, None, progress=False)
print("att", base.post, base.fp_slices, base.fp_rate, flush=True)
mine = pipeline.calibrate(upp, val, progress=False, fp_conditions=EVERY_CONDITION, fp_budget=base.fp_rate, volumes_3d=True)
print("upp within att budget", mine.post, mine.fp_slices, mine.val_score, mine.fp_budget_met, flush=True)
shipped = upp.postprocess
out = {"att_budget": [base.fp_slices, base.fp_rate], "upp_new_post": str(mine.post), "upp_new_val": mine.val_score, "upp_new_fp": mine.fp_slices, "test": {}}
for c in EVERY_CONDITION:
    preds = predict_patients(upp, test, progress=False, condition=c)
    a, b = evaluate_predictions(preds, shipped), evaluate_predictions(preds, mine.post)
    out["test"][c] = {"shipped": [a["per_patient_dice"], a["fp_slice_rate"]], "new": [b["per_patient_dice"], b["fp_slice_rate"]]}
    print(c, out["test"][c], flush=True)
Path("docs/ablations/round9_unetpp_fp_budget.json").write_text(json.dumps(out, indent=1, default=str))
