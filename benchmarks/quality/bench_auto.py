"""`pixelseg train --auto --time-budget B` against the defaults, on real and generated data (issue 18).

For each dataset: one run with `--auto --time-budget B` and nothing else tuned, and one with the defaults
(the tutorial's recipe, `--weights none`), each in its own process; prints best val mIoU, wall time and,
for the auto run, the plan it chose (RUN/plan.yaml) and how the time was spent (summary.json). Results go
to benchmarks/out/bench_auto.json. Targets (issue 18): pets >= 0.60 val mIoU in 10 min from scratch
(defaults 0.451); CamVid >= 0.563 in 20 min (the hand recipe in docs/results.md); coco-cardamage and the
tiny-object set: well above the defaults.

    python benchmarks/quality/bench_auto.py                         # all four, budgets 10m / 20m / 10m / 10m
    python benchmarks/quality/bench_auto.py --only pets --budget pets=5m
    python benchmarks/quality/bench_auto.py --only tiny --no-defaults

The tiny-object set is generated (benchmarks/out/tiny_objects): 256x256 "aerial" tiles with 8-12 px
targets (class 1) and larger patches (class 2) on textured ground, named seqNN_FFFF in sequences of
near-identical frames, so a plan must keep the input large, zoom out little, and group the val split.
coco-cardamage is skipped, saying why, while `--dataset coco` is not registered.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

ROOT, DATA, OUT = _common.REPO, _common.SHARED_DATA, _common.OUT
BUDGETS = {"pets": "10m", "camvid": "20m", "coco": "10m", "tiny": "10m"}


def make_tiny_objects(root: Path, sequences: int = 16, frames: int = 10, size: int = 256, seed: int = 0) -> Path:
    """Write the tiny-object folder dataset (idempotent: kept when already there)."""
    from PIL import Image
    if (root / "masks").is_dir() and len(list((root / "masks").iterdir())) == sequences * frames:
        return root
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for s in range(sequences):
        ground = rng.integers(60, 140, 3)
        targets = rng.integers(0, size - 12, (int(rng.integers(6, 14)), 2))
        patches = rng.integers(0, size - 48, (int(rng.integers(1, 3)), 2))
        for f in range(frames):  # a slowly drifting camera: frames of one sequence nearly repeat
            dy, dx = (rng.integers(-2, 3, 2) + f).tolist()
            mask = np.zeros((size, size), np.uint8)
            img = np.clip(ground + rng.normal(0, 18, (size, size, 3)), 0, 255)
            for y, x in patches:
                y, x = (y + dy) % (size - 48), (x + dx) % (size - 48)
                mask[y:y + 40, x:x + 48] = 2
                img[y:y + 40, x:x + 48] = img[y:y + 40, x:x + 48] * 0.6 + np.array([40, 120, 40]) * 0.4
            for y, x in targets:
                y, x = (y + dy) % (size - 12), (x + dx) % (size - 12)
                r = int(rng.integers(4, 7))
                yy, xx = np.ogrid[-r:r + 1, -r:r + 1]
                disc = yy ** 2 + xx ** 2 <= r * r
                mask[y:y + 2 * r + 1, x:x + 2 * r + 1][disc] = 1
                img[y:y + 2 * r + 1, x:x + 2 * r + 1][disc] = np.array([220, 60, 50]) + rng.normal(0, 15, 3)
            name = f"seq{s:02d}_{f:04d}.png"
            Image.fromarray(img.astype(np.uint8)).save(root / "images" / name)
            Image.fromarray(mask).save(root / "masks" / name)
    (root / "classes.csv").write_text("id,name,r,g,b\n0,ground,0,0,0\n1,target,255,0,0\n2,patch,0,255,0\n")
    return root


def coco_registered() -> bool:
    from pixelseg.data import DATASETS
    return "coco" in DATASETS


def datasets() -> dict:
    return {
        "pets": ["--dataset", "oxford-pet", "--data-root", str(DATA / "oxford-iiit-pet-sample")],
        "camvid": ["--dataset", "camvid", "--data-root", str(DATA / "camvid")],
        "coco": ["--dataset", "coco", "--data-root", str(DATA / "coco-cardamage")],
        "tiny": ["--dataset", "folder", "--data-root", str(OUT / "tiny_objects")],
    }


def run(args: list[str], run_dir: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pixelseg", "train", *args, "--run-dir", str(run_dir)]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=_common.repo_env(TQDM_DISABLE="1"))
    wall = time.time() - t0
    if p.returncode:
        return {"cmd": " ".join(cmd), "error": (p.stderr or p.stdout).strip()[-600:], "wall_s": wall}
    summary = json.loads((run_dir / "summary.json").read_text())
    out = {"cmd": " ".join(cmd), "best_val_miou": summary["best_val_miou"], "wall_s": wall,
           "epochs": summary.get("epochs_done", summary.get("epochs")), "stopped_by": summary.get("stopped_by"),
           "time_s": summary.get("time_s")}
    if (run_dir / "plan.yaml").is_file():
        out["plan"] = (run_dir / "plan.yaml").read_text()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="pets,camvid,coco,tiny", help="comma-separated: pets, camvid, coco, tiny")
    ap.add_argument("--budget", action="append", default=[], metavar="NAME=DURATION",
                    help="override a budget, e.g. pets=5m")
    ap.add_argument("--no-defaults", action="store_true", help="skip the runs with the default recipe")
    ap.add_argument("--out", type=Path, default=OUT / "bench_auto.json")
    a = ap.parse_args()
    budgets = dict(BUDGETS, **dict(b.split("=", 1) for b in a.budget))
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = _common.stamp()
    results = {}
    for name in a.only.split(","):
        if name == "coco" and not coco_registered():
            print(f"{name}: skipped: --dataset coco is not registered in this checkout (the labels issue adds it)")
            continue
        if name == "tiny":
            make_tiny_objects(OUT / "tiny_objects")
        elif not Path(datasets()[name][3]).is_dir():
            print(f"{name}: skipped: {datasets()[name][3]} not found")
            continue
        data = datasets()[name]
        res = {"budget": budgets[name]}
        res["auto"] = run([*data, "--auto", "--time-budget", budgets[name]], OUT / f"auto-{name}-{stamp}", 7200)
        if not a.no_defaults:
            # the same val split as the plan's (it groups the tiny set's sequences): scores compare
            same_split = ["--val-group", "prefix"] if name == "tiny" else []
            res["defaults"] = run([*data, "--weights", "none", *same_split], OUT / f"defaults-{name}-{stamp}", 7200)
        results[name] = res
        for kind in ("auto", "defaults"):
            r = res.get(kind)
            if r:
                print(f"{name} {kind}: " + (f"error: {r['error']}" if "error" in r else
                      f"best val mIoU {r['best_val_miou']:.4f}, wall {r['wall_s'] / 60:.1f} min, "
                      f"{r['epochs']} epochs, stopped by {r['stopped_by']}"))
        if "plan" in res["auto"]:
            print(res["auto"]["plan"])
        a.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
