"""`s3://bucket/prefix/` shard roots and `pixelseg shards --out s3://...`, through fsspec's s3fs.

Why s3fs rather than webdataset's `pipe:aws s3 cp URL -` URLs: a pipe needs the AWS CLI on every node
and reports every failure as a bare exit status of a subprocess, so a wrong key, an unreachable endpoint
and a missing shard look alike (and cannot be told apart for retrying). s3fs is a Python client
(botocore underneath) that reads the standard AWS configuration and raises typed errors.

Configuration is botocore's own: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
AWS_PROFILE and ~/.aws/{config,credentials}, AWS_DEFAULT_REGION; the endpoint of an S3-compatible store
(MinIO, Ceph, ...) from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL. Nothing of it is logged.

Retries (bounded): botocore's "standard" mode retries throttling, 5xx and connection errors with
exponential backoff and jitter, AWS_MAX_ATTEMPTS attempts in all (default 4; AWS_RETRY_MODE picks
another mode); s3fs retries a body read that broke off, at most 3 times. Authentication and
not-found errors are never retried.
"""

from __future__ import annotations

import errno
import os
import posixpath

from ..core.errors import PixelsegError

DEFAULT_MAX_ATTEMPTS = 4
BODY_READ_RETRIES = 3
AUTH_CODES = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "403",
    "Forbidden",
)


def is_s3(url) -> bool:
    return str(url).startswith("s3://")


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def max_attempts() -> int:
    return int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS)


def filesystem():
    """The process's S3FileSystem (fsspec caches one per process and configuration; a forked DataLoader
    worker gets a fresh one). s3fs is imported only here, when an s3:// URL is used."""
    try:
        import s3fs
    except ImportError:
        raise PixelsegError("s3:// URLs need s3fs: pip install 'pixelseg[s3]'") from None
    retries = {
        "total_max_attempts": max_attempts(),  # AWS_MAX_ATTEMPTS counts the first try ("max_attempts" would not)
        "mode": os.environ.get("AWS_RETRY_MODE") or "standard",
    }
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint(), config_kwargs={"retries": retries, "connect_timeout": 10, "read_timeout": 60}
    )
    fs.retries = BODY_READ_RETRIES  # s3fs's own loop (a class attribute, 5 by default) on top of botocore's
    return fs


def cause(exc: BaseException) -> str:
    """What went wrong, in words, without keys or tracebacks."""
    text = str(exc).strip() or type(exc).__name__
    name = type(exc).__name__
    if name == "NoCredentialsError":
        return "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    if isinstance(exc, PermissionError) or any(c in text for c in AUTH_CODES):
        return (
            f"access denied ({text.splitlines()[0][:160]}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE and the bucket's policy"
        )
    if "ConnectionError" in name or "ConnectTimeout" in name or "Could not connect" in text:
        return f"cannot reach the endpoint {endpoint() or 'of AWS S3'} ({name}); check AWS_ENDPOINT_URL and the network"
    if (isinstance(exc, OSError) and exc.errno == errno.EBUSY) or "Service Unavailable" in text or "SlowDown" in text:
        return (
            f"the endpoint stayed unavailable ({text.splitlines()[0][:120]}) through {max_attempts()} attempts "
            "with backoff; try again later, or raise AWS_MAX_ATTEMPTS"
        )
    if isinstance(exc, FileNotFoundError):
        return "bucket does not exist" if "bucket" in text.lower() else "not found"
    return f"{name}: {text.splitlines()[0][:200]}"


def _key(url: str) -> str:
    return url[len("s3://") :]


def read_bytes(url: str) -> bytes:
    try:
        return filesystem().cat_file(_key(url))
    except PixelsegError:
        raise
    except Exception as exc:  # botocore/aiohttp raise many kinds; each becomes one line naming the URL
        raise PixelsegError(f"{url}: {cause(exc)}") from None


def open_read(url: str):
    """A sequential reader of one object (readahead blocks: a tar streams without holding the shard)."""
    fs = filesystem()
    fs.invalidate_cache(_key(url))  # the size must be the object's now, not a listing's from earlier
    return fs.open(_key(url), "rb", block_size=4 << 20, cache_type="readahead")


def listing(prefix: str) -> list[str]:
    """s3:// URLs of the objects directly under `prefix` ([] for an empty or new prefix)."""
    key = _key(prefix).rstrip("/")
    fs = filesystem()
    try:
        return ["s3://" + p for p in fs.ls(key, detail=False, refresh=True)]
    except FileNotFoundError as exc:
        if "/" in key and "bucket" not in str(exc).lower():
            return []
        raise PixelsegError(f"{prefix}: {cause(exc)}") from None
    except PixelsegError:
        raise
    except Exception as exc:
        raise PixelsegError(f"{prefix}: {cause(exc)}") from None


def upload(local_path, url: str) -> None:
    """One PUT per object: S3 shows an object whole or not at all, so readers never see a partial shard."""
    try:
        filesystem().put_file(str(local_path), _key(url))
    except Exception as exc:
        raise PixelsegError(f"{url}: cannot write ({cause(exc)})") from None


def write_bytes(url: str, data: bytes) -> None:
    try:
        filesystem().pipe_file(_key(url), data)
    except Exception as exc:
        raise PixelsegError(f"{url}: cannot write ({cause(exc)})") from None


def join(prefix: str, name: str) -> str:
    return "s3://" + posixpath.join(_key(prefix).rstrip("/"), name)
