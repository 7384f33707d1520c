"""`pixelseg` command line: train, evaluate, predict, models, export, serve.

User-fixable problems (PixelsegError) print one line and exit 2; anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import PixelsegError

TRAIN_HELP = {
    "dataset": "dataset name: oxford-pet, camvid, voc (Pascal VOC 2012 + SBD train_aug), ade20k (SceneParsing), "
               "cityscapes, folder (your own images/ + masks/), synthetic (see docs/datasets.md)",
    "in_channels": "image channels: 3 (RGB), or e.g. 1, 4, 13 for grey, RGB+NIR or multispectral 8/16-bit PNG/TIFF "
                   "(folder dataset); the encoder's first conv is adapted from its RGB weights and inputs are "
                   "normalised with per-channel statistics of the training split",
    "rgb_bands": "bands the figures and predict overlays show as RGB, e.g. 3,2,1 (default: the first three, or "
                 "the first as grey)",
    "data_root": "dataset directory (Oxford-IIIT Pet: holds images/ and annotations/, downloaded into "
                 "$PIXELSEG_DATA or ~/.cache/pixelseg when omitted; CamVid: the SegNet layout; folder: holds "
                 "images/ and masks/, see docs/datasets.md)",
    "images_dir": "folder dataset: sub-folder of --data-root holding the images (default: images)",
    "masks_dir": "folder dataset: sub-folder of --data-root holding the masks, matched to images by file stem "
                 "(default: masks)",
    "mask_suffix": "folder dataset: a mask's stem is its image's stem plus this suffix, e.g. _mask for x.png + "
                   "x_mask.png (then --images-dir and --masks-dir may name the same folder)",
    "val_fraction": "folder dataset without val/ or val.txt: share of the pairs held out for validation, chosen "
                    "by a fixed seed (default: 0.2)",
    "val_group": "folder dataset: keep pairs of one group on one side of the --val-fraction split (frames of a "
                 "video, slices of a stack): a regex whose first group (or match) in the stem is the group, or "
                 "'prefix' (the stem without its trailing number)",
    "classes": "folder dataset: the classes.csv to use (id,name,r,g,b), e.g. outside a read-only data root "
               "(default: DATA_ROOT/classes.csv if present)",
    "class_names": "folder dataset without classes.csv: class names in id order, e.g. membrane,cell",
    "train_split": "training split (default: the dataset's, trainval for pets)",
    "val_split": "validation split, evaluated in full every epoch (default: test for pets)",
    "model": "architecture: unet, fcn8s, fcn16s, fcn32s, segnet, bayesian_segnet, deeplabv3, deeplabv3plus, pspnet, fpn, upernet, segformer (see `pixelseg models`)",
    "backbone": "encoder, e.g. mobilenet_v2, resnet50, vgg16, mit_b0, or timm:NAME for any timm model with features_only (default: the architecture's own)",
    "weights": "encoder weights: imagenet, none, or a path to a state-dict file",
    "freeze_encoder": "auto (freeze iff pretrained weights are loaded, as the tutorial does), yes, no",
    "epochs": "number of epochs",
    "iterations": "number of optimiser steps in all, as papers give schedules (overrides --epochs: the run stops "
                  "after this many steps and the lr schedule spans them; validation still runs once per epoch)",
    "output_stride": "encoder output stride of dilated models (deeplabv3, deeplabv3plus: 16 or 8; pspnet: 8, 16 or 32; default: the architecture's)",
    "batch_size": "global batch size (all processes and accumulation steps together)",
    "accumulate": "gradient accumulation steps per optimiser step",
    "image_size": "training resolution: N (square) or HxW, e.g. 360x480",
    "lr": "peak learning rate",
    "optimizer": "adam, adamw or sgd (momentum)",
    "weight_decay": "weight decay (never applied to norm layers and biases)",
    "momentum": "SGD momentum",
    "schedule": "learning-rate schedule: constant, poly, cosine",
    "warmup_epochs": "linear warm-up length in epochs (may be fractional)",
    "loss": "ce, dice, focal, or a weighted sum like ce+dice or ce:1+dice:0.5",
    "class_weighting": "cross-entropy class weights: none, uniform, inverse, median (SegNet's median frequency)",
    "hflip": "random horizontal flip of image and mask together (the tutorial's augmentation)",
    "seed": "random seed; with --deterministic a CPU run repeats exactly",
    "deterministic": "use deterministic algorithms (slower on GPU)",
    "limit": "use only the first N images of each split (quick tries)",
    "device": "auto, cpu, cuda, cuda:N",
    "precision": "auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), bf16, fp16, fp32",
    "channels_last": "NHWC memory layout (faster convolutions on CPU and tensor cores)",
    "compile": "torch.compile the model (pays off only on long runs: the first step compiles for 30-80 s)",
    "sync_bn": "SyncBatchNorm across processes (needs torchrun with several processes on CUDA)",
    "freeze_bn": "keep every BatchNorm on its running statistics (small per-device batches; makes multi-process "
                 "runs match single-process ones)",
    "precise_bn": "before each validation, re-estimate BatchNorm statistics over N training batches "
                  "(0: off); fixes eval-mode collapse when epochs have few steps",
    "scale_range": "random rescale range of image and mask together, e.g. 0.5,2.0 (use with --crop)",
    "crop": "random crop back to --image-size; mask padding is filled with the ignore index",
    "vflip": "random vertical flip of image and mask together",
    "color_jitter": "brightness/contrast/saturation jitter strength on the image only, e.g. 0.2",
    "workers": "DataLoader worker processes, or auto (none for whole-batch reads of resized samples, else one "
               "per core, divided among torchrun's local ranks)",
    "checkpoint_every": "also write last.pt every N optimiser steps (0: only at the end of each epoch)",
    "figure_samples": "validation images in the per-epoch prediction figure",
    "run_dir": "output directory (default runs/<model>-<backbone>-<dataset>-<time>)",
    "resume": "continue the run in this directory from its last.pt",
    "cache": "how decoded samples are held: mmap (decode once per machine into a disk store in $PIXELSEG_CACHE "
             "or ~/.cache/pixelseg/cache, read through the shared page cache; memory does not grow with the "
             "dataset), memory (private arrays in RAM, no disk writes; --no-cache), none (DataLoader workers "
             "decode each sample when needed); see docs/datasets.md",
    "cache_max_side": "cache the source resolution with its longer side capped to this many pixels, e.g. 2048 "
                      "(implied, uncapped, by --crop: random scale + crop then run per sample in the workers)",
}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .train import DEFAULTS
    p.add_argument("--config", type=Path, help="YAML file of options (keys as the flags, - or _); flags override it")
    for key, default in DEFAULTS.items():
        help_ = f"{TRAIN_HELP.get(key, '')} (default: {default})"
        if key == "cache":
            p.add_argument(_flag(key), dest=key, choices=("mmap", "memory", "none"), default=None, help=help_)
            p.add_argument("--no-cache", dest=key, action="store_const", const="memory",
                           help="same as --cache memory")
        elif isinstance(default, bool):
            p.add_argument(_flag(key), dest=key, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif isinstance(default, int) and key not in ("limit", "image_size"):
            p.add_argument(_flag(key), dest=key, type=int, default=None, help=help_)
        elif isinstance(default, float):
            p.add_argument(_flag(key), dest=key, type=float, default=None, help=help_)
        elif key in ("limit", "iterations", "output_stride"):
            p.add_argument(_flag(key), dest=key, type=int, default=None, help=help_)
        elif key == "val_fraction":
            p.add_argument(_flag(key), dest=key, type=float, default=None, help=help_)
        else:
            p.add_argument(_flag(key), dest=key, default=None, help=help_)


def _load_yaml_config(path: Path) -> dict:
    import yaml
    from .train import DEFAULTS
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise PixelsegError(f"--config {path}: file not found") from None
    except yaml.YAMLError as exc:
        raise PixelsegError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PixelsegError(f"--config {path}: expected a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.pop("source", None)  # recipes cite where their numbers come from; documentation only
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise PixelsegError(f"--config {path}: unknown option(s) {', '.join(unknown)}; see `pixelseg train --help`")
    for key, value in data.items():
        expected = _config_type(key, DEFAULTS[key])
        if float in expected and isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                data[key] = value = float(value)
            except ValueError:
                pass
        if value is not None and not _is_type(value, expected):
            names = " or ".join(t.__name__ for t in expected)
            raise PixelsegError(f"--config {path}: {key}: expected {names}, got {type(value).__name__} {value!r}")
    return data


# Keys whose default is None (or whose value has several spellings) and the YAML types they accept.
_CONFIG_TYPES = {
    "image_size": (int, str, list), "scale_range": (str, list), "limit": (int,), "iterations": (int,),
    "output_stride": (int,), "val_fraction": (float,), "weights": (str,), "backbone": (str,),
    "precise_bn": (int,), "rgb_bands": (str, list), "workers": (int, str), "cache": (str, bool),
    "cache_max_side": (int,),
}


def _config_type(key: str, default) -> tuple:
    if key in _CONFIG_TYPES:
        return _CONFIG_TYPES[key]
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, float):
        return (float,)
    if isinstance(default, int):
        return (int,)
    return (str,)


def _is_type(value, expected: tuple) -> bool:
    if isinstance(value, bool):  # YAML's true/false are never numbers here
        return bool in expected
    if float in expected and isinstance(value, int):
        return True
    return isinstance(value, expected)


def _add_resolution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile", nargs="?", const=True, default=None, metavar="SIZE",
                   help="sliding-window inference at the image's native scale: windows of the training size, or "
                        "SIZE (512 or 360x480); default: resize to the training size and back")
    p.add_argument("--tile-overlap", type=float, default=0.25, help="overlap of neighbouring windows (default: 0.25)")
    p.add_argument("--tta", action="store_true", help="also run the horizontally flipped image and average")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="pixelseg", description="Semantic segmentation: train, evaluate, predict.")
    parser.add_argument("--version", action="version", version=f"pixelseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model", description="Train a segmentation model. Defaults are the "
                       "TensorFlow tutorial's recipe (U-Net/MobileNetV2, Adam 1e-3, batch 64, 20 epochs, 128×128).")
    _add_train_args(p)

    p = sub.add_parser("evaluate", help="score a checkpoint on a split",
                       description="Score a checkpoint over a whole split; prints metrics, writes eval_<split>.json "
                                   "and confusion_<split>.png next to the checkpoint (or in --out).")
    p.add_argument("checkpoint", help="run directory (uses best.pt) or checkpoint file")
    p.add_argument("--data-root", help="dataset directory (default: the one recorded in the run)")
    p.add_argument("--dataset", help="dataset name (default: the one recorded in the run)")
    p.add_argument("--split", help="split to score (default: the run's validation split)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size (default: 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", help="auto, bf16, fp16, fp32")
    p.add_argument("--out", help="directory for the metrics JSON and confusion-matrix figure")
    p.add_argument("--full-res", action="store_true",
                   help="score each image at its own resolution against its original-size mask (the honest number; "
                        "writes eval_<split>_fullres.json); default: the training resolution, as training reports")
    p.add_argument("--uncertainty", action="store_true",
                   help="also measure the softmax-entropy uncertainty: accuracy of the pixels kept when the most "
                        "uncertain p%% are dropped, expected calibration error, reliability diagram "
                        "(uncertainty_<split>.png); see docs/uncertainty.md")
    p.add_argument("--mc-samples", type=int, default=0,
                   help="Monte-Carlo dropout samples for models with dropout (bayesian_segnet, deeplabv3): the "
                        "--uncertainty report for the sampled mean softmax too, with predictive entropy and variance")
    _add_resolution_args(p)

    p = sub.add_parser("predict", help="segment image files",
                       description="Write, for each image, its class mask at the original resolution (palette "
                                   "PNG, values = class ids) and a colour overlay.")
    p.add_argument("checkpoint", help="run directory (uses best.pt) or checkpoint file")
    p.add_argument("images", nargs="+", help="image files or directories of images")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mc-samples", type=int, default=0,
                   help="Monte-Carlo dropout samples (Bayesian SegNet): also writes <name>_entropy.png and "
                        "<name>_variance.png uncertainty heatmaps")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", help="auto, bf16, fp16, fp32")
    _add_resolution_args(p)
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"),
                   help="torch: the checkpoint under PyTorch; onnx: a file from `pixelseg export` under onnxruntime "
                        "auto (default): onnx for .onnx files")

    p = sub.add_parser("export", help="write a checkpoint as ONNX or TorchScript, checked against PyTorch",
                       description="Export a checkpoint with dynamic batch, height and width. The file is run on real "
                                   "images and compared with PyTorch (max logit difference, argmax agreement); it "
                                   "is kept only if they agree on >= 99.9% of pixels.")
    p.add_argument("checkpoint", help="run directory (uses best.pt) or checkpoint file")
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript"), help="default: onnx")
    p.add_argument("--out", required=True, help="output file (e.g. model.onnx, model.ts.pt)")
    p.add_argument("--check-images", nargs="+", metavar="PATH",
                   help="images (files or directories) for the parity check (default: the run's validation images)")
    p.add_argument("--check-limit", type=int, default=4, help="images used for the parity check (default: 4)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")

    p = sub.add_parser("shards", help="write a dataset split as WebDataset shards for streaming",
                       description="Write splits of any dataset pixelseg reads (oxford-pet, camvid, folder, ...) as "
                                   "WebDataset tar shards (source image bytes + class-id PNG masks) and an index "
                                   "<split>.json; train from them with --dataset shards --data-root OUT (a "
                                   "directory, URL or brace pattern). See docs/datasets.md.")
    p.add_argument("--dataset", required=True, help="dataset to read: oxford-pet, camvid, folder, synthetic")
    p.add_argument("--data-root", help="its directory (as for train)")
    p.add_argument("--split", action="append", help="split to write (repeat for several; default: the dataset's "
                                                    "train and val splits)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--limit", type=int, help="only the first N samples of each split")
    for key in ("images_dir", "masks_dir", "val_fraction"):
        p.add_argument(_flag(key), dest=key, type=float if key == "val_fraction" else str, default=None,
                       help=TRAIN_HELP[key])

    sub.add_parser("models", help="list every valid architecture/backbone pair with its parameter count")
    _add_serve_args(sub)
    return parser


def _add_serve_args(sub) -> None:
    from .serving import Limits
    d = Limits()
    p = sub.add_parser("serve", help="HTTP API and web page for a model (needs pip install pixelseg[serve])",
                       description="Serve a model over HTTP: a web page at /, POST /v1/predict, /v1/model, /healthz, "
                                   "/readyz, /metrics. Binds to localhost; see docs/serving.md before exposing it.")
    p.add_argument("model", help="run directory (uses best.pt), checkpoint file, or .onnx file from `pixelseg export`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                   help=f"largest request body in MiB; more is 413 (default: {d.max_upload_mb:g})")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"largest image in pixels, checked before decoding; more is 413 (default: {d.max_pixels})")
    p.add_argument("--max-mc-samples", type=int, default=d.max_mc_samples,
                   help=f"most MC-dropout samples a request may ask for (default: {d.max_mc_samples})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests admitted at once (decoding, waiting, running); more get 503 + Retry-After "
                        f"(default: {d.max_queue})")
    p.add_argument("--upload-timeout", type=float, default=d.upload_timeout_s,
                   help=f"seconds a client has to send its whole body; slower is 408 (default: {d.upload_timeout_s:g})")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"run up to N concurrent requests as one batch (default: {d.max_batch}, off; see "
                        "docs/benchmarks.md for when it helps)")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help=f"how long a batch waits for company (default: {d.batch_wait_ms:g})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", help="auto, bf16, fp16, fp32")
    _add_resolution_args(p)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except PixelsegError as exc:
        msg = str(exc)
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the error's own line
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"pixelseg {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(exc.advice() if hasattr(exc, "advice") else "interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "train":
        from .train import DEFAULTS, train
        overrides = _load_yaml_config(args.config) if args.config else {}
        overrides.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
        summary = train(overrides)
        print(json.dumps({k: summary[k] for k in ("run_dir", "best_val_miou", "wall_time_s")}))
        return 0
    if args.command == "evaluate":
        from .inference import evaluate, format_scores
        result = evaluate(args.checkpoint, data_root=args.data_root, split=args.split, dataset=args.dataset,
                          limit=args.limit, device=args.device, precision=args.precision, out_dir=args.out,
                          batch_size=args.batch_size, full_res=args.full_res, tile=args.tile,
                          overlap=args.tile_overlap, tta=args.tta, uncertainty=args.uncertainty,
                          mc_samples=args.mc_samples)
        print(format_scores(result))
        print(f"wrote {' and '.join(result['files'])}")
        return 0
    if args.command == "predict":
        from .inference import predict
        results = predict(args.checkpoint, args.images, args.out, device=args.device, precision=args.precision,
                          mc_samples=args.mc_samples, tile=args.tile, overlap=args.tile_overlap, tta=args.tta,
                          backend=args.backend)
        print(f"wrote {len(results)} mask(s) and overlay(s) to {args.out} ({results[0]['backend']}, "
              f"{results[0]['mode']})")
        return 0
    if args.command == "export":
        from .export import export, format_parity
        r = export(args.checkpoint, args.format, args.out, check_images=args.check_images,
                   check_limit=args.check_limit, opset=args.opset)
        print(f"parity on {r['parity_source']} ({len(r['inputs'])} inputs incl. a batch of 2): {format_parity(r)}")
        print(f"wrote {r['out']} ({r['format']}, {r['model']}, {r['bytes'] / 1e6:.1f} MB)")
        return 0
    if args.command == "serve":
        from .server import serve
        from .serving import Limits
        limits = Limits(max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                        max_mc_samples=args.max_mc_samples, max_queue=args.max_queue,
                        upload_timeout_s=args.upload_timeout, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
        serve(args.model, host=args.host, port=args.port, limits=limits, device=args.device,
              precision=args.precision, tile=args.tile, overlap=args.tile_overlap, tta=args.tta)
        return 0
    if args.command == "shards":
        from .data import dataset_options, default_split
        from .data.shards import write_shards
        splits = args.split or list(dict.fromkeys(default_split(args.dataset, r) for r in ("train", "val")))
        for split in splits:
            idx = write_shards(args.dataset, args.data_root, split, args.out, args.maxcount, args.limit,
                               **dataset_options(vars(args)))
            print(f"wrote {idx['count']} samples of {args.dataset} {split} in {len(idx['shards'])} shard(s) to "
                  f"{args.out} ({split}.json); skipped {len(idx['skipped'])} unreadable")
        return 0
    if args.command == "models":
        from .models import describe_models
        rows = describe_models()
        print(f"{'arch':<18}{'backbone':<14}{'params':>12}")
        for r in rows:
            params = f"{r['params'] / 1e6:>11.2f}M" if r["params"] is not None else "  n/a (pip install pixelseg[segformer])"
            print(f"{r['arch']:<18}{r['backbone']:<14}{params}")
        print("any timm model with features_only also works: --backbone timm:NAME (e.g. timm:convnext_tiny)")
        return 0
    raise AssertionError(args.command)
