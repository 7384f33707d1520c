"""Pre-annotations out (pixelseg.labels.write, predict --format/--rank): masks -> each tool's format -> masks.

Read back with pixelseg's own readers (pixelseg.labels.*, the ones `--dataset coco|cvat|labelstudio|yolo`
use) and with pycocotools' COCO API. RLE formats must come back exactly; polygons may differ only on pixels
next to a class boundary.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _fakes import fake_checkpoint  # noqa: E402

from pixelseg.cli import main  # noqa: E402
from pixelseg.core.errors import PixelsegError  # noqa: E402
from pixelseg.labels import coco, cvat, labelstudio, raster, yolo  # noqa: E402
from pixelseg.labels import write as pre  # noqa: E402

cv2 = pytest.importorskip("cv2")
CLASSES = ["background", "object", "edge"]
PALETTE = [(0, 0, 0), (200, 60, 60), (240, 240, 240)]


def scene(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Class ids with what makes polygons hard: holes (background and another class inside), an island in a
    hole, shapes touching the border, diagonal and one-pixel-thin parts."""
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), np.uint8)
    for _ in range(3):
        cv2.circle(m, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(4, 14)), 1, -1)
    m[5:25, 30:55] = 1
    m[10:20, 36:48] = 0          # a background hole
    m[13:16, 40:43] = 2          # an island of another class inside it
    cv2.line(m, (0, h - 1), (20, h - 20), 2, 1)   # thin diagonal, touching the border
    m[h - 6:, w - 9:] = 2        # a block in the corner
    return m


def _dataset(tmp_path, masks) -> list[Path]:
    (tmp_path / "images").mkdir(parents=True)
    paths = []
    for i, m in enumerate(masks):
        p = tmp_path / "images" / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (*m.shape, 3), np.uint8)).save(p)
        paths.append(p)
    return paths


def _items(paths, masks, shapes, min_area=0):
    return [pre.image_regions(p, m, np.full(m.shape, 0.9, np.float32), CLASSES, 0.1, shapes, min_area)
            for p, m in zip(paths, masks)]


def _read_back(fmt: str, root: Path, files: list[Path]) -> dict[str, np.ndarray]:
    """name -> class ids in CLASSES' numbering, through the reader `--dataset fmt` uses."""
    if fmt == "labelstudio":   # the tool's export after a person accepts each prediction as the annotation
        tasks = json.loads(files[0].read_text())
        for t in tasks:
            t["annotations"] = [{"result": t.pop("predictions")[0]["result"]}]
        exported = root / "export"
        exported.mkdir()
        (exported / "project.json").write_text(json.dumps(tasks))
        shutil.copy(files[1], exported / "config.xml")
        shutil.copytree(root / "images", exported / "images")
        labels = labelstudio.read(exported)
    else:
        labels = {"coco": coco.read, "cvat": cvat.read, "yolo": yolo.read}[fmt](files[0])
    lut = np.array([CLASSES.index(n) for n in labels.class_names], np.uint8)
    return {it.name: lut[raster.rasterize(it.shapes, it.height, it.width)] for it in labels.items}


def _boundary(m: np.ndarray) -> np.ndarray:
    """Pixels with a differently labelled pixel among their 8 neighbours."""
    pad = np.pad(m, 1, mode="edge")
    near = np.zeros(m.shape, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            near |= pad[dy:dy + m.shape[0], dx:dx + m.shape[1]] != m
    return near


@pytest.mark.parametrize("fmt", ["coco", "cvat", "labelstudio"])
def test_mask_shapes_round_trip_exactly(tmp_path, fmt):
    masks = [scene(s) for s in range(3)]
    paths = _dataset(tmp_path, masks)
    files = pre.write(fmt, _items(paths, masks, "mask"), CLASSES, PALETTE, tmp_path, shapes="mask")
    back = _read_back(fmt, tmp_path, files)
    assert sorted(back) == ["img0", "img1", "img2"]
    for i, m in enumerate(masks):
        np.testing.assert_array_equal(back[f"img{i}"], m)


@pytest.mark.parametrize("fmt", ["coco", "cvat", "labelstudio", "yolo"])
def test_polygons_round_trip_within_a_pixel_of_the_boundary(tmp_path, fmt):
    masks = [scene(s) for s in range(3)]
    paths = _dataset(tmp_path, masks)
    files = pre.write(fmt, _items(paths, masks, "polygon"), CLASSES, PALETTE, tmp_path, shapes="polygon")
    back = _read_back(fmt, tmp_path, files)
    for i, m in enumerate(masks):
        wrong = back[f"img{i}"] != m
        assert not (wrong & ~_boundary(m)).any(), f"img{i}: {int((wrong & ~_boundary(m)).sum())} pixels off the boundary"
        assert wrong.mean() < 0.01   # and few even there (they round-trip exactly on these scenes today)


def test_polygons_have_no_holes_but_keep_them(tmp_path):
    """A ring: one polygon (the hole joined by a cut), and rasterised it still has the hole."""
    from pycocotools import mask as mask_utils
    m = np.zeros((40, 40), bool)
    m[5:35, 5:35] = True
    m[15:25, 15:25] = False
    polys = pre.mask_polygons(m, 0)
    assert len(polys) == 1
    rle = mask_utils.frPyObjects([polys[0][0].ravel().tolist()], 40, 40)[0]
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), m)


def test_min_area_drops_specks_and_fills_pinholes():
    m = np.zeros((40, 40), bool)
    m[5:30, 5:30] = True
    m[12, 12] = False            # pinhole: filled
    m[36:38, 36:38] = True       # 4-pixel speck: dropped
    kept = pre.mask_polygons(m, min_area=16)
    assert len(kept) == 1 and kept[0][1].sum() == 25 * 25   # the pinhole is filled, the speck gone
    everything = pre.mask_polygons(m, min_area=0)
    assert len(everything) == 2


def test_pycocotools_reads_the_coco_file(tmp_path):
    """pycocotools' COCO API loads the written file and annToMask gives back each class's pixels."""
    from pycocotools.coco import COCO
    masks = [scene(s) for s in range(2)]
    paths = _dataset(tmp_path, masks)
    for shapes in ("mask", "polygon"):
        out = tmp_path / shapes
        out.mkdir()
        (f,) = pre.write("coco", _items(paths, masks, shapes), CLASSES, PALETTE, out, shapes=shapes)
        api = COCO(str(f))
        names = {c["id"]: c["name"] for c in api.loadCats(api.getCatIds())}
        assert sorted(names.values()) == ["edge", "object"]
        for img in api.loadImgs(api.getImgIds()):
            m = masks[int(img["file_name"][3])]
            got = np.zeros(m.shape, np.uint8)
            for a in api.loadAnns(api.getAnnIds(imgIds=img["id"])):
                got[api.annToMask(a) > 0] = CLASSES.index(names[a["category_id"]])
                assert 0 <= a["score"] <= 1 and a["area"] == int(api.annToMask(a).sum())
            if shapes == "mask":
                np.testing.assert_array_equal(got, m)
            else:
                assert not ((got != m) & ~_boundary(m)).any()


def test_background_gets_no_regions_and_labels_follow_the_classes(tmp_path):
    m = scene(0)
    paths = _dataset(tmp_path, [m])
    pre.write("labelstudio", _items(paths, [m], "polygon"), CLASSES, PALETTE, tmp_path)
    config = (tmp_path / "labelstudio_config.xml").read_text()
    assert 'value="object"' in config and 'value="edge"' in config and 'value="background"' not in config
    (task,) = json.loads((tmp_path / "labelstudio_tasks.json").read_text())
    labels = {r["value"]["polygonlabels"][0] for r in task["predictions"][0]["result"]}
    assert labels == {"object", "edge"}


def test_ranking_orders_uncertain_images_first(tmp_path):
    h, w = 8, 8
    sure = np.zeros((3, h, w), np.float32)
    sure[0] = 0.98
    sure[1:] = 0.01
    unsure = np.full((3, h, w), 1 / 3, np.float32)
    ent = [float(-(p * np.log(p)).sum(0).mean()) for p in (sure, unsure)]
    items = [pre.image_regions(Path(n), np.zeros((h, w), np.uint8), p.max(0), CLASSES, e, None)
             for n, p, e in zip(("sure.png", "unsure.png"), (sure, unsure), ent)]
    pre.write_ranking(items, tmp_path, "softmax entropy")
    rows = json.loads((tmp_path / "ranking.json").read_text())
    assert [r["image"] for r in rows] == ["unsure.png", "sure.png"]
    assert rows[0]["confidence"] == pytest.approx(0.0, abs=1e-5)   # uniform over 3 classes
    assert (tmp_path / "ranking.csv").read_text().splitlines()[1].startswith("1,unsure.png,")


class _ColourModel(torch.nn.Module):
    """Logits = 12 × the RGB channels: a saturated red image is confidently class 0, a grey one is a coin
    toss between the three classes. With `p`, dropout on the logits (so --rank samples it)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.drop = torch.nn.Dropout(p)

    def forward(self, x):
        return self.drop(12 * x)


@pytest.mark.parametrize("p, method", [(0.0, "softmax entropy"), (0.3, "mc-dropout")])
def test_predict_rank_uncertainty_end_to_end(tmp_path, monkeypatch, p, method):
    import pixelseg.inference.predict as inference
    import pixelseg.inference.runner as runner
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: _ColourModel(p).eval())
    ckpt = fake_checkpoint(tmp_path / "m.pt")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.full((24, 24, 3), 128, np.uint8)).save(imgs / "grey.png")
    red = np.zeros((24, 24, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(imgs / "red.png")
    res = inference.predict(ckpt, [imgs], tmp_path / "out", device="cpu", precision="fp32", progress=False,
                            format="labelstudio", rank="uncertainty")
    rows = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert [Path(r["image"]).name for r in rows] == ["grey.png", "red.png"]
    assert rows[0]["method"].startswith(method) and res[0]["rank_method"].startswith(method)
    tasks = json.loads((tmp_path / "out" / "labelstudio_tasks.json").read_text())
    score = {t["data"]["image"].rsplit("/", 1)[-1]: t["predictions"][0]["score"] for t in tasks}
    assert score["grey.png"] < score["red.png"]          # Label Studio sorts by it: least sure first
    assert all(t["predictions"][0]["model_version"].startswith("pixelseg-m.pt-") for t in tasks)


@pytest.mark.parametrize("fmt, shapes", [("coco", "polygon"), ("cvat", "mask"), ("yolo", "polygon")])
def test_cli_predict_writes_the_format(tmp_path, fmt, shapes):
    ckpt = fake_checkpoint(tmp_path / "m.pt")
    paths = _dataset(tmp_path / "in", [np.zeros((20, 30), np.uint8), np.zeros((26, 18), np.uint8)])
    out = tmp_path / "out"
    rc = main(["predict", str(ckpt), str(paths[0]), str(paths[1]), "--out", str(out), "--format", fmt,
               "--shapes", shapes, "--device", "cpu", "--min-area", "0"])
    assert rc == 0
    assert (out / "img0.png").is_file() and (out / "img1_overlay.png").is_file()   # the PNGs stay
    target = {"coco": out / "annotations.coco.json", "cvat": out / "annotations.xml", "yolo": out / "yolo"}[fmt]
    labels = {"coco": coco.read, "cvat": cvat.read, "yolo": yolo.read}[fmt]
    if fmt == "yolo":
        assert not (out / "yolo.partial").exists()
        labels = labels(target)
    else:   # the writer names the input files; let the reader find them where they are
        shutil.copy(target, paths[0].parent.parent / target.name)
        labels = labels(paths[0].parent.parent / target.name)
    lut = np.array([CLASSES.index(n) for n in labels.class_names], np.uint8)
    for it in labels.items:
        predicted = np.asarray(Image.open(out / f"{it.name}.png"))
        got = lut[raster.rasterize(it.shapes, it.height, it.width)]
        assert got.shape == predicted.shape
        if shapes == "mask":
            np.testing.assert_array_equal(got, predicted)
        else:
            assert not ((got != predicted) & ~_boundary(predicted)).any()


def test_bad_options_fail_before_any_output(tmp_path, capsys):
    ckpt = fake_checkpoint(tmp_path / "m.pt")
    (img,) = _dataset(tmp_path / "in", [np.zeros((20, 30), np.uint8)])
    rc = main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "o"), "--format", "yolo", "--shapes", "mask"])
    assert rc == 2 and "yolo holds polygons only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(PixelsegError, match="--min-area"):
        pre.check_options("coco", "polygon", -1)


def test_yolo_same_names_get_distinct_files_and_never_write_through_links(tmp_path, monkeypatch):
    """Issue 30 #1: d1/img0.png and d2/img0.png: the first is hard-linked into the export; the second used to be
    copied THROUGH that link into d1/img0.png. Now each gets its own name and the user's files are untouched."""
    m = [np.zeros((20, 30), np.uint8), np.ones((20, 30), np.uint8)]
    p1 = _dataset(tmp_path / "d1", m[:1])
    p2 = _dataset(tmp_path / "d2", m[1:])   # also images/img0.png, other pixels
    assert p1[0].name == p2[0].name
    before = {p: p.read_bytes() for p in p1 + p2}
    for link_works in (True, False):
        out = tmp_path / f"out{link_works}"
        out.mkdir()
        if not link_works:   # another file system: copies, created new, never opened through a link
            monkeypatch.setattr(pre.os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError("EXDEV")))
        (root,) = pre.write("yolo", _items(p1 + p2, m, "polygon"), CLASSES, PALETTE, out)
        assert {p: p.read_bytes() for p in p1 + p2} == before
        files = sorted(f.relative_to(root / "images").as_posix() for f in (root / "images").rglob("*.png"))
        assert len(files) == 2 and len({Path(f).stem for f in files}) == 2
        listed = [ln for s in ("train", "val") if (root / f"{s}.txt").is_file()
                  for ln in (root / f"{s}.txt").read_text().split()]
        assert sorted(listed) == ["images/" + f for f in files]
        back = {it.name: it for it in yolo.read(root).items}
        assert len(back) == 2 and len(list((root / "labels").rglob("*.txt"))) == 2
        for f in files:   # each copy holds its own input's pixels
            src = p1[0] if Path(f).stem == "img0" else p2[0]
            assert (root / "images" / f).read_bytes() == src.read_bytes()


def test_yolo_export_has_a_real_val_split_and_no_partial_folder_on_failure(tmp_path, monkeypatch):
    """Issue 30 #4: the export's val is not the training folder; reading it back validates on other images.
    And a failed write removes yolo.partial/ (suspected item)."""
    masks = [scene(s) for s in range(6)]
    paths = _dataset(tmp_path, masks)
    (root,) = pre.write("yolo", _items(paths, masks, "polygon"), CLASSES, PALETTE, tmp_path)
    import yaml
    doc = yaml.safe_load((root / "data.yaml").read_text())
    assert doc["train"] == "images/train" and doc["val"] == "images/val"
    labels = yolo.read(root)
    parts = labels.splits()
    assert len(parts["val"]) >= 1 and len(parts["train"]) + len(parts["val"]) == 6
    assert not {it.name for it in parts["val"]} & {it.name for it in parts["train"]}
    assert not any("training images" in n for n in labels.notes)

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(pre, "_place_image", boom)
    with pytest.raises(OSError):
        pre.write("yolo", _items(paths, masks, "polygon"), CLASSES, PALETTE, tmp_path / "again")
    assert not (tmp_path / "again" / "yolo.partial").exists() and not (tmp_path / "again" / "yolo").exists()


@pytest.mark.parametrize("name", ["my photo.png", "a.png", "ü+#%.png"])
def test_labelstudio_reads_pixelseg_local_file_references(tmp_path, monkeypatch, name):
    """Issue 30 #11: predict -> Label Studio -> train: `/data/local-files/?d=images/my%20photo.png` (URL-encoded,
    relative to where predict ran) and `?d=a.png` resolve to the files next to the export."""
    m = [scene(0)]
    root = tmp_path / "proj"
    (root / "images").mkdir(parents=True)
    img = root / "images" / name
    Image.fromarray(np.zeros((*m[0].shape, 3), np.uint8)).save(img, format="PNG")
    for cwd, ref_dir in ((root, "images"), (root / "images", "")):
        monkeypatch.chdir(cwd)
        tasks = pre.labelstudio_tasks(_items([Path(ref_dir or ".") / name], m, "mask"), "v")
        ref = tasks[0]["data"]["image"]
        assert ref.startswith("/data/local-files/?d=") and " " not in ref
        for t in tasks:
            t["annotations"] = [{"result": t.pop("predictions")[0]["result"]}]
        (root / "project.json").write_text(json.dumps(tasks))
        (root / "config.xml").write_text(pre.labelstudio_config(CLASSES[1:], dict(zip(CLASSES, PALETTE)), "mask"))
        labels = labelstudio.read(root)
        assert [it.image for it in labels.items] == [img]
