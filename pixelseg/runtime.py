"""Device, precision and memory-layout choices, made once so train/evaluate/predict/benchmarks agree.

The fast path is the default where it is safe: channels_last everywhere, bf16 autocast on CPUs with
native bf16 (AVX-512-BF16/AMX) and on CUDA, fp32 elsewhere.
"""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from .errors import PixelsegError


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PixelsegError(f"--device {name!r} is not a device name (try auto, cpu, cuda, cuda:1)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PixelsegError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Map --precision {auto,bf16,fp16,fp32} to an autocast dtype (None = plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise PixelsegError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
        return torch.float16
    raise PixelsegError(f"--precision {precision!r}: choose auto, bf16, fp16 or fp32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 N×3×H×W batch -> float [0,1] on device; normalisation happens inside the model."""
    x = images.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
