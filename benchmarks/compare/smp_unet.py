"""Alternative: segmentation_models_pytorch `Unet("mobilenet_v2")` in the plain training loop its README
shows: fp32, default memory layout, Adam 1e-3, cross-entropy, batch 64, random horizontal flip.

Runs with the project's venv python (torch/torchvision/timm) and SMP on PYTHONPATH from
benchmarks/.envs/smp (compare.py installs it there with --no-deps); never a pixelseg dependency.
Data: the split decoded once and resized to 128×128 in memory (the tutorial's `.cache()`), then a
shuffled DataLoader over tensors.

    python smp_unet.py train   --data-root D --freeze yes --epochs 3
    python smp_unet.py infer   --iters 10
    python smp_unet.py quality --data-root PETS --budget 120 --t0 <launch time>
Each prints one JSON line.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)
import common  # noqa: E402  (this folder)

import numpy as np  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BATCH_SIZE = 64
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # SMP's get_preprocessing_fn for imagenet encoders
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def build(freeze: bool, dev):
    model = smp.Unet("mobilenet_v2", encoder_weights=None, classes=common.NUM_CLASSES).to(dev)
    if freeze:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    return model


def set_train(model, freeze: bool):
    model.train()
    if freeze:
        model.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics (Keras trainable=False)


def preprocess(images_u8: torch.Tensor, dev) -> torch.Tensor:
    x = images_u8.to(dev).float().div_(255.0)
    return (x - MEAN.to(dev)) / STD.to(dev)


def load_tensors(root: Path, split: str, size: int):
    images, masks = common.load_split_arrays(root, split)
    xs, ys = [], []
    for im, m in zip(images, masks):
        t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float()
        xs.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                  .round_().clamp_(0, 255).to(torch.uint8)[0])
        ys.append(F.interpolate(torch.from_numpy(m)[None, None], size=(size, size), mode="nearest")[0, 0])
    return torch.stack(xs), torch.stack(ys).long()


def train_epochs(model, opt, loader, dev, freeze, epochs, budget=None):
    """Plain loop; returns per-epoch images/s and (with a budget) the weights of the last epoch that
    ended inside it."""
    per_epoch, snapshot, done = [], None, 0
    for epoch in range(epochs):
        set_train(model, freeze)
        t0, seen, cut = time.perf_counter(), 0, False
        for images, masks in loader:
            flip = torch.rand(images.shape[0]) < 0.5
            images, masks = images.clone(), masks.clone()
            images[flip] = images[flip].flip(-1)
            masks[flip] = masks[flip].flip(-1)
            x, y = preprocess(images, dev), masks.to(dev)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += x.shape[0]
            if budget is not None and budget.expired():
                cut = True
                break
        _common.sync(dev)
        per_epoch.append(seen / (time.perf_counter() - t0))
        if budget is not None:
            if cut or budget.expired():
                break
            snapshot, done = copy.deepcopy(model.state_dict()), epoch + 1
    return per_epoch, snapshot, done


def task_train(args) -> dict:
    dev = _common.device()
    torch.manual_seed(args.seed)
    t_decode = time.perf_counter()
    x, y = load_tensors(Path(args.data_root), "trainval", args.size)
    decode_s = time.perf_counter() - t_decode
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True)
    freeze = args.freeze == "yes"
    model = build(freeze, dev)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    per_epoch, _, _ = train_epochs(model, opt, loader, dev, freeze, args.epochs)
    return {"task": "train", "freeze": args.freeze, "epochs": args.epochs, "decode_s": decode_s,
            "images_per_s_per_epoch": per_epoch, "train_images_per_s": common.summarise_epochs(per_epoch),
            "peak_device_mem_bytes": _common.peak_device_memory(dev)}


@torch.inference_mode()
def task_infer(args) -> dict:
    dev = _common.device()
    model = build(False, dev).eval()
    xb = preprocess(torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8), dev)
    x1 = xb[:1].clone()
    res = common.time_inference(lambda: model(xb), lambda: model(x1).cpu(), args, sync=lambda: _common.sync(dev))
    return dict(res, peak_device_mem_bytes=_common.peak_device_memory(dev))


def task_quality(args) -> dict:
    budget = common.Budget(args.t0, args.budget)
    dev = _common.device()
    torch.manual_seed(args.seed)
    root = Path(args.data_root)
    x, y = load_tensors(root, "trainval", args.size)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True)
    freeze = args.freeze == "yes"
    model = build(freeze, dev)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _, snapshot, done = train_epochs(model, opt, loader, dev, freeze, 10**6, budget)
    result = {"task": "quality", "budget_s": args.budget, "epochs_in_budget": done, "stopped_at_s": budget.elapsed(),
              "test_miou": None}
    if snapshot is None:
        result["note"] = "no epoch finished inside the budget"
        return result
    model.load_state_dict(snapshot)
    model.eval()
    xe, ye = common.eval_arrays(root, "test", args.size)
    conf = np.zeros((common.NUM_CLASSES,) * 2, np.int64)
    with torch.inference_mode():
        for i in range(0, len(xe), BATCH_SIZE):
            xb = torch.from_numpy(xe[i:i + BATCH_SIZE]).permute(0, 3, 1, 2)
            pred = model(preprocess(xb, dev)).argmax(1).cpu().numpy()
            conf += common.confusion(pred, ye[i:i + BATCH_SIZE])
    result["test_miou"] = common.miou(conf)
    result["test_images"] = int(len(xe))
    return result


def main(argv=None) -> int:
    p = common.runner_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    if args.t0 is None:
        args.t0 = time.time()
    result = {"runner": "smp-unet", "framework": f"segmentation_models_pytorch {smp.__version__} / torch "
              f"{torch.__version__}", "device": str(_common.device())}
    result.update({"train": task_train, "infer": task_infer, "quality": task_quality}[args.task](args))
    result["peak_rss_bytes_self"] = common.peak_rss_bytes()
    common.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
