#!/bin/bash
# Measures CLAHE settings by a short Attention U-Net run each on the same split;
# the validation per-patient Dice of each run is in runs/clahe_sweep/*/attention_unet/history.csv.
set -e
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-4}
run() {  # name, extra preprocess args
  python train.py --model attention_unet --epochs "$EPOCHS" --out "runs/clahe_sweep/$1" --cache "runs/cache_$1" --quiet "${@:2}"
}
run off --no-clahe
run clip2_grid8 --clahe-clip 2.0 --clahe-grid 8
run clip4_grid8 --clahe-clip 4.0 --clahe-grid 8
python scripts/summarize_sweep.py runs/clahe_sweep
