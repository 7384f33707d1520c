"""Device, precision and memory-layout choices, made once so train/evaluate/predict/benchmarks agree.

The fast path is the default where it is safe: channels_last everywhere, bf16 autocast on CPUs with
native bf16 (AVX-512-BF16/AMX) and on CUDA, fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
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


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


@functools.cache
def tune_malloc() -> str:
    """Keep freed memory in the process instead of handing it back to the kernel (Linux/glibc).

    glibc serves every block over 32 MB with a fresh ``mmap`` and unmaps it on free, so each
    training step pays page faults for every large activation (MobileNetV2's 64x64 tensors at batch
    64 are 50-100 MB) and zeroes the pages again. With mmap off and no trimming the heap keeps them,
    for a few percent more peak RSS (the gain: docs/benchmarks.md, "Numbers behind choices in the
    code"): what jemalloc/tcmalloc via LD_PRELOAD would give, without a preload. Skipped when the
    user chose: PIXELSEG_MALLOC=system, MALLOC_* or GLIBC_TUNABLES set, or another allocator
    preloaded. Once per process; returns what it did, for the log.
    """
    if os.environ.get("PIXELSEG_MALLOC", "").lower() == "system":
        return "system default (PIXELSEG_MALLOC=system)"
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ) or any(
        name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")
    ):
        return "left as configured (MALLOC_*/GLIBC_TUNABLES/LD_PRELOAD set)"
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system default (not glibc)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # mallopt's value is a C int: 2**31 - 1 is the largest trim threshold it takes (a larger
        # Python int would be truncated, to 0 for 2**62: trim on every free)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    return "freed memory kept for reuse (glibc mmap off, no trim)" if ok else "system default (mallopt refused)"


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
