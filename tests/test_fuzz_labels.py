"""Fuzzing the five annotation readers (COCO, CVAT, Label Studio, LabelMe, YOLO-seg) with structurally valid
exports holding hostile values: empty/huge/NaN/negative coordinates, wrong types, unknown ids, RLE that does not
add up, unicode and spaces in names, duplicated entries, missing or damaged image files.

Property: the reader returns a LabelSet whose every image rasterises to an H×W mask of declared class ids, or
raises PixelsegError in one line naming the export's file; never another exception or a hang. With --skip-bad
the same holds. A few examples per format also go through `pixelseg convert` end to end: exit 0 with a complete
output folder, or exit 2 with one line and nothing written. Profiles: tests/_fuzz.py.
"""
import json
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _fuzz import HOSTILE, TEXT, count, examples, mutated, no_hang, one_line_naming
from _labels_exports import WRITERS, coco_dict
from pixelseg.core.errors import PixelsegError
from pixelseg.labels import coco, cvat, labelme, labelstudio, yolo
from pixelseg.labels.raster import IGNORE, rasterize

READERS = {"coco": coco.read, "cvat": cvat.read, "labelstudio": labelstudio.read, "labelme": labelme.read,
           "yolo": yolo.read}
DAMAGE = st.sampled_from([None, None, None, "truncate", "garbage", "delete", "empty", "rename"])


def _damage_image(folder: Path, how) -> None:
    imgs = sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png"))
    if not how or not imgs:
        return
    p = imgs[0]
    if how == "truncate":
        p.write_bytes(p.read_bytes()[:40])
    elif how == "garbage":
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\xff" * 64)
    elif how == "delete":
        p.unlink()
    elif how == "empty":
        p.write_bytes(b"")
    elif how == "rename":
        p.rename(p.with_name("ünï cødé " + p.name))


def check_read(fmt: str, root: Path, skip_bad: bool, **options):
    """The property, on one export."""
    count(f"labels.{fmt}")
    try:
        with no_hang(f"{fmt} reader on {root}"):
            labels = READERS[fmt](root, skip_bad=skip_bad, **options)
    except PixelsegError as exc:
        one_line_naming(exc, root)  # every file of the export lies under root
        return None
    k = len(labels.class_names)
    assert labels.items
    for item in labels.items:
        assert item.height >= 1 and item.width >= 1 and item.image.is_file()
        mask = rasterize(item.shapes, item.height, item.width)
        assert mask.shape == (item.height, item.width) and mask.dtype == np.uint8
        vals = np.unique(mask)
        assert ((vals < k) | (vals == IGNORE)).all(), (vals, labels.class_names)
    if not skip_bad:
        assert not labels.bad
    return labels


def _workdir(tmp_path):
    return tempfile.TemporaryDirectory(dir=tmp_path)


# ---- COCO -----------------------------------------------------------------------------------------------
COCO_BASE = {"plain": coco_dict(), "rle": coco_dict(rle=True)}


@examples(60)
@given(kind=st.sampled_from(sorted(COCO_BASE)), data=st.data(), skip_bad=st.booleans(), damage=DAMAGE,
       iscrowd=st.sampled_from(["class", "ignore"]))
def test_coco_reader(tmp_path, kind, data, skip_bad, damage, iscrowd):
    doc = data.draw(mutated(COCO_BASE[kind]))
    with _workdir(tmp_path) as d:
        root = WRITERS["coco"](Path(d) / "coco")
        (root / "train" / "_annotations.coco.json").write_text(json.dumps(doc))
        _damage_image(root, damage)
        check_read("coco", root, skip_bad, iscrowd=iscrowd)


@examples(40)
@given(counts=st.one_of(st.lists(st.integers(-5, 2000), max_size=8), st.text(max_size=20),
                        st.binary(max_size=20).map(lambda b: b.decode("latin-1"))),
       size=st.lists(st.one_of(st.integers(-3, 100), TEXT), min_size=0, max_size=3))
def test_coco_rle_segmentation(tmp_path, counts, size):
    doc = coco_dict()
    doc["annotations"][0]["segmentation"] = {"size": size, "counts": counts}
    with _workdir(tmp_path) as d:
        root = WRITERS["coco"](Path(d) / "coco")
        (root / "train" / "_annotations.coco.json").write_text(json.dumps(doc))
        check_read("coco", root, False)


# ---- Label Studio, LabelMe (JSON) ---------------------------------------------------------------------
def _json_base(fmt: str, brush: bool = False):
    with tempfile.TemporaryDirectory() as d:
        root = (WRITERS[fmt](Path(d) / fmt, brush=brush) if fmt == "labelstudio" else WRITERS[fmt](Path(d) / fmt))
        return {p.name: json.loads(p.read_text()) for p in sorted(root.glob("*.json"))}


@examples(60)
@given(brush=st.booleans(), data=st.data(), skip_bad=st.booleans(), damage=DAMAGE, boxes=st.booleans())
def test_labelstudio_reader(tmp_path, brush, data, skip_bad, damage, boxes):
    base = _json_base("labelstudio", brush)["export.json"]
    doc = data.draw(mutated(base))
    with _workdir(tmp_path) as d:
        root = WRITERS["labelstudio"](Path(d) / "ls", brush=brush)
        (root / "export.json").write_text(json.dumps(doc))
        _damage_image(root, damage)
        check_read("labelstudio", root, skip_bad, boxes=boxes)


@examples(30)
@given(rle=st.lists(st.integers(-300, 300), max_size=40), w=st.integers(-2, 50), h=st.integers(-2, 50))
def test_labelstudio_brush_rle(tmp_path, rle, w, h):
    tasks = _json_base("labelstudio", True)["export.json"]
    r = tasks[0]["annotations"][0]["result"][0]
    r["value"]["rle"] = rle
    r["original_width"], r["original_height"] = w, h
    with _workdir(tmp_path) as d:
        root = WRITERS["labelstudio"](Path(d) / "ls", brush=True)
        (root / "export.json").write_text(json.dumps(tasks))
        check_read("labelstudio", root, False)


LABELME_BASE = _json_base("labelme")


@examples(60)
@given(name=st.sampled_from(sorted(LABELME_BASE)), data=st.data(), skip_bad=st.booleans(), damage=DAMAGE,
       boxes=st.booleans(), labels_txt=st.booleans())
def test_labelme_reader(tmp_path, name, data, skip_bad, damage, boxes, labels_txt):
    doc = data.draw(mutated(LABELME_BASE[name]))
    with _workdir(tmp_path) as d:
        root = WRITERS["labelme"](Path(d) / "lm")
        (root / name).write_text(json.dumps(doc))
        if not labels_txt:
            (root / "labels.txt").unlink()
        _damage_image(root, damage)
        check_read("labelme", root, skip_bad, boxes=boxes)


# ---- CVAT (XML) -------------------------------------------------------------------------------------------
ATTR_VALUES = st.one_of(TEXT, HOSTILE.map(str), st.sampled_from(["1e9", "-1", "nan", "inf", "0", "3.5", "1,2;3",
                                                                 "5, 5, -3", "", "1;2;3;4", "x,y"]))


@examples(60)
@given(as_mask=st.booleans(), data=st.data(), skip_bad=st.booleans(), damage=DAMAGE, boxes=st.booleans())
def test_cvat_reader(tmp_path, as_mask, data, skip_bad, damage, boxes):
    with _workdir(tmp_path) as d:
        root = WRITERS["cvat"](Path(d) / "cvat", as_mask=as_mask)
        xml = root / "annotations.xml"
        doc = ET.parse(xml).getroot()
        for _ in range(data.draw(st.integers(1, 3))):
            els = list(doc.iter())
            el = data.draw(st.sampled_from(els))
            how = data.draw(st.sampled_from(["attr", "attr", "attr", "text", "drop", "dup", "box"]))
            if how == "attr" and el.attrib:
                key = data.draw(st.sampled_from(sorted(el.attrib)))
                el.set(key, data.draw(ATTR_VALUES))
            elif how == "text":
                el.text = data.draw(ATTR_VALUES)
            elif how in ("drop", "dup") and el is not doc:
                parent = next(p for p in doc.iter() if el in list(p))
                parent.remove(el) if how == "drop" else parent.append(el)
            elif how == "box":
                im = next(doc.iter("image"))
                ET.SubElement(im, "box", {k: data.draw(ATTR_VALUES) for k in ("label", "xtl", "ytl", "xbr", "ybr")})
        text = ET.tostring(doc, encoding="unicode")
        if data.draw(st.integers(0, 9)) == 0:
            text = text[:data.draw(st.integers(0, len(text)))]
        xml.write_text(text)
        _damage_image(root, damage)
        check_read("cvat", root, skip_bad, boxes=boxes)


# ---- YOLO-seg ---------------------------------------------------------------------------------------------
TOKENS = st.one_of(st.sampled_from(["0", "1", "2", "-1", "0.5", "0.1", "0.9", "1.0", "nan", "inf", "-inf", "1e9",
                                    "-0.5", "5", "0x1", "a", "1.5e-3", "00", "１"]),
                   st.floats(-2, 2).map(lambda v: f"{v:.4f}"))
LINE = st.lists(TOKENS, max_size=14).map(" ".join)
YAML_BASE = {"path": ".", "train": "images/train", "names": {0: "dent", 1: "scratch"}}


def _inside(value):
    """An absolute folder ("/") or one above the export in data.yaml would make the reader walk the whole
    disk: what the file asks for, not a defect, and no test's business; such strings become images/train."""
    if isinstance(value, str):
        return "images/train" if value.strip().startswith(("/", "\\", "~")) or ".." in value else value
    if isinstance(value, list):
        return [_inside(v) for v in value]
    if isinstance(value, dict):
        return {k: _inside(v) for k, v in value.items()}
    return value


@examples(60)
@given(lines=st.lists(LINE, max_size=5), data=st.data(), skip_bad=st.booleans(), damage=DAMAGE,
       boxes=st.booleans(), mutate_yaml=st.booleans())
def test_yolo_reader(tmp_path, lines, data, skip_bad, damage, boxes, mutate_yaml):
    import yaml
    with _workdir(tmp_path) as d:
        root = WRITERS["yolo"](Path(d) / "yolo")
        (root / "labels" / "train" / "a.txt").write_text("\n".join(lines) + "\n")
        if mutate_yaml:
            doc = data.draw(mutated(YAML_BASE))
            doc = _inside(doc)
            (root / "data.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
        _damage_image(root, damage)
        check_read("yolo", root, skip_bad, boxes=boxes)


# ---- end to end: `pixelseg convert` -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(WRITERS))
@examples(6)
@given(data=st.data(), damage=DAMAGE)
def test_convert_whole_or_nothing(tmp_path, capsys, fmt, data, damage):
    from pixelseg.cli import main
    with _workdir(tmp_path) as d:
        root = WRITERS[fmt](Path(d) / fmt)
        docs = sorted(p for p in root.glob("**/*.json")) if fmt != "yolo" else []
        if docs:
            p = data.draw(st.sampled_from(docs))
            p.write_text(json.dumps(data.draw(mutated(json.loads(p.read_text()), max_edits=2))))
        _damage_image(root, damage)
        out = Path(d) / "out"
        count(f"convert.{fmt}")
        capsys.readouterr()
        with no_hang(f"convert {fmt}"):
            rc = main(["convert", "--dataset", fmt, "--data-root", str(root), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        if rc == 0:
            report = json.loads((out / "convert_report.json").read_text())
            masks = sorted((out / "masks").rglob("*.png"))
            assert len(masks) == report["images"] and (out / "classes.csv").is_file()
        else:
            assert rc == 2, err
            # the error is the last line (info lines of the parse may come before it), and it names the export
            last = err.splitlines()[-1]
            assert "Traceback" not in err and (str(root) in last or " --" in last), err
            assert not out.exists() and not list(Path(d).glob(".out.tmp-*"))
