"""Annotation formats: parse + rasterise speed per format, convert speed, and training per epoch from COCO vs
from the folder `pixelseg convert` made of it (side by side, one run).

    python benchmarks/data/bench_labels.py decode [--images 60]      # synthetic 640×480 exports, 8 polygons/masks each
    python benchmarks/data/bench_labels.py convert                   # ../shared/data/coco-cardamage -> folder
    python benchmarks/data/bench_labels.py epoch [--limit 32]        # train 2 epochs from coco and from the folder,
                                                                # alternating, --repeats times each

Writes benchmarks/out/labels/*.json and prints one table per part.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

OUT = _common.OUT / "labels"
CARDAMAGE = _common.SHARED_DATA / "coco-cardamage"
W, H, SHAPES = 640, 480, 8


def _scene(n: int, seed: int = 0):
    """n images of random star-shaped 24-point polygons (label, points) per image."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        shapes = []
        for _ in range(SHAPES):
            cx, cy, r = rng.uniform(60, W - 60), rng.uniform(60, H - 60), rng.uniform(20, 120)
            t = np.sort(rng.uniform(0, 2 * np.pi, 24))
            rr = r * rng.uniform(0.6, 1.0, 24)
            shapes.append((f"c{rng.integers(0, 4)}", np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], 1)))
        out.append(shapes)
    return out


def _write_all(root: Path, scene) -> dict[str, Path]:
    """The scene in each format (+ the RLE flavours), images shared by symlink."""
    from PIL import Image

    from pixelseg.labels.raster import polygons_rle
    from pixelseg.labels.rle import cvat_rle_encode, ls_rle_encode
    from pycocotools import mask as mu
    img_dir = root / "img"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"im{i:04d}.jpg" for i in range(len(scene))]
    for n in names:
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img_dir / n, quality=90)
    labels = ["c0", "c1", "c2", "c3"]

    def mask(p):
        return mu.decode(polygons_rle([p], H, W)[0]).astype(bool)
    paths = {}
    for fmt in ("coco", "coco-rle", "cvat", "cvat-mask", "labelstudio", "labelstudio-brush", "labelme", "yolo"):
        d = root / fmt
        d.mkdir()
        paths[fmt] = d
    # COCO
    for fmt, rle in (("coco", False), ("coco-rle", True)):
        (paths[fmt] / "images").symlink_to(img_dir)
        anns = []
        for i, shapes in enumerate(scene):
            for lab, p in shapes:
                seg = ({"size": [H, W], "counts": mu.encode(np.asfortranarray(mask(p).astype(np.uint8)))["counts"].decode()}
                       if rle else [p.ravel().tolist()])
                anns.append({"id": len(anns), "image_id": i, "category_id": labels.index(lab) + 1, "segmentation": seg,
                             "iscrowd": 0})
        doc = {"images": [{"id": i, "file_name": n, "width": W, "height": H} for i, n in enumerate(names)],
               "annotations": anns, "categories": [{"id": k + 1, "name": n} for k, n in enumerate(labels)]}
        (paths[fmt] / "_annotations.coco.json").write_text(json.dumps(doc))
    # CVAT
    for fmt, as_mask in (("cvat", False), ("cvat-mask", True)):
        (paths[fmt] / "images").symlink_to(img_dir)
        rows = ["<annotations><version>1.1</version><meta><task><labels>"]
        rows += [f"<label><name>{n}</name></label>" for n in labels] + ["</labels></task></meta>"]
        for n, shapes in zip(names, scene):
            rows.append(f'<image id="0" name="{n}" width="{W}" height="{H}">')
            for lab, p in shapes:
                if as_mask:
                    c, left, top, w, h = cvat_rle_encode(mask(p))
                    rows.append(f'<mask label="{lab}" rle="{", ".join(map(str, c))}" left="{left}" top="{top}" '
                                f'width="{w}" height="{h}" z_order="0"/>')
                else:
                    rows.append(f'<polygon label="{lab}" points="{";".join(f"{x:.2f},{y:.2f}" for x, y in p)}" z_order="0"/>')
            rows.append("</image>")
        (paths[fmt] / "annotations.xml").write_text("\n".join(rows + ["</annotations>"]))
    # Label Studio
    for fmt, brush in (("labelstudio", False), ("labelstudio-brush", True)):
        (paths[fmt] / "images").symlink_to(img_dir)
        tasks = []
        for i, (n, shapes) in enumerate(zip(names, scene)):
            res = []
            for k, (lab, p) in enumerate(shapes):
                base = {"id": f"{i}-{k}", "original_width": W, "original_height": H}
                res.append({**base, "type": "brushlabels", "value": {"format": "rle", "rle": ls_rle_encode(mask(p)),
                                                                      "brushlabels": [lab]}} if brush else
                           {**base, "type": "polygonlabels", "value": {"points": (p / [W / 100, H / 100]).tolist(),
                                                                        "polygonlabels": [lab]}})
            tasks.append({"id": i, "data": {"image": n}, "annotations": [{"result": res}]})
        (paths[fmt] / "export.json").write_text(json.dumps(tasks))
    # LabelMe
    for n, shapes in zip(names, scene):
        (paths["labelme"] / n).symlink_to(img_dir / n)
        (paths["labelme"] / n.replace(".jpg", ".json")).write_text(json.dumps({
            "shapes": [{"label": lab, "points": p.tolist(), "shape_type": "polygon"} for lab, p in shapes],
            "imagePath": n, "imageHeight": H, "imageWidth": W}))
    # YOLO
    (paths["yolo"] / "images").mkdir()
    (paths["yolo"] / "images" / "train").symlink_to(img_dir)
    (paths["yolo"] / "labels" / "train").mkdir(parents=True)
    for n, shapes in zip(names, scene):
        (paths["yolo"] / "labels" / "train" / n.replace(".jpg", ".txt")).write_text("\n".join(
            f"{labels.index(lab)} " + " ".join(f"{x / W:.6f} {y / H:.6f}" for x, y in p) for lab, p in shapes))
    (paths["yolo"] / "data.yaml").write_text("train: images/train\nnames: [c0, c1, c2, c3]\n")
    return paths


def decode(args) -> dict:
    import importlib

    from pixelseg.labels.raster import rasterize
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_all(Path(tmp), _scene(args.images))
        importlib.import_module("pixelseg.labels.coco").read(paths["coco"])  # warm-up: imports, page cache
        for fmt, d in paths.items():
            mod = importlib.import_module(f"pixelseg.labels.{fmt.split('-')[0]}")
            t0 = time.perf_counter()
            labels = mod.read(d)
            t1 = time.perf_counter()
            for it in labels.items:
                rasterize(it.shapes, it.height, it.width)
            t2 = time.perf_counter()
            n = len(labels.items)
            rows[fmt] = {"images": n, "parse_ms_per_image": 1000 * (t1 - t0) / n,
                         "rasterise_ms_per_image": 1000 * (t2 - t1) / n}
            print(f"{fmt:<18} {n:>4} images  parse {rows[fmt]['parse_ms_per_image']:7.2f} ms/img  "
                  f"rasterise {rows[fmt]['rasterise_ms_per_image']:6.2f} ms/img")
    return rows


def convert(args) -> dict:
    from pixelseg.data.convert import convert as run
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = run("coco", CARDAMAGE, Path(tmp) / "out", progress=False)
        dt = time.perf_counter() - t0
    out = {"images": r["images"], "seconds": dt, "images_per_s": r["images"] / dt}
    print(f"convert coco-cardamage -> folder: {r['images']} images (640×640) in {dt:.1f} s, {out['images_per_s']:.1f} img/s")
    return out


def _train(dataset: str, root: Path, run: Path, cache: str, limit: int, size: int) -> list[float]:
    cmd = [sys.executable, "-m", "pixelseg", "train", "--dataset", dataset, "--data-root", str(root), "--weights",
           "none", "--image-size", str(size), "--epochs", "2", "--limit", str(limit), "--batch-size", "8",
           "--run-dir", str(run), "--cache", cache, "--figure-samples", "0", "--precise-bn", "0", "--seed", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_common.repo_env())
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return [e["epoch_time_s"] for e in json.loads((run / "metrics.json").read_text())]


def epoch(args) -> dict:
    from pixelseg.data.convert import convert as run_convert
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["PIXELSEG_CACHE"] = str(tmp / "cache")
        run_convert("coco", CARDAMAGE, tmp / "folder", progress=False)
        for cache in ("mmap", "none"):
            for rep in range(args.repeats):  # alternate the two so that load from other jobs hits both alike
                pair = (("coco", CARDAMAGE), ("folder", tmp / "folder"))
                for dataset, root in pair if rep % 2 == 0 else pair[::-1]:
                    times = _train(dataset, root, tmp / f"run-{dataset}-{cache}-{rep}", cache, args.limit, args.size)
                    rows.setdefault(f"{dataset} --cache {cache}", []).append(times)
                    print(f"{dataset:<7} --cache {cache:<5} run {rep}: epoch times (s) "
                          f"{', '.join(f'{t:.1f}' for t in times)}")
        for k, runs in rows.items():
            print(f"{k:<22} best second epoch {min(r[-1] for r in runs):.1f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("decode", "convert", "epoch"))
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    result = {"decode": decode, "convert": convert, "epoch": epoch}[args.what](args)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.what}.json").write_text(json.dumps({"machine": _common.cpu_model(), "args": vars(args), "result": result}, indent=1))


if __name__ == "__main__":
    main()
