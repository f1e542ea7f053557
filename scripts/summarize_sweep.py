"""Print the validation per-patient Dice of each run of a sweep folder (best and last epoch)."""

import csv
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/clahe_sweep")
print("| setting | best val per-patient Dice | last-epoch val Dice | epochs |")
print("|---|---|---|---|")
for hist in sorted(root.glob("*/*/history.csv")):
    rows = list(csv.DictReader(hist.open()))
    vals = [float(r["val_dice"]) for r in rows]
    print(f"| {hist.parent.parent.name} | {max(vals):.3f} | {vals[-1]:.3f} | {len(rows)} |")
