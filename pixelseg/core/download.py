"""Fetch and unpack files (datasets, weights) into a local cache: resumable, checked, atomic, one-line errors.

Written by hand rather than with ``torchvision.datasets.utils.download_and_extract_archive``
because that helper cannot resume an interrupted 750 MB download, extracts straight into the
target (an interrupted run leaves a half-filled dataset that later looks complete), and fails
offline with a deep urllib traceback instead of a one-line fix. Here:

* downloads stream into ``<dest>.part``, resume it with an HTTP ``Range`` request, check the
  md5 and only then ``os.replace`` onto ``dest``, so ``dest`` is either absent or complete;
* archives unpack into a temporary folder beside the target and are renamed into place;
* every failure the user can fix is a :class:`~pixelseg.core.errors.PixelsegError`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from .errors import PixelsegError

_CHUNK = 1 << 20
_USER_AGENT = "pixelseg (python-urllib)"


class DownloadError(PixelsegError):
    """The network could not deliver ``url``; carries the parts so callers can reword the fix."""

    def __init__(self, message: str, url: str, reason: str):
        super().__init__(message)
        self.url = url
        self.reason = reason


def data_home() -> Path:
    """Where pixelseg keeps downloaded data: ``$PIXELSEG_DATA`` or ``~/.cache/pixelseg``.

    An environment variable (not a config file) so that a shared or larger disk can be chosen
    per shell or per job without touching any command line.
    """
    env = os.environ.get("PIXELSEG_DATA")
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "pixelseg"
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PixelsegError(
            f"cannot create data directory {home} ({_reason(exc)}); set PIXELSEG_DATA to a writable directory"
        ) from None
    return home


def _md5(path: Path, checksum: str | None = None) -> str:
    """Hex digest of ``path``: md5, or the algorithm whose digest length matches ``checksum``
    (40 hex digits: sha1, 64: sha256), because publishers of the datasets give different ones."""
    algo = {40: "sha1", 64: "sha256"}.get(len(checksum or ""), "md5")
    digest = hashlib.new(algo, usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _reason(exc: BaseException) -> str:
    """A short human reason for a network/file error ("Connection refused", "timed out", ...)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        inner = exc.reason
        return _reason(inner) if isinstance(inner, BaseException) else str(inner)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _one_line(exc: BaseException) -> str:
    """tarfile lists every method it tried on separate lines; errors here must be one line."""
    return "; ".join(line.strip(" -:") for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` or ``bytes */TOTAL`` into (start, total); None if absent."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = span.split("-", 1)[0]
    return (int(start) if start.isdigit() else None, int(total) if total.isdigit() else None)


def _fetch(url: str, part: Path, timeout: float, progress: bool, desc: str, allow_resume: bool) -> None:
    """Fill ``part`` with the body of ``url``, appending to it when the server honours Range.

    Raises OSError/URLError/HTTPException on network trouble (the caller rewords them) and
    returns normally when ``part`` holds the whole file.
    """
    offset = part.stat().st_size if allow_resume and part.exists() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # 416: nothing left past `offset`. If the server's size equals ours the part is complete
        # (we were interrupted before the rename); otherwise it is stale, so start again.
        _, total = _content_range(exc.headers.get("Content-Range"))
        exc.close()
        if total == offset:
            return
        part.unlink()
        return _fetch(url, part, timeout, progress, desc, allow_resume=False)

    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:  # a range we did not ask for: do not splice it in
                part.unlink()
                response.close()
                return _fetch(url, part, timeout, progress, desc, allow_resume=False)
            mode = "ab"
        else:  # 200: the server ignored Range (or there was none), the body is the whole file
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None

        received = offset
        with (
            open(part, mode) as fh,
            tqdm(
                total=total,
                initial=offset,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
            ) as bar,
        ):
            while block := response.read(_CHUNK):
                fh.write(block)
                received += len(block)
                bar.update(len(block))
    # http.client returns b"" (no error) when the peer closes early, so check the length here.
    if total is not None and received != total:
        raise http.client.IncompleteRead(b"", total - received)


def download_file(url: str, dest: Path, md5: str | None = None, timeout: float = 15, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify ``md5``, return ``dest``.

    ``md5`` may also be a sha1 or sha256 hex digest (told apart by length).

    ``dest`` already present (with the right md5 when one is given) means no network access.
    ``timeout`` bounds the connect and every read, so an offline machine fails within it.
    A network failure keeps the ``.part`` file so that the next call resumes it.
    """
    dest = Path(dest)
    if dest.is_file() and (md5 is None or _md5(dest, md5) == md5):
        return dest
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _fetch(url, part, timeout, progress, desc=dest.name, allow_resume=True)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = _reason(exc)
        if isinstance(exc, http.client.IncompleteRead):
            reason = "connection closed before the end of the file"
        raise DownloadError(
            f"could not download {url} ({reason}). Check the network and run again "
            f"(it resumes), or download it by hand and save it as {dest}",
            url=url,
            reason=reason,
        ) from None

    if md5 is not None:
        actual = _md5(part, md5)
        if actual != md5:
            part.unlink()
            raise PixelsegError(
                f"downloaded {url} but its checksum is {actual}, expected {md5}; the partial file "
                "was deleted, run again to download it afresh"
            )
    os.replace(part, dest)
    return dest


def _safe_members(tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Fallback for Pythons without ``filter="data"``: refuse links, devices and escaping paths."""
    members = tf.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
            raise tarfile.TarError(f"unsafe member {m.name!r}")
    return members


def _unpack(archive: Path, into: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)  # ZipFile already drops absolute paths and ".." components
        return
    with tarfile.open(archive, "r:*") as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(into, filter="data")
        else:
            tf.extractall(into, members=_safe_members(tf))


def extract_archive(archive: Path, dest_dir: Path) -> Path:
    """Unpack a tar (any compression) or zip ``archive`` into ``dest_dir`` and return it.

    Like ``tar -xf archive -C dest_dir``: the archive's top-level entries land in ``dest_dir``
    and replace same-named entries already there, others are kept (so the two Pets archives
    share one folder). Extraction happens in a temporary folder beside ``dest_dir`` and is
    renamed into place, so a corrupt or interrupted archive never leaves partial entries.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise PixelsegError(f"archive {archive} does not exist")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", suffix=".extracting", dir=dest_dir.parent))
    try:
        try:
            _unpack(archive, tmp)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise PixelsegError(
                f"cannot extract {archive} ({_one_line(exc)}): it is corrupt, "
                "incomplete or not a tar/zip archive; delete it and download it again"
            ) from None
        except OSError as exc:  # disk full, permissions: the archive may be fine
            raise PixelsegError(f"cannot extract {archive} into {dest_dir.parent} ({_reason(exc)})") from None
        if not dest_dir.exists():
            os.replace(tmp, dest_dir)
            return dest_dir
        trash = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", suffix=".old", dir=dest_dir.parent))
        try:
            for entry in tmp.iterdir():
                target = dest_dir / entry.name
                if target.exists() or target.is_symlink():
                    os.replace(target, trash / entry.name)
                os.replace(entry, target)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return dest_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
