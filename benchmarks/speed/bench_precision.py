"""Does bf16 inference (the CPU/GPU default) cost accuracy? One checkpoint, one split, both precisions.

Runs the checkpoint's split at the training resolution through the inference fast path twice - bf16
autocast with bf16 weights (what `--precision auto` picks on CPUs with native bf16 and on CUDA) and
fp32 - and reports each mIoU and the share of pixels whose predicted class differs. pixelseg keeps bf16
as the default only while it costs < 0.1 mIoU point (docs/export.md).

    python benchmarks/speed/bench_precision.py runs/pets --split test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (puts this checkout's pixelseg first on sys.path)
from pixelseg.core.checkpoint import load_checkpoint  # noqa: E402
from pixelseg.data import collate_batch, dataset_options, load_split  # noqa: E402
from pixelseg.inference.loading import load_model  # noqa: E402
from pixelseg.core.metrics import ConfusionMatrix  # noqa: E402
from pixelseg.core.runtime import autocast, to_model_input  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--split", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt["config"]
    split = args.split or cfg["val_split"]
    size = cfg["image_size"]
    ds = load_split(cfg["dataset"], cfg.get("data_root"), split, size, args.limit, **dataset_options(cfg))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=collate_batch)
    dev = torch.device("cpu")
    preds, out = {}, {"checkpoint": ckpt["path"], "split": split, "images": len(ds)}
    for name, amp in (("bf16", torch.bfloat16), ("fp32", None)):
        model = load_model(ckpt, dev, amp)
        cm = ConfusionMatrix(ds.info.num_classes, ds.info.ignore_index)
        chunks, t0 = [], time.time()
        with torch.no_grad():
            for images, masks in loader:
                with autocast(dev, amp):
                    p = model(to_model_input(images, dev, True)).float().argmax(1)
                cm.update(p, masks)
                chunks.append(p)
        preds[name] = torch.cat(chunks)
        out[name] = {"miou": cm.compute()["miou"], "seconds": time.time() - t0}
    out["pixels_differing"] = float((preds["bf16"] != preds["fp32"]).double().mean())
    out["miou_points_bf16_minus_fp32"] = 100 * (out["bf16"]["miou"] - out["fp32"]["miou"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
