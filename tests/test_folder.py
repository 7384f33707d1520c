"""Folder dataset: pairing by stem, splits, classes.csv, mask kinds, the report, and CLI end to end."""
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pixelseg.core.checkpoint import load_checkpoint
from pixelseg.cli import main
from pixelseg.data import dataset_info, load_split
from pixelseg.data import folder
from pixelseg.core.errors import PixelsegError
from conftest import tiny_run

COLOURS = {0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 0, 255)}
CSV = "id,name,r,g,b\n0,background,0,0,0\n1,square,255,0,0\n2,disc,0,0,255\n"
H, W = 40, 48


def _ids(rng, h=H, w=W):
    """Class-id map: background, a square (1) and a disc (2) at random places."""
    m = np.zeros((h, w), np.uint8)
    y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    m[y: y + h // 3, x: x + w // 3] = 1
    yy, xx = np.mgrid[:h, :w]
    cy, cx = int(rng.integers(h // 2, h - 6)), int(rng.integers(w // 2, w - 6))
    m[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = 2
    return m


def make_folder(root: Path, n=8, kind="rgb", csv=CSV, seed=0, sub=None, images="images", masks="masks",
                sizes=None):
    """n image/mask pairs; kind: rgb (colour-coded), index (values = ids), binary (0/255).
    Returns {stem: id map} for independent checks."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        d = f"/{sub[i]}" if sub else ""
        (root / f"{images}{d}").mkdir(parents=True, exist_ok=True)
        (root / f"{masks}{d}").mkdir(parents=True, exist_ok=True)
        h, w = sizes[i] if sizes else (H, W)
        m = _ids(rng, h, w)
        if kind == "binary":
            m = (m > 0).astype(np.uint8)
        img = np.array([(50, 50, 50), (210, 60, 50), (50, 80, 210)], np.uint8)[m]
        Image.fromarray(img).save(root / f"{images}{d}" / f"s{i:02d}.png")
        stored = {"rgb": lambda: np.array([COLOURS[k] for k in range(3)], np.uint8)[m],
                  "index": lambda: m, "binary": lambda: m * 255}[kind]()
        Image.fromarray(stored).save(root / f"{masks}{d}" / f"s{i:02d}.png")
        truth[f"s{i:02d}"] = m
    if csv is not None:
        (root / "classes.csv").write_text(csv)
    return truth


def _all(root, size=(H, W), **kw):
    tr = load_split("folder", root, "train", size, **kw)
    va = load_split("folder", root, "val", size, **kw)
    return tr, va


def test_rgb_masks_follow_classes_csv_exactly(tmp_path):
    truth = make_folder(tmp_path, n=6)
    tr, va = _all(tmp_path)
    assert tr.info.class_names == ["background", "square", "disc"]
    assert tr.info.palette == [COLOURS[0], COLOURS[1], COLOURS[2]]
    for ds in (tr, va):
        for name, mask in zip(ds.names, ds.masks):
            assert np.array_equal(mask, truth[name])    # native size: ids must match the generator's


def test_report_names_pairs_missing_partners_and_frequencies(tmp_path, capsys):
    truth = make_folder(tmp_path, n=6)
    Image.new("RGB", (W, H)).save(tmp_path / "images" / "lonely.png")
    Image.new("RGB", (W, H)).save(tmp_path / "masks" / "orphan.png")
    folder._REPORTED.clear()
    tr, va = _all(tmp_path)
    err = capsys.readouterr().err
    assert f"train {len(tr)}, val {len(va)} image/mask pairs" in err
    assert "skipped 1 image(s) without a mask: lonely.png" in err
    assert "skipped 1 mask(s) without an image: orphan.png" in err
    assert err.count("folder dataset") == 1                     # one report, not one per split
    counts = np.bincount(np.concatenate([m.ravel() for m in truth.values()]), minlength=3)
    freq = 100 * counts / counts.sum()
    assert f"background {freq[0]:.1f}%, square {freq[1]:.1f}%, disc {freq[2]:.1f}%" in err
    assert "lonely" not in tr.names + va.names


def test_unknown_colour_names_colour_file_and_fix(tmp_path):
    make_folder(tmp_path, n=4)
    m = np.array(Image.open(tmp_path / "masks" / "s01.png"))
    m[0, 0] = (0, 255, 0)
    Image.fromarray(m).save(tmp_path / "masks" / "s01.png")
    with pytest.raises(PixelsegError) as e:
        _all(tmp_path)
    msg = str(e.value)
    assert "(0, 255, 0) (1 px)" in msg and "s01.png" in msg and "classes.csv" in msg and "id 255" in msg


def test_ignore_rows_of_classes_csv(tmp_path):
    truth = make_folder(tmp_path, n=4, csv=CSV + "255,void,0,255,0\n")
    m = np.array(Image.open(tmp_path / "masks" / "s00.png"))
    m[:3] = (0, 255, 0)
    Image.fromarray(m).save(tmp_path / "masks" / "s00.png")
    tr, va = _all(tmp_path)
    got = dict(zip(tr.names + va.names, list(tr.masks) + list(va.masks)))
    assert (got["s00"][:3] == 255).all() and np.array_equal(got["s00"][3:], truth["s00"][3:])
    assert tr.info.num_classes == 3


@pytest.mark.parametrize("text, message", [
    ("idx,name,r,g,b\n0,a,0,0,0\n", "classes.csv:1: header is idx,name,r,g,b"),
    ("id,name,r,g,b\n0,a,0,0,zero\n", "classes.csv:2: id, r, g and b must be integers"),
    ("id,name,r,g,b\n0,a,0,0,0\n0,b,1,1,1\n", "classes.csv:3: id 0 defined twice"),
    ("id,name,r,g,b\n0,a,0,0,0\n2,b,1,1,1\n", "must run 0..2 without gaps; missing [1]"),
    ("id,name,r,g,b\n0,a,0,0,300\n", "classes.csv:2: colour (0, 0, 300) out of range"),
    ("id,name,r,g,b\n0,a,0,0,0\n1,b,0,0,0\n", "classes.csv:3: colour (0, 0, 0) already used on line 2"),
    ("id,name,r,g,b\n0,a,0,0\n", "classes.csv:2: 4 fields, expected 5"),
    ("id,name,r,g,b\n", "no classes"),
])
def test_malformed_classes_csv(tmp_path, text, message):
    make_folder(tmp_path, n=3, csv=text)
    with pytest.raises(PixelsegError, match="classes.csv") as e:
        _all(tmp_path)
    assert message in str(e.value)


def test_binary_0_255_masks_become_0_1_with_a_notice(tmp_path, capsys):
    truth = make_folder(tmp_path, n=4, kind="binary", csv=None)
    folder._REPORTED.clear()
    tr, va = _all(tmp_path)
    assert "binary mask, 0 -> class 0 (background), 255 -> class 1" in capsys.readouterr().err
    assert tr.info.class_names == ["background", "foreground"]
    for ds in (tr, va):
        for name, mask in zip(ds.names, ds.masks):
            assert np.array_equal(mask, truth[name])


def test_index_masks_without_csv_are_numbered_from_the_values(tmp_path, capsys):
    truth = make_folder(tmp_path, n=4, kind="index", csv=None)
    tr, _ = _all(tmp_path)
    assert tr.info.class_names == ["class_0", "class_1", "class_2"]
    assert np.array_equal(tr.masks[0], truth[tr.names[0]])
    # values 0, 3, 7 (+ 255 = ignore) are renumbered 0, 1, 2 and said so
    other = tmp_path / "sparse"
    make_folder(other, n=3, kind="index", csv=None)
    for p in (other / "masks").iterdir():
        m = np.array(Image.open(p))
        m = np.array([0, 3, 7], np.uint8)[m]
        m[0, 0] = 255
        Image.fromarray(m).save(p)
    folder._REPORTED.clear()
    tr, va = _all(other)
    err = capsys.readouterr().err
    assert "0->0, 3->1, 7->2" in err and "255 is read as 'ignore'" in err
    assert tr.info.num_classes == 3 and set(np.unique(np.concatenate([tr.masks.ravel(), va.masks.ravel()]))) \
        <= {0, 1, 2, 255}


def test_rgb_masks_without_csv_are_numbered_by_colour(tmp_path, capsys):
    make_folder(tmp_path, n=4, csv=None)
    folder._REPORTED.clear()
    tr, _ = _all(tmp_path)
    assert tr.info.num_classes == 3 and "colours found are numbered" in capsys.readouterr().err
    # RGB order: (0,0,0) < (0,0,255) < (255,0,0)
    assert tr.info.palette == [(0, 0, 0), (0, 0, 255), (255, 0, 0)]


def test_mixed_mask_kinds_need_a_csv(tmp_path):
    make_folder(tmp_path, n=4, csv=None)
    m = np.array(Image.open(tmp_path / "masks" / "s00.png").convert("L"))
    Image.fromarray(m).save(tmp_path / "masks" / "s00.png")
    with pytest.raises(PixelsegError, match="mix RGB colour images .* and index images"):
        _all(tmp_path)


def test_jpeg_masks_and_size_mismatch_are_refused(tmp_path):
    make_folder(tmp_path, n=3)
    Image.open(tmp_path / "masks" / "s00.png").save(tmp_path / "masks" / "s00.jpg")
    (tmp_path / "masks" / "s00.png").unlink()
    with pytest.raises(PixelsegError, match="JPEG masks are lossy"):
        _all(tmp_path)
    other = tmp_path / "other"
    make_folder(other, n=3)
    Image.new("RGB", (W + 1, H)).save(other / "images" / "s01.png")
    with pytest.raises(PixelsegError, match=r"s01.png: mask is 48×40 but its image s01.png is 49×40"):
        _all(other, use_cache=False)


def test_duplicate_stems_are_refused(tmp_path):
    make_folder(tmp_path, n=3)
    Image.new("RGB", (W, H)).save(tmp_path / "images" / "s00.jpg")
    with pytest.raises(PixelsegError, match="share the stem 's00'"):
        _all(tmp_path)


def test_split_subfolders_and_custom_folder_names(tmp_path):
    make_folder(tmp_path, n=6, sub=["train"] * 4 + ["val"] + ["test"], images="img", masks="ann")
    with pytest.raises(PixelsegError, match="--images-dir"):
        _all(tmp_path)
    tr, va = _all(tmp_path, images_dir="img", masks_dir="ann")
    te = load_split("folder", tmp_path, "test", (H, W), images_dir="img", masks_dir="ann")
    assert (tr.names, va.names, te.names) == (["s00", "s01", "s02", "s03"], ["s04"], ["s05"])


def test_list_files_define_splits(tmp_path):
    make_folder(tmp_path, n=5)
    (tmp_path / "train.txt").write_text("s00\ns01.png\n# comment\ns02\n")
    (tmp_path / "val.txt").write_text("s03\n")
    tr, va = _all(tmp_path)
    assert tr.names == ["s00", "s01", "s02"] and va.names == ["s03"]
    with pytest.raises(PixelsegError, match="--split test: the folder dataset .* has splits train, val"):
        load_split("folder", tmp_path, "test", (H, W))
    (tmp_path / "val.txt").write_text("s03\ns00\n")
    with pytest.raises(PixelsegError, match=r"val.txt:2: 's00' is also listed in train.txt"):
        _all(tmp_path)
    (tmp_path / "val.txt").write_text("nosuch\n")
    with pytest.raises(PixelsegError, match=r"val.txt:1: 'nosuch' has no image/mask pair"):
        _all(tmp_path)


def test_val_fraction_split_is_seeded_disjoint_and_stable(tmp_path):
    make_folder(tmp_path, n=20, csv=CSV)
    a = folder.discover(tmp_path, val_fraction=0.25)
    b = folder.discover(tmp_path, val_fraction=0.25)
    names = lambda lay, s: [x.name for x in lay.splits[s]]  # noqa: E731
    assert names(a, "val") == names(b, "val") and len(names(a, "val")) == 5
    assert not set(names(a, "train")) & set(names(a, "val"))
    assert sorted(names(a, "train") + names(a, "val")) == [f"s{i:02d}" for i in range(20)]
    assert names(a, "val") != [f"s{i:02d}" for i in range(5)]      # not just the first files
    # adding files never moves an existing val pair into train beyond the count change
    make_folder(tmp_path / "more", n=1)
    Image.open(tmp_path / "more" / "images" / "s00.png").save(tmp_path / "images" / "zz.png")
    Image.open(tmp_path / "more" / "masks" / "s00.png").save(tmp_path / "masks" / "zz.png")
    c = folder.discover(tmp_path, val_fraction=0.25)
    assert len(set(names(a, "val")) - set(names(c, "val"))) <= 1
    with pytest.raises(PixelsegError, match="--val-fraction 1.5: must be between 0 and 1"):
        folder.discover(tmp_path, val_fraction=1.5)


def test_folder_options_belong_to_the_folder_dataset(tmp_path):
    with pytest.raises(PixelsegError, match=r"--images-dir: not an option of --dataset synthetic \(only of folder\)"):
        load_split("synthetic", None, "train", 32, limit=2, images_dir="x")


def test_missing_root_and_folders(tmp_path):
    with pytest.raises(PixelsegError, match="needs --data-root"):
        load_split("folder", None, "train", 32)
    with pytest.raises(PixelsegError, match="masks/: folder not found|masks: folder not found"):
        (tmp_path / "images").mkdir()
        load_split("folder", tmp_path, "train", 32)


def test_cli_train_evaluate_predict_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    make_folder(data, n=12, sizes=[(40 + 3 * i, 56 - 2 * i) for i in range(12)])
    run = tmp_path / "run"
    assert main(["train", *tiny_run(dataset="folder", data_root=data, limit=None, epochs=1, image_size=64,
                                    batch_size=4, val_fraction=0.25, run_dir=run)]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["dataset"] == "folder" and cfg["val_fraction"] == 0.25 and cfg["data_root"] == str(data)
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["dataset"]["class_names"] == ["background", "square", "disc"]
    assert dataset_info("folder", data).class_names == ckpt["dataset"]["class_names"]

    assert main(["evaluate", str(run), "--device", "cpu", "--full-res"]) == 0
    out = capsys.readouterr().out
    assert "folder / val: 3 images at full resolution" in out and "disc" in out

    assert main(["predict", str(run), str(data / "images"), "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    with Image.open(tmp_path / "pred" / "s05.png") as m:
        assert m.size == (56 - 10, 40 + 15) and m.mode == "P"
        assert m.getpalette()[:9] == [0, 0, 0, 255, 0, 0, 0, 0, 255]   # the colours of classes.csv
    assert (tmp_path / "pred" / "s05_overlay.png").is_file()


def _one_folder(root: Path, n=6, suffix="_mask", kind="index", seed=1):
    """x.png + x<suffix>.png side by side in one folder."""
    rng = np.random.default_rng(seed)
    d = root / "all"
    d.mkdir(parents=True)
    truth = {}
    for i in range(n):
        m = _ids(rng)
        Image.fromarray(np.array([(50, 50, 50), (210, 60, 50), (50, 80, 210)], np.uint8)[m]).save(d / f"p{i}.png")
        Image.fromarray(m if kind == "index" else (m > 0).astype(np.uint8) * 255).save(d / f"p{i}{suffix}.png")
        truth[f"p{i}"] = m
    return truth


def test_one_folder_layout_with_mask_suffix(tmp_path):
    truth = _one_folder(tmp_path)
    kw = dict(images_dir="all", masks_dir="all", mask_suffix="_mask", val_fraction=0.34)
    tr, va = _all(tmp_path, **kw)
    assert sorted(tr.names + va.names) == sorted(truth) and len(va) == 2
    for ds in (tr, va):
        for name, m in zip(ds.names, ds.masks):
            assert np.array_equal(np.asarray(m), truth[name]), name
    # the images are the files without the suffix; nothing was paired with itself
    lay = folder.discover(tmp_path, "all", "all", 0.34, "_mask")
    assert all(s.mask.name == f"{s.name}_mask.png" and s.image.name == f"{s.name}.png" for s in lay.all_samples)


def test_same_folder_for_images_and_masks_is_refused_with_the_fix(tmp_path):
    _one_folder(tmp_path)
    with pytest.raises(PixelsegError, match=r"--images-dir and --masks-dir are the same folder .*paired with itself"
                                            r".*--mask-suffix _mask \(the files there look like that"):
        load_split("folder", tmp_path, "train", (H, W), images_dir="all", masks_dir="all")
    (tmp_path / "all" / "p0_mask.png").rename(tmp_path / "all" / "mask-of-p0.png")
    with pytest.raises(PixelsegError, match="same folder"):
        load_split("folder", tmp_path, "train", (H, W), images_dir=".", masks_dir="./")  # root itself, twice


def test_classes_file_outside_the_data_root_and_class_names(tmp_path):
    data = tmp_path / "data"
    truth = make_folder(data, n=4, kind="index", csv=None)
    elsewhere = tmp_path / "mine.csv"
    elsewhere.write_text(CSV)
    data.chmod(0o555)  # a read-only data root: classes.csv cannot be put there
    try:
        info = dataset_info("folder", data, classes=str(elsewhere))
        assert info.class_names == ["background", "square", "disc"]
        tr, _ = _all(data, classes=str(elsewhere))
        assert all(np.array_equal(np.asarray(m), truth[n]) for n, m in zip(tr.names, tr.masks))
        assert dataset_info("folder", data, class_names="sky,box,ball").class_names == ["sky", "box", "ball"]
        with pytest.raises(PixelsegError, match=r"--class-names gives 2 name\(s\) \(a, b\) but the masks hold 3"):
            dataset_info("folder", data, class_names="a,b")
        with pytest.raises(PixelsegError, match="--class-names 'a,a'"):
            dataset_info("folder", data, class_names="a,a")
        with pytest.raises(PixelsegError, match="--classes .*nope.csv: file not found"):
            dataset_info("folder", data, classes=str(tmp_path / "nope.csv"))
        with pytest.raises(PixelsegError, match="--class-names and .*mine.csv both name the classes"):
            dataset_info("folder", data, classes=str(elsewhere), class_names="a,b,c")
    finally:
        data.chmod(0o755)


def test_binary_masks_can_be_named(tmp_path):
    _one_folder(tmp_path, kind="binary", suffix="_seg")
    folder._REPORTED.clear()
    info = dataset_info("folder", tmp_path, images_dir="all", masks_dir="all", mask_suffix="_seg",
                        class_names="membrane,cell")
    assert info.class_names == ["membrane", "cell"]


def test_grouped_validation_split_keeps_sequences_together(tmp_path):
    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    stems = [f"seq{s}_{f:04d}" for s in range(6) for f in range(5)]
    for stem in stems:
        m = _ids(rng)
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        Image.fromarray(m).save(tmp_path / "masks" / f"{stem}.png")
    seq = lambda names: {n.split("_")[0] for n in names}  # noqa: E731
    for group in ("prefix", r"^(seq\d+)_", r"^seq\d+"):
        lay = folder.discover(tmp_path, val_fraction=0.3, val_group=group)
        tr, va = [x.name for x in lay.splits["train"]], [x.name for x in lay.splits["val"]]
        assert not seq(tr) & seq(va), group          # no sequence straddles the split
        assert len(va) % 5 == 0 and 5 <= len(va) <= 15 and sorted(tr + va) == sorted(stems)
    ungrouped = folder.discover(tmp_path, val_fraction=0.3)
    assert seq(x.name for x in ungrouped.splits["train"]) & seq(x.name for x in ungrouped.splits["val"])
    with pytest.raises(PixelsegError, match="puts all 30 pairs into one group"):
        folder.discover(tmp_path, val_fraction=0.3, val_group="seq")
    with pytest.raises(PixelsegError, match="--val-group '\\(': not a regular expression"):
        folder.discover(tmp_path, val_fraction=0.3, val_group="(")


def test_config_records_absolute_paths_and_evaluate_works_from_elsewhere(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    truth = _one_folder(data, n=6)
    (tmp_path / "classes.csv").write_text(CSV)
    monkeypatch.chdir(tmp_path)
    assert main(["train", *tiny_run(dataset="folder", data_root="data", limit=None, images_dir="all", masks_dir="all",
                                    mask_suffix="_mask", classes="classes.csv", val_fraction=0.34, epochs=1,
                                    batch_size=4, run_dir="run")]) == 0
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["data_root"] == str(data) and cfg["classes"] == str(tmp_path / "classes.csv")
    assert cfg["mask_suffix"] == "_mask" and len(truth) == 6
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert main(["evaluate", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert "folder / val: 2 images" in capsys.readouterr().out
    # a recorded root that has gone away is blamed on the recording, not on a flag never typed
    data.rename(tmp_path / "moved")
    assert main(["evaluate", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"the data_root recorded with this run, {data}, is not a directory" in err and "pass --data-root" in err
    assert main(["evaluate", str(tmp_path / "run"), "--device", "cpu", "--data-root", str(tmp_path / "moved")]) == 0
