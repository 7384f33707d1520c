"""Each annotation-format reader on a synthetic export of one scene: same masks as pycocotools draws, the one
overlap rule, COCO layouts, and the real Roboflow export (train, evaluate, predict like a folder dataset)."""
import json
import time
from pathlib import Path

import numpy as np
import pytest

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
    from pixelseg.server import create_app
    from pixelseg.serving import Engine
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
