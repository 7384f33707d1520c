"""One small labelled scene written as each tool exports it, for the tests of pixelseg.labels.

Two 40×30 images. a.jpg: a big "dent" rectangle and, listed FIRST, a small "scratch" inside it (so the
overlap rules disagree: `smaller` keeps the scratch, `order` paints the later dent over it); b.png: one dent.
`expected(rule)` is the class-id mask pycocotools rasterises from the same polygons.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 40, 30
CLASSES = ["dent", "scratch"]          # class ids 1, 2
DENT = [[2, 2], [30, 2], [30, 20], [2, 20]]
SCRATCH = [[10, 5], [20, 5], [20, 12], [10, 12]]
SCENE = {"a.jpg": [("scratch", SCRATCH), ("dent", DENT)], "b.png": [("dent", [[5, 8], [35, 8], [35, 28], [5, 28]])]}


def poly_mask(pts) -> np.ndarray:
    from pycocotools import mask as mu
    return mu.decode(mu.frPyObjects([np.ravel(pts).astype(float).tolist()], H, W)[0]).astype(bool)


def expected(name: str, rule: str = "smaller") -> np.ndarray:
    out = np.zeros((H, W), np.uint8)
    shapes = SCENE[name]
    order = sorted(shapes, key=lambda s: -poly_mask(s[1]).sum()) if rule == "smaller" else shapes
    for label, pts in order:
        out[poly_mask(pts)] = CLASSES.index(label) + 1
    return out


# the transpose that undoes each EXIF orientation's (PIL.ImageOps.exif_transpose applies the inverse)
STORE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_270}


def upright_pixels(name: str) -> np.ndarray:
    """The H×W×3 image of `name` as a viewer shows it (what the annotations are drawn on)."""
    rng = np.random.default_rng(0)
    imgs = {n: rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for n in SCENE}
    return imgs[name]


def write_images(folder: Path, orientation: int = 1) -> None:
    """The scene's images; with `orientation` != 1 the file stores the pixels turned so that its EXIF tag
    turns them back upright (as a phone camera writes them); the annotations stay in the upright frame."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SCENE:
        im = Image.fromarray(upright_pixels(name))
        if orientation == 1:
            im.save(folder / name)
            continue
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.transpose(STORE[orientation]).save(folder / name, exif=exif, **({"quality": 100} if name.endswith(".jpg")
                                                                          else {}))


def coco_dict(rle: bool = False) -> dict:
    from pycocotools import mask as mu
    images, anns = [], []
    for i, (name, shapes) in enumerate(SCENE.items()):
        images.append({"id": i, "file_name": name, "width": W, "height": H})
        for label, pts in shapes:
            seg = [np.ravel(pts).astype(float).tolist()]
            if rle:
                r = mu.encode(np.asfortranarray(poly_mask(pts).astype(np.uint8)))
                seg = {"size": [H, W], "counts": r["counts"].decode()}
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": CLASSES.index(label) + 1,
                         "segmentation": seg, "iscrowd": 0, "area": 0, "bbox": [0, 0, 1, 1]})
    cats = [{"id": 0, "name": "project", "supercategory": "none"}] + [
        {"id": k + 1, "name": n, "supercategory": "project"} for k, n in enumerate(CLASSES)]
    return {"images": images, "annotations": anns, "categories": cats}


def write_coco(root: Path, layout: str = "roboflow", rle: bool = False, orientation: int = 1) -> Path:
    d = coco_dict(rle)
    if layout == "roboflow":
        write_images(root / "train", orientation)
        (root / "train" / "_annotations.coco.json").write_text(json.dumps(d))
    else:
        write_images(root / "images" / "train", orientation)
        (root / "annotations").mkdir(parents=True)
        (root / "annotations" / "instances_train.json").write_text(json.dumps(d))
    return root


def write_cvat(root: Path, as_mask: bool = False, orientation: int = 1) -> Path:
    from pixelseg.labels.rle import cvat_rle_encode
    write_images(root / "images", orientation)
    rows = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations><version>1.1</version><meta><task><labels>"]
    rows += [f"<label><name>{n}</name><color>#{30 * k:02x}80ff</color></label>" for k, n in enumerate(CLASSES)]
    rows.append("</labels></task></meta>")
    for i, (name, shapes) in enumerate(SCENE.items()):
        rows.append(f'<image id="{i}" name="{name}" width="{W}" height="{H}">')
        for label, pts in shapes:
            if as_mask:
                c, left, top, w, h = cvat_rle_encode(poly_mask(pts))
                rows.append(f'<mask label="{label}" source="manual" occluded="0" rle="{", ".join(map(str, c))}" '
                            f'left="{left}" top="{top}" width="{w}" height="{h}" z_order="0"/>')
            else:
                p = ";".join(f"{x:.2f},{y:.2f}" for x, y in pts)
                rows.append(f'<polygon label="{label}" source="manual" occluded="0" points="{p}" z_order="0"/>')
        rows.append("</image>")
    rows.append("</annotations>")
    (root / "annotations.xml").write_text("\n".join(rows))
    return root


def write_labelstudio(root: Path, brush: bool = False, orientation: int = 1) -> Path:
    from pixelseg.labels.rle import ls_rle_encode
    write_images(root / "images", orientation)
    tasks = []
    for i, (name, shapes) in enumerate(SCENE.items()):
        result = []
        for k, (label, pts) in enumerate(shapes):
            base = {"id": f"r{i}{k}", "from_name": "label", "to_name": "image", "original_width": W,
                    "original_height": H}
            if brush:
                result.append({**base, "type": "brushlabels",
                               "value": {"format": "rle", "rle": ls_rle_encode(poly_mask(pts)), "brushlabels": [label]}})
            else:
                result.append({**base, "type": "polygonlabels", "value": {
                    "points": [[100 * x / W, 100 * y / H] for x, y in pts], "polygonlabels": [label]}})
        tasks.append({"id": i + 1, "data": {"image": f"/data/upload/1/0123abcd-{name}"},
                      "annotations": [{"id": i + 1, "result": result}]})
    (root / "export.json").write_text(json.dumps(tasks))
    (root / "config.xml").write_text('<View><Image name="image" value="$image"/><PolygonLabels name="label" '
                                     'toName="image">' + "".join(f'<Label value="{n}"/>' for n in CLASSES)
                                     + "</PolygonLabels></View>")
    return root


def write_labelme(root: Path, orientation: int = 1) -> Path:
    write_images(root, orientation)
    for name, shapes in SCENE.items():
        doc = {"version": "5.4.1", "shapes": [{"label": lab, "points": pts, "shape_type": "polygon", "group_id": None}
                                              for lab, pts in shapes],
               "imagePath": name, "imageData": None, "imageHeight": H, "imageWidth": W}
        (root / f"{Path(name).stem}.json").write_text(json.dumps(doc))
    (root / "labels.txt").write_text("__ignore__\n_background_\n" + "\n".join(CLASSES) + "\n")
    return root


def write_yolo(root: Path, orientation: int = 1) -> Path:
    write_images(root / "images" / "train", orientation)
    (root / "labels" / "train").mkdir(parents=True)
    for name, shapes in SCENE.items():
        lines = [" ".join([str(CLASSES.index(lab))] + [f"{x / W:.6f} {y / H:.6f}" for x, y in pts])
                 for lab, pts in shapes]
        (root / "labels" / "train" / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: dent\n  1: scratch\n")
    return root


WRITERS = {"coco": write_coco, "cvat": write_cvat, "labelstudio": write_labelstudio, "labelme": write_labelme,
           "yolo": write_yolo}
