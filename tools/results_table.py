"""Markdown rows for docs/results.md from run directories (metrics.json, summary.json, eval_*.json).

    python tools/results_table.py RUN_DIR [RUN_DIR ...]

Prints one row per run with the best epoch's G / C / mIoU (the scores `best.pt` holds), epochs,
wall time, and a per-class IoU table; then the uncertainty rows of any `eval_*.json` that holds an
"uncertainty" report.
"""
import json
import sys
from pathlib import Path


def main(runs):
    print("| run | epochs | best epoch | G | C | mIoU | train wall time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    per_class = {}
    for run in map(Path, runs):
        hist = json.loads((run / "metrics.json").read_text())
        best = max(hist, key=lambda h: h["val_miou"])
        wall = sum(h["epoch_time_s"] for h in hist)
        print(f"| {run.name} | {len(hist)} | {best['epoch']} | {100 * best['val_pixel_acc']:.1f} | "
              f"{100 * best['val_mean_class_acc']:.1f} | {100 * best['val_miou']:.1f} | {wall / 60:.0f} min |")
        per_class[run.name] = best["val_iou"]
    names = list(next(iter(per_class.values())))
    print()
    print("| class IoU | " + " | ".join(per_class) + " |")
    print("| --- |" + " --- |" * len(per_class))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{100 * v[n]:.1f}" for v in per_class.values()) + " |")
    print()
    print("| run, source | ECE | kept acc. at drop 0% / 10% / 20% / 50% |")
    print("| --- | --- | --- |")
    for run in map(Path, runs):
        for f in sorted(run.glob("eval_*.json")):
            unc = json.loads(f.read_text()).get("uncertainty")
            if not unc:
                continue
            rows = [("softmax 1 pass, entropy", unc["softmax"], "entropy")]
            if "mc" in unc:
                rows += [(f"MC {unc['mc_samples']}, entropy", unc["mc"], "entropy"),
                         (f"MC {unc['mc_samples']}, variance", unc["mc"], "variance")]
            for label, st, key in rows:
                k = st["kept_accuracy"][key]
                print(f"| {run.name}, {label} | {100 * st['ece']:.2f}% | " +
                      " / ".join(f"{100 * k[d]:.1f}" for d in ("0%", "10%", "20%", "50%")) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
