import os
import signal
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PETS = SHARED_DATA / "oxford-iiit-pet-sample"
CAMVID = SHARED_DATA / "camvid"

# The tiny training run most tests start from: 16 synthetic 32×32 images, batch 8, random init, one figure sample.
TINY_RUN = {"dataset": "synthetic", "limit": 16, "image_size": 32, "batch_size": 8, "weights": "none",
            "figure_samples": 1}


def tiny_run(**flags) -> list[str]:
    """`pixelseg train` arguments of the tiny run, with ``flags`` changed or added (``epochs=1`` -> --epochs 1,
    ``deterministic=True`` -> --deterministic, None drops a flag). Test modules: ``from conftest import tiny_run``."""
    args: list[str] = []
    for key, value in {**TINY_RUN, **flags}.items():
        if value is None:
            continue
        args += ["--" + key.replace("_", "-")] + ([] if value is True else [str(value)])
    return args


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (full model matrix, long training)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Decode cache and data home in a per-session temp dir: tests never touch ~/.cache."""
    old = {k: os.environ.get(k) for k in ("PIXELSEG_CACHE", "PIXELSEG_DATA")}
    os.environ["PIXELSEG_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["PIXELSEG_DATA"] = str(tmp_path_factory.mktemp("data_home"))
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def pets_root():
    if not (PETS / "annotations" / "trainval.txt").is_file():
        pytest.skip(f"real Oxford-IIIT Pet sample not found at {PETS} (expected ../shared/data beside the repo)")
    return PETS


@pytest.fixture(scope="session")
def camvid_root():
    if not (CAMVID / "train.txt").is_file():
        pytest.skip(f"CamVid not found at {CAMVID} (expected ../shared/data beside the repo)")
    return CAMVID


def _children(parent: int):
    """(pid, environ entries) of each process whose parent is `parent`, read from /proc."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (p / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            yield int(p.name), env


def rank_pid(parent: int, rank: int) -> int | None:
    """The worker process torchrun started with RANK=rank."""
    return next((pid for pid, env in _children(parent) if f"RANK={rank}".encode() in env), None)


def kill_torchrun(proc) -> None:
    """SIGKILL a torchrun agent started with start_new_session=True, and its workers: torchrun starts each
    worker in a session of its own, so killing the agent's group alone leaves them running, orphaned (and a
    hung run's ranks would sit in their collectives for the rest of the test session)."""
    if proc.poll() is None:
        workers = [pid for pid, env in _children(proc.pid) if any(e.startswith(b"RANK=") for e in env)]
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers:
            try:
                group = os.getpgid(pid)
                if group != os.getpgid(0):
                    os.killpg(group, signal.SIGKILL)  # the worker and what it forked (DataLoader workers, ...)
            except ProcessLookupError:
                pass
        proc.wait(30)
