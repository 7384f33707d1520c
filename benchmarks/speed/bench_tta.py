"""What test-time augmentation costs at inference: `pixelseg predict`'s Predictor on real photos, one image at a
time, without TTA, with the flip, and with the flip at several scales (`--tta --tta-scales ...`), in one process
so the ratios are measured side by side.

    python benchmarks/speed/bench_tta.py RUN [--images DIR] [--limit 16] [--repeats 3]
    python benchmarks/speed/bench_tta.py runs/camvid --images ../shared/data/camvid/val

Prints ms per image (median over repeats of the mean over the images) and the ratio to no TTA; writes
benchmarks/out/bench_tta.json. The mIoU each setting buys is `pixelseg evaluate RUN --tta --tta-scales ...`
(docs/datasets.md, "Test-time augmentation").
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

SETTINGS = {
    "none": (False, (1.0,)),
    "flip": (True, (1.0,)),
    "flip + 0.75,1,1.25": (True, (0.75, 1.0, 1.25)),
    "flip + 1,1.25,1.5": (True, (1.0, 1.25, 1.5)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory or checkpoint")
    p.add_argument("--images", default=str(_common.PETS_PHOTOS), help="folder of photos (default: the pets sample)")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON to write (default: benchmarks/out/bench_tta.json)")
    args = p.parse_args()

    import numpy as np
    from PIL import Image

    from pixelseg.inference.runner import open_model
    from pixelseg.inference.tiling import TTA

    files = sorted(f for f in Path(args.images).iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    photos = [np.array(Image.open(f).convert("RGB")) for f in files[: args.limit]]
    if not photos:
        raise SystemExit(f"{args.images}: no .png/.jpg photos")
    rows = {}
    for name, (flip, scales) in SETTINGS.items():
        runner = open_model(args.run, args.device, tta=TTA(flip=flip, scales=scales), backend="torch")
        runner.predictor(photos[0])  # warm-up: first-call allocations
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for img in photos:
                runner.predictor(img, probs=False)
            times.append((time.perf_counter() - t) / len(photos) * 1000)
        rows[name] = sorted(times)[len(times) // 2]
    base = rows["none"]
    result = {
        "machine": _common.machine(),
        "command": " ".join(sys.argv),
        "images": len(photos),
        "image_hw": list(photos[0].shape[:2]),
        "ms_per_image": rows,
        "ratio": {k: v / base for k, v in rows.items()},
    }
    for k, v in rows.items():
        print(f"{k:>20}: {v:7.1f} ms/image  ({v / base:.2f}x)")
    out = Path(args.out) if args.out else _common.out_path("bench_tta")
    out.write_text(json.dumps(result, indent=1))
    print(f"{result['machine']}; wrote {out}")


if __name__ == "__main__":
    main()
