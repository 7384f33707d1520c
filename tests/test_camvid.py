"""CamVid in the SegNet layout: the real files (skipped when ../shared/data is absent) and small fakes."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelseg.data import camvid, iter_full_res, load_split
from pixelseg.core.errors import PixelsegError


def test_real_splits_sizes_and_classes(camvid_root):
    tr = load_split("camvid", camvid_root, "train", (90, 120))
    va = load_split("camvid", camvid_root, "val", (90, 120))
    assert len(tr) == 367 and len(va) == 101                    # README: 367 + 101 pairs
    assert tr.images.shape == (367, 90, 120, 3) and tr.masks.dtype == np.uint8
    assert not set(tr.names) & set(va.names)
    assert tr.info.class_names == ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                                   "Car", "Pedestrian", "Bicyclist"]
    assert tr.info.palette[0] == (128, 128, 128) and tr.info.palette[3] == (128, 64, 128)  # SegNet's colours
    assert set(np.unique(tr.masks)) == set(range(11)) | {255}   # 11 = Unlabelled became ignore


def test_real_unlabelled_is_ignored_at_full_resolution(camvid_root):
    """Independent check against the raw PNGs: value 11 -> 255, 0..10 unchanged, native 360×480."""
    for name, img, target in iter_full_res("camvid", camvid_root, "val", (64, 64), limit=3):
        raw = np.asarray(Image.open(camvid_root / "valannot" / f"{name}.png"))
        assert img.shape == (360, 480, 3) and target.shape == raw.shape == (360, 480)
        assert np.array_equal(target == 255, raw == 11)
        assert np.array_equal(target[raw != 11], raw[raw != 11])


def test_real_label_meaning(camvid_root):
    """Road scenes: the top rows are Sky (0), Building (1) and Tree (5), the bottom rows Road (3) and
    Pavement (4) and never Sky; a shuffled class order would break this."""
    m = load_split("camvid", camvid_root, "val", (36, 48)).masks
    top = np.bincount(m[:, :4].ravel(), minlength=256) / m[:, :4].size
    bottom = np.bincount(m[:, -4:].ravel(), minlength=256) / m[:, -4:].size
    assert top[0] == top[:11].max() and top[[0, 1, 5]].sum() > 0.9
    assert bottom[3] > 0.8 and bottom[[3, 4]].sum() > 0.95 and bottom[0] == 0


def test_real_test_split_is_absent_with_a_clear_message(camvid_root):
    with pytest.raises(PixelsegError, match="split 'test' is not in .*available: train, val"):
        load_split("camvid", camvid_root, "test", 64)


def _fake(root: Path, split="train", n=3, values=(0, 3, 11)):
    (root / split).mkdir(parents=True)
    (root / f"{split}annot").mkdir()
    lines = []
    for i in range(n):
        name = f"0001TP_{i:06d}.png"
        Image.new("RGB", (48, 36), (i * 40, 0, 0)).save(root / split / name)
        m = np.zeros((36, 48), np.uint8)
        m[:12], m[12:24], m[24:] = values
        Image.fromarray(m).save(root / f"{split}annot" / name)
        lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_list_paths_of_another_machine_resolve_by_file_name(tmp_path):
    ds = load_split("camvid", _fake(tmp_path), "train", (36, 48), use_cache=False)
    assert ds.names == [f"0001TP_{i:06d}" for i in range(3)]
    assert (ds.masks[:, :12] == 0).all() and (ds.masks[:, 12:24] == 3).all() and (ds.masks[:, 24:] == 255).all()


def test_missing_annotation_is_named(tmp_path):
    _fake(tmp_path)
    (tmp_path / "trainannot" / "0001TP_000001.png").unlink()
    with pytest.raises(PixelsegError, match=r"trainannot/0001TP_000001.png: listed for CamVid split train but not"):
        load_split("camvid", tmp_path, "train", 32)


def test_values_outside_camvid_labels_are_refused(tmp_path):
    _fake(tmp_path, values=(0, 12, 3))
    with pytest.raises(PixelsegError, match=r"mask values \[12\] are outside"):
        load_split("camvid", tmp_path, "train", 32, use_cache=False)


def test_no_root_and_unknown_split(tmp_path):
    with pytest.raises(PixelsegError, match="needs --data-root"):
        load_split("camvid", None, "train", 32)
    with pytest.raises(PixelsegError, match="CamVid has splits train, val, test"):
        camvid.list_samples(_fake(tmp_path), "trainval")


def test_malformed_list_line(tmp_path):
    _fake(tmp_path)
    (tmp_path / "train.txt").write_text("only_one_path.png\n")
    with pytest.raises(PixelsegError, match=r"train.txt:1: expected 'image annotation'"):
        load_split("camvid", tmp_path, "train", 32)
