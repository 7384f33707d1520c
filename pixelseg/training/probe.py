"""The machine probe: device, memory, precision and measured training/evaluation speed (a few seconds of real
steps), so the planner sizes the recipe for the box it runs on; ``fixed_machine`` makes plans reproducible."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

RESIZE_S_PER_MPX = 0.02  # seconds to rescale one megapixel of a cached uint8 image (antialiased, one core),
# where the probe does not measure it (fixed_machine)
ACT_PER_PX, PARAMS = 476, 6.5e6  # U-Net/MobileNetV2's saved activations per input pixel (sum of its layers'
# outputs) and parameters, where the probe does not measure them (fixed_machine)


# ---- machine -------------------------------------------------------------------------------------------
@dataclass
class Machine:
    """Where training runs and how fast; ``speed(model, backbone, (h, w), batch)`` -> (train, eval) images/s."""

    device: str
    memory_gb: float
    precision: str
    speed: Callable
    cores: int = 1
    read_s_per_image: float | None = None  # decode time per image; None: as measured by the fingerprint
    host_memory_gb: float | None = None  # RAM, for the decoded cache; None: memory_gb (a CPU's own)
    resize_s: Callable | None = None  # (cached (h, w), crop (h, w)) -> s to rescale + crop one image; None:
    # RESIZE_S_PER_MPX of the cached size
    train_gb: Callable | None = None  # (model, backbone, (h, w), micro-batch) -> GB one step needs; None:
    # U-Net/MobileNetV2's constants (ACT_PER_PX, PARAMS)

    @property
    def ram_gb(self) -> float:
        return self.host_memory_gb if self.host_memory_gb is not None else self.memory_gb

    def resize_seconds(self, src_hw, crop_hw) -> float:
        if self.resize_s is not None:
            return self.resize_s(tuple(src_hw), tuple(crop_hw))
        return RESIZE_S_PER_MPX * src_hw[0] * src_hw[1] / 1e6

    def step_gb(self, model: str, backbone: str, hw, batch: int) -> float:
        if self.train_gb is not None:
            return self.train_gb(model, backbone, tuple(hw), batch)
        return train_memory_gb(ACT_PER_PX, PARAMS, hw, batch, self.precision)


def train_memory_gb(act_per_px: float, params: float, hw, batch: int, precision: str) -> float:
    """One training step's memory: fp32 weights, gradients and Adam's two moments (16 bytes a parameter)
    plus the activations autograd keeps (4 bytes each in float32, about 2 under bf16/fp16 autocast)."""
    act_bytes = 4 if "32" in str(precision) else 2
    return (16 * params + act_bytes * act_per_px * hw[0] * hw[1] * batch) / 2**30


def activations_per_pixel(model: str, backbone: str, in_channels: int = 3) -> tuple[float, float]:
    """(activations per input pixel, parameters) of a model: the outputs of its layers on a 64×64 input,
    the tensors autograd keeps for the backward pass (in-place ones counted too: an upper bound)."""
    import torch

    from ..models import create_model

    m = create_model(model, backbone=backbone, num_classes=2, weights=None, in_channels=in_channels)
    total = [0]

    def hook(_mod, _inp, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    handles = [mod.register_forward_hook(hook) for mod in m.modules() if not list(mod.children())]
    m.train()
    with torch.no_grad():
        m(torch.rand(1, in_channels, 64, 64))
    for h in handles:
        h.remove()
    return total[0] / (64 * 64), float(sum(p.numel() for p in m.parameters()))


def measure_speed(
    model: str,
    backbone: str,
    size_hw: tuple[int, int],
    batch: int,
    num_classes: int = 2,
    in_channels: int = 3,
    device: str = "auto",
    seconds: float = 3.0,
) -> tuple[float, float]:
    """Training and inference images/s of real steps (random weights and data) on this machine."""
    import torch
    import torch.nn.functional as F

    from ..core.runtime import autocast, resolve_precision, select_device
    from ..models import create_model
    from ..models.rewrites import optimize_for_training

    dev = select_device(device)
    amp = resolve_precision("auto", dev)
    m = create_model(model, backbone=backbone, num_classes=num_classes, weights=None, in_channels=in_channels)
    m.to(dev).to(memory_format=torch.channels_last)
    optimize_for_training(m, dev, amp)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    x = torch.rand(batch, in_channels, *size_hw, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch, *size_hw), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        with autocast(dev, amp):
            loss = F.cross_entropy(m(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    m.train()
    step()  # the first step allocates and picks kernels
    sync()
    t0, n = time.perf_counter(), 0
    while n < 1 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync()
    train_ips = n * batch / (time.perf_counter() - t0)
    m.eval()
    with torch.no_grad(), autocast(dev, amp):
        m(x)
        sync()
        t0 = time.perf_counter()
        m(x)
        sync()
    return train_ips, batch / (time.perf_counter() - t0)


def probe_machine(device: str = "auto", seconds: float = 2.0, zoom: tuple[float, float] = (0.75, 1.5)) -> Machine:
    """The real machine: device, memory, and a speed function that measures each model once, at 128×128
    and a batch of at most 8, and scales by pixel count to other sizes (a convnet's cost is close to
    linear in pixels; measuring at the candidate size would make a busy machine's probe take minutes)."""
    import torch

    from ..core.runtime import resolve_precision, select_device

    dev = select_device(device)
    amp = resolve_precision("auto", dev)
    if dev.type == "cuda":
        mem = torch.cuda.get_device_properties(dev).total_memory / 2**30
        name = torch.cuda.get_device_name(dev)
    else:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        name = "cpu"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    measured: dict = {}
    resized: dict = {}
    weighed: dict[tuple[str, str], tuple[float, float]] = {}  # (model, backbone) -> activations_per_pixel

    def resize_s(src_hw, crop_hw):  # the training transform on a cached image of this size, best of 3
        if (src_hw, crop_hw) not in resized:
            from ..data.augment import build_train_transform

            tf = build_train_transform(crop_hw, scale=zoom, crop=True)  # the plan's rescale range (plan.ZOOM)
            img = torch.randint(0, 256, (3, *src_hw), dtype=torch.uint8)
            mask = torch.zeros(src_hw, dtype=torch.uint8)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                tf(img, mask)
                times.append(time.perf_counter() - t0)
            resized[(src_hw, crop_hw)] = min(times)
        return resized[(src_hw, crop_hw)]

    def train_gb(model, backbone, size_hw, batch):
        if (model, backbone) not in weighed:
            weighed[(model, backbone)] = activations_per_pixel(model, backbone)
        act_per_px, params = weighed[(model, backbone)]
        return train_memory_gb(act_per_px, params, size_hw, batch, str(amp or torch.float32))

    def speed(model, backbone, size_hw, batch):
        key = (model, backbone)
        if key not in measured:
            measured[key] = (
                (128, 128),
                measure_speed(model, backbone, (128, 128), min(batch, 8), device=device, seconds=seconds),
            )
        (h0, w0), (tr, ev) = measured[key]
        f = (h0 * w0) / (size_hw[0] * size_hw[1])
        return tr * f, ev * f

    return Machine(
        f"{dev}" + (f" ({name})" if dev.type == "cuda" else ""),
        round(mem, 1),
        str(amp or torch.float32).replace("torch.", ""),
        speed,
        cores,
        host_memory_gb=round(ram, 1),
        resize_s=resize_s,
        train_gb=train_gb,
    )


def fixed_machine(
    train_ips_128: float = 20.0,
    eval_ips_128: float = 80.0,
    device: str = "cpu",
    memory_gb: float = 16.0,
    host_memory_gb: float | None = None,
) -> Machine:
    """A probe that measures nothing: speed at 128×128 scaled by pixels, rescaling at RESIZE_S_PER_MPX and
    memory from U-Net/MobileNetV2's constants (tests; planning for another box)."""

    def speed(model, backbone, size_hw, batch):
        f = 128 * 128 / (size_hw[0] * size_hw[1])
        return train_ips_128 * f, eval_ips_128 * f

    return Machine(device, memory_gb, "fp32", speed, 2, read_s_per_image=0.01, host_memory_gb=host_memory_gb)
