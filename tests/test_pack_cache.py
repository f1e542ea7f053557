"""scripts/gpu/pack_cache.py: a cache packed for a lent GPU unpacks to a cache load_cache reads, with the
skull-stripped slices the domain-shift runs train on, and without the test patients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import script

from brainseg.training.cache import cache_complete, load_cache

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "pack_cache.py"


def _module():
    return script("gpu/pack_cache.py")


def test_pack_and_unpack_keep_every_training_array_bit_exact(tiny_cache, tmp_path):
    mod = _module()
    mod.main(["pack", str(tiny_cache), str(tmp_path / "c.npz")])
    mod.main(["unpack", str(tmp_path / "c.npz"), str(tmp_path / "out")])
    assert cache_complete(tmp_path / "out")
    before, after = load_cache(tiny_cache), load_cache(tmp_path / "out")
    split = json.loads((tiny_cache / "split.json").read_text())
    rows = before.rows(split["train"] + split["val"])
    assert after.patients == [before.patients[r] for r in rows] and not set(split["test"]) & set(after.patients)
    for name in ("images", "images_stripped", "masks"):
        assert np.array_equal(np.asarray(getattr(after, name)), np.asarray(getattr(before, name))[rows])


def test_help_and_bad_input_answer_in_one_line(tmp_path):
    ok = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "pack" in ok.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "pack", str(tmp_path), str(tmp_path / "x.npz")], capture_output=True, text=True)
    assert bad.returncode != 0 and "not a complete cache" in bad.stderr and "Traceback" not in bad.stderr
