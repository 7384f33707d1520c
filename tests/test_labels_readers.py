"""Each annotation-format reader on a synthetic export of one scene: same masks as pycocotools draws, the one
overlap rule, COCO layouts, and the real Roboflow export (train, evaluate, predict like a folder dataset)."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _labels_exports import CLASSES, SCENE, WRITERS, expected, write_coco, write_cvat, write_labelstudio
from pixelseg.data import dataset_info, iter_full_res, load_split
from pixelseg.data.base import CacheSpec
from conftest import tiny_run

CARDAMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-cardamage"


def full_res(name, root, **options):
    return {n: t for n, _, t in iter_full_res(name, root, "train", 64, **options)} | \
           {n: t for n, _, t in iter_full_res(name, root, "val", 64, **options)}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_reader_masks_equal_pycocotools(tmp_path, fmt):
    root = WRITERS[fmt](tmp_path / fmt)
    info = dataset_info(fmt, root)
    assert info.class_names == ["background"] + CLASSES
    got = full_res(fmt, root)
    assert sorted(got) == ["a", "b"]
    for name in SCENE:
        np.testing.assert_array_equal(got[Path(name).stem], expected(name), err_msg=f"{fmt} {name}")


@pytest.mark.parametrize("rule", ["smaller", "order"])
def test_overlap_rule(tmp_path, rule):
    root = write_cvat(tmp_path / "cvat")
    got = full_res("cvat", root, overlap=rule)
    np.testing.assert_array_equal(got["a"], expected("a.jpg", rule))
    assert (2 in got["a"]) == (rule == "smaller")  # the scratch survives only when the smaller shape is on top


def test_overlap_ignore_marks_conflicts(tmp_path):
    got = full_res("coco", write_coco(tmp_path / "c"), overlap="ignore")
    from _labels_exports import SCRATCH, poly_mask
    assert (got["a"][poly_mask(SCRATCH)] == 255).all() and (got["a"] == 1).any()


def test_masks_from_rle_formats(tmp_path):
    """COCO compressed RLE, CVAT <mask> and Label Studio brushes decode to the same masks."""
    for name, root in (("coco", write_coco(tmp_path / "coco", rle=True)),
                       ("cvat", write_cvat(tmp_path / "cvat", as_mask=True)),
                       ("labelstudio", write_labelstudio(tmp_path / "ls", brush=True))):
        got = full_res(name, root)
        np.testing.assert_array_equal(got["a"], expected("a.jpg"), err_msg=name)


def test_coco_layouts_found_without_flags(tmp_path):
    a = full_res("coco", write_coco(tmp_path / "rf", "roboflow"))
    b = full_res("coco", write_coco(tmp_path / "classic", "classic"))
    assert sorted(a) == sorted(b) == ["a", "b"]
    np.testing.assert_array_equal(a["a"], b["a"])
    # the placeholder category (id 0, supercategory of the others, unused) is not a class
    assert dataset_info("coco", tmp_path / "classic").class_names == ["background"] + CLASSES


def test_coco_iscrowd_flag(tmp_path):
    root = tmp_path / "c"
    write_coco(root)
    f = root / "train" / "_annotations.coco.json"
    d = json.loads(f.read_text())
    d["annotations"][-1]["iscrowd"] = 1   # b's dent
    f.write_text(json.dumps(d))
    assert set(np.unique(full_res("coco", root)["b"])) == {0, 1}
    assert set(np.unique(full_res("coco", root, iscrowd="ignore")["b"])) == {0, 255}


def test_resized_split_and_cache_modes_agree(tmp_path):
    root = WRITERS["yolo"](tmp_path / "y")
    a = load_split("yolo", root, "train", 16, use_cache="mmap")
    b = load_split("yolo", root, "train", 16, use_cache=CacheSpec("none"))
    assert a.names == b.names and len(a) == 1
    np.testing.assert_array_equal(np.asarray(a.masks[0]), np.asarray(b.masks[0]))


@pytest.mark.skipif(not CARDAMAGE.is_dir(), reason=f"real data absent: {CARDAMAGE}")
def test_cardamage_train_evaluate_predict(tmp_path, capsys):
    from pixelseg.cli import main
    run = tmp_path / "run"
    assert main(["train", *tiny_run(dataset="coco", data_root=CARDAMAGE, epochs=1, limit=4, batch_size=4, run_dir=run,
                                    precise_bn=0, workers=0, cache="memory")]) == 0
    ck = __import__("torch").load(run / "best.pt", weights_only=True, map_location="cpu")
    assert ck["dataset"]["class_names"][0] == "background" and len(ck["dataset"]["class_names"]) == 9
    assert "car" not in ck["dataset"]["class_names"]  # Roboflow's placeholder category is not a class
    assert main(["evaluate", str(run), "--full-res", "--limit", "2"]) == 0
    assert json.loads((run / "eval_val_fullres.json").read_text())["images"] == 2
    img = sorted((CARDAMAGE / "valid").glob("*.jpg"))[0]
    assert main(["predict", str(run), str(img), "--out", str(tmp_path / "pred")]) == 0
    assert any((tmp_path / "pred").glob("*.png"))
    # ... and serves like any folder dataset's run: the answer names the COCO file's classes
    pytest.importorskip("fastapi", reason="pixelseg[serve] not installed")
    from fastapi.testclient import TestClient
    from pixelseg.inference.server import create_app
    from pixelseg.inference.serving import Engine
    with TestClient(create_app(Engine(run), warm=False)) as client:
        for _ in range(600):  # polls until ready; the test asserts readiness, not how fast it came
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        r = client.post("/v1/predict?format=json", content=img.read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["areas"]) == ck["dataset"]["class_names"] and (body["width"], body["height"]) == (640, 640)
    assert sum(body["areas"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_exif_orientation_annotations_land_upright(tmp_path, fmt, orientation):
    """Issue 30 #2: the tools annotate the image as a viewer shows it (EXIF-upright), and record that size;
    every reader reads it upright, so the shapes land where they were drawn for all 8 orientations."""
    from _labels_exports import H, W, upright_pixels
    root = WRITERS[fmt](tmp_path / fmt, orientation=orientation)
    got = {n: (img, t) for sp in ("train", "val") for n, img, t in iter_full_res(fmt, root, sp, 64)}
    assert sorted(got) == ["a", "b"]
    for name in SCENE:
        img, target = got[Path(name).stem]
        np.testing.assert_array_equal(target, expected(name), err_msg=f"{fmt} orientation {orientation} {name}")
        assert img.shape == (H, W, 3)
        if name.endswith(".png"):   # lossless: exactly the upright pixels
            np.testing.assert_array_equal(img, upright_pixels(name))
    # the training path (the reader workers decode with, at a training size) reads the same upright pair
    ds = load_split(fmt, root, "train", (H // 2, W // 2), use_cache=CacheSpec("none"))
    for s in ds.samples:
        img, mask = ds.reader(s, (H // 2, W // 2), None)
        assert img.shape == (H // 2, W // 2, 3) and mask.shape == (H // 2, W // 2)
        want = np.asarray(Image.fromarray(expected(f"{s.name}.{'jpg' if s.name == 'a' else 'png'}"))
                          .resize((W // 2, H // 2), Image.NEAREST))
        np.testing.assert_array_equal(mask, want)


def test_exif_orientation_stored_size_record_says_why(tmp_path, capsys):
    """A CVAT export that records the stored (not upright) size of a turned photo: one line that names the tag."""
    from pixelseg.cli import main
    root = write_cvat(tmp_path / "cvat", orientation=6)
    xml = root / "annotations.xml"
    xml.write_text(xml.read_text().replace('width="40" height="30"', 'width="30" height="40"', 1))
    rc = main(["convert", "--dataset", "cvat", "--data-root", str(root), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "30×40" in err and "EXIF Orientation 6" in err, err


def test_labelstudio_unlabelled_and_cancelled_tasks_left_out_and_counted(tmp_path):
    """Issue 30 #3: a task nobody labelled (annotations: []) or whose only annotation was cancelled is not an
    all-background image: it is left out, and the report says how many."""
    from pixelseg.data.labelled import report_line
    from pixelseg.labels import labelstudio
    root = write_labelstudio(tmp_path / "ls")
    tasks = json.loads((root / "export.json").read_text())
    from _labels_exports import write_images
    write_images(root / "more")
    for k, anns in enumerate(([], [{"id": 9, "was_cancelled": True, "result": tasks[1]["annotations"][0]["result"]}])):
        (root / "images" / f"c{k}.png").write_bytes((root / "images" / "b.png").read_bytes())
        tasks.append({"id": 10 + k, "data": {"image": f"/data/upload/1/c{k}.png"}, "annotations": anns})
    tasks.append({"id": 20, "data": {"image": "/data/upload/1/d.png"}, "annotations": [{"id": 5, "result": []}]})
    (root / "images" / "d.png").write_bytes((root / "images" / "b.png").read_bytes())
    (root / "export.json").write_text(json.dumps(tasks))
    labels = labelstudio.read(root)
    assert sorted(it.name for it in labels.items) == ["a", "b", "d"]   # d: labelled, nothing in it: background
    assert any("2 task(s) without an annotation" in n for n in labels.notes), labels.notes
    assert "2 task(s) without an annotation" in report_line(labels, root)


def test_labelstudio_image_key_from_config(tmp_path):
    """Suspected item: the task's image is data[KEY] for the config's <Image value="$KEY">, not data's first string."""
    root = write_labelstudio(tmp_path / "ls")
    tasks = json.loads((root / "export.json").read_text())
    for t in tasks:
        t["data"] = {"caption": "b.png", "photo": t["data"]["image"]}
    (root / "export.json").write_text(json.dumps(tasks))
    (root / "config.xml").write_text((root / "config.xml").read_text().replace('value="$image"', 'value="$photo"'))
    got = full_res("labelstudio", root)
    for name in SCENE:
        np.testing.assert_array_equal(got[Path(name).stem], expected(name))


def test_cvat_rotated_box(tmp_path):
    """Issue 30 #5: CVAT turns a <box> by `rotation` degrees clockwise about its centre: a 30×6 box turned 90° is
    painted standing up (6×30), as Label Studio's rotation already was."""
    box = '<box label="scratch" xtl="5" ytl="12" xbr="35" ybr="18" rotation="{}" z_order="5"/></image>'
    spans = {}
    for rot in ("90.0", "0"):
        root = write_cvat(tmp_path / f"cvat{rot}")
        xml = root / "annotations.xml"
        xml.write_text(box.format(rot).join(xml.read_text().rsplit("</image>", 1)))   # in b.png: no scratch there
        ys, xs = np.nonzero(full_res("cvat", root, boxes=True)["b"] == 2)
        spans[rot] = (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
    assert spans == {"90.0": (0, 30, 17, 23), "0": (12, 18, 5, 35)}


def test_cvat_tags_are_counted(tmp_path):
    from pixelseg.labels import cvat
    root = write_cvat(tmp_path / "cvat")
    xml = root / "annotations.xml"
    xml.write_text(xml.read_text().replace("</image>", '<tag label="dent" source="manual"/></image>', 1))
    assert cvat.read(root).dropped == {"<tag> is not a region": 1}


def test_coco_placeholder_rule_keeps_a_self_supercategory(tmp_path):
    """Issue 30 #7: COCO's `person` is its own supercategory; unused, it is still a class and later ids keep
    their place. Only an unused category that is the supercategory of *others* is a placeholder."""
    root = write_coco(tmp_path / "c")
    f = root / "train" / "_annotations.coco.json"
    d = json.loads(f.read_text())
    d["categories"] = [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 2, "name": "dent", "supercategory": "damage"},
                       {"id": 3, "name": "scratch", "supercategory": "damage"}]
    for a in d["annotations"]:
        a["category_id"] += 1
    f.write_text(json.dumps(d))
    assert dataset_info("coco", root).class_names == ["background", "person", "dent", "scratch"]
    got = full_res("coco", root)
    np.testing.assert_array_equal(got["a"], expected("a.jpg") + (expected("a.jpg") > 0))


@pytest.mark.parametrize("fmt", ["coco", "yolo", "cvat", "labelme", "labelstudio"])
def test_background_name_is_class_zero_in_every_reader(tmp_path, fmt):
    """Docs item: a class named "background" is class 0 in every reader (COCO and YOLO made it class 1)."""
    root = WRITERS[fmt](tmp_path / fmt)
    if fmt == "coco":
        f = root / "train" / "_annotations.coco.json"
        d = json.loads(f.read_text())
        d["categories"].insert(1, {"id": 7, "name": "Background", "supercategory": "project"})
        f.write_text(json.dumps(d))
    elif fmt == "yolo":
        (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [background, dent, scratch]\n")
        for t in (root / "labels" / "train").glob("*.txt"):
            t.write_text("".join(f"{int(ln.split()[0]) + 1} {ln.split(' ', 1)[1]}\n" for ln in t.read_text().splitlines()))
    elif fmt == "cvat":
        xml = root / "annotations.xml"
        xml.write_text(xml.read_text().replace("<labels>", "<labels><label><name>background</name></label>"))
    elif fmt == "labelme":
        (root / "labels.txt").write_text("background\n" + "\n".join(CLASSES) + "\n")
    else:
        cfg = root / "config.xml"
        cfg.write_text(cfg.read_text().replace("<Label ", '<Label value="background"/><Label ', 1))
    assert dataset_info(fmt, root).class_names == ["background"] + CLASSES
    got = full_res(fmt, root)
    for name in SCENE:
        np.testing.assert_array_equal(got[Path(name).stem], expected(name))


def test_coco_year_suffixed_files_are_splits(tmp_path):
    """Suspected item: official COCO names (instances_train2017.json, images in train2017/) are train and val."""
    from _labels_exports import coco_dict, write_images
    root = tmp_path / "coco2017"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        write_images(root / split)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco_dict()))
    assert sorted(full_res("coco", root)) == ["a", "b"]
    assert [n for n, _, _ in iter_full_res("coco", root, "val", 64)] == ["a", "b"]


def test_yolo_val_that_is_the_training_folder_is_not_a_val_split(tmp_path):
    """Issue 30 #4: `val: images/train` validated on the training images, silently. Now it is dropped with a
    note and val is carved out of train; val images that are also training images are left out of val."""
    from pixelseg.data.labelled import splits
    from pixelseg.labels import yolo
    root = WRITERS["yolo"](tmp_path / "y")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: [dent, scratch]\n")
    labels = yolo.read(root)
    assert [it.split for it in labels.items] == ["train", "train"]
    assert any("holds only training images" in n for n in labels.notes), labels.notes
    parts = splits(labels, {"val_fraction": 0.5, "val_group": None})
    assert not {s.name for s in parts["val"]} & {s.name for s in parts["train"]}
    # partly shared: the shared image is left out of val
    (root / "images" / "val").mkdir()
    (root / "images" / "val" / "c.png").write_bytes((root / "images" / "train" / "b.png").read_bytes())
    (root / "images" / "val" / "b.png").symlink_to(root / "images" / "train" / "b.png")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [dent, scratch]\n")
    labels = yolo.read(root)
    assert sorted((it.split, it.name) for it in labels.items) == [("train", "a"), ("train", "b"), ("val", "c")]
    assert any("1 val image(s)" in n for n in labels.notes), labels.notes


def test_labelme_embedded_image_data(tmp_path, monkeypatch):
    """Suspected item (confirmed): LabelMe embeds the image (`imageData`, its default); JSON-only folders read."""
    import base64
    monkeypatch.setenv("PIXELSEG_CACHE", str(tmp_path / "cache"))
    root = WRITERS["labelme"](tmp_path / "lm")
    for name in SCENE:
        doc = json.loads((root / f"{Path(name).stem}.json").read_text())
        doc["imageData"] = base64.b64encode((root / name).read_bytes()).decode()
        (root / f"{Path(name).stem}.json").write_text(json.dumps(doc))
        (root / name).unlink()
    got = full_res("labelme", root)
    for name in SCENE:
        np.testing.assert_array_equal(got[Path(name).stem], expected(name))
    assert len(list((tmp_path / "cache" / "labelme-images").iterdir())) == 2
