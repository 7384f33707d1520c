"""Training options: one dataclass field per option, and everything generated from it.

Each field of ``TrainConfig`` carries its default, its parser (the one function that turns a flag,
a YAML value or a Python value into the canonical value), its choices, help text and help group.
The ``pixelseg train`` flags, the YAML keys, ``DEFAULTS`` and the validation in
``resolve_config`` are all generated from these fields, so adding an option is one entry here.

YAML is applied through the parser, as timm's ``train.py`` does: ``parser.set_defaults(**yaml)``
then ``parse_args``, so flags override the file. The parser's own defaults are
``argparse.SUPPRESS``, so what comes out is exactly what the user set (file or flags); an explicit
``null`` survives (``weights: null`` stays "no weights"), and ``resolve_config`` fills the rest
from the field defaults. ``resolve_config`` returns a frozen ``TrainConfig``: the run reads it by attribute
(checked by the type checker) and nothing changes it after validation; its ``to_dict()`` is what
``config.yaml`` and the checkpoints record, and ``pixelseg train --config RUN/config.yaml`` reads it back
to the same run.

This module imports no torch: ``pixelseg --help`` and ``pixelseg train --help`` stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import PixelsegError
from ..core.sizes import OptionError, parse_size
from ..core.sizes import show as _show

GROUPS = {
    "data": "data",
    "model": "model",
    "optimisation": "optimisation",
    "augmentation": "augmentation",
    "runtime": "runtime",
    "distributed": "distributed",
    "output": "output and logging",
}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


# ---- value parsers: each turns a flag string, YAML value or Python value into the canonical value ----
def _int(minimum: int | None = None) -> Callable:
    def parse(value) -> int:
        if isinstance(value, bool):
            raise OptionError("expected a whole number")
        try:
            out = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            out = None
        if out is None:
            raise OptionError("expected a whole number")
        if minimum is not None and out < minimum:
            raise OptionError(f"must be >= {minimum}")
        return out

    parse.__name__ = "int"
    return parse


def _float(minimum: float | None = None, maximum: float | None = None) -> Callable:
    def parse(value) -> float:
        try:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        except (TypeError, ValueError):
            raise OptionError("expected a number") from None
        if out != out or (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
            lo = "" if minimum is None else f">= {minimum}"
            hi = "" if maximum is None else f"<= {maximum}"
            raise OptionError("must be " + " and ".join(s for s in (lo, hi) if s))
        return out

    parse.__name__ = "float"
    return parse


_TRUE, _FALSE = ("yes", "true", "1", "on"), ("no", "false", "0", "off")


def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise OptionError("expected yes or no")


def parse_tristate(value) -> str | bool:
    """auto / yes / no (and true/false, 1/0) -> "auto", True or False; parsed once, here."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return parse_bool(value)
    except OptionError:
        raise OptionError("expected auto, yes or no") from None


def parse_weights(value) -> str | None:
    """imagenet, none or a path; "none" (and YAML null) mean random init."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() in ("none", "null", ""):
        return None
    return "imagenet" if text.lower() == "imagenet" else text


def parse_path(value) -> str:
    if isinstance(value, str):
        return value
    try:
        return str(Path(value))
    except TypeError:  # a list or a number where a path belongs (resolve_config / a caller's dict)
        raise OptionError("expected a path") from None


def parse_scale_range(value) -> list[float]:
    try:
        vals = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 2:
        raise OptionError("expected 2 comma-separated numbers, e.g. 0.5,2.0")
    if not 0 < vals[0] <= vals[1]:
        raise OptionError("must be two numbers 0 < lo <= hi, e.g. 0.5,2.0")
    return vals


def parse_rgb_bands(value) -> list[int]:
    """ "3,2,1" or [3, 2, 1] -> band indices (how many and which are checked against the image in viz)."""
    try:
        vals = [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        vals = []
    if not vals:
        raise OptionError("give 1 or 3 band indices, e.g. 3,2,1")
    return vals


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(value) -> float | None:
    """ "15m", "90s", "1h30m", "2.5h", 900 or "900" -> seconds (float); "none"/"off" -> None (no budget)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise OptionError("give a duration like 15m, 90s, 1h30m or a number of seconds")
    text = str(value).strip().lower().replace(" ", "")
    if text in ("none", "off", "null", ""):
        return None
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.fullmatch(text)
        if not match or not any(match.groups()):
            raise OptionError("give a duration like 15m, 90s, 1h30m or a number of seconds") from None
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise OptionError("must be a positive duration")
    return seconds


def _lower(value) -> str:
    return str(value).strip().lower()


def parse_cache(value) -> str:
    """mmap | memory | none."""
    return _lower(value)


def parse_workers(value) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return _int(0)(value)
    except OptionError:
        raise OptionError("give a number of DataLoader worker processes (0: none) or auto") from None


def parse_val_every(value) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return _int(1)(value)
    except OptionError:
        raise OptionError("give a number of epochs between validations (>= 1) or auto") from None


# ---- the options ------------------------------------------------------------------------------------
def option(
    default,
    help: str,
    group: str,
    *,
    parse: Callable | None = None,
    choices: tuple | None = None,
    nullable: bool = False,
    default_text: str | None = None,
    metavar: str | None = None,
):
    """One training option. ``parse`` (default: str) canonicalises any value; ``nullable`` allows None
    (YAML null) as a real value; ``default_text`` is how --help shows the default when it is not a literal."""
    assert group in GROUPS, group
    return field(
        default=default,
        metadata=dict(
            help=help,
            group=group,
            parse=parse,
            choices=choices,
            nullable=nullable or default is None,
            default_text=default_text,
            metavar=metavar,
        ),
    )


@dataclass(frozen=True)
class TrainConfig:
    """One training run's options, validated (``resolve_config``) and frozen."""

    # data
    dataset: str = option(
        "oxford-pet",
        "dataset name: oxford-pet, camvid, voc (Pascal VOC 2012 + SBD train_aug), "
        "ade20k (SceneParsing), cityscapes, folder (your own images/ + masks/), coco, cvat, "
        "labelstudio, labelme, yolo (annotation exports), synthetic, shards (see docs/datasets.md)",
        "data",
    )
    data_root: str | None = option(
        None,
        "dataset directory (Oxford-IIIT Pet: holds images/ and annotations/, "
        "downloaded into $PIXELSEG_DATA or ~/.cache/pixelseg when omitted; CamVid: the "
        "SegNet layout; folder: holds images/ and masks/, see docs/datasets.md)",
        "data",
        parse=parse_path,
        default_text="pets: downloaded; other datasets: required",
    )
    images_dir: str | None = option(
        None, "folder dataset: sub-folder of --data-root holding the images", "data", default_text="images"
    )
    masks_dir: str | None = option(
        None,
        "folder dataset: sub-folder of --data-root holding the masks, matched to images by file stem",
        "data",
        default_text="masks",
    )
    mask_suffix: str | None = option(
        None,
        "folder dataset: a mask's stem is its image's stem plus this suffix, e.g. "
        "_mask for x.png + x_mask.png (then --images-dir and --masks-dir may name the "
        "same folder)",
        "data",
        default_text="none",
    )
    val_fraction: float | None = option(
        None,
        "folder and annotation datasets without a val split: share of the "
        "pairs held out for validation, chosen by a fixed seed",
        "data",
        parse=_float(),
        default_text="0.2",
    )
    val_group: str | None = option(
        None,
        "folder and annotation datasets: keep pairs of one group on one side "
        "of the --val-fraction split (frames of a video, slices of a stack): a regex "
        "whose first group (or match) in the stem is the group, or 'prefix' (the stem "
        "without its trailing number)",
        "data",
        default_text="none",
    )
    overlap: str | None = option(
        None,
        "coco, cvat, labelstudio, labelme, yolo: which class wins a pixel "
        "several shapes cover: smaller (higher z_order first, then the smaller shape on top), "
        "order (z_order, then the later shape), ignore (pixels of conflicting classes become "
        "255)",
        "data",
        parse=_lower,
        choices=("smaller", "order", "ignore"),
        default_text="smaller",
    )
    iscrowd: str | None = option(
        None,
        "coco: iscrowd regions are painted with their class, or ignore (255, left out of loss and metrics)",
        "data",
        parse=_lower,
        choices=("class", "ignore"),
        default_text="class",
    )
    boxes: bool | None = option(
        None,
        "cvat, labelstudio, labelme, yolo: also paint boxes (rectangles) as filled "
        "regions; default: boxes are left out and counted",
        "data",
        parse=parse_bool,
        default_text="no",
    )
    skip_bad: bool | None = option(
        None,
        "coco, cvat, labelstudio, labelme, yolo: skip damaged annotations and images "
        "(counted in the report and the run summary) instead of stopping at the first",
        "data",
        parse=parse_bool,
        default_text="no",
    )
    classes: str | None = option(
        None,
        "folder dataset: the classes.csv to use (id,name,r,g,b), e.g. outside a read-only data root",
        "data",
        parse=parse_path,
        default_text="DATA_ROOT/classes.csv if present",
    )
    class_names: str | None = option(
        None,
        "folder dataset without classes.csv: class names in id order, e.g. membrane,cell",
        "data",
        default_text="none",
    )
    train_split: str | None = option(None, "training split", "data", default_text="the dataset's, trainval for pets")
    val_split: str | None = option(
        None, "validation split, evaluated in full every epoch", "data", default_text="the dataset's, test for pets"
    )
    image_size: int | list = option(
        128, "training resolution: N (square) or HxW, e.g. 360x480", "data", parse=parse_size, metavar="SIZE"
    )
    limit: int | None = option(
        None, "use only the first N images of each split (quick tries)", "data", parse=_int(1), default_text="all"
    )
    cache: str = option(
        "mmap",
        "how decoded samples are held: mmap (decode once per machine into a disk store in "
        "$PIXELSEG_CACHE or ~/.cache/pixelseg/cache, read through the shared page cache; memory does "
        "not grow with the dataset), memory (private arrays in RAM, no disk writes), none "
        "(DataLoader workers decode each sample when needed); see docs/datasets.md",
        "data",
        parse=parse_cache,
        choices=("mmap", "memory", "none"),
    )
    cache_max_side: int | None = option(
        None,
        "cache the source resolution with its longer side capped to this many "
        "pixels, e.g. 2048 (implied, uncapped, by --crop: random scale + crop then "
        "run per sample in the workers)",
        "data",
        parse=_int(8),
        default_text="off",
    )
    workers: int | str = option(
        "auto",
        "DataLoader worker processes, or auto (none for whole-batch reads of resized "
        "samples, else one per core, divided among torchrun's local ranks)",
        "data",
        parse=parse_workers,
        metavar="{N,auto}",
    )
    # model
    model: str = option(
        "unet",
        "architecture: unet, fcn8s, fcn16s, fcn32s, segnet, bayesian_segnet, deeplabv3, "
        "deeplabv3plus, pspnet, fpn, upernet, segformer (see `pixelseg models`)",
        "model",
    )
    backbone: str | None = option(
        None,
        "encoder, e.g. mobilenet_v2, resnet50, vgg16, mit_b0, or timm:NAME for any timm model with features_only",
        "model",
        default_text="the architecture's own, marked * in `pixelseg models`",
    )
    output_stride: int | None = option(
        None,
        "encoder output stride of dilated models (deeplabv3, deeplabv3plus: 16 or 8; pspnet: 8, 16 or 32)",
        "model",
        parse=_int(1),
        default_text="the architecture's",
    )
    in_channels: int = option(
        3,
        "image channels: 3 (RGB), or e.g. 1, 4, 13 for grey, RGB+NIR or multispectral "
        "8/16-bit PNG/TIFF (folder dataset); the encoder's first conv is adapted from its RGB "
        "weights and inputs are normalised with per-channel statistics of the training split",
        "model",
        parse=_int(1),
    )
    rgb_bands: list | None = option(
        None,
        "bands the figures and predict overlays show as RGB, e.g. 3,2,1",
        "output",
        parse=parse_rgb_bands,
        default_text="the first three, or the first as grey",
        metavar="B[,G,R]",
    )
    weights: str | None = option(
        "imagenet",
        "encoder weights: imagenet, none, or a path to a state-dict file",
        "model",
        parse=parse_weights,
        nullable=True,
        metavar="{imagenet,none,PATH}",
    )
    freeze_encoder: str | bool = option(
        False,
        "no (train every layer: pretrained encoders fine-tune better than "
        "frozen ones, docs/training.md), yes, or auto (freeze iff pretrained "
        "weights are loaded, as the tutorial does)",
        "model",
        parse=parse_tristate,
        metavar="{no,yes,auto}",
    )
    encoder_lr_mult: float = option(
        1.0,
        "learning rate of a trained (not frozen) encoder as a multiple of --lr, e.g. "
        "0.1: a pretrained encoder moves slower than the new decoder",
        "model",
        parse=_float(0.0),
    )
    freeze_encoder_bn: bool = option(
        False,
        "keep the encoder's BatchNorm on its pretrained running statistics while its weights train (small batches)",
        "model",
        parse=parse_bool,
    )
    # optimisation
    epochs: int | None = option(
        20,
        "number of epochs (with --time-budget: an upper bound when given; null = the budget alone decides)",
        "optimisation",
        parse=_int(1),
        nullable=True,
    )
    iterations: int | None = option(
        None,
        "number of optimiser steps in all, as papers give schedules (overrides "
        "--epochs: the run stops after this many steps and the lr schedule spans them; "
        "validation still runs once per epoch)",
        "optimisation",
        parse=_int(1),
        default_text="off",
    )
    time_budget: float | None = option(
        None,
        "stop training at this wall time, e.g. 15m, 90s, 1h30m or seconds; the "
        "lr schedule spans the steps that fit (measured speed, re-estimated after the "
        "first epoch), validation included, and best.pt is kept (docs/training.md)",
        "optimisation",
        parse=parse_duration,
        default_text="off",
        metavar="DURATION",
    )
    early_stop: int | None = option(
        None,
        "stop after N epochs without a val mIoU improvement of more than --early-stop-delta",
        "optimisation",
        parse=_int(1),
        default_text="off",
    )
    early_stop_delta: float = option(
        0.001, "the val mIoU gain that counts as an improvement for --early-stop", "optimisation", parse=_float(0.0)
    )
    val_every: int | str = option(
        "auto",
        "validate every N epochs (the last epoch always); auto: every epoch, "
        "or with --time-budget as often as keeps validation to about 10% of the "
        "budget (measured); best.pt is the best validated epoch",
        "optimisation",
        parse=parse_val_every,
        metavar="{N,auto}",
    )
    folds: int | None = option(
        None,
        "K-fold cross-validation: K runs RUN/fold_0 .. fold_K-1 on grouped folds of "
        "the training pool, RUN/cv.json (mean and std) and cv.png; the folds run dir "
        "then serves evaluate/predict/serve as an ensemble (docs/training.md)",
        "optimisation",
        parse=_int(2),
        default_text="off",
    )
    fold: int | None = option(
        None,
        "with --folds K: train only fold I (0..K-1) as one ordinary run, held-out fold "
        "as val (what --folds runs K times; e.g. one fold per torchrun launch)",
        "optimisation",
        parse=_int(0),
        default_text="all",
        metavar="I",
    )
    batch_size: int = option(
        64, "global batch size (all processes and accumulation steps together)", "optimisation", parse=_int(1)
    )
    accumulate: int = option(1, "gradient accumulation steps per optimiser step", "optimisation", parse=_int(1))
    lr: float = option(1e-3, "peak learning rate", "optimisation", parse=_float(0.0))
    optimizer: str = option(
        "adam", "adam, adamw or sgd (momentum)", "optimisation", parse=_lower, choices=("adam", "adamw", "sgd")
    )
    weight_decay: float = option(
        0.0, "weight decay (never applied to norm layers and biases)", "optimisation", parse=_float(0.0)
    )
    momentum: float = option(0.9, "SGD momentum", "optimisation", parse=_float(0.0))
    schedule: str = option(
        "constant",
        "learning-rate schedule: constant, poly, cosine",
        "optimisation",
        parse=_lower,
        choices=("constant", "poly", "cosine"),
    )
    warmup_epochs: float = option(
        0.0, "linear warm-up length in epochs (may be fractional)", "optimisation", parse=_float(0.0)
    )
    loss: str = option(
        "ce", "ce, dice, focal, or a weighted sum like ce+dice or ce:1+dice:0.5", "optimisation", metavar="SPEC"
    )
    class_weighting: str = option(
        "none",
        "cross-entropy class weights: none, uniform, inverse, median (SegNet's median frequency), sqrt_median "
        "(its square root: softer)",
        "optimisation",
        parse=_lower,
        choices=("none", "uniform", "inverse", "median", "sqrt_median"),
    )
    oversample_rare: float = option(
        0.0,
        "repeat-factor sampling (LVIS's): an image holding a class that is in fewer than this share of the "
        "training images is drawn sqrt(share/f) times as often (its rarest class decides), e.g. 0.3; "
        "epochs keep their length; 0 = every image once per epoch",
        "optimisation",
        parse=_float(0.0, 1.0),
        metavar="SHARE",
    )
    ema: float = option(
        0.0,
        "keep an exponential moving average of the weights with this decay (e.g. 0.999; warmed up as timm's "
        "ModelEmaV3 does, so short runs average their last few epochs); validation, best.pt and the figures "
        "use it; 0 = off",
        "optimisation",
        parse=_float(0.0, 0.99999),
        metavar="DECAY",
    )
    # augmentation
    hflip: bool = option(
        True,
        "random horizontal flip of image and mask together (the tutorial's augmentation)",
        "augmentation",
        parse=parse_bool,
    )
    scale_range: list | None = option(
        None,
        "random rescale range of image and mask together, e.g. 0.5,2.0 (use with --crop)",
        "augmentation",
        parse=parse_scale_range,
        default_text="off",
        metavar="LO,HI",
    )
    crop: bool = option(
        False,
        "random crop back to --image-size; mask padding is filled with the ignore index",
        "augmentation",
        parse=parse_bool,
    )
    vflip: bool = option(False, "random vertical flip of image and mask together", "augmentation", parse=parse_bool)
    color_jitter: float = option(
        0.0,
        "brightness/contrast/saturation jitter strength on the image only, e.g. 0.2",
        "augmentation",
        parse=_float(0.0),
    )
    # runtime
    seed: int = option(0, "random seed; with --deterministic a CPU run repeats exactly", "runtime", parse=_int())
    deterministic: bool = option(False, "use deterministic algorithms (slower on GPU)", "runtime", parse=parse_bool)
    device: str = option("auto", "auto, cpu, cuda, cuda:N", "runtime", metavar="DEVICE")
    precision: str = option(
        "auto",
        "auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), bf16, fp16, fp32",
        "runtime",
        parse=_lower,
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    channels_last: bool = option(
        True, "NHWC memory layout (faster convolutions on CPU and tensor cores)", "runtime", parse=parse_bool
    )
    compile: bool = option(
        False,
        "torch.compile the model (pays off only on long runs: the first step compiles for 30-80 s)",
        "runtime",
        parse=parse_bool,
    )
    freeze_bn: bool = option(
        False,
        "keep every BatchNorm on its running statistics (small per-device batches; makes "
        "multi-process runs match single-process ones)",
        "runtime",
        parse=parse_bool,
    )
    precise_bn: int = option(
        4,
        "before each validation, re-estimate BatchNorm statistics over N training batches "
        "(0: off); fixes eval-mode collapse when epochs have few steps",
        "runtime",
        parse=_int(0),
    )
    # distributed
    sync_bn: bool = option(
        False,
        "SyncBatchNorm across processes (needs torchrun with several processes on CUDA)",
        "distributed",
        parse=parse_bool,
    )
    dist_timeout: float | None = option(
        None,
        "seconds a rank waits in a collective for the others (a lost or hung "
        "node) before the run stops with an error; unset: torch's own, 30 min "
        "for gloo, 10 for nccl",
        "distributed",
        parse=_float(1.0),
        metavar="SECONDS",
    )
    # output
    run_dir: str | None = option(
        None, "output directory", "output", parse=parse_path, default_text="runs/<model>-<backbone>-<dataset>-<time>"
    )
    resume: str | None = option(
        None,
        "continue the run in this directory from its last.pt; auto: continue --run-dir "
        "when it holds last.pt, else start it (torchrun restarts do so by themselves)",
        "output",
        parse=parse_path,
        metavar="RUN_DIR",
    )
    checkpoint_every: int = option(
        0, "also write last.pt every N optimiser steps (0: only at the end of each epoch)", "output", parse=_int(0)
    )
    figure_samples: int = option(3, "validation images in the per-epoch prediction figure", "output", parse=_int(0))
    logger: str = option(
        "none",
        "also send each epoch's scalars and figures to an experiment tracker: tensorboard "
        "(RUN/tensorboard) or mlflow (RUN/mlruns, or $MLFLOW_TRACKING_URI); the run directory stays "
        "the record",
        "output",
        parse=_lower,
        choices=("none", "tensorboard", "mlflow"),
    )

    def to_dict(self) -> dict[str, Any]:
        """The options as plain values, in field order: what config.yaml and checkpoints record."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


OPTIONS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
DEFAULTS: dict[str, Any] = {k: f.default for k, f in OPTIONS.items()}
# The dataset options (data.DATASET_OPTION_KEYS, named here so that building the CLI imports no torch; a test
# checks the two agree): `pixelseg shards` and `pixelseg convert` take them as train does.
DATASET_FLAGS = (
    "images_dir",
    "masks_dir",
    "mask_suffix",
    "val_fraction",
    "val_group",
    "classes",
    "class_names",
    "overlap",
    "skip_bad",
    "iscrowd",
    "boxes",
)
# Options that may change when a run is resumed (they do not change what is trained).
RESUMABLE = (
    "epochs",
    "device",
    "workers",
    "checkpoint_every",
    "logger",
    "time_budget",
    "early_stop",
    "val_every",
    "early_stop_delta",
    "dist_timeout",
)


def _canonical(key: str, value):
    meta = OPTIONS[key].metadata
    out = meta["parse"](value) if meta["parse"] else str(value)
    if meta["choices"] and out not in meta["choices"]:
        raise OptionError(f"choose one of {', '.join(meta['choices'])}")
    return out


def parse_value(key: str, value, source: str | None = None):
    """The canonical value of option ``key``, or a PixelsegError naming the flag (and ``source``)."""
    where = f"{source}: " if source else ""
    if value is None:
        if OPTIONS[key].metadata["nullable"]:
            return None
        raise PixelsegError(
            f"{where}{flag(key)}: null is not a value for this option; give one or leave it out "
            f"(default: {_default_text(key)})"
        )
    try:
        return _canonical(key, value)
    except OptionError as exc:
        raise PixelsegError(f"{where}{flag(key)} {_show(value)}: {exc}") from None


def _default_text(key: str) -> str:
    meta, default = OPTIONS[key].metadata, OPTIONS[key].default
    if meta["default_text"]:
        return meta["default_text"]
    if isinstance(default, bool):
        return "yes" if default else "no"
    if default is None:
        return "none"
    return str(default)


# ---- argparse, generated ------------------------------------------------------------------------------
def _argparse_type(key: str) -> Callable:
    def convert(text):
        try:
            return _canonical(key, text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(f"{_show(text)}: {exc}") from None

    convert.__name__ = OPTIONS[key].metadata["parse"].__name__ if OPTIONS[key].metadata["parse"] else "str"
    return convert


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """One flag per option, grouped; defaults are SUPPRESS so the namespace holds only what was set."""
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="YAML",
        help="YAML file of options (keys as the flags, - or _; a run's config.yaml reproduces it); flags override it",
    )
    groups = {g: parser.add_argument_group(title) for g, title in GROUPS.items()}
    for key, f in OPTIONS.items():
        meta = f.metadata
        help_ = f"{meta['help']} (default: {_default_text(key)})".replace("%", "%%")
        group = groups[meta["group"]]
        if meta["parse"] is parse_bool:
            group.add_argument(
                flag(key), dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        else:
            group.add_argument(
                flag(key),
                dest=key,
                type=_argparse_type(key),
                default=argparse.SUPPRESS,
                metavar=_metavar(meta),
                help=help_,
            )


def _metavar(meta) -> str:
    if meta["metavar"]:
        return meta["metavar"]
    if meta["choices"]:
        return "{" + ",".join(meta["choices"]) + "}"
    return {"int": "N", "float": "X", "parse_path": "PATH"}.get(getattr(meta["parse"], "__name__", ""), "NAME")


def _yaml_types(key: str) -> tuple:
    """The YAML types option ``key`` accepts (a file is stricter than a flag: ``hflip: 1`` is a mistake)."""
    parse = OPTIONS[key].metadata["parse"]
    name = getattr(parse, "__name__", "")
    return {
        "parse_bool": (bool,),
        "int": (int,),
        "float": (float,),
        "parse_size": (int, str, list),
        "parse_scale_range": (str, list),
        "parse_rgb_bands": (str, list),
        "parse_tristate": (str, bool),
        "parse_cache": (str,),
        "parse_workers": (int, str),
        "parse_val_every": (int, str),
        "parse_duration": (str, int, float),
    }.get(name, (str,))


def read_yaml(path: Path) -> dict:
    """A YAML file of options -> {key: value as written}, keys and value types checked, naming the file.

    ``source`` (recipes cite where their numbers come from) is documentation and dropped; PyYAML reads
    ``1e-4`` (no dot) as a string, so numbers spelled that way become floats.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PixelsegError(f"--config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PixelsegError(f"--config {path}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        raise PixelsegError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PixelsegError(f"--config {path}: expected a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.pop("source", None)
    unknown = sorted(set(data) - set(OPTIONS))
    if unknown:
        raise PixelsegError(
            f"--config {path}: unknown option(s) {', '.join(map(_show, unknown))}; see `pixelseg train --help`"
        )
    for key, value in data.items():
        expected = _yaml_types(key)
        if float in expected and isinstance(value, str):
            with contextlib.suppress(ValueError):
                data[key] = value = float(value)
        if value is None:
            continue  # null: parse_value says whether the option can be null
        ok = (
            (bool in expected)
            if isinstance(value, bool)
            else isinstance(value, expected) or (float in expected and isinstance(value, int))
        )
        if not ok:
            names = " or ".join(t.__name__ for t in expected)
            raise PixelsegError(f"--config {path}: {key}: expected {names}, got {type(value).__name__} {value!r}")
    return data


def load_yaml(path: Path) -> dict:
    """A YAML file of options -> {key: canonical value}, everything checked, naming the file."""
    return {k: parse_value(k, v, f"--config {path}") for k, v in read_yaml(path).items()}


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The options set on the command line or in --config (parsed namespace, SUPPRESS defaults)."""
    return {k: getattr(args, k) for k in OPTIONS if hasattr(args, k)}


# ---- resolution -----------------------------------------------------------------------------------------
def resolve_config(overrides: dict) -> TrainConfig:
    """Defaults + overrides -> the full, validated, frozen config the run reads and records.

    Validates everything that can be checked without data (values, model/backbone pair, dataset
    name, loss spec) before a run directory or anything else is created. None is a value for
    nullable options (``weights: None`` = random init) and an error for the others.
    """
    unknown = set(overrides) - set(OPTIONS)
    if unknown:
        raise PixelsegError(f"unknown config keys: {', '.join(sorted(unknown))}")
    cfg = dict(DEFAULTS)
    cfg.update({k: parse_value(k, v) for k, v in overrides.items()})
    # Paths of inputs are recorded absolute, so `evaluate RUN` and `--config RUN/config.yaml` work from any
    # directory (os.path.abspath, not resolve(): a symlinked data folder keeps the name the user gave).
    import os

    for key in ("data_root", "classes"):
        if cfg[key] is not None and "://" not in str(cfg[key]):  # URLs (s3://, https://) stay as given
            cfg[key] = os.path.abspath(os.path.expanduser(str(cfg[key])))
    if isinstance(cfg["weights"], str) and cfg["weights"] != "imagenet" and Path(cfg["weights"]).expanduser().is_file():
        cfg["weights"] = os.path.abspath(os.path.expanduser(cfg["weights"]))
    if cfg["time_budget"] and "epochs" not in overrides and not cfg["iterations"]:
        cfg["epochs"] = None  # the budget decides how many epochs; explicit --epochs/--iterations stay bounds
    if cfg["epochs"] is None and not cfg["time_budget"]:
        raise PixelsegError("--epochs: null (no epoch limit) needs --time-budget to end the run")
    if cfg["scale_range"] is not None and not cfg["crop"]:
        raise PixelsegError("--scale-range needs --crop (the random rescale is cropped back to --image-size)")
    if cfg["in_channels"] != 3 and cfg["color_jitter"]:  # before any data is decoded
        raise PixelsegError(f"--color-jitter works on RGB images, not on {cfg['in_channels']}-channel inputs; drop it")
    # Cross-option and registry checks (these import the registries, and with them torch).
    from ..data import default_split, get_dataset_module
    from ..models import check_model
    from .losses import parse_loss_spec

    get_dataset_module(cfg["dataset"])
    cfg["train_split"] = cfg["train_split"] or default_split(cfg["dataset"], "train")
    cfg["val_split"] = cfg["val_split"] or default_split(cfg["dataset"], "val")
    arch_options = {} if cfg["output_stride"] is None else {"output_stride": cfg["output_stride"]}
    try:
        cfg["backbone"] = check_model(cfg["model"], cfg["backbone"], **arch_options)
    except PixelsegError as exc:  # the registry's message names the value; a config file's reader needs the option
        if str(exc).startswith("--"):
            raise
        which = f"--model {_show(cfg['model'])}" + (f" --backbone {_show(cfg['backbone'])}" if cfg["backbone"] else "")
        raise PixelsegError(f"{which}: {exc}") from None
    parse_loss_spec(cfg["loss"])
    if cfg["run_dir"] is None:
        cfg["run_dir"] = default_run_dir(cfg["model"], cfg["dataset"], cfg["backbone"])
    return TrainConfig(**cfg)


def resumed_config(recorded: dict, overrides: dict, run_dir: Path, source: str) -> TrainConfig:
    """The config of a run continued with --resume: what it recorded, re-canonicalised (older runs may spell
    freeze_encoder "yes"; options added since get their defaults), with the RESUMABLE options given now."""
    cfg = dict(DEFAULTS)
    cfg.update({k: parse_value(k, v, source) for k, v in recorded.items() if k in OPTIONS})
    for key in RESUMABLE:  # safe to change on resume
        if key in overrides:
            cfg[key] = parse_value(key, overrides[key])
    cfg["resume"] = str(run_dir)
    if cfg["backbone"] is None:  # runs recorded before the backbone was resolved at validation
        from ..models import check_model

        cfg["backbone"] = check_model(cfg["model"])
    return TrainConfig(**cfg)


def default_run_dir(model: str, dataset: str, backbone: str | None = None, kind: str = "") -> str:
    """runs/[<kind>-]<model>[-<backbone>]-<dataset>-<time>: the one rule for a run directory nobody named."""
    from datetime import datetime

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    parts = [kind, model, backbone, dataset, stamp]
    return str(Path("runs") / "-".join(p for p in parts if p))


__all__ = [
    "DEFAULTS",
    "GROUPS",
    "OPTIONS",
    "RESUMABLE",
    "TrainConfig",
    "add_train_args",
    "default_run_dir",
    "flag",
    "load_yaml",
    "overrides_from_args",
    "parse_bool",
    "parse_tristate",
    "parse_value",
    "parse_weights",
    "resolve_config",
    "resumed_config",
]
