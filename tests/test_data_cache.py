"""The decode cache: on-disk store equals fresh decoding, one decode per machine, bad caches and disks."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelseg.data import load_split
from pixelseg.data import base
from pixelseg.data.base import CacheSpec, FileDataset
from pixelseg.data.synthetic import write_folder
from conftest import tiny_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_folder(root, 10, (40, 56), seed=3, vary=True)
    return root


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _arrays(ds):
    return [np.asarray(ds.images[i]) for i in range(len(ds))], [np.asarray(ds.masks[i]) for i in range(len(ds))]


def _same(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("full_res", [False, True])
def test_disk_store_equals_fresh_decoding(folder, cache, full_res):
    spec = lambda mode: CacheSpec(mode, full_res, 36 if full_res else None)  # noqa: E731
    fresh = load_split("folder", folder, "train", (24, 32), use_cache=spec("memory"))
    first = load_split("folder", folder, "train", (24, 32), use_cache=spec("mmap"))
    again = load_split("folder", folder, "train", (24, 32), use_cache=spec("mmap"))  # read back, not decoded
    assert first.store is not None and again.store is not None and fresh.store is None
    fi, fm = _arrays(fresh)
    for ds in (first, again):
        assert ds.names == fresh.names
        di, dm = _arrays(ds)
        assert _same(di, fi) and _same(dm, fm)
    if full_res:  # source sizes differ; the longer side is capped at 36
        assert len({a.shape for a in fi}) > 1 and max(max(a.shape[:2]) for a in fi) == 36
    else:
        assert isinstance(again.images, np.memmap) and again.images.shape == (len(fresh), 24, 32, 3)
        imgs, masks = again.__getitems__([3, 0, 3])
        assert torch.equal(imgs, torch.from_numpy(np.stack([fi[3], fi[0], fi[3]])).permute(0, 3, 1, 2))
        assert torch.equal(masks, torch.from_numpy(np.stack([fm[3], fm[0], fm[3]])).long())
    # --cache none reads the same arrays, one sample at a time
    none = load_split("folder", folder, "train", (24, 32), use_cache=spec("none"))
    assert isinstance(none, FileDataset)
    for i in range(len(none)):
        img, mask = none[i]
        assert np.array_equal(img.permute(1, 2, 0).numpy(), fi[i]) and np.array_equal(mask.numpy(), fm[i])


def test_store_survives_pickling_for_workers(folder, cache):
    import pickle
    ds = load_split("folder", folder, "train", (24, 32))
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the pixels are not pickled: the copy reopens the store
    copy = pickle.loads(blob)
    assert torch.equal(copy.__getitems__([1, 2])[0], ds.__getitems__([1, 2])[0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=base.collate_batch)
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, torch.from_numpy(np.array(ds.images)).permute(0, 3, 1, 2))


_RANK = textwrap.dedent("""
    import sys, time, os
    from pathlib import Path
    import numpy as np
    from pixelseg.data import base, load_split
    log, go, root, out = sys.argv[1:5]
    orig = base.read_image
    def counted(path, *a, **k):
        with open(log, "a") as f:
            f.write(f"{path}\\n")
        time.sleep(0.02)  # keep the decoder busy long enough for the other process to arrive
        return orig(path, *a, **k)
    base.read_image = counted
    while not os.path.exists(go):  # start both processes together, like torchrun's ranks
        time.sleep(0.01)
    ds = load_split("folder", root, "train", (24, 32))
    np.save(out, np.asarray(ds.images))
""")


def test_two_processes_decode_each_file_once(folder, cache, tmp_path):
    log, go = tmp_path / "decodes.log", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(log), str(go), str(folder), str(tmp_path / f"r{r}.npy")],
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    go.touch()
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    decoded = log.read_text().split()
    train = load_split("folder", folder, "train", (24, 32), use_cache=False)
    assert len(decoded) == len(train) and len(set(decoded)) == len(decoded)  # every file exactly once
    a, b = np.load(tmp_path / "r0.npy"), np.load(tmp_path / "r1.npy")
    assert np.array_equal(a, b) and np.array_equal(a, train.images)
    # at most one process waited for the other's decode (the mask scan has its own lock and message)
    assert sum("waiting for another process that is decoding folder-" in e for e in errs) <= 1


def _cache_dirs(cache):
    return [p for p in (cache / "decoded").iterdir() if p.is_dir()]


def test_old_version_and_damaged_caches_are_replaced(folder, cache, capsys):
    ref = load_split("folder", folder, "train", (24, 32), use_cache=False)
    load_split("folder", folder, "train", (24, 32))
    (cdir,) = _cache_dirs(cache)
    meta = json.loads((cdir / "meta.json").read_text())
    meta["version"] = 1
    (cdir / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    ds = load_split("folder", folder, "train", (24, 32))
    err = capsys.readouterr().err
    assert f"decode cache {cdir} was written by an older pixelseg (cache format 1" in err
    assert np.array_equal(ds.images, ref.images)
    assert json.loads((cdir / "meta.json").read_text())["version"] == base.CACHE_VERSION
    # a truncated pixel file is noticed by its size, not read
    with open(cdir / "images.u8", "r+b") as f:
        f.truncate(100)
    ds = load_split("folder", folder, "train", (24, 32))
    assert "holds 100 bytes" in capsys.readouterr().err
    assert np.array_equal(ds.images, ref.images)


def test_half_written_cache_is_never_read(folder, cache):
    ref = load_split("folder", folder, "train", (24, 32), use_cache=False)
    ds = load_split("folder", folder, "train", (24, 32))
    (cdir,) = _cache_dirs(cache)
    # what a killed writer leaves: the pixel files without meta.json (written last)
    (cdir / "meta.json").unlink()
    with open(cdir / "images.u8", "r+b") as f:
        f.write(b"\xff" * 64)
    del ds
    again = load_split("folder", folder, "train", (24, 32))
    assert np.array_equal(again.images, ref.images)


def test_unwritable_cache_dir_falls_back_in_one_line(folder, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PIXELSEG_CACHE", str(blocker / "cache"))  # like a read-only mount: mkdir fails
    ref = load_split("folder", folder, "train", (24, 32), use_cache=False)
    capsys.readouterr()
    ds = load_split("folder", folder, "train", (24, 32))
    err = [line for line in capsys.readouterr().err.splitlines() if "decode cache" in line]
    assert len(err) == 1 and f"{blocker / 'cache' / 'decoded'}" in err[0] and "--cache none" in err[0]
    assert isinstance(ds, FileDataset)
    assert torch.equal(ds.__getitems__([0, 1])[0], ref.__getitems__([0, 1])[0])


def test_full_disk_while_writing_falls_back_and_leaves_nothing(folder, cache, monkeypatch, capsys):
    import errno

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(base, "open", lambda p, mode="r": Full(open(p, mode)), raising=False)
    ds = load_split("folder", folder, "train", (24, 32))
    err = capsys.readouterr().err
    assert "the disk is full" in err and isinstance(ds, FileDataset)
    assert not list((cache / "decoded").glob("*tmp*"))  # the partial store was removed
    assert not _cache_dirs(cache)


def test_workers_auto(monkeypatch):
    from pixelseg.training.train import resolve_workers
    assert resolve_workers("auto", per_sample_work=False) == 0  # whole-batch reads need no workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    one = resolve_workers("auto", per_sample_work=True)
    assert 1 <= one <= 8 and resolve_workers(3, per_sample_work=False) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert resolve_workers("auto", per_sample_work=True) == 1


def test_train_crops_from_files_decoded_on_the_fly(folder, cache, tmp_path):
    import yaml
    from pixelseg.cli import main
    run = tmp_path / "run"
    assert main(["train", *tiny_run(dataset="folder", data_root=folder, limit=None, image_size=16, crop=True,
                                    scale_range="0.5,1.5", cache="none", batch_size=4, epochs=1, run_dir=run)]) == 0
    log = (run / "train.log").read_text()
    assert "(crops of the source resolution); cache none; DataLoader workers" in log
    assert "DataLoader workers 0" not in log
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["cache"] == "none" and cfg["workers"] == "auto"
    assert not (cache / "decoded").exists()  # nothing decoded up front, nothing written
    with pytest.raises(SystemExit):
        main(["train", "--cache", "sometimes"])
