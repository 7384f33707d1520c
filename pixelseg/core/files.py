"""Files and output directories: atomic writes (temp file beside the target, fsync, os.replace - a kill
at any moment leaves the old file or the new one, never a truncated one) and output directories that are
checked before any work and created with a write probe. Used for checkpoints, metrics, figures, exports."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from .errors import PixelsegError


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temp file beside `path`; on success fsync and rename it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make outputs private, unlike open()'s files
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pid_prefix(base: str) -> str:
    """A temp name prefix that records this process: `remove_stale_temps` can tell a killed writer's leftovers
    from a running one's."""
    return f"{base}{os.getpid()}-"


def remove_stale_temps(folder: Path, base: str) -> None:
    """Delete `folder/<base><pid>-*` (files or folders made under `pid_prefix(base)`) whose process is gone: what
    a writer killed mid-way (SIGKILL, power) left behind. A running writer's temps are kept."""
    import glob
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob(glob.escape(base) + "*"):
        pid = p.name[len(base) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_output_dir(path, flag: str) -> Path:
    """Refuse, before any work, an output directory that cannot exist: a file in its place or on its path,
    or a parent we may not write in. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PixelsegError(
            f"{flag} {path}: a file with that name exists; {flag} names a directory, so choose "
            "another name or move the file"
        )
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PixelsegError(f"{flag} {path}: {existing} is a file, so no directory can be made under it")
    if existing != path and not os.access(existing, os.W_OK | os.X_OK):
        raise PixelsegError(
            f"{flag} {path}: no permission to create it in {existing}; choose a directory you can write to"
        )
    return path


def make_output_dir(path, flag: str) -> Path:
    """Create an output directory (and parents) and prove a file can be written there; on failure remove
    whatever this call created and raise a one-line PixelsegError naming the flag."""
    path = check_output_dir(path, flag)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".pixelseg-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        for d in missing:  # deepest first: nothing half-made is left behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise PixelsegError(
            f"{flag} {path}: cannot create or write there ({exc.strerror or exc}); choose a "
            "directory on a writable file system"
        ) from None
    return path


def file_sha256(path) -> str:
    """A file's sha256, read in 1 MiB blocks (checkpoints and weights files run to hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where decoded datasets and extracted label images are cached: $PIXELSEG_CACHE, else $PIXELSEG_DATA/cache."""
    if os.environ.get("PIXELSEG_CACHE"):
        return Path(os.environ["PIXELSEG_CACHE"]).expanduser()
    return Path(os.environ.get("PIXELSEG_DATA", "~/.cache/pixelseg")).expanduser() / "cache"
