"""CPU inference speed: ONNX Runtime vs PyTorch, per model, in one run.

    python scripts/bench_inference.py --model-dir models --data ../shared/data/lgg/kaggle_3m --repeats 7

Times one real 256x256 slice end to end (preprocessing + network + resize back), and one
batch of 32 slices, for each backend; prints the median and the spread over ``--repeats``
runs after one warm-up. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from brainseg.data import discover, labelled, load_patient
from brainseg.inference import Segmenter, TorchBackend, load_segmenter
from brainseg.registry import model_path, read_registry


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="models")
    ap.add_argument("--data", default="../shared/data/lgg/kaggle_3m")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()

    reg = read_registry(a.model_dir)
    patient = labelled(discover(a.data)).patients[0]
    images, _ = load_patient(patient)
    one, batch = images[len(images) // 2], (images * 2)[:32]
    print("| model | backend | 1 slice, ms (median [min-max]) | 32 slices, ms/slice (median) |")
    print("|---|---|---|---|")
    for name in sorted(reg["models"]):
        onnx_seg = load_segmenter(model_path(reg, name, prefer_onnx=True), name)
        torch_seg = Segmenter(TorchBackend(Path(reg["_dir"]) / reg["models"][name]["checkpoint"], device="cpu"), name)
        for label, seg in (("onnxruntime", onnx_seg), ("pytorch", torch_seg)):
            t1 = timed(lambda: seg.probabilities([one]), a.repeats)
            tb = timed(lambda: seg.probabilities(batch, batch_size=32), max(2, a.repeats // 2))
            print(
                f"| {name} | {label} | {1000 * statistics.median(t1):.1f} [{1000 * min(t1):.1f}-{1000 * max(t1):.1f}] "
                f"| {1000 * statistics.median(tb) / len(batch):.1f} |"
            )


if __name__ == "__main__":
    main()
