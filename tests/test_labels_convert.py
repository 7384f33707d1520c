"""`pixelseg convert`: the folder it writes reads back through --dataset folder (and shards through --dataset
shards) as exactly the masks the annotation reader gives; report and overlay are written; existing output kept."""
import json

import numpy as np
import pytest

from _labels_exports import CLASSES, write_cvat, write_labelme
from pixelseg.cli import main
from pixelseg.convert import convert
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
    from pixelseg.errors import PixelsegError
    with pytest.raises(PixelsegError, match="--to"):
        convert("labelme", write_labelme(tmp_path / "lm"), tmp_path / "o", to="zip")
    assert not (tmp_path / "o").exists()
