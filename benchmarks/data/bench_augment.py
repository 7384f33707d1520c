"""Throughput of the training augmentation on 360×480 inputs (CamVid size), one sample at a time as a
DataLoader worker sees it.

Compares `pixelseg.data.augment.build_train_transform` (torchvision.transforms.v2) with a hand-rolled
`torch.nn.functional` version of the same steps, and with albumentations when it happens to be installed
(it is not a dependency; this script never installs it).

    python benchmarks/data/bench_augment.py [--samples 200] [--threads 1] [--repeats 3]

Uses real CamVid frames from ../shared/data/camvid when present, random ones otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)
from pixelseg.data.augment import build_train_transform  # noqa: E402

IGNORE = 255
CAMVID = _common.SHARED_DATA / "camvid"

CONFIGS = {
    # name: kwargs of build_train_transform
    "resize 256² + hflip": dict(image_size=256, hflip=True),
    "scale 0.5-2 + crop 360×480 + hflip + jitter .2": dict(image_size=(360, 480), scale=(0.5, 2.0), crop=True,
                                                         hflip=True, color_jitter=0.2),
}


def load_inputs(n: int = 8) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    if (CAMVID / "train").is_dir():
        from PIL import Image

        pairs = []
        for path in sorted((CAMVID / "train").glob("*.png"))[:n]:
            image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()
            mask = torch.from_numpy(np.array(Image.open(CAMVID / "trainannot" / path.name)))
            pairs.append((image, mask))
        return pairs, f"CamVid ({len(pairs)} frames)"
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(0, 256, (3, 360, 480), dtype=torch.uint8, generator=g),
              torch.randint(0, 12, (360, 480), dtype=torch.uint8, generator=g)) for _ in range(n)]
    return pairs, "random 360×480"


# ---- hand-rolled reference: the same steps with torch.nn.functional -----------------------------

def _resize(image, mask, h, w):
    # uint8 in, uint8 out: torch's CPU kernels take uint8 directly (the path torchvision uses too)
    img = F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    msk = F.interpolate(mask[None, None], size=(h, w), mode="nearest-exact")
    return img[0], msk[0, 0]


def _gray(img):  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
    return (0.2989 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)


def hand_rolled(image_size=None, scale=None, crop=False, hflip=True, vflip=False, color_jitter=0.0,
                ignore_index=IGNORE):
    size = (image_size, image_size) if isinstance(image_size, int) else image_size

    def apply(image, mask):
        if scale is not None:
            lo, hi = round(scale[0] * min(size)), round(scale[1] * min(size))
            short = int(torch.randint(lo, hi + 1, ()))
            h, w = image.shape[1:]
            new = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
            image, mask = _resize(image, mask, *new)
        if crop:
            th, tw = size
            ph, pw = max(th - image.shape[1], 0), max(tw - image.shape[2], 0)
            if ph or pw:
                image = F.pad(image, (pw, pw, ph, ph), value=0)
                mask = F.pad(mask, (pw, pw, ph, ph), value=ignore_index)
            top = int(torch.randint(0, image.shape[1] - th + 1, ()))
            left = int(torch.randint(0, image.shape[2] - tw + 1, ()))
            image, mask = image[:, top:top + th, left:left + tw], mask[top:top + th, left:left + tw]
        elif size is not None:
            image, mask = _resize(image, mask, *size)
        if hflip and torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        if vflip and torch.rand(()) < 0.5:
            image, mask = image.flip(-2), mask.flip(-2)
        if color_jitter:
            img = image.float()
            b, c, s = (1 + (torch.rand(3) * 2 - 1) * color_jitter).tolist()
            img = img * b
            img = c * img + (1 - c) * _gray(img).mean()
            img = s * img + (1 - s) * _gray(img)
            image = img.clamp_(0, 255).to(torch.uint8)
        return image.contiguous(), mask.long()

    return apply


def albumentations_version(kwargs):
    """Only the resize config: the pad/crop argument names differ between albumentations 1.x and 2.x."""
    try:
        import albumentations as A
        import cv2
    except ImportError:
        return None
    if kwargs.get("crop"):
        return None
    size = kwargs["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    steps = [A.Resize(h, w, interpolation=cv2.INTER_LINEAR)]
    if kwargs.get("hflip"):
        steps.append(A.HorizontalFlip(p=0.5))
    pipeline = A.Compose(steps)

    def apply(image, mask):
        out = pipeline(image=image.permute(1, 2, 0).numpy(), mask=mask.numpy())
        return torch.from_numpy(out["image"]).permute(2, 0, 1), torch.from_numpy(out["mask"]).long()

    return apply


def throughput(fn, pairs, samples: int, repeats: int) -> float:
    for i in range(10):  # warm-up
        fn(*pairs[i % len(pairs)])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(samples):
            fn(*pairs[i % len(pairs)])
        rates.append(samples / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = a DataLoader worker)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pairs, source = load_inputs()
    print(f"inputs: {source}; torch {torch.__version__}; threads={args.threads}; "
          f"{args.samples} samples × {args.repeats} repeats (median)")
    rows = []
    for name, kwargs in CONFIGS.items():
        impls = {"torchvision v2 (pixelseg)": build_train_transform(**kwargs),
                 "hand-rolled F": hand_rolled(**kwargs)}
        album = albumentations_version(kwargs)
        if album is not None:
            impls["albumentations"] = album
        for impl, fn in impls.items():
            rows.append((name, impl, throughput(fn, pairs, args.samples, args.repeats)))
    width = max(len(r[0]) for r in rows)
    print(f"{'pipeline':<{width}}  {'implementation':<26}  samples/s")
    for name, impl, rate in rows:
        print(f"{name:<{width}}  {impl:<26}  {rate:9.1f}")
    try:
        import albumentations  # noqa: F401
    except ImportError:
        print("albumentations: not installed, skipped")


if __name__ == "__main__":
    main()
