"""WebDataset shards: round trip, exactly-once splitting across processes and workers, damaged shards, CLI."""
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelseg.cli import main
from pixelseg.data import load_split
from pixelseg.data.base import CacheSpec
from pixelseg.data.io import read_image
from pixelseg.data.shards import ShardDataset, read_index
from pixelseg.data.shards_write import write_shards
from pixelseg.data.synthetic import write_folder
from pixelseg.core.errors import PixelsegError
from conftest import tiny_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_folder(root, 12, (40, 56), seed=5, vary=True)
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        write_shards("folder", folder, split, out, maxcount=3, progress=False)
    return out


def test_round_trip_is_identical_to_the_source(folder, shards):
    index, urls, counts = read_index(shards, "train")
    src = load_split("folder", folder, "train", (8, 8), use_cache=CacheSpec("none", full_res=True))
    assert index["count"] == len(src) == sum(counts) and len(urls) == -(-len(src) // 3)
    got = {name: (img, mask) for name, img, mask in
           ShardDataset(urls, counts, src.info, (8, 8), full_res=True).iter_samples()}
    assert sorted(got) == sorted(src.names)
    for s in src.samples:
        img, mask = got[s.name]
        ref_mask = src.reader(s)[1]
        assert np.array_equal(img, read_image(s.image)) and np.array_equal(mask, ref_mask)
    # at a fixed size, shards give the very arrays the decode cache holds
    cached = load_split("folder", folder, "train", (24, 32))
    fixed = {n: (i, m) for n, i, m in ShardDataset(urls, counts, src.info, (24, 32)).iter_samples()}
    for i, name in enumerate(cached.names):
        assert np.array_equal(fixed[name][0], cached.images[i]) and np.array_equal(fixed[name][1], cached.masks[i])


def test_brace_pattern_and_missing_index(shards, tmp_path):
    _, urls, counts = read_index(str(shards / "{split}-{000000..000001}.tar"), "train")
    assert [Path(u).name for u in urls] == ["train-000000.tar", "train-000001.tar"] and counts == [3, 3]
    with pytest.raises(PixelsegError, match="train.json: cannot read the shard index"):
        read_index(tmp_path, "train")


_RANK = textwrap.dedent("""
    import json, sys
    import torch
    from pixelseg.data import load_split
    rank, root, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    ds = load_split("shards", root, "train", (8, 8)).configure(3, 2, rank, 2, shuffle=True, even=True, seed=1)
    ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    ids, sizes = [], []
    for images, masks in loader:
        sizes.append(len(images))
        ids += (images[:, 0, 0, 0].int() + 256 * images[:, 1, 0, 0].int()).tolist()  # the sample's id, see below
    json.dump({"ids": ids, "sizes": sizes, "planned": ds.num_batches()}, open(out, "w"))
""")


# many shards (split by shard), one shard (by sample); 25 at batch 3 on 2 ranks: 13 + 12 samples, the short
# rank's last batch would be empty (13 = 4 x 3 + 1), so the batch before it shrinks: nothing is read twice
@pytest.mark.parametrize("n,maxcount", [(23, 4), (9, 9), (25, 4), (25, 25)])
def test_two_process_epoch_sees_every_sample_once(tmp_path, n, maxcount):
    from pixelseg.data.shards import INDEX_FORMAT  # noqa: F401  (shards module importable)
    root = tmp_path / "ids"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):  # lossless images whose first pixel encodes the sample id
        img = np.zeros((8, 8, 3), np.uint8)
        img[..., 0], img[..., 1] = i % 256, i // 256
        Image.fromarray(img).save(root / "images" / f"s{i:03d}.png")
        Image.fromarray(np.full((8, 8), i % 2, np.uint8)).save(root / "masks" / f"s{i:03d}.png")
    (root / "train.txt").write_text("\n".join(f"s{i:03d}" for i in range(n)))
    (root / "val.txt").write_text("")
    out = tmp_path / "shards"
    write_shards("folder", root, "train", out, maxcount=maxcount, progress=False)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(r), str(out), str(tmp_path / f"r{r}.json")],
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    res = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    ids = res[0]["ids"] + res[1]["ids"]
    assert sorted(ids) == list(range(n))  # every sample exactly once across ranks and workers
    assert len(res[0]["sizes"]) == len(res[1]["sizes"]) == res[0]["planned"] == res[1]["planned"]  # in step
    assert max(res[0]["sizes"] + res[1]["sizes"]) <= 3


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_damaged_shards_are_reported_and_skipped(shards, tmp_path, capsys):
    index, urls, counts = read_index(shards, "train")
    info = load_split("shards", shards, "train", (8, 8)).info
    img, mask = np.zeros((6, 6, 3), np.uint8), np.zeros((6, 6), np.uint8)
    bad = tmp_path / "bad.tar"
    _tar(bad, [("a.img.png", _png(img)), ("a.seg.png", _png(mask)),          # fine
               ("b.img.png", _png(img)),                                    # mask missing
               ("c.img.png", _png(img)), ("c.seg.png", _png(mask[:4])),    # size mismatch
               ("d.img.png", b"not an image"), ("d.seg.png", _png(mask))])  # corrupt image
    truncated = tmp_path / "trunc.tar"
    data = Path(urls[0]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    ds = ShardDataset([str(bad), str(truncated)], [4, counts[0]], info, (8, 8))
    got = [n for n, _, _ in ds.iter_samples()]
    err = capsys.readouterr().err
    assert got[0] == "a" and 1 <= len(got) < 1 + counts[0]  # the damaged shard's first samples are still used
    assert f"{bad} sample b (b): no mask (seg.png)" in err
    assert f"{bad} sample c (c): mask is 6×4 but the image is 6×6" in err
    assert f"skipping {bad} sample d (d)" in err
    assert f"{truncated}: shard is truncated or corrupt" in err
    # three bad samples and the truncated shard (plus the sample the cut went through, if it split one)
    assert [f"{bad} sample {k}" for k in "bcd"] == ds.skipped[:3] and str(truncated) in ds.skipped
    assert all(s.startswith((str(bad), str(truncated))) for s in ds.skipped) and len(ds.skipped) <= 5


def test_cli_writes_shards_then_trains_and_evaluates_from_them(folder, tmp_path, capsys):
    out = tmp_path / "sh"
    assert main(["shards", "--dataset", "folder", "--data-root", str(folder), "--out", str(out),
                 "--maxcount", "4"]) == 0
    assert "samples of folder train" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", *tiny_run(dataset="shards", data_root=out, limit=None, crop=True, scale_range="0.5,1.5",
                                    batch_size=4, epochs=1, workers=1, run_dir=run)]) == 0
    hist = json.loads((run / "metrics.json").read_text())
    assert hist[0]["train_loss"] > 0 and 0 <= hist[0]["val_miou"] <= 1
    assert main(["evaluate", str(run)]) == 0
    res = json.loads((run / "eval_val.json").read_text())
    assert res["images"] == read_index(out, "val")[0]["count"]
    assert main(["evaluate", str(run), "--full-res", "--tile"]) == 0
    assert json.loads((run / "eval_val_fullres_tile.json").read_text())["images"] == res["images"]


def test_class_weighting_from_shards_matches_the_folder_it_came_from(folder, tmp_path):
    """--class-weighting counts the training masks of the shards: the same weights as the source folder."""
    out = tmp_path / "sh"
    assert main(["shards", "--dataset", "folder", "--data-root", str(folder), "--out", str(out), "--maxcount", "4"]) == 0
    weights = {}
    for name, dataset, root in (("shards", "shards", out), ("folder", "folder", folder)):
        run = tmp_path / name
        assert main(["train", *tiny_run(dataset=dataset, data_root=root, batch_size=4, epochs=1,
                                        class_weighting="median", workers=0, limit=8, run_dir=run)]) == 0
        lines = [ln for ln in (run / "train.log").read_text().splitlines() if "class weights (median):" in ln]
        assert len(lines) == 1, name
        weights[name] = lines[0].split("class weights (median):", 1)[1].strip()
    assert weights["shards"] == weights["folder"]
    assert len(set(w.split("=")[1] for w in weights["shards"].split(", "))) > 1  # not all equal: real counts
