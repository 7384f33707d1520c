"""Short from-scratch training curves on the pets sample, one per architecture, same budget.

Runs `pixelseg train` for each (arch, backbone) with identical settings (no pretrained weights,
--image-size, Adam 1e-3, batch 16, N epochs, optionally --limit images per split), then plots validation mIoU and training loss per epoch
for all of them into one PNG and prints a table. It shows that each architecture learns; it is not
a ranking (the budget is tiny and the machine shared).

    python benchmarks/quality/bench_curves.py --epochs 6 --image-size 64 --limit 96 --out docs/figures/zoo_curves.png
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

ROOT = _common.REPO
PAIRS = ["deeplabv3plus:mobilenet_v1", "pspnet:mobilenet_v1", "fpn:mobilenet_v1", "upernet:mobilenet_v1",
         "segformer:mit_b0"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default=",".join(PAIRS))
    p.add_argument("--data-root", default=str(_common.PETS_SAMPLE))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="first N images of each split")
    p.add_argument("--runs", type=Path, default=Path("runs/curves"))
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "zoo_curves.png")
    args = p.parse_args(argv)
    results = {}
    for pair in args.pairs.split(","):
        arch, backbone = pair.split(":", 1)
        run = args.runs / f"{arch}-{backbone.replace(':', '_')}"
        if not (run / "metrics.json").is_file():
            t = time.time()
            cmd = [sys.executable, "-m", "pixelseg", "train", "--data-root", args.data_root, "--model", arch,
                   "--backbone", backbone, "--weights", "none", "--epochs", str(args.epochs), "--batch-size",
                   str(args.batch_size), "--image-size", str(args.image_size), "--figure-samples", "2",
                   "--run-dir", str(run)] + (["--limit", str(args.limit)] if args.limit else [])
            print(" ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=_common.repo_env())
            print(f"  {time.time() - t:.0f} s", flush=True)
        results[pair] = json.loads((run / "metrics.json").read_text())
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    print(f"| arch / backbone | epochs | train loss first -> last | val mIoU first -> best |")
    print("| --- | --- | --- | --- |")
    for pair, hist in results.items():
        hist = hist if isinstance(hist, list) else hist.get("history", hist.get("epochs", []))
        ep = [h["epoch"] for h in hist]
        a1.plot(ep, [h["train_loss"] for h in hist], "-o", ms=3, label=pair)
        a2.plot(ep, [h["val_miou"] for h in hist], "-o", ms=3, label=pair)
        print(f"| {pair} | {len(hist)} | {hist[0]['train_loss']:.3f} -> {hist[-1]['train_loss']:.3f} | "
              f"{hist[0]['val_miou']:.3f} -> {max(h['val_miou'] for h in hist):.3f} |")
    a1.set(xlabel="epoch", ylabel="train loss", title="training loss")
    a2.set(xlabel="epoch", ylabel="val mIoU", title="validation mIoU (pets sample, from scratch)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
