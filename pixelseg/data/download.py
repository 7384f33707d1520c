"""The public datasets pixelseg can fetch itself (Oxford-IIIT Pet, VOC, ADE20K): where they come from and
how a complete copy is recognised; the fetching itself is core.download's."""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from ..core.download import DownloadError, data_home, download_file, extract_archive
from ..core.errors import PixelsegError

__all__ = [
    "PETS_HOMEPAGE",
    "PETS_URLS",
    "DownloadError",
    "data_home",
    "download_file",
    "ensure_archives",
    "ensure_oxford_pet",
    "extract_archive",
]

PETS_HOMEPAGE = "https://www.robots.ox.ac.uk/~vgg/data/pets/"
# Same files and md5s as torchvision.datasets.OxfordIIITPet._RESOURCES (a test checks this);
# copied so that importing this module does not import torchvision.
PETS_URLS: list[tuple[str, str]] = [
    ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz", "5c4f3ee8e5d25df40f4fd59a7f44e54c"),
    ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz", "95a8c909bbe2e81eed6a22bccdf3f68f"),
]


def _pets_missing(root: Path) -> list[str]:
    return [name for name in ("images", "annotations/trimaps") if not (root / name).is_dir()]


def _archive_name(url: str) -> str:
    return Path(urllib.parse.urlparse(url).path).name


def ensure_oxford_pet(
    root: Path | str | None = None,
    download: bool = True,
    *,
    urls: Sequence[tuple[str, str | None]] | None = None,
    timeout: float = 15,
    progress: bool = True,
) -> Path:
    """Return a folder in the official Oxford-IIIT Pet layout, downloading it if needed.

    ``root`` given: it must already hold ``images/`` and ``annotations/trimaps/``; pixelseg
    never downloads into or writes to a folder the user named (it could be a read-only share
    or the wrong path), it says what is missing instead. ``root`` None: the cache folder
    ``data_home()/oxford-iiit-pet`` is used and, with ``download``, filled from ``urls``
    (default :data:`PETS_URLS`; archives are kept in ``data_home()/downloads``).
    """
    if root is not None:
        root = Path(root).expanduser()
        missing = _pets_missing(root)
        if not missing:
            return root
        hint = ""
        if root.is_dir():
            found = [d for d in sorted(root.iterdir()) if d.is_dir() and not _pets_missing(d)]
            if found:
                hint = f" (did you mean --data-root {found[0]}?)"
        what = "does not exist" if not root.exists() else "lacks " + " and ".join(f"{name}/" for name in missing)
        raise PixelsegError(
            f"--data-root {root} {what}{hint}: it must hold the Oxford-IIIT Pet images/ and "
            f"annotations/trimaps/ folders (extract images.tar.gz and annotations.tar.gz from "
            f"{PETS_HOMEPAGE} into it), or leave out --data-root to download into "
            f"$PIXELSEG_DATA/oxford-iiit-pet"
        )

    urls = PETS_URLS if urls is None else urls
    return ensure_archives(
        "Oxford-IIIT Pet",
        "oxford-iiit-pet",
        urls,
        _pets_missing,
        PETS_HOMEPAGE,
        download,
        timeout=timeout,
        progress=progress,
    )


def ensure_archives(
    name: str,
    folder: str,
    urls: Sequence[tuple[str, str | None]],
    missing,
    homepage: str,
    download: bool = True,
    *,
    timeout: float = 15,
    progress: bool = True,
) -> Path:
    """``data_home()/folder`` holding a dataset, downloaded from ``urls`` (checked, extracted) if needed.

    ``missing(path) -> list[str]``: what a complete tree lacks (empty: done). Every failure names
    the files to fetch by hand and where to put them.
    """
    target = data_home() / folder
    if not missing(target):
        return target
    names = " and ".join(_archive_name(url) for url, _ in urls)
    by_hand = (
        f"Download {names} from {homepage} and extract into {target} (it must then hold "
        + ", ".join(missing(target))
        + "), or pass --data-root PATH"
    )
    if not download:
        raise PixelsegError(f"{name} not found in {target}. {by_hand}")
    downloads = data_home() / "downloads"
    archives = []
    for url, checksum in urls:
        try:
            archives.append(
                download_file(url, downloads / _archive_name(url), checksum, timeout=timeout, progress=progress)
            )
        except DownloadError as exc:
            raise PixelsegError(f"could not download {exc.url} ({exc.reason}). {by_hand}") from None
    for archive in archives:
        extract_archive(archive, target)
    still = missing(target)
    if still:
        raise PixelsegError(
            f"extracted {names} into {target} but it still lacks {', '.join(still)}; are the archives right? {by_hand}"
        )
    return target
