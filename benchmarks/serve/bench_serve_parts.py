"""The parts of a served mask that issue 19's last pass changed, old way against new, in one process.

- logits upsampling: bilinear from the training size back to the photo's, on the channels-last tensor the
  model returns vs on an NCHW copy (what `tiling.torch_logits_fn` now returns);
- the photo's resize to the model's input: on [0, 1] floats vs on the uint8 pixels, as training's resize;
- class ids of the upsampled logits with and without a softmax first;
- one photo's `Engine.mask` and a dynamic batch of 8's `Engine.masks`, each beside the model's forward
  pass alone;
- PNG encoding of the class-id masks at the server's zlib level: PIL (adaptive row filters) vs
  `viz.grey_png` (filter 0).

Rounds are interleaved; medians are printed. libgomp's spin count and the allocator are
`serve`'s. The masks come from the run's model on real pets photos.

    python benchmarks/serve/bench_serve_parts.py RUN_DIR [--photo JPEG] [--repeats 30]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run directory or checkpoint")
    ap.add_argument("--photo", default=str(_common.PETS_PHOTO))
    ap.add_argument("--photos", default=str(_common.PETS_PHOTOS))
    ap.add_argument("--n-photos", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()

    from pixelseg.cli import serve_openmp_env
    serve_openmp_env()  # the server's libgomp spin count, before torch loads
    from pixelseg.core.runtime import tune_malloc
    tune_malloc()  # and its allocator settings (every CLI command's)
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from pixelseg.core import viz
    from pixelseg.inference.serving import FAST_PNG, Engine, HTTPProblem, decode_upload

    engine = Engine(args.run)
    engine.warm_up(batch=8)
    img = decode_upload(Path(args.photo).read_bytes(), 10**9, args.photo)
    h, w = img.shape[:2]
    size = engine.size
    pred = engine.predictor
    print(f"photo {Path(args.photo).name} {w}x{h}, model input {size[1]}x{size[0]}, {engine.describe()['precision']}")

    x = torch.as_tensor(img).permute(2, 0, 1)[None].float().div_(255)
    small = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    nchw = pred.fn(small)
    cl = nchw.contiguous(memory_format=torch.channels_last)
    assert torch.equal(F.interpolate(cl, size=(h, w), mode="bilinear", align_corners=False),
                       F.interpolate(nchw, size=(h, w), mode="bilinear", align_corners=False))
    small8 = small.expand(8, -1, -1, -1).contiguous()
    up = F.interpolate(nchw, size=(h, w), mode="bilinear", align_corners=False)
    from pixelseg.core.metrics import class_ids
    u8 = torch.as_tensor(img).permute(2, 0, 1)[None]

    def old_masks(images):  # Engine.masks before: float resize, softmax, then class ids
        xs = [torch.as_tensor(i).permute(2, 0, 1)[None].float().div_(255) for i in images]
        lg = pred.fn(torch.cat([F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
                                for x in xs]))
        return [class_ids(F.interpolate(lg[k: k + 1], size=tuple(x.shape[-2:]), mode="bilinear",
                                        align_corners=False).softmax(1))[0].to(torch.uint8).numpy()
                for k, x in enumerate(xs)]
    jobs = {
        "resize, [0, 1] floats (before)": lambda: F.interpolate(u8.float().div_(255), size=size, mode="bilinear",
                                                                antialias=True, align_corners=False),
        "resize, uint8 then /255": lambda: F.interpolate(u8, size=size, mode="bilinear", antialias=True,
                                                         align_corners=False).float().div_(255),
        "class ids, softmax first (before)": lambda: class_ids(up.softmax(1)),
        "class ids, from the logits": lambda: class_ids(up),
        "upsample, channels-last logits": lambda: F.interpolate(cl, size=(h, w), mode="bilinear", align_corners=False),
        "upsample, NCHW logits": lambda: F.interpolate(nchw, size=(h, w), mode="bilinear", align_corners=False),
        "model forward, batch 1": lambda: pred.fn(small),
        "model forward, batch 8": lambda: pred.fn(small8),
        "Engine.masks, batch 8, before": lambda: old_masks([img] * 8),
        "Engine.masks, batch 8": lambda: engine.masks([img] * 8),
        "Engine.mask, batch 1": lambda: engine.mask(img),
    }
    rows = {k: [] for k in jobs}
    for _ in range(3):
        for k, fn in jobs.items():
            rows[k].append(_common.median_ms(fn, max(3, args.repeats // 3)))
    for k, v in rows.items():
        print(f"{k:34s} {statistics.median(v):8.2f} ms")

    photos = sorted(Path(args.photos).glob("*.jpg"))[: args.n_photos]
    masks, agree, worst = [], 0, 1.0
    gap = {k: [] for k in ("floats", "floats max", "uint8", "uint8 max")}
    for p in photos:
        try:
            im = decode_upload(p.read_bytes(), 10**9, p.name)
        except HTTPProblem:  # a file the server would refuse is not what this measures
            continue
        masks.append(engine.mask(im)[0])
        a = float((old_masks([im])[0] == masks[-1]).mean())
        agree, worst = agree + a, min(worst, a)
        # the model's input against what training feeds it (PIL's antialiased resize of the uint8 photo)
        pil = torch.from_numpy(np.asarray(Image.fromarray(im).resize((size[1], size[0]), Image.BILINEAR,
                                                                    reducing_gap=None))).permute(2, 0, 1)[None]
        t = torch.as_tensor(im).permute(2, 0, 1)[None]
        for k, x in (("floats", F.interpolate(t.float(), size=size, mode="bilinear", antialias=True,
                                              align_corners=False)), ("uint8", pred._input(im, size) * 255)):
            gap[k].append((x - pil.float()).abs().mean().item())
            gap[k + " max"].append((x - pil.float()).abs().max().item())
    print(f"masks now vs before on {len(masks)} photos: {100 * agree / len(masks):.2f}% of pixels agree, "
          f"worst photo {100 * worst:.2f}%")
    for k in ("floats", "uint8"):
        print(f"model input resized as {k:6s} vs PIL's resize (training's): mean {statistics.mean(gap[k]):.3f}, "
              f"max {max(gap[k + ' max']):.2f} grey levels")

    def pil_png(m):
        buf = io.BytesIO()
        Image.fromarray(m).save(buf, format="PNG", compress_level=FAST_PNG)
        return buf.getvalue()
    for m in masks:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(viz.grey_png(m, FAST_PNG)))), m)
    enc = {"PIL": pil_png, "viz.grey_png": lambda m: viz.grey_png(m, FAST_PNG)}
    t = {k: [] for k in enc}
    for _ in range(3):
        for k, fn in enc.items():
            t[k].append(_common.median_ms(lambda: [fn(m) for m in masks], max(3, args.repeats // 3)) / len(masks))
    for k, fn in enc.items():
        kb = statistics.mean(len(fn(m)) for m in masks) / 1000
        print(f"PNG of {len(masks)} real masks, zlib {FAST_PNG}, {k:14s} {statistics.median(t[k]):6.2f} ms, {kb:5.1f} kB mean")


if __name__ == "__main__":
    main()
