"""The data path at scale: memory vs dataset size, one decode per machine, data wait, shards vs folder.

Generates on-disk folder datasets with structure (512×512 JPEG photos with shapes, PNG index masks;
`pixelseg.data.synthetic.write_folder`) and runs `pixelseg train` on the tutorial model (U-Net /
MobileNetV2, random init) with random-scale 512×512 crops in fresh processes. `--code DIR` runs another
checkout (e.g. `git archive` of the pre-change commit) to put today's numbers beside the new ones.

One "epoch" is capped at `--steps` optimiser steps (and as many validation batches): the data
structures are built for the whole split either way (that is what grows with N), only the number of
model steps is cut, because one real epoch at 512×512 takes hours on 2 shared CPU cores.

    python benchmarks/data/bench_data.py gen --sizes 500 2000 8000
    python benchmarks/data/bench_data.py rss --sizes 500 2000 8000 [--code /tmp/pixelseg-old]
    python benchmarks/data/bench_data.py torchrun --sizes 500 [--code ...]     # 2 ranks vs 1: decode CPU, summed PSS
    python benchmarks/data/bench_data.py wait --sizes 500                      # data-wait fraction, shards vs folder
    python benchmarks/data/bench_data.py pipe --sizes 500 --crop 512           # data pipeline alone: folder vs shards
    python benchmarks/data/bench_data.py decoders                              # PIL vs torchvision.io.decode_jpeg
    python benchmarks/data/bench_data.py assemble                              # batch assembly: memory vs disk store
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

REPO, OUT = _common.REPO, _common.OUT / "data"

# Runs inside each training process: cap the steps, report peak RSS and the CPU time spent loading data.
WRAPPER = r'''
import itertools, json, os, resource, sys, time
import torch
steps = int(os.environ["BENCH_STEPS"])
class Capped(torch.utils.data.DataLoader):
    def __iter__(self):
        return itertools.islice(super().__iter__(), steps)
    def __len__(self):
        return min(steps, super().__len__())
torch.utils.data.DataLoader = Capped
import pixelseg.data as data, pixelseg.training.train as train
load = data.load_split
cpu = [0.0]
def timed(*a, **k):
    t = time.process_time()
    try:
        return load(*a, **k)
    finally:
        cpu[0] += time.process_time() - t
train.load_split = timed
from pixelseg.cli import main
rc = main(sys.argv[1:])
rank = os.environ.get("RANK", "0")
with open(os.environ["BENCH_OUT"] + f".rank{rank}.json", "w") as f:
    json.dump({"rc": rc, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
               "load_cpu_s": cpu[0]}, f)
sys.exit(rc)
'''


def gen(args):
    """N pairs; beyond --unique, the generated pairs are hard-linked under new names (decode work and
    memory do not depend on content repeating, and generating 8000 images on a busy 2-core box takes hours)."""
    from pixelseg.data.synthetic import write_folder
    base = args.data / f"unique{args.unique}"
    if not ((base / "masks").is_dir() and len(list((base / "masks").iterdir())) == args.unique):
        t = time.time()
        write_folder(base, args.unique, (512, 512), seed=0)
        print(f"{base}: {args.unique} pairs in {time.time() - t:.0f}s", flush=True)
    for n in args.sizes:
        root = args.data / f"n{n}"
        if (root / "masks").is_dir() and len(list((root / "masks").iterdir())) == n:
            continue
        shutil.rmtree(root, ignore_errors=True)
        for sub, ext in (("images", "jpg"), ("masks", "png")):
            (root / sub).mkdir(parents=True)
            for i in range(n):
                os.link(base / sub / f"img_{i % args.unique:05d}.{ext}", root / sub / f"img_{i:05d}.{ext}")
        print(f"{root}: {n} pairs", flush=True)


def _pss_tree(pid: int) -> float:
    import psutil
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def run_train(args, code: Path, data_args: list[str], tag: str, nproc: int = 1, cache_dir: Path | None = None,
              extra: list[str] = ()) -> dict:
    """One capped `pixelseg train` (under torchrun when nproc > 1); peak summed PSS sampled every 0.2 s."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-{tag}-", dir=args.scratch))
    cache = cache_dir or work / "cache"
    env = _common.repo_env(code, PIXELSEG_CACHE=str(cache), TQDM_DISABLE="1",
                          BENCH_STEPS=str(args.steps), BENCH_OUT=str(work / "res"), OMP_NUM_THREADS=str(max(1, 2 // nproc)))
    wrapper = work / "wrapper.py"
    wrapper.write_text(WRAPPER)
    train_args = ["train", *data_args, "--model", "unet", "--weights", "none", "--epochs", "1",
                  "--image-size", str(args.crop), "--crop", "--scale-range", "0.5,2.0", "--batch-size", str(args.batch),
                  "--precise-bn", "0", "--figure-samples", "1", "--run-dir", str(work / "run"), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(wrapper), *train_args]
    else:
        cmd = [sys.executable, str(wrapper), *train_args]
    t = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], _pss_tree(proc.pid))
            time.sleep(0.2)
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, _ = proc.communicate()
    th.join()
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob("res.rank*.json"))]
    if proc.returncode != 0 or not ranks:
        raise SystemExit(f"{tag}: failed\n{out[-3000:]}")
    hist = json.loads((work / "run" / "metrics.json").read_text())[-1]
    res = {"tag": tag, "nproc": nproc, "wall_s": time.time() - t, "peak_pss_sum_mb": peak[0],
           "maxrss_mb": max(r["maxrss_mb"] for r in ranks),
           "workers_maxrss_mb": max(r["children_maxrss_mb"] for r in ranks),
           "load_cpu_s_sum": sum(r["load_cpu_s"] for r in ranks), "load_cpu_s": [r["load_cpu_s"] for r in ranks],
           "data_time_frac": hist["data_time_frac"], "train_images_per_s": hist["train_images_per_s"]}
    print(json.dumps(res), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _record(args, name: str, rows: list[dict]):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    old = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(old + [dict(r, code=str(args.code), steps=args.steps, batch=args.batch, crop=args.crop)
                                      for r in rows], indent=1))


def rss(args):
    rows = []
    for n in args.sizes:
        rows.append(dict(run_train(args, args.code, ["--dataset", "folder", "--data-root", str(args.data / f"n{n}")],
                                   f"rss-n{n}"), n=n))
    _record(args, "rss", rows)


def torchrun(args):
    rows = []
    for n in args.sizes:
        for nproc in (1, 2):
            rows.append(dict(run_train(args, args.code, ["--dataset", "folder", "--data-root", str(args.data / f"n{n}")],
                                       f"ddp{nproc}-n{n}", nproc=nproc), n=n))
    _record(args, "torchrun", rows)


def wait(args):
    """Data-wait fraction on the folder data (warm decode cache) and the same run from shards."""
    rows = []
    for n in args.sizes:
        root = args.data / f"n{n}"
        cache = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.scratch))
        folder = ["--dataset", "folder", "--data-root", str(root)]
        run_train(args, args.code, folder, f"warmup-n{n}", cache_dir=cache)  # builds the decode cache
        rows.append(dict(run_train(args, args.code, folder, f"folder-n{n}", cache_dir=cache), n=n, source="folder"))
        shards = args.data / f"n{n}-shards"
        if not (shards / "val.json").is_file():
            env = _common.repo_env(args.code, TQDM_DISABLE="1")
            subprocess.run([sys.executable, "-m", "pixelseg", "shards", *folder, "--out", str(shards)], env=env,
                           check=True)
        rows.append(dict(run_train(args, args.code, ["--dataset", "shards", "--data-root", str(shards)],
                                   f"shards-n{n}"), n=n, source="shards"))
        shutil.rmtree(cache, ignore_errors=True)
    _record(args, "wait", rows)


PIPE = r'''
import json, sys, time
import torch
from pixelseg.data import load_split, collate_batch
from pixelseg.data.base import CacheSpec
from pixelseg.data.augment import build_train_transform
name, root, crop, batch, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ds = load_split(name, root, "train", (crop, crop), None, CacheSpec("mmap", full_res=True))
ds.transform = build_train_transform((crop, crop), scale=(0.5, 2.0), crop=True, hflip=True)
if isinstance(ds, torch.utils.data.IterableDataset):
    ds.configure(batch, workers, 0, 1, shuffle=True, even=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
else:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=collate_batch)
for epoch in range(2):  # epoch 1 warms the decode cache and the workers; epoch 2 is timed
    t, n = time.time(), 0
    for x, y in loader:
        n += len(x)
print(json.dumps({"source": name, "images": n, "images_per_s": n / (time.time() - t)}))
'''


def pipe(args):
    """Data pipeline alone (no model): one epoch of random-scale crops from the folder (decode cache) vs
    from shards, same transform, same workers: what a training step would wait for at most."""
    env = _common.repo_env(args.code, TQDM_DISABLE="1",
                           PIXELSEG_CACHE=tempfile.mkdtemp(prefix="bench-cache-", dir=args.scratch))
    rows = []
    for n in args.sizes:
        folder = args.data / f"n{n}"
        shards = args.data / f"n{n}-shards"
        if not (shards / "val.json").is_file():
            subprocess.run([sys.executable, "-m", "pixelseg", "shards", "--dataset", "folder", "--data-root",
                            str(folder), "--out", str(shards)], env=env, check=True)
        for name, root in (("folder", folder), ("shards", shards)):
            out = subprocess.run([sys.executable, "-c", PIPE, name, str(root), str(args.crop), str(args.batch),
                                  str(args.workers)], env=env, check=True, capture_output=True, text=True).stdout
            rows.append(dict(json.loads(out.strip().splitlines()[-1]), n=n, workers=args.workers))
            print(json.dumps(rows[-1]), flush=True)
    _record(args, "pipe", rows)
    shutil.rmtree(env["PIXELSEG_CACHE"], ignore_errors=True)


def decoders(args):
    """Full-resolution decode of 512×512 JPEGs: PIL (pixelseg.data.io.read_image) vs torchvision.io."""
    import numpy as np
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from pixelseg.data.io import read_image
    torch.set_num_threads(1)
    files = sorted((args.data / f"n{args.sizes[0]}" / "images").iterdir())[:args.count]
    res = {}
    for name, fn in (("PIL read_image", lambda p: read_image(p)),
                     ("torchvision decode_jpeg", lambda p: decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB)),
                     ("PIL read_image at 128x128 (draft)", lambda p: read_image(p, (128, 128)))):
        fn(files[0])
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for p in files:
                fn(p)
            best = min(best, time.perf_counter() - t)
        res[name] = 1000 * best / len(files)
    a = read_image(files[0])
    b = decode_jpeg(read_file(str(files[0])), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
    res["max_abs_diff_PIL_vs_torchvision"] = int(np.abs(a.astype(int) - b.astype(int)).max())
    print(json.dumps(res, indent=1))
    _record(args, "decoders", [dict(res, files=len(files))])


def assemble(args):
    """Batch assembly (64 × 128×128, the tutorial default): private in-memory array vs the disk store."""
    sys.path.insert(0, str(args.code))  # --code: another checkout's pixelseg, before this one
    import numpy as np
    import torch
    os.environ["PIXELSEG_CACHE"] = str(Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.scratch)))
    from pixelseg.data import load_split
    root = args.data / f"n{args.sizes[0]}"
    res = {}
    for mode in ("memory", "mmap"):
        ds = load_split("folder", root, "train", (128, 128), use_cache=False if mode == "memory" else mode)
        rng = np.random.default_rng(0)
        batches = [rng.choice(len(ds), 64, replace=False).tolist() for _ in range(50)]
        ds.__getitems__(batches[0])
        t = time.perf_counter()
        for b in batches:
            x, y = ds.__getitems__(b)
        res[mode] = 1000 * (time.perf_counter() - t) / len(batches)
    print(json.dumps({"ms_per_batch_of_64": res}))
    _record(args, "assemble", [res])
    shutil.rmtree(os.environ["PIXELSEG_CACHE"], ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=("gen", "rss", "torchrun", "wait", "pipe", "decoders", "assemble"))
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("BENCH_DATA", "/tmp/pixelseg-bench-data")))
    p.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--code", type=Path, default=REPO, help="checkout whose pixelseg runs (default: this one)")
    p.add_argument("--steps", type=int, default=4, help="optimiser steps per capped epoch")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--crop", type=int, default=512, help="random-scale crop size (--image-size)")
    p.add_argument("--count", type=int, default=100, help="decoders: files decoded")
    p.add_argument("--unique", type=int, default=500, help="gen: distinct generated pairs (the rest are hard links)")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--workers", type=int, default=2, help="pipe: DataLoader workers")
    args = p.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    args.code = args.code.resolve()
    globals()[args.task](args)


if __name__ == "__main__":
    main()
