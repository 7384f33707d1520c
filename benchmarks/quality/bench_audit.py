"""`pixelseg audit` on known label errors: corrupt a share of the training masks with a fixed seed, train
`--folds 3`, audit, and measure how well the ranking finds the corrupted images, per kind of corruption.

    python benchmarks/quality/bench_audit.py                          # pets sample and coco-cardamage, pretrained encoder
    python benchmarks/quality/bench_audit.py --sets pets --train-args "--auto --weights none --time-budget 20m"
    python benchmarks/quality/bench_audit.py --limit 24 --train-args "--epochs 1 --image-size 64 --weights none"  # smoke

Corruptions (10% of the pool images by default, kinds dealt in turn over a seeded shuffle), one per image:
    swap      one object gets another class (pets: the pet becomes "border", the only other object class)
    drop      one object is removed (painted background; COCO: its annotation deleted)
    boundary  one object's outline dilated or eroded (a coin flip) by --boundary-px (8) pixels
    shift     one object's polygon moved by 10% of the image's shorter side in a random direction

The corrupted copy lives in --work (images are symlinks; only the changed masks / annotation file are written).
Metrics, per kind, over the ranking restricted to that kind's images and the clean ones (images with another
kind of corruption left out): average precision (mean of the precision at each corrupted image's rank) and
precision at the number corrupted; plus the same over all kinds together, and how often the audit's own kind
for the image's heaviest suspect matches. Writes <set>.json beside --work (default benchmarks/out/audit/) and
prints a table; `--audit-only` scores an earlier run's folds again (after a change to the audit method).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

SHARED = _common.SHARED_DATA
SETS = {"pets": ("oxford-pet", SHARED / "oxford-iiit-pet-sample", "trainval"),
        "cardamage": ("coco", SHARED / "coco-cardamage", "train")}
KINDS = ("swap", "drop", "boundary", "shift")
EXPECTED = {"swap": {"wrong_class"}, "drop": {"missing_label"}, "boundary": {"boundary"},
            "shift": {"missing_label", "spurious_label", "boundary"}}
PETS_PET, PETS_BG, PETS_BORDER = 1, 2, 3
TRAIN_ARGS = ("--backbone efficientnet_lite0 --weights imagenet --freeze-encoder no --batch-size 16 --loss ce+dice "
              "--schedule cosine --epochs 12 --figure-samples 1")


# ---- corrupting a copy ---------------------------------------------------------------------------------
def choose(names: list[str], rate: float, seed: int) -> dict[str, str]:
    """name -> kind for round(rate * n) images: a seeded shuffle, kinds dealt in turn."""
    rng = np.random.default_rng(seed)
    picked = [names[i] for i in rng.permutation(len(names))[:max(1, round(rate * len(names)))]]
    return {n: KINDS[k % len(KINDS)] for k, n in enumerate(picked)}


def _shift_vector(rng, h: int, w: int) -> tuple[int, int]:
    a = rng.uniform(0, 2 * np.pi)
    d = 0.1 * min(h, w)
    return round(d * np.cos(a)), round(d * np.sin(a))


def _morph(mask: np.ndarray, px: int, grow: bool) -> np.ndarray:
    import cv2
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return (cv2.dilate if grow else cv2.erode)(mask.astype(np.uint8), k) > 0


def corrupt_trimap(t: np.ndarray, kind: str, rng, px: int) -> np.ndarray:
    """A pets trimap (1 pet, 2 background, 3 border) with one corruption."""
    import cv2
    out = t.copy()
    obj = (t == PETS_PET) | (t == PETS_BORDER)
    if kind == "swap":
        out[t == PETS_PET] = PETS_BORDER
    elif kind == "drop":
        out[obj] = PETS_BG
    elif kind == "boundary":
        grow = bool(rng.integers(2)) or _morph(t == PETS_PET, px, False).sum() == 0
        pet = _morph(t == PETS_PET, px, grow)
        ring = _morph(pet, 2, True) & ~pet    # the border band redrawn around the moved outline
        out[:] = PETS_BG
        out[ring] = PETS_BORDER
        out[pet] = PETS_PET
    elif kind == "shift":
        dx, dy = _shift_vector(rng, *t.shape)
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        moved = cv2.warpAffine(np.where(obj, t, 0).astype(np.uint8), m, t.shape[::-1], flags=cv2.INTER_NEAREST)
        out[obj] = PETS_BG
        out[moved > 0] = moved[moved > 0]
    return out


def make_pets(src: Path, dst: Path, pool: list[str], rate: float, seed: int, px: int) -> dict[str, str]:
    from PIL import Image
    plan = choose(pool, rate, seed)
    rng = np.random.default_rng(seed + 1)
    (dst / "annotations" / "trimaps").mkdir(parents=True)
    os.symlink(src / "images", dst / "images")
    for f in (src / "annotations").iterdir():
        if f.is_file():
            shutil.copy(f, dst / "annotations" / f.name)
    for f in (src / "annotations" / "trimaps").iterdir():
        target = dst / "annotations" / "trimaps" / f.name
        if f.stem in plan:
            t = np.asarray(Image.open(f))
            Image.fromarray(corrupt_trimap(t, plan[f.stem], rng, px)).save(target)
        else:
            os.symlink(f, target)
    return plan


def _polygons_of(mask: np.ndarray) -> list[list[float]]:
    from pixelseg.labels.write import mask_polygons
    return [[round(float(v), 2) for v in p.ravel()] for p, _ in mask_polygons(mask, min_area=16)]


def corrupt_annotation(ann: dict, kind: str, rng, px: int, h: int, w: int, n_cats: list[int]) -> dict | None:
    """One COCO annotation corrupted (None: dropped)."""
    from pixelseg.labels.raster import polygons_rle
    from pixelseg.labels.rle import coco_rle_decode
    ann = json.loads(json.dumps(ann))
    if kind == "drop":
        return None
    if kind == "swap":
        ann["category_id"] = int(rng.choice([c for c in n_cats if c != ann["category_id"]]))
        return ann
    seg = ann["segmentation"]
    if not isinstance(seg, list):   # RLE: rasterise, move as a mask
        from pycocotools import mask as mu
        r = mu.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
        mask = mu.decode(r).astype(bool)
    else:
        rle, _ = polygons_rle([np.asarray(p, float).reshape(-1, 2) for p in seg], h, w)
        mask = coco_rle_decode(rle, h, w)
    if kind == "boundary":
        grow = bool(rng.integers(2)) or _morph(mask, px, False).sum() < 16
        mask = _morph(mask, px, grow)
    elif kind == "shift":
        dx, dy = _shift_vector(rng, h, w)
        moved = np.zeros_like(mask)
        ys, xs = np.nonzero(mask)
        keep = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        moved[ys[keep] + dy, xs[keep] + dx] = True
        mask = moved
    polys = _polygons_of(mask)
    if not polys:
        return None
    ann["segmentation"] = polys
    return ann


def make_coco(src: Path, dst: Path, pool: list[str], rate: float, seed: int, px: int) -> dict[str, str]:
    """coco-cardamage with train/_annotations.coco.json corrupted; other splits and images linked."""
    plan = choose(pool, rate, seed)
    rng = np.random.default_rng(seed + 1)
    dst.mkdir(parents=True)
    for d in src.iterdir():
        if d.is_dir() and d.name != "train":
            os.symlink(d, dst / d.name)
        elif d.is_file():
            shutil.copy(d, dst / d.name)
    (dst / "train").mkdir()
    for f in (src / "train").iterdir():
        if f.name != "_annotations.coco.json":
            os.symlink(f, dst / "train" / f.name)
    doc = json.loads((src / "train" / "_annotations.coco.json").read_text())
    cats = [c["id"] for c in doc["categories"] if any(a["category_id"] == c["id"] for a in doc["annotations"])]
    by_image: dict[int, list] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    anns, done = [], {}
    for im in doc["images"]:
        stem = Path(im["file_name"]).stem
        own = by_image.get(im["id"], [])
        kind = plan.get(stem)
        if kind and own:
            k = int(rng.integers(len(own)))
            new = corrupt_annotation(own[k], kind, rng, px, im["height"], im["width"], cats)
            own = own[:k] + ([new] if new else []) + own[k + 1:]
            done[stem] = kind
        anns += own
    doc["annotations"] = anns
    (dst / "train" / "_annotations.coco.json").write_text(json.dumps(doc))
    return done


def pool_names(dataset: str, root: Path, split: str, limit: int | None) -> list[str]:
    from pixelseg.data import get_dataset_module
    samples, _ = get_dataset_module(dataset).full_res_samples(root, split)
    return [s.name for s in (samples[:limit] if limit else samples)]


# ---- metrics -------------------------------------------------------------------------------------------
def average_precision(ranked_positive: list[bool]) -> float:
    hits, total = 0, 0.0
    for k, p in enumerate(ranked_positive, 1):
        if p:
            hits += 1
            total += hits / k
    return total / hits if hits else float("nan")


def metrics(ranking: list[dict], truth: dict[str, str]) -> dict:
    """Per kind (and all): AP and precision@n over that kind's images and the clean ones."""
    out = {}
    for kind in (*KINDS, "all"):
        rows = [r for r in ranking if r["name"] not in truth or kind == "all" or truth[r["name"]] == kind]
        pos = [r["name"] in truth for r in rows]
        n = sum(pos)
        if not n:
            continue
        heaviest = [r for r in rows if r["name"] in truth]
        kind_ok = [bool(r["suspects"]) and r["suspects"][0]["kind"] in EXPECTED[truth[r["name"]]] for r in heaviest]
        out[kind] = {"corrupted": n, "images": len(rows), "ap": round(average_precision(pos), 4),
                     "precision_at_n": round(sum(pos[:n]) / n, 4),
                     "kind_matches": round(sum(kind_ok) / len(kind_ok), 4)}
    return out


def run(cmd: list[str], log: Path) -> None:
    env = _common.repo_env()
    print("$ " + shlex.join(cmd), flush=True)
    with open(log, "a") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}); see {log}")


def bench_set(name: str, a, work: Path) -> dict:
    dataset, src, split = SETS[name]
    if not src.is_dir():
        print(f"{name}: {src} not found, skipped")
        return {}
    base = work / name
    if a.audit_only:   # the corrupted copy and the fold runs of an earlier bench run: audit and score again
        if not (base / "truth.json").is_file() or not (base / "run" / "cv.json").is_file():
            sys.exit(f"--audit-only: no earlier run in {base} (truth.json, run/cv.json)")
        truth = json.loads((base / "truth.json").read_text())
        pool = pool_names(dataset, base / "data", split, a.limit)
        earlier = json.loads((base / "bench.json").read_text()) if (base / "bench.json").is_file() else {}
        train_s, a.train_args = earlier.get("train_s"), earlier.get("train_args", a.train_args)
        shutil.rmtree(base / "audit", ignore_errors=True)
    else:
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        pool = pool_names(dataset, src, split, a.limit)
        make = make_pets if name == "pets" else make_coco
        truth = make(src, base / "data", pool, a.rate, a.seed, a.boundary_px)
        (base / "truth.json").write_text(json.dumps(truth, indent=1))
    print(f"{name}: corrupted {len(truth)} of {len(pool)} pool images "
          f"({', '.join(f'{k} {sum(v == k for v in truth.values())}' for k in KINDS)}) in {base / 'data'}")
    t0 = time.time()
    if not a.audit_only:
        train = [sys.executable, "-m", "pixelseg", "train", "--dataset", dataset, "--data-root", str(base / "data"),
                 "--folds", str(a.folds), "--seed", str(a.seed), "--run-dir", str(base / "run")]
        train += (["--limit", str(a.limit)] if a.limit else []) + shlex.split(a.train_args)
        run(train, base / "log.txt")
    t1 = time.time()
    train_s = train_s if a.audit_only else round(t1 - t0, 1)
    run([sys.executable, "-m", "pixelseg", "audit", str(base / "run"), "--out", str(base / "audit"), "--top",
         str(a.top), "--format", "none"], base / "log.txt")
    t2 = time.time()
    report = json.loads((base / "audit" / "audit.json").read_text())
    cv = json.loads((base / "run" / "cv.json").read_text())
    result = {"set": name, "dataset": dataset, "pool": len(pool), "corrupted": truth, "rate": a.rate, "seed": a.seed,
              "boundary_px": a.boundary_px, "train_args": a.train_args, "limit": a.limit,
              "cv_miou": cv["miou"], "train_s": train_s, "audit_s": round(t2 - t1, 1),
              "machine": _common.machine(), "threads": os.environ.get("OMP_NUM_THREADS"),
              "thresholds": report["thresholds"], "metrics": metrics(report["ranking"], truth)}
    (base / "bench.json").write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict]) -> str:
    lines = [f"{'set':<10}{'kind':<10}{'corrupted':>10}{'images':>8}{'AP':>8}{'P@n':>8}{'kind ok':>9}"]
    for r in results:
        for kind, m in r["metrics"].items():
            lines.append(f"{r['set']:<10}{kind:<10}{m['corrupted']:>10}{m['images']:>8}{m['ap']:>8.3f}"
                         f"{m['precision_at_n']:>8.3f}{m['kind_matches']:>9.2f}")
        lines.append(f"{'':<10}cv mIoU {r['cv_miou']['mean']:.3f}, train {r['train_s'] or 0:.0f}s, audit {r['audit_s']:.0f}s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="pets,cardamage", help="comma-separated: pets, cardamage (default: both)")
    p.add_argument("--rate", type=float, default=0.1, help="share of the pool images corrupted (default: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--boundary-px", type=int, default=8, help="dilation/erosion of boundary corruptions (default: 8)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--limit", type=int, help="only the first N pool images (smoke runs)")
    p.add_argument("--audit-only", action="store_true",
                   help="reuse --work's corrupted copies and fold runs from an earlier run: audit and score again "
                        "(after a change to the audit method)")
    p.add_argument("--top", type=int, default=10, help="overlays written by the audit (default: 10)")
    p.add_argument("--train-args", default=TRAIN_ARGS,
                   help=f"more `pixelseg train` flags (default: {TRAIN_ARGS!r}: an ImageNet EfficientNet-Lite0 "
                        "encoder trained whole, a fixed number of epochs rather than a time budget, so a busy "
                        "machine gets the same steps)")
    p.add_argument("--work", type=Path, default=_common.OUT / "audit" / "work",
                   help="where the corrupted copies, runs and audits go")
    a = p.parse_args()
    results = []
    for name in a.sets.split(","):
        r = bench_set(name.strip(), a, a.work)
        if r:
            out = a.work.parent / f"{name.strip()}.json"   # default: benchmarks/out/audit/<set>.json
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(r, indent=1))
            results.append(r)
            print(table([r]), flush=True)
    if len(results) > 1:
        print(table(results))


if __name__ == "__main__":
    main()
