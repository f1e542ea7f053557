"""The request path (issue 19): optional answer images (``return``), the result store written
stored and compacted in the background, and a crash after an answer losing nothing."""

from __future__ import annotations

import base64
import gzip
import os
import signal
import zipfile

import cv2
import numpy as np
import pytest
from conftest import start_api, stop
from helpers import make_client, nifti, segment, tiff

from brainseg.io.synthetic import synthetic_png, synthetic_slice
from brainseg.serving import answers
from brainseg.serving.store import ResultStore, StoredResult


def slice_tiff() -> bytes:
    img, _ = synthetic_slice(size=64, seed=1)
    return tiff(img)


def volume_nifti(z: int = 6, size: int = 64) -> bytes:
    img, _ = synthetic_slice(size=size, seed=2)
    return nifti(np.stack([np.rot90(img[:, :, 1], -1).astype(np.float32)] * z, axis=2), np.diag([1.0, 1.0, 3.0, 1.0]))


@pytest.fixture
def counted(monkeypatch):
    """Counts the answers' PNG encodings and overlay drawings (the work ``return`` may spare)."""
    calls = {"b64png": 0, "render": 0}

    def wrap(name, fn):
        def counting(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)

        monkeypatch.setattr(answers, name, counting)

    wrap("b64png", answers.b64png)
    wrap("render", answers.render)
    return calls


def test_a_slice_answer_carries_only_the_images_asked_for(tiny_model_dir, counted):
    with make_client(tiny_model_dir) as c:
        default = segment(c, ("s.tif", slice_tiff()))
        assert default.status_code == 200, default.text
        assert {"mask_png", "overlay_png"} <= set(default.json()) and counted == {"b64png": 2, "render": 1}

        counted.update(b64png=0, render=0)
        none = segment(c, ("s.tif", slice_tiff()), **{"return": "none"}).json()
        assert "mask_png" not in none and "overlay_png" not in none
        assert counted == {"b64png": 0, "render": 0}  # not computed, not only left out
        assert none["lesion_area_px"] == default.json()["lesion_area_px"] and none["urls"]["mask_png"].endswith("/mask.png")

        mask_only = c.post("/v1/segment?return=mask_png", files=[("files", ("s.tif", slice_tiff()))]).json()  # the query string works too
        assert "overlay_png" not in mask_only and counted == {"b64png": 1, "render": 0}
        png = cv2.imdecode(np.frombuffer(base64.b64decode(mask_only["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert int((png > 0).sum()) == none["lesion_area_px"]
        # The mask left out of the answer is still the stored result's.
        stored = c.get(none["urls"]["mask_png"])
        assert stored.status_code == 200
        assert int((cv2.imdecode(np.frombuffer(stored.content, np.uint8), cv2.IMREAD_UNCHANGED) > 0).sum()) == none["lesion_area_px"]


def test_a_volume_answer_without_its_preview(tiny_model_dir, counted):
    with make_client(tiny_model_dir) as c:
        body = segment(c, ("v.nii.gz", volume_nifti()), **{"return": "none"}).json()
        assert "preview_png" not in body and counted == {"b64png": 0, "render": 0}
        assert {"decode", "inference", "network", "answer", "store", "total"} <= set(body["timings_ms"])
        assert 0 < body["timings_ms"]["network"] <= body["timings_ms"]["inference"]
        assert body["timings_ms"]["store"] <= body["timings_ms"]["answer"]
        assert "preview_png" in segment(c, ("v.nii.gz", volume_nifti())).json()


@pytest.mark.parametrize("value", ["mask", "mask_png,nifti", "../x"])
def test_an_unknown_return_name_is_a_422(tiny_model_dir, value):
    with make_client(tiny_model_dir) as c:
        r = segment(c, ("s.tif", slice_tiff()), **{"return": value})
        assert r.status_code == 422 and "mask_png, overlay_png, preview_png" in r.json()["detail"]


# ---------------------------------------------------------------- the store


def big_result(z: int = 30, size: int = 240) -> StoredResult:
    rng = np.random.default_rng(3)
    display = np.zeros((z, size, size, 3), np.uint8)
    display[:, 40:200, 40:200] = rng.integers(0, 40, (z, 160, 160, 3), dtype=np.uint8)  # compressible, like a brain on black
    mask = np.zeros((z, size, size), bool)
    mask[10:20, 100:140, 90:150] = True
    prob = (mask * 230).astype(np.uint8)
    return StoredResult("volume", display, mask, {"kind": "volume"}, affine=np.eye(4), name="big", owner="o", prob=prob)


def members_compressed(path) -> set[int]:
    with zipfile.ZipFile(path) as zf:
        return {info.compress_type for info in zf.infolist() if info.filename.startswith("display_")}


def test_a_result_is_whole_on_disk_when_put_returns_and_compacted_later(tmp_path, monkeypatch):
    store = ResultStore(tmp_path, compact_above=1 << 20)
    gate = []
    monkeypatch.setattr(store, "compact", lambda rid, st: gate.append((rid, st)) or False)  # hold compaction back
    res = big_result()
    rid = store.put(res)
    path = tmp_path / f"{rid}.npz"
    assert members_compressed(path) == {zipfile.ZIP_STORED}  # written stored, at once
    got = ResultStore(tmp_path).get(rid)  # another worker reads it before any compaction
    np.testing.assert_array_equal(np.asarray(got.display), res.display)
    np.testing.assert_array_equal(np.asarray(got.mask), res.mask)
    assert store.flush(10) and len(gate) == 1

    stored_size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    monkeypatch.undo()
    assert store.compact(*gate[0]) is True
    assert members_compressed(path) == {zipfile.ZIP_DEFLATED}
    assert path.stat().st_size < stored_size / 3 and path.stat().st_mtime_ns == mtime  # its age (TTL) unchanged
    got = store.get(rid)
    np.testing.assert_array_equal(np.asarray(got.display), res.display)
    np.testing.assert_array_equal(np.asarray(got.prob), res.prob)
    assert got.owner == "o" and got.nifti() == res.nifti()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_the_background_compactor_deflates_volumes_not_slices(tmp_path):
    store = ResultStore(tmp_path, compact_above=1 << 20)
    big = store.put(big_result())
    img, _ = synthetic_slice(size=64)
    small = store.put(StoredResult("slice", img[None], np.zeros((1, 64, 64), bool), {}))
    assert store.flush(30) and store.compactor.done == 1
    assert members_compressed(tmp_path / f"{big}.npz") == {zipfile.ZIP_DEFLATED}
    assert members_compressed(tmp_path / f"{small}.npz") == {zipfile.ZIP_STORED}


def test_a_result_deleted_before_its_compaction_stays_deleted(tmp_path, monkeypatch):
    store = ResultStore(tmp_path, compact_above=1 << 20)
    held = []
    monkeypatch.setattr(store.compactor, "submit", lambda rid, st: held.append((rid, st)) or True)
    rid = store.put(big_result())
    assert store.delete(rid)
    assert store.compact(*held[0]) is False and not (tmp_path / f"{rid}.npz").exists()
    # Replaced by another writer meanwhile (same id, new file): not overwritten with the old content.
    rid2 = store.put(big_result())
    (tmp_path / "copy").write_bytes((tmp_path / f"{rid2}.npz").read_bytes())
    os.replace(tmp_path / "copy", tmp_path / f"{rid2}.npz")  # a new file under the same name
    assert store.compact(*held[1]) is False and members_compressed(tmp_path / f"{rid2}.npz") == {zipfile.ZIP_STORED}


def test_a_full_compaction_queue_makes_put_deflate_itself(tmp_path, monkeypatch):
    store = ResultStore(tmp_path, compact_above=1 << 20)
    monkeypatch.setattr(store.compactor, "submit", lambda rid, st: False)
    rid = store.put(big_result())
    assert members_compressed(tmp_path / f"{rid}.npz") == {zipfile.ZIP_DEFLATED}


def test_compaction_off_deflates_in_put(tmp_path):
    store = ResultStore(tmp_path, compact_above=None)
    rid = store.put(big_result())
    assert store.compactor is None and members_compressed(tmp_path / f"{rid}.npz") == {zipfile.ZIP_DEFLATED}


def test_a_server_killed_right_after_an_answer_loses_nothing(tiny_model_dir, tmp_path):
    """SIGKILL the server the instant a volume (big enough to be compacted in the background) is
    answered; a new server on the same folder serves the result, the mask the answer described."""
    import httpx

    results = tmp_path / "results"
    url, proc, _ = start_api(tiny_model_dir, tmp_path / "a.log", BRAINSEG_RESULT_DIR=str(results))
    try:
        r = httpx.post(url + "/v1/segment", files={"files": ("v.nii.gz", volume_nifti(z=24, size=256))}, data={"return": "none"}, timeout=300)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert r.status_code == 200, r.text
    body = r.json()
    url, proc, _ = start_api(tiny_model_dir, tmp_path / "b.log", BRAINSEG_RESULT_DIR=str(results))
    try:
        summary = httpx.get(f"{url}/v1/results/{body['id']}", timeout=30)
        assert summary.status_code == 200 and summary.json()["lesion_voxels"] == body["lesion_voxels"]
        mask = httpx.get(url + body["mask_url"], timeout=30)
        assert mask.status_code == 200
        import nibabel as nib

        img = nib.Nifti1Image.from_bytes(gzip.decompress(mask.content))
        assert img.shape == (256, 256, 24) and int(np.asarray(img.dataobj).astype(bool).sum()) == body["lesion_voxels"]
    finally:
        stop(proc)


# ---------------------------------------------------------------- memory


def test_the_allocator_is_bounded_at_start_and_trimmed_after_volumes(tiny_model_dir, monkeypatch):
    from brainseg.serving import allocator, engine
    from brainseg.serving.routes import segment as route

    arenas, kept, trims = [], [], []
    monkeypatch.setattr(engine, "limit_arenas", arenas.append)
    monkeypatch.setattr(engine, "keep_freed", kept.append)
    monkeypatch.setattr(route, "trim", lambda: trims.append(1) or True)
    with make_client(tiny_model_dir, malloc_arenas=3, malloc_keep_mb=64, inline_png_max_pixels=64 * 64) as c:
        assert arenas[-1] == 3 and kept[-1] == 64  # (importing the api module makes its default app first)
        assert segment(c, ("s.tif", slice_tiff())).status_code == 200 and trims == []  # a small slice: its buffers are reused
        assert segment(c, ("v.nii.gz", volume_nifti())).status_code == 200 and trims == [1]
        assert segment(c, ("big.png", synthetic_png(size=96))).status_code == 200 and trims == [1, 1]  # above the inline size
    if allocator._LIBC is None:
        pytest.skip("not glibc: limit_arenas, keep_freed and trim do nothing here")
    assert allocator.limit_arenas(2) is True and allocator.limit_arenas(0) is False
    assert allocator.keep_freed(256) is True and allocator.keep_freed(0) is False
    assert isinstance(allocator.trim(), bool)
