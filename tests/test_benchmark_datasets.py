"""Pascal VOC (+SBD train_aug), ADE20K and Cityscapes on small fake trees in their official layouts.

Every expectation (class counts, ignore values, id mappings, split sizes) is written out by hand here
from the publishers' documentation, not derived from the loader's own tables.
"""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelseg.cli import main
from pixelseg.data import iter_full_res, load_split
from pixelseg.core.errors import PixelsegError
from conftest import tiny_run

H, W = 12, 16


def _img(path: Path, seed: int, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, fmt)


def _mask(path: Path, values, palette=False):
    """Horizontal bands of `values` (one per band), saved as an 8-bit (or palette) PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((H, W), np.uint8)
    for i, v in enumerate(values):
        m[i * H // len(values):(i + 1) * H // len(values)] = v
    im = Image.fromarray(m)
    if palette:
        im = im.convert("P")
        im.putpalette([c for i in range(256) for c in (i, 255 - i, i // 2)])
    im.save(path)
    return m


# ---- Pascal VOC 2012 + SBD --------------------------------------------------------------------------
def _voc_tree(root: Path, sbd=True):
    voc = root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    train, val = ["2007_000001", "2007_000002"], ["2007_000003"]
    for i, n in enumerate(train + val):
        _img(voc / "JPEGImages" / f"{n}.jpg", i)
        _mask(voc / "SegmentationClass" / f"{n}.png", (0, 15, 255, 20), palette=True)  # person, border, tv
    (sets / "train.txt").write_text("\n".join(train) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n")
    (sets / "trainval.txt").write_text("\n".join(train + val) + "\n")
    if sbd:
        from scipy.io import savemat
        ds = root / "benchmark_RELEASE" / "dataset"
        (ds / "cls").mkdir(parents=True)
        # SBD train holds a VOC val image (must be dropped) and a VOC train image (VOC's label wins);
        # 2008_000010/11 exist only in SBD.
        (ds / "train.txt").write_text("2008_000010\n2007_000003\n2007_000001\n")
        (ds / "val.txt").write_text("2008_000011\n")
        for i, n in enumerate(["2008_000010", "2008_000011", "2007_000003", "2007_000001"]):
            if n.startswith("2008"):
                _img(voc / "JPEGImages" / f"{n}.jpg", 10 + i)
            seg = np.full((H, W), 1 + i, np.uint8)  # aeroplane, bicycle, ...
            seg[:, :4] = 0
            savemat(ds / "cls" / f"{n}.mat", {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros(1),
                                                         "CategoriesPresent": np.array([1 + i])}})
    return root


def test_voc_splits_classes_and_border_ignored(tmp_path):
    root = _voc_tree(tmp_path)
    tr = load_split("voc", root, "train", (H, W), use_cache=False)
    va = load_split("voc", root, "val", (H, W), use_cache=False)
    assert tr.info.num_classes == 21 and tr.info.class_names[0] == "background"
    assert tr.info.class_names[15] == "person" and tr.info.class_names[20] == "tvmonitor"
    assert tr.info.palette[1] == (128, 0, 0) and tr.info.palette[15] == (192, 128, 128)  # devkit colour map
    assert tr.names == ["2007_000001", "2007_000002"] and va.names == ["2007_000003"]
    # palette PNG indices are the class ids; 255 (border) stays the ignore value
    assert sorted(np.unique(tr.masks).tolist()) == [0, 15, 20, 255]
    assert tr.info.ignore_index == 255


def test_voc_train_aug_merges_sbd_without_val(tmp_path):
    pytest.importorskip("scipy")
    root = _voc_tree(tmp_path)
    ds = load_split("voc", root, "train_aug", (H, W), use_cache=False)
    # VOC train (2) + SBD-only (2), VOC val image dropped even though SBD lists it
    assert ds.names == ["2007_000001", "2007_000002", "2008_000010", "2008_000011"]
    by_name = dict(zip(ds.names, ds.masks))
    assert sorted(np.unique(by_name["2007_000001"]).tolist()) == [0, 15, 20, 255]  # VOC's label, not SBD's
    assert sorted(np.unique(by_name["2008_000010"]).tolist()) == [0, 1]            # from SBD's .mat
    assert sorted(np.unique(by_name["2008_000011"]).tolist()) == [0, 2]


def test_voc_default_train_split_is_train_aug(tmp_path):
    from pixelseg.data import default_split
    assert default_split("voc", "train") == "train_aug" and default_split("voc", "val") == "val"


def test_voc_missing_split_file_names_it(tmp_path):
    root = _voc_tree(tmp_path, sbd=False)
    (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(PixelsegError, match=r"ImageSets/Segmentation/val\.txt: split file not found"):
        load_split("voc", root, "val", (H, W), use_cache=False)


def test_voc_train_aug_without_sbd_says_where_to_put_it(tmp_path):
    root = _voc_tree(tmp_path, sbd=False)
    with pytest.raises(PixelsegError, match="train_aug needs SBD: extract benchmark.tgz"):
        load_split("voc", root, "train_aug", (H, W), use_cache=False)


def test_voc_label_outside_ids_names_the_file(tmp_path):
    root = _voc_tree(tmp_path, sbd=False)
    bad = root / "VOCdevkit/VOC2012/SegmentationClass/2007_000002.png"
    _mask(bad, (0, 21), palette=True)
    with pytest.raises(PixelsegError, match=r"2007_000002\.png: mask values \[21\] are outside"):
        load_split("voc", root, "train", (H, W), use_cache=False)


def test_voc_root_may_be_the_voc2012_folder(tmp_path):
    root = _voc_tree(tmp_path, sbd=False)
    ds = load_split("voc", root / "VOCdevkit" / "VOC2012", "val", (H, W), use_cache=False)
    assert ds.names == ["2007_000003"]


# ---- ADE20K -----------------------------------------------------------------------------------------
def _ade_tree(root: Path):
    ade = root / "ADEChallengeData2016"
    for split, n in (("training", 4), ("validation", 2)):
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            _img(ade / "images" / split / f"{name}.jpg", i)
            _mask(ade / "annotations" / split / f"{name}.png", (0, 1, 150, 13))
    return root


def test_ade20k_150_classes_zero_ignored_ids_shifted(tmp_path):
    root = _ade_tree(tmp_path)
    tr = load_split("ade20k", root, "training", (H, W), use_cache=False)
    va = load_split("ade20k", root, "val", (H, W), use_cache=False)   # alias of validation
    assert tr.info.num_classes == 150 and len(set(tr.info.class_names)) == 150
    assert tr.info.class_names[0] == "wall" and tr.info.class_names[12] == "person"
    assert tr.info.class_names[149] == "flag"
    assert len(tr) == 4 and len(va) == 2
    # raw 0 -> 255 (ignore), 1 -> 0 (wall), 13 -> 12 (person), 150 -> 149 (flag)
    band = tr.masks[0][:, 0]
    assert band.tolist() == [255] * 3 + [0] * 3 + [149] * 3 + [12] * 3


def test_ade20k_full_res_matches_mapping(tmp_path):
    root = _ade_tree(tmp_path)
    name, img, target = next(iter_full_res("ade20k", root, "validation", (8, 8)))
    assert img.shape == (H, W, 3) and sorted(np.unique(target).tolist()) == [0, 12, 149, 255]


def test_ade20k_missing_split_folder_and_bad_label(tmp_path):
    root = _ade_tree(tmp_path)
    import shutil
    shutil.rmtree(root / "ADEChallengeData2016/annotations/validation")
    with pytest.raises(PixelsegError, match=r"annotations/validation: split folder not found"):
        load_split("ade20k", root, "validation", (H, W), use_cache=False)
    _mask(root / "ADEChallengeData2016/annotations/training/ADE_train_00000001.png", (0, 151))
    with pytest.raises(PixelsegError, match=r"ADE_train_00000001\.png: mask values \[151\] are outside"):
        load_split("ade20k", root, "training", (H, W), use_cache=False)


# ---- Cityscapes -------------------------------------------------------------------------------------
def _city_tree(root: Path):
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt",))):
        for c in cities:
            stem = f"{c}_000000_000019"
            _img(root / "leftImg8bit" / split / c / f"{stem}_leftImg8bit.png", len(c), fmt="PNG")
            # road, parking (ignored), sky, bicycle, license-plate-free void 0
            _mask(root / "gtFine" / split / c / f"{stem}_gtFine_labelIds.png", (7, 9, 23, 33, 0, 26))
    return root


def test_cityscapes_label_ids_to_19_train_ids(tmp_path):
    root = _city_tree(tmp_path)
    tr = load_split("cityscapes", root, "train", (H, W), use_cache=False)
    assert tr.info.num_classes == 19
    assert tr.info.class_names[0] == "road" and tr.info.class_names[10] == "sky"
    assert tr.info.class_names[13] == "car" and tr.info.class_names[18] == "bicycle"
    assert tr.names == ["aachen_000000_000019", "bochum_000000_000019"]
    # labelIds 7 road -> 0, 9 parking -> 255, 23 sky -> 10, 33 bicycle -> 18, 0 unlabeled -> 255, 26 car -> 13
    assert tr.masks[0][:, 0].tolist() == [0, 0, 255, 255, 10, 10, 18, 18, 255, 255, 13, 13]
    from pixelseg.data import cityscapes
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for label_id in range(34):
        assert cityscapes.LABEL_MAP[label_id] == expected.get(label_id, 255), label_id


def test_cityscapes_without_gtfine_names_the_folder(tmp_path):
    root = _city_tree(tmp_path)
    import shutil
    shutil.rmtree(root / "gtFine")
    with pytest.raises(PixelsegError, match=r"gtFine: not found; .*gtFine_trainvaltest\.zip"):
        load_split("cityscapes", root, "train", (H, W), use_cache=False)


def test_cityscapes_label_outside_ids_and_no_root(tmp_path):
    root = _city_tree(tmp_path)
    _mask(root / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png", (7, 34))
    with pytest.raises(PixelsegError, match=r"frankfurt_000000_000019_gtFine_labelIds\.png: mask values \[34\]"):
        load_split("cityscapes", root, "val", (H, W), use_cache=False)
    with pytest.raises(PixelsegError, match="needs a login|cityscapes-dataset.com"):
        load_split("cityscapes", None, "val", (H, W), use_cache=False)


# ---- the CLI reads each fake tree; bad input is one line, exit 2 -------------------------------------
@pytest.mark.parametrize("dataset,make,train,val", [
    ("voc", _voc_tree, "train", "val"),
    ("ade20k", _ade_tree, "training", "validation"),
    ("cityscapes", _city_tree, "train", "val"),
])
def test_cli_trains_one_step_on_each_fake_tree(tmp_path, dataset, make, train, val):
    root = make(tmp_path / "data")
    run = tmp_path / "run"
    rc = main(["train", *tiny_run(dataset=dataset, data_root=root, limit=None, train_split=train, val_split=val,
                                  model="unet", backbone="mobilenet_v2", epochs=1, batch_size=2, cache="memory",
                                  precise_bn=0, figure_samples=0, run_dir=run, device="cpu")])
    assert rc == 0
    import json
    hist = json.loads((run / "metrics.json").read_text())
    assert len(hist[0]["val_iou"]) == {"voc": 21, "ade20k": 150, "cityscapes": 19}[dataset]


def test_cli_bad_tree_is_one_line(tmp_path, capsys):
    root = _city_tree(tmp_path / "data")
    import shutil
    shutil.rmtree(root / "gtFine")
    rc = main(["train", "--dataset", "cityscapes", "--data-root", str(root), "--weights", "none",
               "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "gtFine" in err
    assert not (tmp_path / "run" / "last.pt").exists()


# ---- downloads (file:// URLs stand in for the publishers' servers; the HTTP machinery is test_download's) ----
def _archive(src: Path, top: str, dest: Path) -> Path:
    import shutil
    return Path(shutil.make_archive(str(dest), "zip" if dest.name.endswith("zip_") else "tar", src, top))


def _digest(path: Path, algo: str) -> str:
    import hashlib
    return hashlib.new(algo, path.read_bytes()).hexdigest()


def test_voc_downloads_checks_md5_extracts_then_reuses(tmp_path, monkeypatch):
    from pixelseg.data import voc
    tar = _archive(_voc_tree(tmp_path / "src", sbd=False), "VOCdevkit", tmp_path / "VOCtrainval")
    monkeypatch.setenv("PIXELSEG_DATA", str(tmp_path / "home"))
    monkeypatch.setattr(voc, "VOC_URL", (tar.as_uri(), _digest(tar, "md5")))
    ds = load_split("voc", None, "val", (H, W), use_cache=False)
    assert ds.names == ["2007_000003"] and (tmp_path / "home" / "voc" / "VOCdevkit" / "VOC2012").is_dir()
    tar.unlink()                                               # present now: no second download
    assert load_split("voc", None, "train", (H, W), use_cache=False).names == ["2007_000001", "2007_000002"]


def test_voc_checksum_mismatch_keeps_nothing(tmp_path, monkeypatch):
    from pixelseg.data import voc
    tar = _archive(_voc_tree(tmp_path / "src", sbd=False), "VOCdevkit", tmp_path / "VOCtrainval")
    monkeypatch.setenv("PIXELSEG_DATA", str(tmp_path / "home"))
    monkeypatch.setattr(voc, "VOC_URL", (tar.as_uri(), "0" * 32))
    with pytest.raises(PixelsegError, match="checksum is .* expected 0{32}"):
        load_split("voc", None, "val", (H, W), use_cache=False)
    assert not (tmp_path / "home" / "voc").exists()


def test_ade20k_download_with_sha1(tmp_path, monkeypatch):
    from pixelseg.data import ade20k
    z = _archive(_ade_tree(tmp_path / "src"), "ADEChallengeData2016", tmp_path / "ADEChallengeData2016.zip_")
    monkeypatch.setenv("PIXELSEG_DATA", str(tmp_path / "home"))
    monkeypatch.setattr(ade20k, "URL", (z.as_uri(), _digest(z, "sha1")))
    assert len(load_split("ade20k", None, "val", (H, W), use_cache=False)) == 2


def test_offline_download_is_one_actionable_line(tmp_path, monkeypatch, capsys):
    import socket
    from pixelseg.data import ade20k
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PIXELSEG_DATA", str(tmp_path / "home"))
    monkeypatch.setattr(ade20k, "URL", (f"http://127.0.0.1:{port}/ADEChallengeData2016.zip", "0" * 40))
    rc = main(["train", "--dataset", "ade20k", "--weights", "none", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "could not download" in err and "ADEChallengeData2016.zip" in err and "sceneparsing" in err
    assert str(tmp_path / "home" / "ade20k") in err and "--data-root" in err
