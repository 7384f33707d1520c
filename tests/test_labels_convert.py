"""`pixelseg convert`: the folder it writes reads back through --dataset folder (and shards through --dataset
shards) as exactly the masks the annotation reader gives; report and overlay are written; existing output kept."""
import json

import numpy as np
import pytest

from _labels_exports import CLASSES, write_cvat, write_labelme
from pixelseg.cli import main
from pixelseg.data.convert import convert
from pixelseg.data import dataset_info, iter_full_res


def masks(name, root, splits=("train", "val")):
    return {(sp, n): t for sp in splits for n, _, t in iter_full_res(name, root, sp, 64)}


def test_convert_to_folder_reads_back_equal(tmp_path, capsys):
    src = write_cvat(tmp_path / "cvat")
    out = tmp_path / "out"
    assert main(["convert", "--dataset", "cvat", "--data-root", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "converted 2 images" in printed and "dent" in printed
    assert dataset_info("folder", out).class_names == ["background"] + CLASSES
    assert (out / "classes.csv").read_text().splitlines()[2].startswith("1,dent,")
    want, got = masks("cvat", src), masks("folder", out)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    report = json.loads((out / "convert_report.json").read_text())
    assert report["images"] == 2 and report["shapes"] == 3 and report["images_without_labels"] == []
    assert 0 < report["pixel_share"]["scratch"] < report["pixel_share"]["dent"]
    assert (out / "convert_overlay.png").stat().st_size > 1000
    # a second convert refuses to write into the first one's folder, and leaves it as it was
    assert main(["convert", "--dataset", "cvat", "--data-root", str(src), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "classes.csv").is_file()


def test_convert_to_shards_and_from_folder(tmp_path):
    src = write_labelme(tmp_path / "lm")
    r = convert("labelme", src, tmp_path / "sh", to="shards", progress=False)
    assert r["splits"] == {"train": 1, "val": 1} and (tmp_path / "sh" / "train.json").is_file()
    want = masks("labelme", src)
    got = masks("shards", tmp_path / "sh")
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # folder -> folder (palette PNG masks in): the same masks again
    convert("labelme", src, tmp_path / "f1", progress=False)
    convert("folder", tmp_path / "f1", tmp_path / "f2", progress=False)
    for k, m in masks("folder", tmp_path / "f2").items():
        np.testing.assert_array_equal(m, want[k])


def test_convert_unknown_target_writes_nothing(tmp_path):
    from pixelseg.core.errors import PixelsegError
    with pytest.raises(PixelsegError, match="--to"):
        convert("labelme", write_labelme(tmp_path / "lm"), tmp_path / "o", to="zip")
    assert not (tmp_path / "o").exists()


AWKWARD = ["dent, deep", 'say "hi"', "ünïcödé", "a;b", "tab\there", "#not a comment", "'quoted'", "x,y,z,w"]


def test_convert_80_classes_awkward_names_round_trip(tmp_path):
    """Issue 30 #9: with 80 classes the colours stay distinct (tab20 repeated after 20) and names with commas
    and quotes are CSV-quoted, so --dataset folder reads classes.csv back as written."""
    import json as _json
    from _labels_exports import write_coco
    src = write_coco(tmp_path / "coco")
    f = src / "train" / "_annotations.coco.json"
    d = _json.loads(f.read_text())
    names = [AWKWARD[i] if i < len(AWKWARD) else f"class {i}" for i in range(80)]
    d["categories"] = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(names)]
    for a in d["annotations"]:
        a["category_id"] = 80 if a["category_id"] == 2 else 1
    f.write_text(_json.dumps(d))
    out = tmp_path / "out"
    convert("coco", src, out, progress=False)
    info = dataset_info("folder", out)
    assert info.class_names == ["background"] + names
    assert len(set(map(tuple, info.palette))) == 81
    want, got = masks("coco", src), masks("folder", out)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert max(int(m.max()) for m in got.values()) == 80   # the scratch is class 80


def test_convert_output_mode_follows_umask_and_stale_temp_is_cleaned(tmp_path):
    """Issue 30 #16: the converted folder is not private (0700 of mkdtemp), and a convert killed outright leaves
    a .OUT.tmp-* that the next convert to OUT removes (one still being written, by a live process, is kept)."""
    import os
    import socket
    src = write_labelme(tmp_path / "lm")
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-dead1"
    (stale / "images").mkdir(parents=True)
    (stale / ".pixelseg-convert-owner").write_text(f"{socket.gethostname()} 999999999\n")
    bare = tmp_path / ".out.tmp-dead2"     # killed before it wrote its owner file
    bare.mkdir()
    live = tmp_path / ".out.tmp-live"
    live.mkdir()
    (live / ".pixelseg-convert-owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    other = tmp_path / ".other.tmp-x"
    other.mkdir()
    old = os.umask(0o022)
    try:
        convert("labelme", src, out, progress=False)
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert oct((out / "classes.csv").stat().st_mode & 0o777) == oct(0o644)
    assert not stale.exists() and not bare.exists() and live.exists() and other.exists()
    assert not (out / ".pixelseg-convert-owner").exists()
    old = os.umask(0o077)
    try:
        convert("labelme", src, tmp_path / "private", progress=False)
    finally:
        os.umask(old)
    assert oct((tmp_path / "private").stat().st_mode & 0o777) == oct(0o700)


def test_convert_folder_keeps_its_test_split(tmp_path):
    """Suspected item (confirmed): convert of a folder dataset with images/test/ used to drop the test split."""
    src = tmp_path / "f1"
    convert("labelme", write_labelme(tmp_path / "lm"), src, progress=False)
    for sub in ("images", "masks"):
        (src / sub / "test").mkdir()
        for p in (src / sub / "val").iterdir():
            (src / sub / "test" / p.name).write_bytes(p.read_bytes())
    r = convert("folder", src, tmp_path / "f2", progress=False)
    assert set(r["splits"]) == {"train", "val", "test"}
    want = masks("folder", src, ("train", "val", "test"))
    got = masks("folder", tmp_path / "f2", ("train", "val", "test"))
    assert sorted(want) == sorted(got) and any(k[0] == "test" for k in got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("to", ["folder", "shards"])
def test_convert_exif_oriented_images_written_upright(tmp_path, to):
    """Issue 30 #2 through convert: the annotations are upright, so the image written beside the mask is too
    (a folder dataset reads the stored grid): the pair reads back equal, pixels and mask."""
    from _labels_exports import upright_pixels, write_cvat
    src = write_cvat(tmp_path / "cvat", orientation=6)
    out = tmp_path / "out"
    r = convert("cvat", src, out, to=to, progress=False)
    assert any("EXIF Orientation" in n for n in r.get("notes", [])) or to == "shards"
    name = "folder" if to == "folder" else "shards"
    got = {n: (img, t) for sp in ("train", "val") for n, img, t in iter_full_res(name, out, sp, 64)}
    want = {n: t for sp in ("train", "val") for n, _, t in iter_full_res("cvat", src, sp, 64)}
    assert sorted(got) == sorted(want) == ["a", "b"]
    for n in want:
        np.testing.assert_array_equal(got[n][1], want[n])
    np.testing.assert_array_equal(got["b"][0], upright_pixels("b.png"))
