"""Bad annotation input: one line naming the file and the annotation/shape, exit 2, nothing written;
--skip-bad skips the damaged item and the report counts it."""
import json
import math

import pytest

from _labels_exports import write_coco, write_cvat, write_labelme, write_labelstudio, write_yolo
from pixelseg.cli import main


def coco_file(root):
    return root / "train" / "_annotations.coco.json"


def edit_coco(root, change):
    f = coco_file(root)
    d = json.loads(f.read_text())
    change(d)
    f.write_text(json.dumps(d))


def refused(tmp_path, capsys, fmt, root, *must, extra=()):
    out = tmp_path / "out"
    rc = main(["convert", "--dataset", fmt, "--data-root", str(root), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for m in must:
        assert m in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written
    return err


COCO_CASES = {
    "malformed": (lambda d: None, ["_annotations.coco.json:1:", "not valid JSON"]),
    "missing image": (lambda d: d["images"][0].update(file_name="gone.jpg"), ["image id 0", "'gone.jpg' not found"]),
    "size disagrees": (lambda d: d["images"][1].update(width=41), ["image id 1", "41×30", "40×30"]),
    "undeclared category": (lambda d: d["annotations"][1].update(category_id=7), ["annotation id 2", "category_id 7"]),
    "two points": (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 5]]), ["annotation id 1", "at least 3"]),
    "huge coordinate": (lambda d: d["annotations"][0]["segmentation"][0].__setitem__(0, 1e9),
                        ["annotation id 1", "far outside"]),
    "nan coordinate": (lambda d: d["annotations"][2]["segmentation"][0].__setitem__(1, math.nan),
                       ["annotation id 3", "NaN"]),
    "rle length": (lambda d: d["annotations"][0].update(segmentation={"size": [30, 40], "counts": [5, 10]}),
                   ["annotation id 1", "add up to 15", "1200"]),
    "rle size not numbers": (lambda d: d["annotations"][0].update(segmentation={"size": ["30px", 40], "counts": [1200]}),
                             ["annotation id 1", "RLE size", "not two whole numbers"]),
    "rle counts not numbers": (lambda d: d["annotations"][0].update(segmentation={"size": [30, 40],
                                                                                  "counts": [600, "x", 600]}),
                               ["annotation id 1", "'x'", "not a whole number"]),
    "rle counts fractional": (lambda d: d["annotations"][0].update(segmentation={"size": [30, 40],
                                                                                 "counts": [600.5, 599.5]}),
                              ["annotation id 1", "600.5"]),
    "rle size none": (lambda d: d["annotations"][0].update(segmentation={"size": [None, 40], "counts": "PP"}),
                      ["annotation id 1", "RLE size"]),
    "empty export": (lambda d: d.update(images=[], annotations=[]), ["empty export"]),
    "duplicate name": (lambda d: d["images"][1].update(file_name="a.jpg"), ["duplicate image name 'a'"]),
}


@pytest.mark.parametrize("case", sorted(COCO_CASES))
def test_coco_bad_input(tmp_path, capsys, case):
    root = write_coco(tmp_path / "coco")
    change, must = COCO_CASES[case]
    if case == "malformed":
        coco_file(root).write_text('{"images": [}')
    else:
        edit_coco(root, change)
    refused(tmp_path, capsys, "coco", root, "_annotations.coco.json", *must)


def test_cvat_bad_input(tmp_path, capsys):
    root = write_cvat(tmp_path / "cvat", as_mask=True)
    xml = root / "annotations.xml"
    text = xml.read_text()
    xml.write_text(text.replace('label="dent"', 'label="rust"', 1))
    refused(tmp_path, capsys, "cvat", root, "annotations.xml", "name='a.jpg'", "label 'rust' is not declared")
    xml.write_text(text.replace('rle="', 'rle="7, ', 1))
    refused(tmp_path, capsys, "cvat", root, "annotations.xml", "<mask> #0", "runs add up to")
    xml.write_text(text.replace("</annotations>", ""))
    refused(tmp_path, capsys, "cvat", root, "annotations.xml:", "not valid XML")


def test_labelstudio_labelme_yolo_bad_input(tmp_path, capsys):
    ls = write_labelstudio(tmp_path / "ls", brush=True)
    tasks = json.loads((ls / "export.json").read_text())
    tasks[0]["annotations"][0]["result"][0]["original_width"] = 20
    tasks[0]["annotations"][0]["result"][0]["original_height"] = 15
    (ls / "export.json").write_text(json.dumps(tasks))
    refused(tmp_path, capsys, "labelstudio", ls, "export.json", "task 1", "20×15")
    lm = write_labelme(tmp_path / "lm")
    doc = json.loads((lm / "a.json").read_text())
    doc["shapes"][0]["label"] = "rust"
    (lm / "a.json").write_text(json.dumps(doc))
    refused(tmp_path, capsys, "labelme", lm, "a.json", "shape #0", "'rust' is not in")
    yo = write_yolo(tmp_path / "yo")
    (yo / "labels" / "train" / "b.txt").write_text("5 0.1 0.1 0.5 0.1 0.5 0.5\n")
    refused(tmp_path, capsys, "yolo", yo, "b.txt:1", "class 5 is not declared")
    (yo / "labels" / "train" / "b.txt").write_text("0 0.1 nan 0.5 0.1 0.5 0.5\n")
    refused(tmp_path, capsys, "yolo", yo, "b.txt:1", "NaN")


def test_skip_bad_skips_and_counts(tmp_path, capsys):
    root = write_coco(tmp_path / "coco")
    edit_coco(root, lambda d: d["annotations"][1].update(category_id=7))
    out = tmp_path / "out"
    rc = main(["convert", "--dataset", "coco", "--data-root", str(root), "--out", str(out), "--skip-bad",
               "--val-fraction", "0.5"])
    printed = capsys.readouterr().out
    assert rc == 0
    report = json.loads((out / "convert_report.json").read_text())
    assert len(report["skipped_bad"]) == 1 and "annotation id 2" in report["skipped_bad"][0]
    assert report["shapes"] == 2 and "1 damaged item(s) skipped" in printed


def test_labelstudio_rotation_not_a_number(tmp_path, capsys):
    """Issue 30 #12: a non-numeric rectangle rotation is one line naming the file and the result id."""
    ls = write_labelstudio(tmp_path / "ls")
    tasks = json.loads((ls / "export.json").read_text())
    tasks[0]["annotations"][0]["result"].append({"id": "rot", "type": "rectanglelabels", "original_width": 40,
                                                 "original_height": 30, "value": {
                                                     "x": 10, "y": 10, "width": 20, "height": 20,
                                                     "rotation": "ninety", "rectanglelabels": ["dent"]}})
    (ls / "export.json").write_text(json.dumps(tasks))
    refused(tmp_path, capsys, "labelstudio", ls, "export.json", "task 1 result 'rot'", "rotation 'ninety'",
            extra=["--boxes"])


def test_cvat_rotation_not_a_number(tmp_path, capsys):
    root = write_cvat(tmp_path / "cvat")
    xml = root / "annotations.xml"
    xml.write_text(xml.read_text().replace("</image>", '<box label="dent" xtl="1" ytl="1" xbr="9" ybr="9" '
                                           'rotation="left" z_order="0"/></image>', 1))
    refused(tmp_path, capsys, "cvat", root, "annotations.xml", "<box>", "rotation 'left'", extra=["--boxes"])


def _many_coco(root, k):
    d = json.loads(coco_file(root).read_text())
    d["categories"] = [{"id": i, "name": f"c{i}", "supercategory": "none"} for i in range(1, k + 1)]
    d["annotations"][-1]["category_id"] = k
    coco_file(root).write_text(json.dumps(d))


def _many_yolo(root, k):
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n" + "".join(f"  {i}: c{i}\n"
                                                                                      for i in range(k)))
    (root / "labels" / "train" / "b.txt").write_text(f"{k - 1} 0.1 0.1 0.5 0.1 0.5 0.5\n")


@pytest.mark.parametrize("fmt", ["coco", "yolo"])
def test_class_limit_one_message(tmp_path, capsys, fmt):
    """Issue 30 #8: 300 classes is refused, by COCO and YOLO as by the others, with the one message."""
    root = (write_coco if fmt == "coco" else write_yolo)(tmp_path / fmt)
    (_many_coco if fmt == "coco" else _many_yolo)(root, 300)
    refused(tmp_path, capsys, fmt, root, "300", "at most 254 classes besides background")


def test_class_limit_254_reads(tmp_path):
    """254 classes (ids 1..254) is the most there can be: the last one is painted as itself, not as ignore."""
    from pixelseg.data import iter_full_res
    root = write_yolo(tmp_path / "yo")
    _many_yolo(root, 254)
    got = {n: t for sp in ("train", "val") for n, _, t in iter_full_res("yolo", root, sp, 64)}
    assert got["b"].max() == 254 and 255 not in got["b"]
