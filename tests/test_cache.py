"""The training cache belongs to one dataset; a failed run leaves nothing that breaks the next;
validation / test counts scale with the dataset. Small synthetic datasets in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import require, synthetic_dataset

from brainseg import pipeline
from brainseg.cli import main
from brainseg.config import ExperimentConfig, PreprocessConfig
from brainseg.io.datasets import DataError, default_holdout, discover, read_split, split_patients
from brainseg.training.cache import build_cache, cache_matches, dataset_fingerprint, load_cache, sized_cache_dir

CFG = ExperimentConfig(preprocess=PreprocessConfig(input_size=32))
PRE = ["--size", "32"]


def _split_ids(split: dict) -> set[str]:
    return set(split["train"]) | set(split["val"]) | set(split["test"])


def _ids(root: Path) -> set[str]:
    return {p.id for p in discover(root).patients}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------- default hold-out


@pytest.mark.parametrize("n, expected", [(81, (12, 20)), (40, (6, 10)), (10, (2, 3)), (4, (1, 1)), (3, (1, 1)), (2, (0, 1)), (1, (0, 0))])
def test_default_holdout_scales_and_leaves_one_to_train(n, expected):
    assert default_holdout(n) == expected
    n_val, n_test = expected
    assert n - n_val - n_test >= 1


def test_default_holdout_needs_patients():
    with pytest.raises(ValueError, match="no patients"):
        default_holdout(0)


def test_explicit_counts_too_large_say_what_to_do():
    ids = [f"TCGA_CS_{i:04d}_20000101" for i in range(3)]
    with pytest.raises(ValueError, match=r"cannot hold out 6 \+ 10 of 3 patients.*leave --val / --test out.*1 \+ 1"):
        split_patients(ids, 6, 10)
    with pytest.raises(ValueError, match="0 or more"):
        split_patients(ids, -1, 1)


def test_split_command_scales_with_the_dataset(tmp_path, capsys):
    three = synthetic_dataset(tmp_path / "three", patients=3, slices=2, size=32)
    assert main(["split", "--data", str(three), "--out", str(tmp_path / "s3.json")]) == 0
    split = read_split(tmp_path / "s3.json")
    assert [len(split[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    assert "train 1, val 1, test 1" in capsys.readouterr().out
    # Two patients: one to train on, one to test on, none to validate on (documented in default_holdout).
    two = synthetic_dataset(tmp_path / "two", patients=2, slices=2, size=32)
    assert main(["split", "--data", str(two), "--out", str(tmp_path / "s2.json")]) == 0
    split = read_split(tmp_path / "s2.json")
    assert [len(split[k]) for k in ("train", "val", "test")] == [1, 0, 1]
    # Explicit counts still win, and a count that cannot be met is one clear line.
    assert main(["split", "--data", str(three), "--out", str(tmp_path / "e.json"), "--val", "0", "--test", "2"]) == 0
    assert [len(read_split(tmp_path / "e.json")[k]) for k in ("val", "test")] == [0, 2]
    assert main(["split", "--data", str(three), "--out", str(tmp_path / "x.json"), "--val", "6", "--test", "10"]) == 2
    assert "cannot hold out 6 + 10 of 3 patients" in capsys.readouterr().err


def test_preprocess_three_patients_with_default_counts(tmp_path, capsys):
    """The case that used to stop with "cannot hold out 6 + 10 of 3 patients"."""
    data = synthetic_dataset(tmp_path / "data", patients=3, slices=2, size=32)
    cache = tmp_path / "runs" / "cache"
    assert main(["preprocess", "--data", str(data), "--cache", str(cache), *PRE]) == 0
    assert "train 1, val 1, test 1" in capsys.readouterr().out
    assert cache_matches(cache, data, CFG.preprocess)


def test_preprocess_two_patients_trains_on_one_and_tests_on_one(tmp_path, caplog):
    data = synthetic_dataset(tmp_path / "data", patients=2, slices=2, size=32)
    with caplog.at_level("WARNING"):
        res = pipeline.preprocess(str(data), str(tmp_path / "cache"), CFG, overview=False)
    assert res["split_sizes"] == {"train": 1, "val": 0, "test": 1}
    assert "no validation patients" in caplog.text


# ---------------------------------------------------------------- the cache is keyed by the dataset


def test_fingerprint_changes_with_the_files(tmp_path):
    data = synthetic_dataset(tmp_path / "a", patients=2, slices=2, size=32)
    before = dataset_fingerprint(discover(data))
    assert dataset_fingerprint(discover(str(data) + "/")) == before  # same folder, spelled differently
    img = next(data.glob("*/*_1.tif"))
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert dataset_fingerprint(discover(data)) != before
    copy = synthetic_dataset(tmp_path / "b", patients=2, slices=2, size=32)  # same names, another folder
    assert dataset_fingerprint(discover(copy)) != dataset_fingerprint(discover(data))


def test_cache_for_another_dataset_is_rebuilt_with_its_own_split(tmp_path):
    a = synthetic_dataset(tmp_path / "a", patients=4, slices=2, size=32, first=0)
    b = synthetic_dataset(tmp_path / "b", patients=3, slices=2, size=32, first=10)
    cache = tmp_path / "cache"
    pipeline.preprocess(str(a), str(cache), CFG, overview=False)
    assert cache_matches(cache, a, CFG.preprocess)
    assert not cache_matches(cache, b, CFG.preprocess)  # same settings, another dataset
    assert not cache_matches(cache, a, PreprocessConfig(input_size=48))  # same dataset, other settings
    assert not cache_matches(cache, tmp_path / "missing", CFG.preprocess)

    pipeline.preprocess(str(b), str(cache), CFG, overview=False)
    split = read_split(cache / "split.json")
    assert _split_ids(split) == _ids(b), "A's split must not be kept for B's patients"
    assert set(load_cache(cache).patients) == _ids(b)
    assert cache_matches(cache, b, CFG.preprocess) and not cache_matches(cache, a, CFG.preprocess)


def test_split_is_kept_when_all_its_patients_are_still_there(tmp_path):
    data = synthetic_dataset(tmp_path / "a", patients=4, slices=2, size=32)
    cache = tmp_path / "cache"
    pipeline.preprocess(str(data), str(cache), CFG, overview=False, seed=1)
    first = json.loads((cache / "split.json").read_text())
    # A slice is replaced: the arrays are rebuilt, the split (same patients) is kept.
    img = next(data.glob("*/*_2.tif"))
    tifffile.imwrite(img, np.full((32, 32, 3), 7, np.uint8))
    assert not cache_matches(cache, data, CFG.preprocess)
    pipeline.preprocess(str(data), str(cache), CFG, overview=False, seed=99)
    assert json.loads((cache / "split.json").read_text()) == first
    assert cache_matches(cache, data, CFG.preprocess)


def test_build_cache_without_a_split_keeps_only_a_matching_one(tmp_path):
    a = synthetic_dataset(tmp_path / "a", patients=3, slices=2, size=32, first=0)
    b = synthetic_dataset(tmp_path / "b", patients=3, slices=2, size=32, first=10)
    cache = tmp_path / "cache"
    build_cache(discover(a), CFG.preprocess, cache, progress=False, split=split_patients(sorted(_ids(a)), 1, 1))
    build_cache(discover(a), CFG.preprocess, cache, progress=False)
    assert _split_ids(read_split(cache / "split.json")) == _ids(a)
    build_cache(discover(b), CFG.preprocess, cache, progress=False)
    assert not (cache / "split.json").exists()


def test_split_file_naming_other_patients_is_refused(tmp_path):
    a = synthetic_dataset(tmp_path / "a", patients=3, slices=2, size=32, first=0)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"train": ["TCGA_CS_0099_20000101"], "val": [], "test": []}))
    with pytest.raises(DataError, match="not in"):
        pipeline.preprocess(str(a), str(tmp_path / "cache"), CFG, split_file=str(other), overview=False)
    assert not (tmp_path / "cache").exists()


def test_train_after_another_dataset_rebuilds_the_cache(tmp_path, monkeypatch):
    """`brainseg train --data B` after training on A: B's cache and B's split, not A's."""
    calls = []
    monkeypatch.setattr(pipeline, "train_models", lambda names, cache_dir, *a, **k: calls.append(read_split(Path(cache_dir) / "split.json")) or {})
    a = synthetic_dataset(tmp_path / "a", patients=4, slices=2, size=32, first=0)
    b = synthetic_dataset(tmp_path / "b", patients=3, slices=2, size=32, first=10)
    cache = tmp_path / "runs" / "cache"
    common = ["train", "--cache", str(cache), "--out", str(tmp_path / "runs" / "train"), "--quiet", *PRE]
    assert main([*common, "--data", str(a)]) == 0
    assert _split_ids(calls[-1]) == _ids(a)
    assert main([*common, "--data", str(b)]) == 0
    assert _split_ids(calls[-1]) == _ids(b)
    assert set(load_cache(cache).patients) == _ids(b)


# ---------------------------------------------------------------- failed runs leave nothing that breaks the next


def test_failed_split_leaves_no_cache_folder_and_the_next_run_works(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "train_models", lambda names, cache_dir, *a, **k: calls.append(cache_dir) or {})
    data = synthetic_dataset(tmp_path / "data", patients=3, slices=2, size=32)
    runs = tmp_path / "runs"
    cache = runs / "cache"
    common = ["train", "--data", str(data), "--cache", str(cache), "--out", str(runs / "train"), "--quiet", *PRE]
    assert main([*common, "--val", "6", "--test", "10"]) == 2
    assert "cannot hold out 6 + 10 of 3 patients" in capsys.readouterr().err
    assert not runs.exists(), _leftovers(runs)
    assert main(common) == 0
    assert calls == [str(cache)] and (cache / "split.json").is_file() and (cache / "index.json").is_file()


def test_unreadable_slice_leaves_no_folder_behind(tmp_path):
    data = synthetic_dataset(tmp_path / "data", patients=3, slices=2, size=32)
    bad = next(data.glob("*/*_2.tif"))
    bad.write_bytes(bad.read_bytes()[:60])
    runs = tmp_path / "runs"
    with pytest.raises(DataError, match=bad.name):
        pipeline.preprocess(str(data), str(runs / "deeper" / "cache"), CFG, overview=False)
    assert not runs.exists(), _leftovers(runs)
    # An existing parent folder stays, without temporary folders in it.
    runs.mkdir()
    with pytest.raises(DataError):
        pipeline.preprocess(str(data), str(runs / "cache"), CFG, overview=False)
    assert _leftovers(runs) == []


@pytest.mark.parametrize("leftover", ["empty", "no_split", "no_index"])
def test_incomplete_cache_folder_counts_as_no_cache(tmp_path, monkeypatch, leftover):
    data = synthetic_dataset(tmp_path / "data", patients=3, slices=2, size=32)
    cache = tmp_path / "runs" / "cache"
    if leftover == "empty":
        cache.mkdir(parents=True)
    else:
        pipeline.preprocess(str(data), str(cache), CFG, overview=False)
        (cache / ("split.json" if leftover == "no_split" else "index.json")).unlink()
    assert not cache_matches(cache, data, CFG.preprocess)
    calls = []
    monkeypatch.setattr(pipeline, "train_models", lambda names, cache_dir, *a, **k: calls.append(read_split(Path(cache_dir) / "split.json")) or {})
    assert main(["train", "--data", str(data), "--cache", str(cache), "--out", str(tmp_path / "runs" / "train"), "--quiet", *PRE]) == 0
    assert len(calls) == 1 and _split_ids(calls[0]) == _ids(data)
    assert cache_matches(cache, data, CFG.preprocess)


# ---------------------------------------------------------------- one preprocessing path

# Real slices of four patients: complete input, post-contrast missing (a FLAIR copy), FLAIR only;
# slices with and without lesion.
REAL_SLICES = {
    "TCGA_CS_4941_19960909": (1, 11, 15, 20),
    "TCGA_DU_6407_19860514": (5, 20, 30),
    "TCGA_HT_7877_19980917": (10, 20, 30),
    "TCGA_FG_7634_20000128": (12, 25),
}


class RecordingBackend:
    """Keeps every batch the server hands to the network and answers 'no lesion' without running it.

    ``config`` replaces the model's own, so the server preprocesses with the settings under test."""

    def __init__(self, inner, config):
        self.inner, self.config, self.batches = inner, config, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch):
        self.batches.append(np.array(batch))
        return np.full((len(batch), batch.shape[2], batch.shape[3]), -10.0, np.float32)


@pytest.mark.parametrize("normalization", ["minmax", "zscore"])  # the tiny test models' and the shipped models' setting
def test_training_cache_and_serving_feed_the_network_the_same_tensors(normalization, shared_data, tiny_model_dir, tmp_path):
    """The tensor a training step reads from the cache (``SliceDataset``, not augmented) equals, bit for bit,
    the one the API gives the network for the same real TIFF uploaded."""
    pytest.importorskip("torch")
    from helpers import make_client, segment

    from brainseg.training.trainer import SliceDataset

    lgg = shared_data / "lgg" / "kaggle_3m"
    root = tmp_path / "data"
    for pid, numbers in REAL_SLICES.items():
        (root / pid).mkdir(parents=True)
        for n in numbers:
            for name in (f"{pid}_{n}.tif", f"{pid}_{n}_mask.tif"):
                (root / pid / name).symlink_to(require(lgg / pid / name))
    cfg = ExperimentConfig(preprocess=PreprocessConfig(normalization=normalization))
    cache = load_cache(build_cache(discover(root), cfg.preprocess, tmp_path / "cache", progress=False))
    training = SliceDataset(cache, np.arange(len(cache.patients)), cfg, augment=False)
    assert len(training) == sum(len(v) for v in REAL_SLICES.values())

    with make_client(tiny_model_dir) as client:
        seg = client.app.state.engine.get()
        seg.backend = recorder = RecordingBackend(seg.backend, cfg)
        for pos, (pid, n) in enumerate(zip(cache.patients, cache.slices, strict=False)):
            name = f"{pid}_{n}.tif"
            r = segment(client, (name, (root / pid / name).read_bytes(), "image/tiff"))
            assert r.status_code == 200, r.text
            served = recorder.batches[-1]
            assert served.shape == (1, 3, cfg.preprocess.input_size, cfg.preprocess.input_size) and served.dtype == np.float32
            assert np.array_equal(served[0], training[pos][0].numpy()), name
    assert len(recorder.batches) == len(training)


# ---------------------------------------------------------------- temporaries of killed builds

SLOW_BUILD = """
import sys, time
import brainseg.training.cache as cache
from brainseg.config import PreprocessConfig
from brainseg.io.datasets import discover
read = cache.read_pair
def slow(*a, **k):
    time.sleep(0.2)
    return read(*a, **k)
cache.read_pair = slow
cache.build_cache(discover(sys.argv[1]), PreprocessConfig(input_size=32), sys.argv[2], progress=False)
"""


def _temporaries(folder: Path, name: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(f".{name}.")) if folder.exists() else []


def test_sigterm_during_a_build_leaves_no_temporary_folder(tmp_path):
    """`kill PID` (SIGTERM) while the cache is being written: the build cleans up and exits 143, as Ctrl-C does."""
    import signal
    import subprocess
    import sys
    import time

    root = synthetic_dataset(tmp_path / "data", patients=2, slices=40, size=48)
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(root), str(runs / "c")], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(p.is_dir() and (p / "masks.npy").exists() for p in _temporaries(runs, "c")):  # writing has begun
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no temporary folder"
            )
            time.sleep(0.05)
        (tmp,) = _temporaries(runs, "c")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr.read().decode()[-2000:])
    assert _temporaries(runs, "c") == [] and not (runs / "c").exists()
    assert tmp.name.startswith(f".c.{proc.pid}.")  # the folder named its owner (for the next build, had this been kill -9)


def test_a_build_removes_temporaries_of_builds_that_died(tmp_path):
    """kill -9 cannot be caught: the next build of the same cache removes what such builds left
    (owner pid gone, pid now another process's, or an old pid-less name), and nothing else."""
    import subprocess
    import sys
    import time

    root = synthetic_dataset(tmp_path / "data", patients=3, slices=4, size=48)
    runs = tmp_path / "runs"
    runs.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.5)
        hour_ago = time.time() - 7200
        dead_owner = runs / f".c.{gone.pid}.abcd1234"
        running_owner = runs / f".c.{alive.pid}.efgh5678"  # made after its process started: a build still running
        reused_pid = runs / f".c.{alive.pid}.ijkl9012"  # made before that process started: its pid was reused
        old_unnamed, fresh_unnamed = runs / ".c.mnop3456", runs / ".c.qrst7890"
        other_cache, swap = runs / f".d.{gone.pid}.uvwx1234", runs / ".c.old"
        for d in (dead_owner, running_owner, reused_pid, old_unnamed, fresh_unnamed, other_cache, swap):
            d.mkdir()
            (d / "images.npy").write_bytes(b"x" * 1000)
        for d in (reused_pid, old_unnamed):
            os.utime(d, (hour_ago, hour_ago))
        build_cache(discover(root), PreprocessConfig(input_size=32), runs / "c", progress=False)
        left = {p.name for p in runs.iterdir()}
        assert left == {"c", running_owner.name, fresh_unnamed.name, other_cache.name, swap.name}, left
    finally:
        alive.kill()
        alive.wait()


def test_a_cache_serves_either_normalisation_but_not_other_arrays(tmp_path):
    """The normalisation is applied when a row is read, so a z-score run reuses a [0, 1] run's cache
    (it was rebuilt each time the two alternated); another size or CLAHE still needs its own."""
    from dataclasses import replace

    data = synthetic_dataset(tmp_path / "data", patients=3, slices=2, size=32)
    cache = tmp_path / "cache"
    assert main(["preprocess", "--data", str(data), "--cache", str(cache), *PRE]) == 0
    built = CFG.preprocess
    other = "zscore" if built.normalization == "minmax" else "minmax"
    assert cache_matches(cache, data, replace(built, normalization=other))
    assert not cache_matches(cache, data, replace(built, input_size=built.input_size * 2))
    assert not cache_matches(cache, data, replace(built, clahe=not built.clahe))


def test_each_input_size_has_its_own_cache_folder(tmp_path):
    base = tmp_path / "cache81z"
    assert sized_cache_dir(base, PreprocessConfig().input_size) == base
    assert sized_cache_dir(base, 256) == tmp_path / "cache81z_s256"
    assert sized_cache_dir(str(base) + "/", 64) == tmp_path / "cache81z_s64"
