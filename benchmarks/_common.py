"""What every benchmark script sets up: this checkout's pixelseg first on ``sys.path``, the paths (repository,
``benchmarks/out/``, ``../shared/data``), the device, peak memory, small timing helpers, and the machine's name.

How a script finds this module. Every script begins with the same two lines::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
    import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

and that is the only ``sys.path`` edit left in ``benchmarks/``: importing ``_common`` puts the repository root
first on ``sys.path`` (so a script measures the pixelseg of the checkout it sits in, installed or not), and
``_common.load("group/script.py")`` imports another script by path instead of a second edit.
Why not the alternatives: a package (``python -m benchmarks.speed.bench_zoo``) would break the documented
``python benchmarks/<group>/<script>.py`` form that other scripts, the GPU suite and the tests spawn, and the
TensorFlow runner runs in a virtualenv of its own where nothing is installed; a ``PYTHONPATH`` requirement is
one more thing to forget; symlinked copies of this file in every folder break on checkouts without symlinks.

Nothing here imports torch or numpy at import time: ``compare/common.py`` imports this module inside the
TensorFlow virtualenv, which has neither torch nor pixelseg.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent  # benchmarks/
REPO = BENCH.parent  # the checkout whose pixelseg is measured
OUT = BENCH / "out"  # results (git-ignored)
ENVS = BENCH / ".envs"  # TensorFlow / SMP virtualenvs of compare/run.py (git-ignored)
SHARED_DATA = REPO.parent / "shared" / "data"  # data sets beside the checkout (../shared/data)
PETS_SAMPLE = SHARED_DATA / "oxford-iiit-pet-sample"
PETS_PHOTOS = PETS_SAMPLE / "images"
PETS_PHOTO = PETS_PHOTOS / "Abyssinian_105.jpg"  # the one photo the serve benchmarks post by default

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's pixelseg, installed or not


# ---- paths and processes -------------------------------------------------------------------------

def out_path(name: str, *, stamped: bool = False, suffix: str = ".json") -> Path:
    """``benchmarks/out/NAME[-YYYYmmdd-HHMMSS]SUFFIX`` (NAME may hold folders); its folder is created."""
    path = OUT / (f"{name}-{stamp()}{suffix}" if stamped else f"{name}{suffix}" if suffix else name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def repo_env(code: Path | str = REPO, **extra: str) -> dict[str, str]:
    """The environment for a child process that must run the pixelseg of ``code`` (default: this checkout),
    whether or not some pixelseg is installed: ``code`` first on PYTHONPATH, then the caller's."""
    path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def load(relpath: str):
    """Import another benchmark script as a module, by its path under benchmarks/ (``"speed/gemm_peak.py"``);
    once per process, under the file's stem."""
    path = BENCH / relpath
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ---- the machine ---------------------------------------------------------------------------------

def cpu_model() -> str:
    """lscpu's "Model name" (``/proc/cpuinfo`` where lscpu is missing, then ``platform.processor()``)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")), "")
        if name:
            return name
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_count() -> int:
    """The cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine() -> str:
    """One line for the record: CPU model and usable cores, and the GPU when torch is loaded and sees one."""
    line = f"{cpu_model()}, {cpu_count()} CPUs"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        line += f", {torch.cuda.get_device_name(0)}"
    return line


# ---- device and memory ---------------------------------------------------------------------------

def device(spec: str | None = "auto"):
    """A torch.device: CUDA when present for "auto"/None, else what ``spec`` names."""
    import torch

    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def sync(dev) -> None:
    """Wait for the device's queued work (CUDA is asynchronous; a no-op on CPU)."""
    if getattr(dev, "type", str(dev)).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def peak_device_memory(dev) -> int | None:
    """``torch.cuda.max_memory_allocated`` in bytes on CUDA, None elsewhere."""
    if getattr(dev, "type", str(dev)).startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    return None


def peak_rss_bytes(children: bool = False) -> int:
    """This process's (or its waited-for children's) peak resident set, in bytes (Linux reports KiB)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024


# ---- timing --------------------------------------------------------------------------------------

def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def percentile(values, q: float) -> float:
    """The q-quantile (0..1) of ``values``, linearly interpolated; nan for none."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
