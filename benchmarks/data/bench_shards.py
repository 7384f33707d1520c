"""Shards vs folder, one epoch end to end (issue 20's goal: shards >= 0.9x the folder per epoch, sys time
under 20% of user time), at 24, 2,400 and 24,000 samples.

Each (size, source) pair is one fresh `pixelseg train` process of 2 epochs: small images (64x64 JPEG
photos with shapes, `write_folder`), the smallest model, random init, the same flags for both sources.
Per epoch: the run's own `epoch_time_s` of epoch 2 (epoch 1 includes the folder's one-off decode cache
build and the workers' start); CPU: user and sys time of the whole run from getrusage(RUSAGE_CHILDREN).

    python benchmarks/data/bench_shards.py --sizes 24 2400 24000 [--epochs 2] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

FLAGS = ["--model", "unet", "--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "64",
         "--batch-size", "16", "--precision", "fp32", "--figure-samples", "0", "--device", "cpu", "--seed", "0"]


def _run(cmd, env) -> dict:
    """Wall, user and sys seconds of one child process (and its DataLoader workers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return {"wall_s": wall, "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime}


def bench(n: int, scratch: Path, epochs: int, workers: int) -> list[dict]:
    from pixelseg.data.synthetic import write_folder
    env = _common.repo_env()
    root, shards = scratch / f"folder{n}", scratch / f"shards{n}"
    write_folder(root, n, (64, 64), seed=0)
    subprocess.run([sys.executable, "-m", "pixelseg", "shards", "--dataset", "folder", "--data-root", str(root),
                    "--out", str(shards)], env=env, check=True, capture_output=True)
    rows = []
    for source, data in (("folder", ["--dataset", "folder", "--data-root", str(root)]),
                         ("shards", ["--dataset", "shards", "--data-root", str(shards)])):
        run = scratch / f"run-{source}{n}"
        cpu = _run([sys.executable, "-m", "pixelseg", "train", *data, *FLAGS, "--epochs", str(epochs),
                    "--workers", str(workers), "--run-dir", str(run)], env)
        hist = json.loads((run / "metrics.json").read_text())
        from pixelseg.core.checkpoint import load_checkpoint
        steps = load_checkpoint(run / "last.pt")["global_step"]
        rows.append({"n": n, "source": source, "epoch_s": hist[-1]["epoch_time_s"],
                     "img_s": hist[-1]["train_images_per_s"], "steps": steps, **cpu})
        shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[24, 2400, 24000])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=_common.OUT / "shards.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as d:
        for n in args.sizes:
            rows += bench(n, Path(d), args.epochs, args.workers)
            f, s = rows[-2], rows[-1]
            print(f"n={n}: folder {f['epoch_s']:.1f} s/epoch, shards {s['epoch_s']:.1f} s/epoch "
                  f"({f['epoch_s'] / s['epoch_s']:.2f}x of the folder's speed); sys/user: folder "
                  f"{f['sys_s'] / f['user_s']:.0%}, shards {s['sys_s'] / s['user_s']:.0%}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "load": os.getloadavg(), "date": time.strftime("%Y-%m-%d")},
                                   indent=1))
    print("| samples | source | s/epoch (epoch 2) | img/s | steps | wall s | user s | sys s | sys/user |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['source']} | {r['epoch_s']:.1f} | {r['img_s']:.0f} | {r['steps']} | {r['wall_s']:.0f} "
              f"| {r['user_s']:.0f} | {r['sys_s']:.0f} | {r['sys_s'] / max(r['user_s'], 1e-9):.0%} |")


if __name__ == "__main__":
    main()
