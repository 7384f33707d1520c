"""Pre-annotations out: a model's class-id masks in the formats labelling tools import for correction.

    coco         ONE file  annotations.coco.json   polygons, or RLE with --shapes mask (pycocotools)
    cvat         ONE file  annotations.xml         CVAT for images 1.1: <polygon>, or <mask> (CVAT's RLE)
    labelstudio  TWO files labelstudio_tasks.json  tasks with `predictions` (polygonlabels in percent, or
                           labelstudio_config.xml  brushlabels RLE), and the labelling config they match
    yolo         A FOLDER  yolo/                   data.yaml, train.txt, val.txt, labels/{train,val}/*.txt,
                                                   images/{train,val}/ (hard links, else copies, of the inputs;
                                                   never written through); polygons only

Regions. One region per class (`--shapes mask`: the class's pixels exactly) or per connected component of
a class (`--shapes polygon`, the default: polygons are what people drag). Classes named "background"
(any case) get no regions: the tools have no background label. Scores: a region's is the mean top-class
probability over its pixels; an image's is its confidence, 1 - mean entropy / ln(classes), so sorting by it
ascending lists the images the model is least sure of first (the order of ranking.csv).

Polygons (OpenCV's findContours on the mask upsampled 2x, then halved): vertices sit a quarter pixel inside
the region's outer pixel edges, so every region pixel's centre is inside and every other pixel's outside, and
rasterising them back (pycocotools, as every pixelseg reader does) gives the mask up to the pixels of holes
cut and of parts thinner than the threshold below. Coordinates are on pixel corners ((0, 0) is the image's
top-left corner), as COCO, CVAT, Label Studio and YOLO all use.
    holes       the tools' polygons have none, so each hole is joined to its outline by a zero-width cut
                (the polygon walks in, around the hole and back out), as Ultralytics' COCO converter does.
    tiny parts  components and holes under `min_area` pixels (default 16, `--min-area`) are dropped or
                filled: one-pixel specks are noise for a person correcting. `--shapes mask` keeps every pixel.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..core.errors import PixelsegError
from ..core.files import atomic_write_text
from .rle import coco_rle_decode, coco_rle_encode, cvat_rle_encode, ls_rle_encode

FORMATS = ("coco", "cvat", "labelstudio", "yolo")
SHAPES = ("polygon", "mask")
MIN_AREA = 16
LS_FROM, LS_TO, LS_DATA = "label", "image", "image"  # names in labelstudio_config.xml the predictions refer to


@dataclass
class Region:
    """One class's pixels (`polygons` empty: `rle` is exact) or one component's outline (`polygons`: one)."""

    label: str
    rle: dict  # COCO RLE (str counts) of the region's pixels
    score: float
    polygons: list = field(default_factory=list)  # each N×2 float (x, y), pixel-corner coordinates
    attributes: dict = field(default_factory=dict)  # name -> str, written where the format has them (audit)


@dataclass
class ImageRegions:
    image: Path
    height: int
    width: int
    regions: list[Region]
    confidence: float  # 1 - mean entropy / ln(C)
    uncertainty: float  # mean per-pixel entropy (nats)


def labelled_classes(class_names: list[str]) -> list[int]:
    """The class ids that become labels in the tools: all but those named background."""
    return [i for i, n in enumerate(class_names) if n.lower() not in ("background", "_background_")]


def _clean(binary: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected components and fill 4-connected holes under `min_area` pixels."""
    import cv2

    if min_area <= 1:
        return binary
    out = binary.copy()
    n, lab, stats, _ = cv2.connectedComponentsWithStats(out.astype(np.uint8), connectivity=8)
    small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_area)
    out[np.isin(lab, small[small > 0])] = False
    n, lab, stats, _ = cv2.connectedComponentsWithStats((~out).astype(np.uint8), connectivity=4)
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])).tolist())
    holes = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] < min_area and k not in border]
    out[np.isin(lab, holes)] = True
    return out


def _bridge(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """One polygon from an outline and its holes: each hole spliced in at the closest pair of vertices."""
    poly = outer
    for hole in sorted(holes, key=lambda c: -len(c)):
        d = ((poly[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(d.argmin()), d.shape)
        ring = np.concatenate([hole[j:], hole[: j + 1]])
        poly = np.concatenate([poly[: i + 1], ring, poly[i:]])
    return poly


def mask_polygons(binary: np.ndarray, min_area: int = MIN_AREA) -> list[tuple[np.ndarray, np.ndarray]]:
    """(polygon N×2 in pixel-corner coordinates, the component's bool mask) per component (module doc)."""
    import cv2

    binary = _clean(np.asarray(binary, bool), min_area)
    if not binary.any():
        return []
    _, comps = cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)  # findContours' connectivity
    big = np.repeat(np.repeat(binary.astype(np.uint8), 2, 0), 2, 1)
    contours, hierarchy = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    hierarchy = hierarchy[0]
    out = []
    for k, c in enumerate(contours):
        if hierarchy[k][3] != -1:  # a hole: handled with its outline
            continue
        holes, child = [], hierarchy[k][2]
        while child != -1:
            holes.append((contours[child].reshape(-1, 2) + 0.5) / 2)
            child = hierarchy[child][0]
        x, y = c.reshape(-1, 2)[0] // 2  # a pixel of the component the outline traces
        out.append((_bridge((c.reshape(-1, 2) + 0.5) / 2, holes), comps == comps[y, x]))
    return out


def image_regions(
    image: Path,
    mask: np.ndarray,
    top: np.ndarray,
    class_names: list[str],
    uncertainty: float,
    shapes: str | None = "polygon",
    min_area: int = MIN_AREA,
) -> ImageRegions:
    """The regions of one predicted mask (H×W class ids), scored with `top` (H×W top-class probability);
    `uncertainty` is the image's mean per-pixel entropy in nats (softmax, or MC dropout's predictive);
    `shapes=None`: only the scores (for a ranking without pre-annotations)."""
    if shapes is not None and shapes not in SHAPES:
        raise PixelsegError(f"--shapes {shapes}: choose one of {', '.join(SHAPES)}")
    regions = []
    for k in labelled_classes(class_names) if shapes else []:
        binary = mask == k
        if not binary.any():
            continue
        if shapes == "mask":
            regions.append(Region(class_names[k], coco_rle_encode(binary), float(top[binary].mean())))
            continue
        for poly, comp in mask_polygons(binary, min_area):
            regions.append(Region(class_names[k], coco_rle_encode(comp), float(top[comp].mean()), [poly]))
    h, w = mask.shape
    confidence = 1 - uncertainty / np.log(max(len(class_names), 2))
    return ImageRegions(Path(image), h, w, regions, float(confidence), float(uncertainty))


# ---- writers ----------------------------------------------------------------------------------------------
def _bbox(rle: dict) -> list[float]:
    from pycocotools import mask as mask_utils

    return [float(v) for v in mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})]


def _area(rle: dict) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))


def write_coco(items: list[ImageRegions], labels: list[str], palette: dict, out: Path, **_) -> list[Path]:
    """COCO instances JSON; categories 1..K in the model's class order, file names as the inputs'."""
    cat = {n: i + 1 for i, n in enumerate(labels)}
    images: list[dict] = []
    anns: list[dict] = []
    for i, it in enumerate(items, 1):
        images.append(
            {
                "id": i,
                "file_name": it.image.name,
                "width": it.width,
                "height": it.height,
                "confidence": round(it.confidence, 6),
                "uncertainty": round(it.uncertainty, 6),
            }
        )
        for r in it.regions:
            seg = [[round(float(v), 2) for v in p.ravel()] for p in r.polygons] if r.polygons else r.rle
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": cat[r.label],
                    "segmentation": seg,
                    "area": _area(r.rle),
                    "bbox": _bbox(r.rle),
                    "iscrowd": 0,
                    "score": round(r.score, 6),
                }
            )
            if r.attributes:
                anns[-1]["attributes"] = dict(r.attributes)
    doc = {
        "info": {"description": "pixelseg pre-annotations"},
        "images": images,
        "annotations": anns,
        "categories": [{"id": cat[n], "name": n, "supercategory": ""} for n in labels],
    }
    path = out / "annotations.coco.json"
    atomic_write_text(path, json.dumps(doc))
    return [path]


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def write_cvat(
    items: list[ImageRegions], labels: list[str], palette: dict, out: Path, attributes: dict | None = None, **_
) -> list[Path]:
    """CVAT for images 1.1 XML; shapes have source="auto" (CVAT's mark for machine-made shapes).
    `attributes` (name -> values) are declared on every label, as CVAT needs before it imports them."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "size").text = str(len(items))
    ET.SubElement(task, "mode").text = "annotation"
    labs = ET.SubElement(task, "labels")
    for n in labels:
        lab = ET.SubElement(labs, "label")
        ET.SubElement(lab, "name").text = n
        ET.SubElement(lab, "color").text = _hex(palette[n])
        ET.SubElement(lab, "type").text = "any"
        attrs = ET.SubElement(lab, "attributes")
        for a_name, values in (attributes or {}).items():
            a = ET.SubElement(attrs, "attribute")
            ET.SubElement(a, "name").text = a_name
            ET.SubElement(a, "mutable").text = "False"
            ET.SubElement(a, "input_type").text = "select"
            ET.SubElement(a, "default_value").text = values[0]
            ET.SubElement(a, "values").text = "\n".join(values)
    for i, it in enumerate(items):
        im = ET.SubElement(root, "image", id=str(i), name=it.image.name, width=str(it.width), height=str(it.height))
        for r in it.regions:
            common = {"label": r.label, "source": "auto", "occluded": "0", "z_order": "0"}
            if r.polygons:
                pts = ";".join(f"{x:.2f},{y:.2f}" for x, y in r.polygons[0])
                shape = ET.SubElement(im, "polygon", {"points": pts, **common})
            else:
                counts, left, top, width, height = cvat_rle_encode(coco_rle_decode(r.rle, it.height, it.width))
                shape = ET.SubElement(
                    im,
                    "mask",
                    {
                        "rle": ", ".join(map(str, counts)),
                        "left": str(left),
                        "top": str(top),
                        "width": str(width),
                        "height": str(height),
                        **common,
                    },
                )
            for a_name, value in r.attributes.items():
                ET.SubElement(shape, "attribute", name=a_name).text = str(value)
    ET.indent(root)
    path = out / "annotations.xml"
    atomic_write_text(path, '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n")
    return [path]


def labelstudio_config(labels: list[str], palette: dict, shapes: str) -> str:
    """The labelling config the predictions refer to (from_name "label", to_name "image", data key "image")."""
    tag = "BrushLabels" if shapes == "mask" else "PolygonLabels"
    lines = [
        "<View>",
        f'  <Image name="{LS_TO}" value="${LS_DATA}" zoom="true"/>',
        f'  <{tag} name="{LS_FROM}" toName="{LS_TO}">',
    ]
    lines += [f'    <Label value="{_xml_attr(n)}" background="{_hex(palette[n])}"/>' for n in labels]
    return "\n".join([*lines, f"  </{tag}>", "</View>", ""])


def _xml_attr(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def image_reference(image: Path, image_url: str | None) -> str:
    """data.image: `image_url` + the file name, or by default the path (relative to the current directory
    where it lies under it) in Label Studio's local-files form, /data/local-files/?d=PATH."""
    if image_url:
        return image_url + quote(image.name)
    p = image.resolve()
    with contextlib.suppress(ValueError):
        p = p.relative_to(Path.cwd().resolve())
    return "/data/local-files/?d=" + quote(p.as_posix().lstrip("/"))


def labelstudio_tasks(items: list[ImageRegions], model_version: str, image_url: str | None = None) -> list[dict]:
    tasks = []
    for it in items:
        result = []
        for k, r in enumerate(it.regions):
            base = {
                "id": f"r{k}",
                "from_name": LS_FROM,
                "to_name": LS_TO,
                "original_width": it.width,
                "original_height": it.height,
                "image_rotation": 0,
                "score": round(r.score, 6),
            }
            if r.attributes:  # Label Studio shows a region's meta text beside it
                base["meta"] = {"text": [", ".join(f"{a}: {v}" for a, v in r.attributes.items())]}
            if r.polygons:
                pts = (r.polygons[0] * [100.0 / it.width, 100.0 / it.height]).round(4).tolist()
                result.append(
                    {
                        **base,
                        "type": "polygonlabels",
                        "value": {"points": pts, "closed": True, "polygonlabels": [r.label]},
                    }
                )
            else:
                rle = ls_rle_encode(coco_rle_decode(r.rle, it.height, it.width))
                result.append(
                    {**base, "type": "brushlabels", "value": {"format": "rle", "rle": rle, "brushlabels": [r.label]}}
                )
        tasks.append(
            {
                "data": {LS_DATA: image_reference(it.image, image_url), "uncertainty": round(it.uncertainty, 6)},
                "predictions": [{"model_version": model_version, "score": round(it.confidence, 6), "result": result}],
            }
        )
    return tasks


def write_labelstudio(
    items: list[ImageRegions],
    labels: list[str],
    palette: dict,
    out: Path,
    shapes: str = "polygon",
    model_version: str = "pixelseg",
    image_url: str | None = None,
    **_,
) -> list[Path]:
    tasks, config = out / "labelstudio_tasks.json", out / "labelstudio_config.xml"
    atomic_write_text(config, labelstudio_config(labels, palette, shapes))
    atomic_write_text(tasks, json.dumps(labelstudio_tasks(items, model_version, image_url)))
    return [tasks, config]


VAL_EVERY = 5  # YOLO export: every 5th image (from the 3rd, in input order) is val, so val is ~20% and spread


def _yolo_split(n: int) -> list[str]:
    """Split of each of n images: one image can only be train (no val then); otherwise every VAL_EVERY-th
    image, at least one, is val."""
    if n < 2:
        return ["train"] * n
    split = ["val" if k % VAL_EVERY == VAL_EVERY // 2 else "train" for k in range(n)]
    if "val" not in split:
        split[-1] = "val"
    return split


def _unique_names(items: list[ImageRegions]) -> list[str]:
    """Output file names: each input's own, and for inputs that share one (d1/a.jpg, d2/a.jpg) a -2, -3 ...
    suffix on the stem, so no image and no label file is written twice."""
    stems, out = set(), []  # label files are per stem, so a.jpg and a.png collide too
    for it in items:
        name, k = it.image.name, 1
        while Path(name).stem.lower() in stems:
            k += 1
            name = f"{it.image.stem}-{k}{it.image.suffix}"
        stems.add(Path(name).stem.lower())
        out.append(name)
    return out


def _place_image(src: Path, dst: Path) -> None:
    """A hard link to `src` at the new path `dst`, or a copy: never opening an existing file to write into
    it (a hard link there would be the user's photo)."""
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst} exists")  # names are unique: a bug, not a file to overwrite
    try:
        os.link(src, dst)
        return
    except OSError:  # another file system, or links not allowed
        pass
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # a new file, or an error: never through a link
    with os.fdopen(fd, "wb") as f, open(src, "rb") as g:
        shutil.copyfileobj(g, f)
    shutil.copystat(src, dst)


def write_yolo(
    items: list[ImageRegions], labels: list[str], palette: dict, out: Path, shapes: str = "polygon", **_
) -> list[Path]:
    """Ultralytics YOLO-seg, as CVAT imports it ("Ultralytics YOLO Segmentation 1.0") and Ultralytics trains
    on it: train and val splits (every 5th image val, `_yolo_split`), so the folder reads back with a real
    val split. Written to yolo.partial/ and renamed, so no half folder is left (and a failed write removes it)."""
    if shapes != "polygon":
        raise PixelsegError("--format yolo holds polygons only; drop --shapes mask")
    final, tmp = out / "yolo", out / "yolo.partial"
    if final.exists():
        raise PixelsegError(f"{final} exists; choose another --out or remove it")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        cls = {n: i for i, n in enumerate(labels)}
        listing: dict[str, list[str]] = {"train": [], "val": []}
        for it, name, split in zip(items, _unique_names(items), _yolo_split(len(items)), strict=True):
            (tmp / "labels" / split).mkdir(parents=True, exist_ok=True)
            (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
            lines = [
                f"{cls[r.label]} " + " ".join(f"{v:.6f}" for v in (r.polygons[0] / [it.width, it.height]).ravel())
                for r in it.regions
            ]
            (tmp / "labels" / split / f"{Path(name).stem}.txt").write_text("".join(ln + "\n" for ln in lines))
            _place_image(it.image, tmp / "images" / split / name)
            listing[split].append(f"images/{split}/{name}")
        (tmp / "images" / "train").mkdir(parents=True, exist_ok=True)
        doc: dict[str, str | dict[int, str]] = {"path": ".", "train": "images/train"}
        for split, rows in listing.items():
            if rows:
                (tmp / f"{split}.txt").write_text("".join(s + "\n" for s in rows))
                doc[split] = f"images/{split}"
        import yaml

        doc["names"] = {i: n for i, n in enumerate(labels)}
        (tmp / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [final]


WRITERS = {"coco": write_coco, "cvat": write_cvat, "labelstudio": write_labelstudio, "yolo": write_yolo}


def write(fmt: str, items: list[ImageRegions], class_names: list[str], palette, out: Path, **kw) -> list[Path]:
    """Write `items` in `fmt` into the folder `out`; returns the files (or YOLO's folder) written."""
    if fmt not in WRITERS:
        raise PixelsegError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    names = [class_names[k] for k in labelled_classes(class_names)]
    colours = {class_names[k]: tuple(palette[k]) for k in labelled_classes(class_names)}
    return WRITERS[fmt](items, names, colours, Path(out), **kw)


def check_options(fmt: str | None, shapes: str, min_area: int) -> None:
    """Before any work: the options `write` will need."""
    if fmt is not None and fmt not in FORMATS:
        raise PixelsegError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if shapes not in SHAPES:
        raise PixelsegError(f"--shapes {shapes}: choose one of {', '.join(SHAPES)}")
    if fmt == "yolo" and shapes != "polygon":
        raise PixelsegError("--format yolo holds polygons only; drop --shapes mask")
    if min_area < 0:
        raise PixelsegError(f"--min-area {min_area}: must be >= 0")


def write_ranking(items: list[ImageRegions], out: Path, method: str) -> list[Path]:
    """ranking.csv / ranking.json: the images, most uncertain first."""
    order = sorted(items, key=lambda it: -it.uncertainty)
    rows = [
        {
            "rank": k + 1,
            "image": str(it.image),
            "uncertainty": round(it.uncertainty, 6),
            "confidence": round(it.confidence, 6),
            "method": method,
        }
        for k, it in enumerate(order)
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["rank", "image"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "ranking.csv", buf.getvalue())
    atomic_write_text(out / "ranking.json", json.dumps(rows, indent=1))
    return [out / "ranking.csv", out / "ranking.json"]
