"""The on-disk result store: round trip, expiry, caps, damaged files, several processes, and
``uvicorn --workers 2`` where one worker serves what the other made, also after a restart."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, server_env, start_uvicorn, stop
from helpers import BRATS, make_client, nifti, require, segment

from brainseg.io.synthetic import synthetic_slice
from brainseg.serving.settings import Settings
from brainseg.serving.store import ResultStore, StoredResult, default_result_dir


def volume_result(z: int = 5, size: int = 24, seed: int = 0, owner: str | None = "owner-hash") -> StoredResult:
    rng = np.random.default_rng(seed)
    display = rng.integers(0, 256, (z, size, size + 3, 3), dtype=np.uint8)  # W not a multiple of 8
    mask = rng.random((z, size, size + 3)) > 0.8
    affine = np.diag([0.9, 1.1, 2.5, 1.0])
    summary = {"id": "x", "kind": "volume", "lesion_voxels": int(mask.sum()), "name": "Müller 病人", "v": np.float32(0.5)}
    return StoredResult("volume", display, mask, summary, affine=affine, name="Müller 病人", owner=owner)


def age(store: ResultStore, rid: str, seconds: float) -> None:
    """Make a stored result look ``seconds`` old (its file's modification time is its age)."""
    t = time.time() - seconds
    os.utime(store.dir / f"{rid}.npz", (t, t))


def test_round_trip_keeps_arrays_metadata_and_owner(tmp_path):
    store = ResultStore(tmp_path / "r")
    res = volume_result()
    assert store.put(res) == res.id and len(store) == 1
    got = ResultStore(tmp_path / "r").get(res.id)  # another store on the folder: as another worker sees it
    assert (got.kind, got.name, got.owner, got.id) == ("volume", "Müller 病人", "owner-hash", res.id)
    assert got.summary == {**res.summary, "v": 0.5}
    np.testing.assert_array_equal(got.affine, res.affine)
    assert got.display.shape == res.display.shape and got.mask.shape == res.mask.shape
    for z in range(res.mask.shape[0]):
        np.testing.assert_array_equal(got.display[z], res.display[z])
        np.testing.assert_array_equal(got.mask[z], res.mask[z])
    np.testing.assert_array_equal(np.asarray(got.mask), res.mask)
    np.testing.assert_array_equal(np.asarray(got.display), res.display)
    assert got.nifti() == res.nifti()
    import nibabel as nib

    img = nib.Nifti1Image.from_bytes(gzip.decompress(got.nifti()))
    assert int(np.asarray(img.dataobj).sum()) == int(res.mask.sum())
    # The file is a plain .npz.
    with np.load(store.dir / f"{res.id}.npz") as npz:
        assert json.loads(bytes(npz["meta.json"]))["owner"] == "owner-hash"
        np.testing.assert_array_equal(npz["display_0002"], res.display[2])


def test_slice_result_and_unknown_or_unsafe_ids(tmp_path):
    store = ResultStore(tmp_path)
    img, mask = synthetic_slice(size=64)
    res = StoredResult("slice", img[None], mask[None], {"kind": "slice"}, name="s", owner=None)
    store.put(res)
    got = store.get(res.id)
    assert got.kind == "slice" and got.affine is None and got.owner is None
    np.testing.assert_array_equal(got.display[0], img)
    with pytest.raises(ValueError, match="only volume"):
        got.nifti()
    (tmp_path.parent / "outside.npz").write_bytes(store.dir.joinpath(f"{res.id}.npz").read_bytes())
    for rid in ["0" * 32, "../outside", res.id.upper(), res.id + "/", "", "x" * 32, f"../{tmp_path.name}/{res.id}"]:
        assert store.get(rid) is None and store.delete(rid) is False
    bad = volume_result()
    bad.id = "../escape"
    with pytest.raises(ValueError, match="32 lowercase hex"):
        store.put(bad)
    assert store.delete(res.id) is True and store.delete(res.id) is False and store.get(res.id) is None


def test_results_expire_after_the_ttl(tmp_path):
    store = ResultStore(tmp_path, ttl_s=60)
    old, new = volume_result(seed=1), volume_result(seed=2)
    store.put(old)
    store.put(new)
    age(store, old.id, 61)
    assert store.get(old.id) is None and not (tmp_path / f"{old.id}.npz").exists()
    assert store.get(new.id) is not None and len(store) == 1
    age(store, new.id, 61)
    assert len(store) == 0 and list(tmp_path.iterdir()) == []  # listing cleans up too


def test_caps_evict_the_oldest_and_keep_the_newest(tmp_path):
    store = ResultStore(tmp_path, max_items=2)
    a, b, c = (volume_result(seed=s) for s in range(3))
    for i, r in enumerate((a, b)):
        store.put(r)
        age(store, r.id, 100 - i)  # a older than b
    store.put(c)
    assert store.get(a.id) is None and store.get(b.id) is not None and store.get(c.id) is not None
    one = (tmp_path / f"{c.id}.npz").stat().st_size
    small = ResultStore(tmp_path, max_items=10, max_bytes=int(one * 1.5))  # room for one result, not two
    d = volume_result(seed=4)
    small.put(d)
    assert small.get(b.id) is None and small.get(c.id) is None and small.get(d.id) is not None
    big = volume_result(z=40, seed=5)  # alone above the byte cap: the newest still stays
    small.put(big)
    assert len(small) == 1 and small.get(big.id) is not None


def test_the_result_just_written_stays_when_another_clock_is_ahead(tmp_path):
    store = ResultStore(tmp_path, max_items=1)
    ahead, now = volume_result(seed=1), volume_result(seed=2)
    store.put(ahead)
    age(store, ahead.id, -1000)  # written by a machine whose clock is ahead: it looks newer than anything written here
    store.put(now)
    assert store.get(now.id) is not None and store.get(ahead.id) is None and len(store) == 1


def test_orphaned_temporary_files_are_removed(tmp_path):
    store = ResultStore(tmp_path)
    rid = "a" * 32
    stale, fresh, other = tmp_path / f".{rid}.npz.x1.tmp", tmp_path / f".{rid}.npz.x2.tmp", tmp_path / "notes.txt"
    for p in (stale, fresh, other):
        p.write_bytes(b"half a result")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    store.put(volume_result())
    assert not stale.exists() and fresh.exists() and other.exists()  # a writer may still be busy with the fresh one


def damaged_copies(good: bytes) -> dict[str, bytes]:
    """Ways an entry can be broken on disk (a crash without fsync, a full disk, a hand edit)."""

    def rezip(drop: str | None = None, replace: tuple[str, bytes] | None = None) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                if info.filename == drop:
                    continue
                data = replace[1] if replace and info.filename == replace[0] else src.read(info.filename)
                dst.writestr(info.filename, data)
        return out.getvalue()

    meta = json.loads(zipfile.ZipFile(io.BytesIO(good)).read("meta.json"))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # must never be unpickled
    pickled = buf.getvalue()
    return {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "garbage": b"PK\x03\x04" + bytes(range(256)) * 4,
        "no meta": rezip(drop="meta.json"),
        "bad json": rezip(replace=("meta.json", b"{not json")),
        "other format": rezip(replace=("meta.json", json.dumps({**meta, "format": 99}).encode())),
        "no mask": rezip(drop="mask_bits.npy"),
        "mask shape": rezip(replace=("meta.json", json.dumps({**meta, "mask_shape": [2, 2, 2]}).encode())),
        "a slice missing": rezip(drop="display_0003.npy"),
        "pickled mask": rezip(replace=("mask_bits.npy", pickled)),
    }


def test_damaged_entries_are_not_results(tmp_path):
    store = ResultStore(tmp_path)
    res = volume_result()
    store.put(res)
    good = (tmp_path / f"{res.id}.npz").read_bytes()
    for what, data in damaged_copies(good).items():
        (tmp_path / f"{res.id}.npz").write_bytes(data)
        assert store.get(res.id) is None, what
        assert not (tmp_path / f"{res.id}.npz").exists(), what  # removed: it can never become whole


def flip_member_bytes(path: Path, member: str) -> None:
    """Corrupt the compressed bytes of one member in place (the zip directory stays valid)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 2, start + min(info.compress_size, 40)):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def small_volume(z: int = 6) -> bytes:
    img, _ = synthetic_slice(size=64, seed=2)
    return nifti(np.stack([np.rot90(img[:, :, 1], -1).astype(np.float32)] * z, axis=2), np.diag([1.0, 1.0, 3.0, 1.0]))


def test_damaged_results_through_http_are_clean_404s(tiny_model_dir, tmp_path):
    with make_client(tiny_model_dir, result_dir=str(tmp_path)) as c:
        rid = segment(c, ("v.nii.gz", small_volume())).json()["id"]
        path = tmp_path / f"{rid}.npz"
        good = path.read_bytes()
        for what, data in damaged_copies(good).items():
            path.write_bytes(data)
            for url in ("", "/mask.nii.gz", "/slice/1.png", "/mask.png?z=1"):
                r = c.get(f"/v1/results/{rid}{url}")
                assert r.status_code == 404 and set(r.json()) == {"detail"} and "not found" in r.json()["detail"], (what, url, r.text)
        # Damage a slice the check on opening does not read: found when that slice is asked for.
        path.write_bytes(good)
        flip_member_bytes(path, "display_0002.npy")
        assert c.get(f"/v1/results/{rid}/slice/1.png").status_code == 200
        r = c.get(f"/v1/results/{rid}/slice/2.png")
        assert r.status_code == 404 and r.json() == {"detail": "result not readable: it was damaged on the server and has been removed"}
        assert not path.exists() and c.get(f"/v1/results/{rid}").status_code == 404
        assert c.get("/health").json()["results_kept"] == 0


def test_a_brats_volume_is_small_on_disk_and_in_memory(tmp_path):
    """Issue 8: each stored 240x240x155 result cost ~33 MB of RAM. Now a few MB of disk, ~1 MB to read a slice."""
    from brainseg.io.volumes import load_volume
    from brainseg.serving.render import display_volume

    vol = load_volume([require(BRATS / f"BraTS-MET-00110-000-{s}.nii.gz") for s in ("t1n", "t2f", "t1c")])
    display = display_volume(vol.slices)
    assert display.shape == (155, 240, 240, 3)
    mask = np.zeros(display.shape[:3], bool)
    mask[60:90, 100:140, 90:150] = True
    store = ResultStore(tmp_path)
    res = StoredResult("volume", display, mask, {"kind": "volume"}, affine=vol.affine, name="brats")
    store.put(res)
    assert store.flush(60)  # written stored at once, deflated in the background
    on_disk = (tmp_path / f"{res.id}.npz").stat().st_size
    assert on_disk < 8 * 2**20, on_disk  # 26.8 MB of display and 8.9 MB of mask as arrays
    tracemalloc.start()
    got = store.get(res.id)
    np.testing.assert_array_equal(got.display[75], display[75])
    np.testing.assert_array_equal(got.mask[75], mask[75])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * 2**20, peak  # the packed mask (1.1 MB) and one slice, not the volume


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from brainseg.serving.store import ResultStore, StoredResult
    directory, seed = sys.argv[1], int(sys.argv[2])
    store = ResultStore(directory, max_items=12)
    mine = []
    for i in range(15):
        value = seed * 100 + i
        res = StoredResult("volume", np.full((20, 32, 40, 3), value % 251, np.uint8), np.full((20, 32, 40), i % 2 == 0), {"value": value},
                           affine=np.eye(4), name=str(value), owner=str(seed))
        mine.append(store.put(res))
        for rid in mine[-4:]:  # read back while the others write and evict
            got = store.get(rid)
            if got is None:
                continue
            v = got.summary["value"]
            assert got.name == str(v) and got.owner == str(seed), (got.name, v)
            assert all((got.display[z] == v % 251).all() for z in range(20)), v
            assert np.asarray(got.mask).all() == (v % 100 % 2 == 0), v
    print("OK", len(mine))
    """
)


def test_several_processes_write_and_read_at_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(s)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=False):
        assert p.returncode == 0 and out.decode().strip() == "OK 15", err.decode()[-2000:]
    store = ResultStore(tmp_path, max_items=12)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert 1 <= len(store) <= 12 and all(n.endswith(".npz") and not n.startswith(".") for n in names), names
    for name in names:  # every entry left is whole and holds what its writer wrote
        got = store.get(name[:-4])
        v = got.summary["value"]
        assert got.owner == str(v // 100) and (np.asarray(got.display) == v % 251).all() and np.asarray(got.mask).all() == (v % 2 == 0)


def test_settings_choose_the_folder(tmp_path):
    s = Settings.from_env({"BRAINSEG_RESULT_DIR": str(tmp_path / "shared"), "BRAINSEG_MAX_RESULTS": "3", "BRAINSEG_RESULT_TTL_S": "10"})
    store = ResultStore.from_settings(s)
    assert store.dir == tmp_path / "shared" and store.dir.is_dir() and (store.max_items, store.ttl_s) == (3, 10)
    assert (store.dir.stat().st_mode & 0o777) == 0o700  # results hold patients' images
    assert ResultStore.from_settings(Settings()).dir == default_result_dir()


# ---------------------------------------------------------------- two workers, then a restart


def start_workers(model_dir: Path, result_dir: Path, log: Path, workers: int) -> tuple[str, subprocess.Popen]:
    """``uvicorn`` with ``workers`` processes serving ``app:app`` (plus a PID header, tests/pid_app.py)."""
    env = server_env(model_dir, BRAINSEG_RESULT_DIR=str(result_dir), BRAINSEG_API_KEY="k1,k2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env["PYTHONPATH"]])
    return start_uvicorn("pid_app:app", env, log, "--workers", str(workers))


def answers_from(url: str, path: str, pids: set[str], tries: int = 300, **kw) -> dict[str, list]:
    """GET ``path`` on fresh connections until each PID in ``pids`` has answered; the answers by PID."""
    import httpx

    seen: dict[str, list] = {}
    for _ in range(tries):
        r = httpx.get(url + path, timeout=30, **kw)  # a new connection each time, so either worker may take it
        seen.setdefault(r.headers["x-worker-pid"], []).append(r)
        if pids <= set(seen):
            break
    return seen


def test_two_workers_share_results_and_a_restart_keeps_them(tiny_model_dir, tmp_path):
    import httpx

    k1, k2 = {"X-API-Key": "k1"}, {"X-API-Key": "k2"}
    url, proc = start_workers(tiny_model_dir, tmp_path / "results", tmp_path / "uvicorn.log", workers=2)
    try:
        workers: set[str] = set()
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:  # until the second worker is up too
            workers.add(httpx.get(url + "/health", timeout=10).headers["x-worker-pid"])
        assert len(workers) == 2, f"only {workers} answered"
        r = httpx.post(url + "/v1/segment", files={"files": ("v.nii.gz", small_volume())}, headers=k1, timeout=120)
        assert r.status_code == 200, r.text
        rid, maker = r.json()["id"], r.headers["x-worker-pid"]
        seen = answers_from(url, f"/v1/results/{rid}/mask.nii.gz", workers, headers=k1)
        assert set(seen) == workers, "the other worker never answered"
        other = (workers - {maker}).pop()
        assert [a.status_code for a in seen[other]] == [200] * len(seen[other])  # made by one worker, served by the other
        assert [a.status_code for a in seen[maker]] == [200] * len(seen[maker])
        bodies = {gzip.decompress(a.content) for answers in seen.values() for a in answers}  # the gzip header holds a time
        assert len(bodies) == 1
        mask = bodies.pop()
        for pid, answers in answers_from(url, f"/v1/results/{rid}", workers, headers=k2).items():
            assert all(a.status_code == 404 for a in answers), pid  # another key's result: not found, in every worker
        # Deleted through one worker: gone in both.
        gone = httpx.post(url + "/v1/segment", files={"files": ("v.nii.gz", small_volume())}, headers=k1, timeout=120).json()["id"]
        assert httpx.delete(f"{url}/v1/results/{gone}", headers=k1).status_code == 204
        for answers in answers_from(url, f"/v1/results/{gone}", workers, headers=k1).values():
            assert all(a.status_code == 404 for a in answers)
    finally:
        stop(proc)
    for pid in workers:  # the workers went with the server
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)

    url, proc = start_workers(tiny_model_dir, tmp_path / "results", tmp_path / "uvicorn.log", workers=1)
    try:
        r = httpx.get(f"{url}/v1/results/{rid}/mask.nii.gz", headers=k1, timeout=30)
        assert r.status_code == 200 and gzip.decompress(r.content) == mask
        assert httpx.get(f"{url}/v1/results/{rid}", headers=k1).json()["id"] == rid
        assert httpx.get(f"{url}/v1/results/{rid}", headers=k2).status_code == 404  # the owner survives the restart too
        assert httpx.get(f"{url}/health").json()["results_kept"] == 1
    finally:
        stop(proc)


# ---------------------------------------------------------------- who may read the results


def test_result_files_are_private(tmp_path, monkeypatch):
    """Result files hold the images (a DICOM SEG the patient's name): 0600 from their creation on (the
    temporary file is renamed, never re-opened), 0660 in a folder shared with a group."""
    import stat

    seen_modes = []
    store = ResultStore(tmp_path / "r")
    real_replace = os.replace

    def replace(src, dst):  # the temporary file's mode just before the rename
        seen_modes.append(stat.S_IMODE(os.stat(src).st_mode))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    rid = store.put(volume_result())
    monkeypatch.undo()
    assert seen_modes == [0o600]
    assert stat.S_IMODE((store.dir / f"{rid}.npz").stat().st_mode) == 0o600
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)
    rid = ResultStore(shared, shared=True).put(volume_result())
    assert stat.S_IMODE((shared / f"{rid}.npz").stat().st_mode) == 0o660


@pytest.mark.parametrize(
    "mode, shared, refused",
    [(0o700, False, None), (0o755, False, "other users"), (0o750, False, "its group"), (0o711, False, None),
     (0o770, True, None), (0o2770, True, None), (0o775, True, "other users"), (0o777, True, "other users")],
)  # fmt: skip
def test_a_result_folder_others_can_read_is_refused(tmp_path, mode, shared, refused):
    from brainseg.serving.settings import StartupError

    folder = tmp_path / "results"
    folder.mkdir()
    folder.chmod(mode)
    if refused is None:
        ResultStore(folder, shared=shared)
        return
    with pytest.raises(StartupError) as exc:
        ResultStore(folder, shared=shared)
    msg = str(exc.value)
    assert str(folder) in msg and refused in msg and f"{mode & 0o777:03o}" in msg
    assert ("chmod o-rwx" if shared else "chmod 700") in msg and "BRAINSEG_RESULT_DIR_SHARED" in msg


def test_the_server_does_not_start_on_a_folder_others_can_read(tiny_model_dir, tmp_path):
    """A real uvicorn on an existing 0755 result folder: no start, a message naming the folder and the fix;
    BRAINSEG_RESULT_DIR_SHARED=1 lets a group (not others) share it."""
    import httpx

    folder = tmp_path / "results"
    folder.mkdir()
    folder.chmod(0o755)
    log = tmp_path / "uvicorn.log"
    env = server_env(tiny_model_dir, BRAINSEG_RESULT_DIR=str(folder))
    with pytest.raises(RuntimeError, match="exited with 3"):
        url, proc = start_uvicorn("app:app", env, log)
        stop(proc)
    text = log.read_text(errors="replace")
    assert f"brainseg: cannot start: the result folder {folder} can be read or written by other users (mode 755)" in text, text[-2000:]
    assert f"chmod 700 {folder}" in text and "Traceback" not in text
    folder.chmod(0o2770)
    url, proc = start_uvicorn("app:app", {**env, "BRAINSEG_RESULT_DIR_SHARED": "1"}, log)
    try:
        r = httpx.post(url + "/v1/segment", files={"files": ("v.nii.gz", small_volume())}, timeout=120)
        assert r.status_code == 200, r.text
        assert (os.stat(folder / f"{r.json()['id']}.npz").st_mode & 0o777) == 0o660
    finally:
        stop(proc)
