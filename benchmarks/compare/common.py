"""What the three comparison runners share: data on disk, the test set they are scored on, and the score.

Only numpy, Pillow and the standard library, because this module is imported by the TensorFlow runner
(its own virtualenv, no torch) as well as by the torch runners. Keeping the data reader and the mIoU
here means the three frameworks are scored on the very same arrays with the very same arithmetic.
Paths and peak memory come from ``benchmarks/_common.py`` (no torch either), which every importer has put on
``sys.path`` with the scripts' two-line idiom.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import OUT, PETS_SAMPLE, REPO, peak_rss_bytes  # noqa: F401  (re-exported for the runners)

NUM_CLASSES = 3  # Oxford-IIIT Pet trimaps: 0 pet, 1 background, 2 border (after subtracting 1)


def emit(result: dict) -> None:
    """Every runner ends by printing exactly one JSON line; the harness reads the last line that parses."""
    print(json.dumps(result), flush=True)


def parse_last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_measured(cmd: list[str], env: dict | None = None, timeout: float | None = None, cwd=None) -> dict:
    """Run a child process; return its stdout/stderr, exit code, wall time and *its own* peak RSS.

    ``os.wait4`` gives the rusage of exactly that child (``RUSAGE_CHILDREN`` would mix in every
    earlier child), so TensorFlow, SMP and pixelseg are all measured from outside in the same way.
    stdout/stderr go to temporary files: a pipe could fill up while we poll wait4.
    """
    import tempfile

    t0 = time.time()
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, env=env, cwd=cwd, text=True)
        deadline = None if timeout is None else t0 + timeout
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.time() > deadline and not killed:
                proc.kill()
                killed = True
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    if killed:
        err += f"\n[benchmark] killed after {timeout} s"
    return {"stdout": out, "stderr": err, "rc": proc.returncode, "wall_s": time.time() - t0,
            "peak_rss_bytes": usage.ru_maxrss * 1024}  # Linux reports kilobytes


# ---- data on disk ----------------------------------------------------------------------------

def _blob_sample(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A pet-like sample: an elliptic blob (pet), a ring around it (border), the rest background."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.35) * h, rng.uniform(0.15, 0.35) * w
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    cls = np.where(d < 0.9, 0, np.where(d < 1.1, 2, 1)).astype(np.uint8)
    colours = rng.integers(0, 256, (3, 3)).astype(np.int16)
    image = colours[cls] + rng.integers(-60, 60, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), cls + 1  # trimap values 1..3


def make_random_pets(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random images and trimaps in the official Oxford-IIIT Pet layout (JPEG images of varied sizes,
    PNG trimaps, trainval.txt/test.txt), so every framework reads them through its normal pets path.
    Cached: regenerated only when the counts or seed change."""
    from PIL import Image

    stamp = root / ".params.json"
    params = {"n_train": n_train, "n_test": n_test, "seed": seed, "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lists = {"trainval": [], "test": []}
    for i in range(n_train + n_test):
        split = "trainval" if i < n_train else "test"
        name = f"Random_{i + 1}"
        h, w = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        image, trimap = _blob_sample(rng, h, w)
        Image.fromarray(image).save(root / "images" / f"{name}.jpg", quality=90)
        Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{name}.png")
        lists[split].append(f"{name} 1 1 1")
    for split, lines in lists.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    stamp.write_text(json.dumps(params))
    return root


def read_split_names(root: Path, split: str) -> list[str]:
    lines = (Path(root) / "annotations" / f"{split}.txt").read_text().splitlines()
    return [ln.split()[0] for ln in lines if ln.strip() and not ln.startswith("#")]


def read_pet(root: Path, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Original-size RGB uint8 image and trimap-1 (0 pet, 1 background, 2 border), or None when the
    image cannot be decoded. Decodes by content (the sample holds a GIF and a PNG named .jpg)."""
    from PIL import Image

    try:
        with Image.open(Path(root) / "images" / f"{name}.jpg") as im:
            image = np.asarray(im.convert("RGB"))
        with Image.open(Path(root) / "annotations" / "trimaps" / f"{name}.png") as tm:
            trimap = np.asarray(tm)
    except (OSError, ValueError):
        return None
    return image, (trimap.astype(np.int16) - 1).clip(0, 255).astype(np.uint8)


def load_split_arrays(root: Path, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, masks = [], []
    for name in read_split_names(root, split):
        sample = read_pet(root, name)
        if sample is not None:
            images.append(sample[0])
            masks.append(sample[1])
    return images, masks


def eval_arrays(root: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The scoring set every runner predicts on: N×size×size×3 uint8 images (bilinear, PIL) and
    N×size×size uint8 labels (nearest, PIL), i.e. the tutorial's 128×128 evaluation resolution."""
    from PIL import Image

    images, masks = load_split_arrays(root, split)
    x = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])
    y = np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) for m in masks])
    return x, y


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    keep = target < num_classes
    idx = target[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou(conf: np.ndarray) -> float:
    """Mean over classes of TP / (TP + FP + FN) from one confusion matrix summed over the whole split
    (classes absent from both prediction and target are left out)."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


class Budget:
    """Wall-clock budget measured from the moment the harness launched this process (``t0``), so
    interpreter start-up, imports and data decoding count, as they do for a user."""

    def __init__(self, t0: float, seconds: float):
        self.deadline = t0 + seconds
        self.t0 = t0

    def expired(self) -> bool:
        return time.time() >= self.deadline

    def elapsed(self) -> float:
        return time.time() - self.t0


def summarise_epochs(images_per_s: list[float], first: int = 1) -> float | None:
    """Epoch 2 onward (index 1..): the first epoch pays for decoding, caching and graph tracing."""
    rest = images_per_s[first:]
    return float(np.median(rest)) if rest else None


def python_info() -> str:
    return f"python {sys.version.split()[0]}"


def runner_parser(description: str):
    """The command line every runner shares (compare.py passes the same flags to all three)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("task", choices=["train", "infer", "quality"])
    p.add_argument("--data-root")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--freeze", choices=["yes", "no"], default="yes")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--latency-iters", type=int, default=20)
    p.add_argument("--budget", type=float, default=120.0)
    p.add_argument("--t0", type=float, default=None, help="launch time (time.time()) the budget counts from")
    p.add_argument("--seed", type=int, default=0)
    return p


def time_inference(run_batch, run_one, args, sync=lambda: None) -> dict:
    """Median (and best) batch throughput and batch-1 latency, timed the same way for every framework.

    ``run_batch``/``run_one`` run one forward pass and return something host-side (or synchronised by
    ``sync``); warm-up calls come first and are not timed.
    """
    import statistics

    for _ in range(args.warmup):
        run_batch()
        run_one()
    times, lat = [], []
    for _ in range(args.iters):
        sync()
        t = time.perf_counter()
        run_batch()
        sync()
        times.append(time.perf_counter() - t)
    for _ in range(args.latency_iters):
        sync()
        t = time.perf_counter()
        run_one()
        lat.append(time.perf_counter() - t)
    return {"task": "infer", "batch": args.batch, "infer_images_per_s": args.batch / statistics.median(times),
            "latency_b1_ms": 1000 * statistics.median(lat),
            "infer_images_per_s_best": args.batch / min(times), "latency_b1_ms_best": 1000 * min(lat)}
