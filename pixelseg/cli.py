"""`pixelseg` command line: train, evaluate, predict, models, export, serve, audit.

User-fixable problems (PixelsegError) print one line and exit 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .core.errors import PixelsegError
from .training import config

# ---- options several commands share, defined once ---------------------------------------------------------
BACKENDS = ("auto", "torch", "onnx", "openvino")  # inference.runner.resolve_backend checks them


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """--device and --precision of evaluate, predict, audit and serve: train's options (TrainConfig) reused."""
    for key in ("device", "precision"):
        meta = config.OPTIONS[key].metadata
        p.add_argument(
            config.flag(key),
            default=config.DEFAULTS[key],
            choices=meta["choices"],
            metavar=meta["metavar"],
            help=meta["help"],
        )


def _add_backend_arg(p: argparse.ArgumentParser, default: str, help: str) -> None:
    p.add_argument("--backend", default=default, choices=BACKENDS if default == "auto" else BACKENDS[1:], help=help)


def _add_resolution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tile",
        nargs="?",
        const=True,
        default=None,
        metavar="SIZE",
        help="sliding-window inference at the image's native scale: windows of the training size, or "
        "SIZE (512 or 360x480); default: resize to the training size and back",
    )
    p.add_argument("--tile-overlap", type=float, default=0.25, help="overlap of neighbouring windows (default: 0.25)")
    p.add_argument("--tta", action="store_true", help="also run the horizontally flipped image and average")
    p.add_argument(
        "--tta-scales",
        type=_tta_scales,
        default=None,
        metavar="S[,S...]",
        help="also run the image rescaled by each factor (e.g. 1,1.25,1.5) and average the probabilities; "
        "helps thin objects, can hurt large ones: measure it with `pixelseg evaluate` first",
    )


def _tta_scales(text: str) -> tuple[float, ...]:
    from .inference.tiling import parse_scales

    try:
        return parse_scales(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tta(args):
    """--tta and --tta-scales as one test-time augmentation."""
    from .inference.tiling import TTA

    return TTA(flip=args.tta, scales=args.tta_scales or (1.0,))


class _TopParser(argparse.ArgumentParser):
    """The top-level parser, which keeps its sub-parsers by name: main() applies a --config file to train's or
    plan's."""

    subcommands: dict[str, argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def _parsers() -> tuple[_TopParser, argparse.ArgumentParser]:
    """The top-level parser and its train sub-parser (YAML options become the latter's defaults)."""
    from ._version import __version__

    parser = _TopParser(prog="pixelseg", description="Semantic segmentation: train, evaluate, predict.")
    parser.add_argument("--version", action="version", version=f"pixelseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=argparse.ArgumentParser)
    _add_train_parser(sub)
    _add_plan_parser(sub)
    _add_evaluate_parser(sub)
    _add_predict_parser(sub)
    _add_export_parser(sub)
    _add_shards_parser(sub)
    _add_convert_parser(sub)
    _add_audit_parser(sub)
    sub.add_parser(
        "models",
        help="list every valid architecture/backbone pair with its parameter count "
        "(* marks each architecture's default backbone)",
    )
    _add_serve_args(sub)
    parser.subcommands = sub.choices
    return parser, sub.choices["train"]


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model",
        description="Train a segmentation model. Defaults are the "
        "TensorFlow tutorial's recipe (U-Net/MobileNetV2, Adam 1e-3, batch 64, 20 epochs, 128×128).",
    )
    config.add_train_args(p)
    p.add_argument(
        "--auto",
        action="store_true",
        default=argparse.SUPPRESS,
        help="plan the recipe from the data and this machine (`pixelseg plan`), save it as RUN/plan.yaml "
        "and train it; options you give win over the plan, and plan.yaml records which ones did",
    )


def _add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="derive a training recipe from a dataset and this machine",
        description="Read the dataset (sizes, channels, class frequencies, object scales, file-name "
        "patterns), measure a few seconds of training steps, and write a recipe YAML that "
        "`pixelseg train --config` runs, each choice under its reason. Takes the data "
        "options of `train` (and any other train option, which the plan then keeps).",
    )
    config.add_train_args(p)
    p.add_argument("--out", type=Path, default=Path("plan.yaml"), help="where to write the recipe (default: plan.yaml)")


def _add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a checkpoint on a split",
        description="Score a checkpoint over a whole split; prints metrics, writes eval_<split>.json "
        "and confusion_<split>.png next to the checkpoint (or in --out).",
    )
    p.add_argument("checkpoint", help="run directory (uses best.pt) or checkpoint file")
    p.add_argument("--data-root", help="dataset directory (default: the one recorded in the run)")
    p.add_argument("--dataset", help="dataset name (default: the one recorded in the run)")
    p.add_argument("--split", help="split to score (default: the run's validation split)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size (default: 32)")
    _add_runtime_args(p)
    p.add_argument("--out", help="directory for the metrics JSON and confusion-matrix figure")
    p.add_argument(
        "--full-res",
        action="store_true",
        help="score each image at its own resolution against its original-size mask (the honest number; "
        "writes eval_<split>_fullres.json); default: the training resolution, as training reports",
    )
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="also measure the softmax-entropy uncertainty: accuracy of the pixels kept when the most "
        "uncertain p%% are dropped, expected calibration error, reliability diagram "
        "(uncertainty_<split>.png); see docs/uncertainty.md",
    )
    p.add_argument(
        "--mc-samples",
        type=int,
        default=0,
        help="Monte-Carlo dropout samples for models with dropout (bayesian_segnet, deeplabv3): the "
        "--uncertainty report for the sampled mean softmax too, with predictive entropy and variance",
    )
    _add_backend_arg(
        p, "torch", "torch (default): the checkpoint; onnx/openvino: score --exported FILE made from this run"
    )
    p.add_argument("--exported", metavar="FILE", help="an .onnx or OpenVINO .xml from `pixelseg export` of this run")
    _add_resolution_args(p)


def _add_predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="segment image files",
        description="Write, for each image, its class mask at the original resolution (palette "
        "PNG, values = class ids) and a colour overlay.",
    )
    p.add_argument("checkpoint", help="run directory (uses best.pt) or checkpoint file")
    p.add_argument("images", nargs="+", help="image files or directories of images")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--mc-samples",
        type=int,
        default=0,
        help="Monte-Carlo dropout samples (Bayesian SegNet): also writes <name>_entropy.png and "
        "<name>_variance.png uncertainty heatmaps",
    )
    _add_runtime_args(p)
    _add_resolution_args(p)
    _add_backend_arg(
        p,
        "auto",
        "torch: the checkpoint under PyTorch; onnx: a file from `pixelseg export` under "
        "onnxruntime; openvino: an .xml from `export --format openvino`; auto (default): by "
        "the file's suffix",
    )
    p.add_argument(
        "--keep-exif-grid",
        action="store_true",
        help="segment the pixels as stored; default: turn photos upright as their EXIF Orientation "
        "says (phone photos), so masks fit the image as people see it",
    )
    p.add_argument(
        "--format",
        choices=("coco", "cvat", "labelstudio", "yolo"),
        help="also write the masks as pre-annotations a labelling tool imports for correction: "
        "annotations.coco.json, annotations.xml (CVAT for images 1.1), labelstudio_tasks.json + "
        "labelstudio_config.xml, or yolo/ (YOLO-seg); see docs/datasets.md",
    )
    p.add_argument(
        "--shapes",
        default="polygon",
        choices=("polygon", "mask"),
        help="polygon (default): one editable polygon per connected region; mask: each class's pixels "
        "exactly (COCO RLE, CVAT <mask>, Label Studio brush; not yolo)",
    )
    p.add_argument(
        "--min-area",
        type=int,
        default=16,
        help="polygons: drop regions and fill holes smaller than this many pixels (default: 16)",
    )
    p.add_argument(
        "--rank",
        choices=("uncertainty",),
        help="write ranking.csv/ranking.json: the images, most uncertain (mean per-pixel entropy) first; "
        "models with dropout are sampled (MC dropout, --mc-samples, default 8)",
    )
    p.add_argument(
        "--image-url",
        metavar="PREFIX",
        help="labelstudio: image URLs are PREFIX + file name (default: /data/local-files/?d=PATH, "
        "the path relative to the current directory)",
    )


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as ONNX or TorchScript, checked against PyTorch",
        description="Export a checkpoint with dynamic batch, height and width. The file is run on real "
        "images and compared with PyTorch (max logit difference, argmax agreement); it "
        "is kept only if they agree on >= 99.9% of pixels.",
    )
    p.add_argument("checkpoint", help="run directory (uses best.pt) or checkpoint file")
    p.add_argument(
        "--format",
        default="onnx",
        choices=("onnx", "torchscript", "openvino"),
        help="default: onnx; openvino writes OUT.xml/.bin plus the fp32 OUT.onnx it falls back to "
        "(pip install 'pixelseg[openvino]'), kept only if it passes the gate on the run's split",
    )
    p.add_argument("--out", required=True, help="output file (e.g. model.onnx, model.ts.pt, model.xml)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="openvino: int8 by NNCF post-training quantization on real calibration images",
    )
    p.add_argument(
        "--calibration-split",
        help="openvino --int8: split the calibration images come from (default: the run's training split)",
    )
    p.add_argument("--calibration-images", type=int, default=100, help="openvino --int8: how many (default: 100)")
    p.add_argument(
        "--check-split", help="openvino: split the gate is measured on (default: the run's validation split)"
    )
    p.add_argument(
        "--int8-ignore",
        help="openvino --int8: layers kept in higher precision (NNCF ignored scope), "
        "comma-separated names or the groups 'ends' (stem and logits layer) and "
        "'encoder' (only the decoder in int8); a refused export names candidates",
    )
    p.add_argument(
        "--check-images",
        nargs="+",
        metavar="PATH",
        help="images (files or directories) for the parity check (default: the run's validation images)",
    )
    p.add_argument(
        "--check-limit",
        type=int,
        help="images used for the parity check (default: 4; openvino: the whole --check-split)",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")


def _add_shards_parser(sub) -> None:
    p = sub.add_parser(
        "shards",
        help="write a dataset split as WebDataset shards for streaming",
        description="Write splits of any dataset pixelseg reads (oxford-pet, camvid, folder, ...) as "
        "WebDataset tar shards (source image bytes + class-id PNG masks) and an index "
        "<split>.json; train from them with --dataset shards --data-root OUT (a "
        "directory, URL or brace pattern). See docs/datasets.md.",
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="dataset to read: oxford-pet, camvid, folder, coco, cvat, labelstudio, labelme, yolo, synthetic, ...",
    )
    p.add_argument("--data-root", help="its directory (as for train)")
    p.add_argument(
        "--split",
        action="append",
        help="split to write (repeat for several; default: the dataset's train and val splits)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--limit", type=int, help="only the first N samples of each split")
    _add_dataset_option_args(p)


def _add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="an annotation export (COCO, CVAT, Label Studio, LabelMe, YOLO-seg) or any "
        "dataset to a folder of class-id PNG masks (or shards)",
        description="Convert any dataset pixelseg reads to OUT/images/<split>/, OUT/masks/<split>/ "
        "(class-id PNGs) and OUT/classes.csv, which --dataset folder reads back; or to "
        "WebDataset shards (--to shards). Prints a report (classes, pixel shares, images "
        "without labels, shapes clipped or dropped) and writes it to "
        "OUT/convert_report.json with an overlay figure OUT/convert_overlay.png.",
    )
    p.add_argument("--dataset", required=True, help="coco, cvat, labelstudio, labelme, yolo, folder, voc, ...")
    p.add_argument("--data-root", required=True, help="the export's directory (as for train)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--to", default="folder", choices=("folder", "shards"), help="default: folder")
    p.add_argument(
        "--split",
        action="append",
        help="split to convert (repeat; default: every split the export has, or the dataset's train and val)",
    )
    p.add_argument("--limit", type=int, help="only the first N samples of each split")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard with --to shards (default: 1000)")
    _add_dataset_option_args(p)


def _add_audit_parser(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="find likely label errors in a run's training data (confident learning with "
        "the held-out fold models of a --folds run)",
        description="Score every training image with the fold model that did not train on it, flag "
        "regions where that model is confident in another class than the label (missing "
        "label, wrong class, spurious label, boundary) and rank the images by label "
        "quality. Writes audit.csv, audit.json, overlays/ of the top images and review/, "
        "the suspects as pre-annotations in the dataset's format. See docs/labels.md.",
    )
    p.add_argument("run", help="a `pixelseg train --folds K` run directory (a plain run works, with a warning)")
    p.add_argument("--out", help="output directory (default: RUN/audit)")
    p.add_argument("--top", type=int, default=20, help="overlay PNGs for this many top-ranked images (default: 20)")
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "coco", "cvat", "labelstudio", "yolo", "none"),
        help="review tasks: auto (default) = the dataset's own format (coco, cvat, labelstudio, yolo), "
        "coco for datasets of mask files; none: no export",
    )
    p.add_argument("--data-root", help="the dataset's directory, if it moved since training (default: the run's)")
    p.add_argument(
        "--band",
        type=int,
        help="width in pixels of the band along labelled edges whose suspects count "
        "as boundary errors (default: 2%% of the image's longer side, >= 3)",
    )
    p.add_argument(
        "--min-area", type=int, help="smallest suspect region in pixels (default: 0.025%% of the image, >= 16)"
    )
    p.add_argument("--limit", type=int, help="only the first N images (a quick look)")
    p.add_argument(
        "--unlabelled",
        action="append",
        metavar="DIR",
        help="folder (or file) of images without labels (repeat): also write OUT/next/, one next-to-label "
        "list of these images (pre-annotated by the run's model) and the suspects, ranked by the "
        "expected share of pixels a person will change, in --format's tool format; see docs/labels.md",
    )
    p.add_argument("--next-top", type=int, help="with --unlabelled: only the first N of the list (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    _add_runtime_args(p)


def _add_dataset_option_args(p: argparse.ArgumentParser) -> None:
    """The dataset options of `train` (folder's --images-dir ..., the annotation readers' --overlap ...)."""
    for key in config.DATASET_FLAGS:
        meta = config.OPTIONS[key].metadata
        if meta["parse"] is config.parse_bool:
            p.add_argument(
                config.flag(key), dest=key, action=argparse.BooleanOptionalAction, default=None, help=meta["help"]
            )
        else:
            p.add_argument(
                config.flag(key),
                dest=key,
                type=config._argparse_type(key),
                default=None,
                choices=meta["choices"],
                help=meta["help"],
            )


def _add_serve_args(sub) -> None:
    from .core.sizes import Limits

    d = Limits()
    p = sub.add_parser(
        "serve",
        help="HTTP API and web page for a model (needs pip install pixelseg[serve])",
        description="Serve a model over HTTP: a web page at /, POST /v1/predict, /v1/model, /healthz, "
        "/readyz, /metrics. Binds to localhost; see docs/serving.md before exposing it.",
    )
    p.add_argument("model", help="run directory (uses best.pt), checkpoint file, or .onnx file from `pixelseg export`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=d.max_upload_mb,
        help=f"largest request body in MiB; more is 413 (default: {d.max_upload_mb:g})",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=d.max_pixels,
        help=f"largest image in pixels, checked before decoding; more is 413 (default: {d.max_pixels})",
    )
    p.add_argument(
        "--max-mc-samples",
        type=int,
        default=d.max_mc_samples,
        help=f"most MC-dropout samples a request may ask for (default: {d.max_mc_samples})",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help=f"requests admitted at once (waiting, decoding, running); more get 503 + Retry-After "
        f"(default: {d.max_queue})",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=d.deadline_s,
        help=f"seconds an admitted request may wait and run; one that cannot make it gets 503 + "
        f"Retry-After (default: {d.deadline_s:g})",
    )
    p.add_argument(
        "--upload-timeout",
        type=float,
        default=d.upload_timeout_s,
        help=f"seconds a client has to send its whole body; slower is 408 (default: {d.upload_timeout_s:g})",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help=f"run up to N waiting requests as one forward pass (default: {d.max_batch}; 1: off; see docs/serving.md)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=d.batch_wait_ms,
        help=f"how long a batch waits for company (default: {d.batch_wait_ms:g})",
    )
    _add_runtime_args(p)
    _add_backend_arg(
        p, "auto", "as for predict; auto (default): by the model file's suffix (.onnx, .xml, else a checkpoint)"
    )
    p.add_argument(
        "--keep-exif-grid",
        action="store_true",
        help="segment uploads as stored; default: turn photos upright as their EXIF Orientation says "
        "(a request may override with ?keep_exif_grid=true/false)",
    )
    _add_resolution_args(p)
    _add_label_studio_args(p)


def _add_label_studio_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Label Studio ML backend (docs/serving.md#label-studio-ml-backend)")
    g.add_argument(
        "--label-studio",
        action="store_true",
        help="also answer Label Studio's ML backend protocol (/health, /setup, /predict, /webhook, /train): "
        "predictions as the project's brush or polygon labels, and fine-tuning on submitted "
        "annotations in the background",
    )
    g.add_argument(
        "--retrain-after",
        type=int,
        default=10,
        metavar="N",
        help="fine-tune after N newly submitted annotations (default: 10; 0: only on Label Studio's 'Start training')",
    )
    g.add_argument(
        "--retrain-budget",
        default="5m",
        metavar="DURATION",
        help="time budget of each fine-tune, e.g. 90s, 5m (default: 5m)",
    )
    g.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="share of the annotated tasks held out to judge a fine-tuned model; it is served only if "
        "it scores no worse on them than the model serving (default: 0.2)",
    )
    g.add_argument(
        "--ls-dir",
        default=None,
        help="where the backend keeps annotations, versions and retrain rounds (default: RUN/label-studio)",
    )
    g.add_argument(
        "--label-studio-url",
        default=os.environ.get("LABEL_STUDIO_URL"),
        help="Label Studio's address for fetching task images (default: $LABEL_STUDIO_URL, else the "
        "address Label Studio sends when it connects); its token: $LABEL_STUDIO_API_KEY, else the one "
        "it sends",
    )


def main(argv=None) -> int:
    parser, _ = _parsers()
    args = parser.parse_args(argv)
    try:
        if args.command in ("train", "plan") and getattr(args, "config", None):
            # As timm's train.py: the YAML file sets the parser's defaults, then the flags are parsed again
            # on top of it, so flags win and every value goes through the same parser.
            parser.subcommands[args.command].set_defaults(**config.load_yaml(args.config))
            args = parser.parse_args(argv)
        return _run(args)
    except PixelsegError as exc:
        msg = str(exc)
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the error's own line
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"pixelseg {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(exc.advice() if hasattr(exc, "advice") else "interrupted", file=sys.stderr)
        return getattr(exc, "exit_code", 130)  # 143 for SIGTERM (train.TrainingPreempted): requeue
    except BrokenPipeError:  # `pixelseg models | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0


# How long libgomp's workers spin after a parallel region before they sleep, for `serve` (its default is
# 300,000 spins, milliseconds of a core). A server's torch thread ends each forward pass and hands over to
# the event loop, decoding and encoding on the same cores, which a still-spinning worker slows down and the
# one-client tail shows (the sweep: docs/benchmarks.md, "Numbers behind choices in the code"). Short
# enough to stop soon after a pass, long enough to bridge the gaps between the ops of one.
SERVE_GOMP_SPINCOUNT = "10000"


def serve_openmp_env(environ=os.environ) -> str | None:
    """Set GOMP_SPINCOUNT for `serve` unless the user chose an OpenMP wait policy; libgomp reads it once,
    when torch loads it, so this runs before the first torch import. Returns the value set, or None."""
    if "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ or "torch" in sys.modules:
        return None
    environ["GOMP_SPINCOUNT"] = SERVE_GOMP_SPINCOUNT
    return SERVE_GOMP_SPINCOUNT


def _run(args) -> int:
    run = _COMMANDS.get(args.command)
    if run is None:
        raise AssertionError(args.command)
    if args.command == "serve":
        serve_openmp_env()
    from .core.runtime import tune_malloc

    tune_malloc()  # before the first large tensor: every command allocates activations step after step
    return run(args)


def _run_plan(args) -> int:
    from .training.plan import plan_from_options, write_plan

    print(write_plan(plan_from_options(config.overrides_from_args(args)), args.out), end="")
    print(f"wrote {args.out}; train it with: pixelseg train --config {args.out}")
    return 0


def _run_train(args) -> int:
    if getattr(args, "auto", False):
        from .training.train import train_auto

        summary = train_auto(config.overrides_from_args(args))
        print(json.dumps({k: summary[k] for k in ("run_dir", "best_val_miou", "wall_time_s")}))
        return 0
    from .training.train import train

    summary = train(config.overrides_from_args(args))
    print(json.dumps({k: summary[k] for k in ("run_dir", "best_val_miou", "wall_time_s")}))
    return 0


def _run_evaluate(args) -> int:
    from .inference.evaluate import EvalOptions, evaluate, format_scores

    options = EvalOptions(
        data_root=args.data_root,
        split=args.split,
        dataset=args.dataset,
        limit=args.limit,
        device=args.device,
        precision=args.precision,
        out_dir=args.out,
        batch_size=args.batch_size,
        full_res=args.full_res,
        tile=args.tile,
        overlap=args.tile_overlap,
        tta=_tta(args),
        uncertainty=args.uncertainty,
        mc_samples=args.mc_samples,
        backend=args.backend,
        exported=args.exported,
    )
    result = evaluate(args.checkpoint, options)
    print(format_scores(result))
    print(f"wrote {' and '.join(result['files'])}")
    return 0


def _run_predict(args) -> int:
    from .inference.predict import predict

    results = predict(
        args.checkpoint,
        args.images,
        args.out,
        device=args.device,
        precision=args.precision,
        mc_samples=args.mc_samples,
        tile=args.tile,
        overlap=args.tile_overlap,
        tta=_tta(args),
        backend=args.backend,
        format=args.format,
        shapes=args.shapes,
        min_area=args.min_area,
        rank=args.rank,
        image_url=args.image_url,
        keep_exif_grid=args.keep_exif_grid,
    )
    print(f"wrote {len(results)} mask(s) and overlay(s) to {args.out} ({results[0]['backend']}, {results[0]['mode']})")
    if args.format:
        print(f"wrote {args.format} pre-annotations: {', '.join(results[0]['files'])}")
    if args.rank:
        print(f"wrote {' and '.join(results[0]['ranking'])}: most uncertain first ({results[0]['rank_method']})")
    return 0


def _run_export(args) -> int:
    if args.format == "openvino":
        from .inference.openvino import export_openvino, format_gate

        r = export_openvino(
            args.checkpoint,
            args.out,
            int8=args.int8,
            calibration_split=args.calibration_split,
            calibration_images=args.calibration_images,
            check_split=args.check_split,
            check_limit=args.check_limit,
            ignore=args.int8_ignore.split(",") if args.int8_ignore else None,
        )
        print(f"gate on {r['check_split']} ({r['precision']}): {format_gate(r)}")
        print(
            f"wrote {r['out']} (+ .bin, + .onnx fallback; openvino {r['precision']}, {r['model']}, "
            f"{r['bytes'] / 1e6:.1f} MB weights)"
        )
        return 0
    from .inference.export import export, format_parity

    r = export(
        args.checkpoint,
        args.format,
        args.out,
        check_images=args.check_images,
        check_limit=args.check_limit or 4,
        opset=args.opset,
    )
    print(f"parity on {r['parity_source']} ({len(r['inputs'])} inputs incl. a batch of 2): {format_parity(r)}")
    print(f"wrote {r['out']} ({r['format']}, {r['model']}, {r['bytes'] / 1e6:.1f} MB)")
    return 0


def _run_serve(args) -> int:
    from .core.sizes import Limits
    from .inference.server import serve

    limits = Limits(
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        max_mc_samples=args.max_mc_samples,
        max_queue=args.max_queue,
        upload_timeout_s=args.upload_timeout,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        deadline_s=args.deadline,
    )
    serve(
        args.model,
        host=args.host,
        port=args.port,
        limits=limits,
        device=args.device,
        precision=args.precision,
        tile=args.tile,
        overlap=args.tile_overlap,
        tta=_tta(args),
        keep_exif_grid=args.keep_exif_grid,
        backend=args.backend,
        label_studio=_label_studio_options(args),
    )
    return 0


def _label_studio_options(args):
    if not args.label_studio:
        return None
    from .inference.lsml_server import LSOptions

    try:
        budget = config.parse_duration(args.retrain_budget)
    except ValueError as exc:  # OptionError
        raise PixelsegError(f"--retrain-budget {args.retrain_budget}: {exc}") from None
    if budget is None:  # "none"/"off": LSOptions.check() refuses it with this same message
        raise PixelsegError("--retrain-budget: must be a positive duration, e.g. 5m")
    return LSOptions(
        work_dir=args.ls_dir,
        retrain_after=args.retrain_after,
        retrain_budget_s=budget,
        holdout=args.holdout,
        url=args.label_studio_url,
        token=os.environ.get("LABEL_STUDIO_API_KEY") or None,
        train_device=args.device,
    ).check()


def _run_shards(args) -> int:
    from .data import dataset_options, default_split
    from .data.shards_write import write_shards

    splits = args.split or list(dict.fromkeys(default_split(args.dataset, r) for r in ("train", "val")))
    for split in splits:
        idx = write_shards(
            args.dataset, args.data_root, split, args.out, args.maxcount, args.limit, **dataset_options(vars(args))
        )
        print(
            f"wrote {idx['count']} samples of {args.dataset} {split} in {len(idx['shards'])} shard(s) to "
            f"{args.out} ({split}.json); skipped {len(idx['skipped'])} unreadable"
        )
    return 0


def _run_convert(args) -> int:
    from .data import dataset_options
    from .data.convert import convert, format_report

    report = convert(
        args.dataset,
        args.data_root,
        args.out,
        args.to,
        args.split,
        args.limit,
        args.maxcount,
        **dataset_options(vars(args)),
    )
    print(format_report(report))
    print(f"wrote {args.out} (convert_report.json, convert_overlay.png)")
    return 0


def _run_audit(args) -> int:
    from .inference.audit import audit, format_summary

    report = audit(
        args.run,
        args.out,
        top=args.top,
        fmt=args.format,
        data_root=args.data_root,
        device=args.device,
        precision=args.precision,
        band=args.band,
        min_area=args.min_area,
        limit=args.limit,
        batch_size=args.batch_size,
        unlabelled=args.unlabelled,
        next_top=args.next_top,
    )
    print(format_summary(report))
    print(
        f"wrote {len(report['files'])} files to {Path(report['files'][0]).parent}: audit.csv, audit.json, "
        "overlays/, review/" + (", next/" if args.unlabelled else "")
    )
    if args.unlabelled:
        from .inference.label_next import format_summary as next_summary

        print(next_summary(report["next"]))
    return 0


def _run_models(args) -> int:
    from .models import describe_models

    rows = describe_models()
    print(f"{'arch':<18}{'backbone':<16}{'params':>12}")
    for r in rows:
        name = r["backbone"] + (" *" if r["default"] else "")
        missing = "  n/a (pip install pixelseg[segformer])"
        params = f"{r['params'] / 1e6:>11.2f}M" if r["params"] is not None else missing
        print(f"{r['arch']:<18}{name:<16}{params}")
    print("* the architecture's default backbone (used when --backbone is not given)")
    print("any timm model with features_only also works: --backbone timm:NAME (e.g. timm:convnext_tiny)")
    return 0


_COMMANDS = {
    "plan": _run_plan,
    "train": _run_train,
    "evaluate": _run_evaluate,
    "predict": _run_predict,
    "export": _run_export,
    "serve": _run_serve,
    "shards": _run_shards,
    "convert": _run_convert,
    "models": _run_models,
    "audit": _run_audit,
}
