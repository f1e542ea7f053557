#!/usr/bin/env bash
# How the shipped models were made (see docs/ablations.md and the model cards).
#  1. cache + split of the 81 LGG patients (49 train / 12 validation / 20 test, seed 42)
#  2. on a machine with a GPU: ten configurations side by side for 360 s each
#     (scripts/gpu/pack_cache.py packs the train + validation slices to carry them there)
#  3. continue the Attention U-Net on the CPU at a low learning rate (35 min on 2 cores)
#  4. ship: calibrate each candidate on validation, keep the better, export ONNX, evaluate
#     on the test patients under the four input conditions, write cards and the registry.
# Step 2 runs on CPU too, but ten runs at once on 2 cores take hours: pass --runs to pick
# fewer (e.g. --runs att_sd30_z,upp_sd30) and a larger --budget.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/lgg/kaggle_3m}
python preprocess.py --data "$DATA" --cache runs/cache81 --seed 42
python scripts/gpu/train_ablations.py --cache runs/cache81 --out runs/gpu/abl --budget "${BUDGET:-360}" --workers "${WORKERS:-1}" ${RUNS:+--runs "$RUNS"}
python train.py --data "$DATA" --cache runs/cache81 --out runs/ship2 --model attention_unet --init-from runs/gpu/abl/att_sd30_z/best.pt \
  --normalization zscore --epochs 30 --lr 3e-4 --batch-size 32 --threads 2 --time-budget 2100 --quiet
python scripts/ship_models.py --data "$DATA" --out models \
  --candidates attention_unet=runs/gpu/abl/att_sd30_z/best.pt,runs/ship2/attention_unet/best.pt unetpp=runs/gpu/abl/upp_sd30/best.pt
