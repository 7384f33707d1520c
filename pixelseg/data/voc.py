"""Pascal VOC 2012 segmentation (Everingham et al. 2010), with the SBD augmented training set.

Layout, as ``VOCtrainval_11-May-2012.tar`` and ``benchmark.tgz`` extract into --data-root:

    VOCdevkit/VOC2012/JPEGImages/*.jpg
    VOCdevkit/VOC2012/SegmentationClass/*.png        palette PNGs: 0 background, 1..20 classes, 255 border
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    benchmark_RELEASE/dataset/{cls/*.mat, train.txt, val.txt}   SBD (Hariharan et al. 2011), train_aug only

``train_aug`` is the usual 10,582-image set (DeepLab, MMSegmentation): VOC train + SBD train +
SBD val, minus every VOC val image, labels from VOC's PNG where one exists, else from SBD. The
pre-converted DeepLab layout (``VOC2012/SegmentationClassAug/*.png`` with
``ImageSets/Segmentation/train_aug.txt``) is used as it is when present. SBD's ``.mat`` labels
are converted once to PNGs under ``$PIXELSEG_DATA/voc-sbd-png`` (never into --data-root), so
every split decodes through the same ``decode_samples`` path as the other datasets.
--data-root may also be ``VOCdevkit`` or ``VOCdevkit/VOC2012`` itself. Without --data-root the
archives are downloaded (md5/sha256 checked) into ``$PIXELSEG_DATA/voc``.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from .base import CacheArg, DatasetInfo, Sample, decode_samples, paired_mask

CLASS_NAMES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def _voc_palette(n: int) -> list[tuple[int, int, int]]:
    """The devkit's colour map (VOCcode/VOClabelcolormap.m): bits of the id spread over r, g, b."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


INFO = DatasetInfo(name="voc", class_names=CLASS_NAMES, palette=_voc_palette(21), ignore_index=255)
SPLITS = ("train", "val", "trainval", "train_aug")
DEFAULT_SPLITS = {"train": "train_aug", "val": "val"}
VALID_VALUES = (*range(21), 255)  # 255: the 5-pixel border VOC leaves unlabelled; stays ignore
LABEL_MAP = np.full(256, 255, dtype=np.uint8)
LABEL_MAP[:21] = np.arange(21)

HOMEPAGE = (
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and the SBD page "
    "http://home.bharathh.info/pubs/codes/SBD/download.html"
)
# Checksums as torchvision gives them (datasets.VOCSegmentation md5; the SBD sha256 of its
# prototype datasets); download_file tells md5 from sha256 by length.
VOC_URL = (
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "6cd6e144f989b92b3379bac3b3de84fd",
)
SBD_URL = (
    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
    "6a5a2918d5c73ce032fdeba876574d150d9d04113ab87540a1304cbcc715be53",
)


def _voc_dir(root: Path) -> Path | None:
    for cand in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (cand / "JPEGImages").is_dir():
            return cand
    return None


def _sbd_dir(root: Path, voc: Path) -> Path | None:
    for cand in (
        root / "benchmark_RELEASE" / "dataset",
        root / "SBD" / "dataset",
        root / "SBD",
        voc.parent.parent / "benchmark_RELEASE" / "dataset",
    ):
        if (cand / "cls").is_dir():
            return cand
    return None


def _missing(root: Path) -> list[str]:
    voc = _voc_dir(root)
    if voc is None:
        return ["VOCdevkit/VOC2012/JPEGImages/"]
    return [
        f"VOCdevkit/VOC2012/{d}/" for d in ("SegmentationClass", "ImageSets/Segmentation") if not (voc / d).is_dir()
    ]


def resolve_root(root: Path | None, split: str, download: bool = True) -> Path:
    if root is None:
        from .download import ensure_archives

        urls = [VOC_URL] + ([SBD_URL] if split == "train_aug" else [])

        def missing(p):
            gone = _missing(p)
            if split == "train_aug" and not gone:
                voc = _voc_dir(p)  # there is one: _missing found nothing missing
                if voc is None or _sbd_dir(p, voc) is None:
                    gone.append("benchmark_RELEASE/dataset/cls/")
            return gone

        return ensure_archives("Pascal VOC 2012", "voc", urls, missing, HOMEPAGE, download)
    root = Path(root)
    if not root.is_dir():
        raise PixelsegError(f"--data-root {root}: directory not found")
    gone = _missing(root)
    if gone:
        raise PixelsegError(
            f"--data-root {root}: no {gone[0]}; expected Pascal VOC 2012 as "
            "VOCtrainval_11-May-2012.tar extracts (VOCdevkit/VOC2012/JPEGImages, SegmentationClass, "
            "ImageSets/Segmentation), or omit --data-root to download it"
        )
    return root


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise PixelsegError(f"{path}: split file not found; is --data-root a complete VOC/SBD tree?")
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise PixelsegError(f"{path}: the split file is empty")
    return names


def _sbd_label(mat: Path) -> np.ndarray:
    """Class-id map from an SBD ``cls/*.mat`` (MATLAB struct GTcls with field Segmentation)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise PixelsegError(
            "reading SBD .mat labels needs scipy: pip install 'pixelseg[voc]' (or scipy), or use "
            "the pre-converted SegmentationClassAug PNGs with ImageSets/Segmentation/train_aug.txt"
        ) from None
    try:
        seg = loadmat(str(mat), squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise PixelsegError(f"{mat}: not an SBD class label file ({type(exc).__name__}: {exc})") from None
    seg = np.asarray(seg)
    bad = np.setdiff1d(np.unique(seg), VALID_VALUES)
    if bad.size:
        raise PixelsegError(f"{mat}: label values {bad.tolist()} are outside VOC's ids 0..20 and 255")
    return seg.astype(np.uint8)


def _sbd_png(mat: Path) -> Path:
    """SBD label converted once to a PNG in the data home (written atomically), keyed by size+mtime."""
    from PIL import Image

    from .download import data_home

    st = mat.stat()
    out = data_home() / "voc-sbd-png" / f"{mat.stem}-{st.st_size}-{st.st_mtime_ns}.png"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".png", dir=out.parent)
        os.close(fd)
        Image.fromarray(_sbd_label(mat)).save(tmp)
        os.replace(tmp, out)
    return out


def list_samples(root: Path, split: str) -> list[Sample]:
    if split not in SPLITS:
        raise PixelsegError(f"--split {split!r}: Pascal VOC has splits {', '.join(SPLITS)}")
    voc = _voc_dir(root)
    assert voc is not None, f"{root}: no VOC tree (resolve_root checks for one first)"
    sets = voc / "ImageSets" / "Segmentation"
    img = lambda n: voc / "JPEGImages" / f"{n}.jpg"  # noqa: E731
    if split != "train_aug":
        return [Sample(n, img(n), voc / "SegmentationClass" / f"{n}.png") for n in _read_list(sets / f"{split}.txt")]
    if (sets / "train_aug.txt").is_file() and (voc / "SegmentationClassAug").is_dir():  # DeepLab's layout
        return [
            Sample(n, img(n), voc / "SegmentationClassAug" / f"{n}.png") for n in _read_list(sets / "train_aug.txt")
        ]
    sbd = _sbd_dir(root, voc)
    if sbd is None:
        raise PixelsegError(
            f"--split train_aug needs SBD: extract benchmark.tgz into {root} (giving "
            f"benchmark_RELEASE/dataset/cls/), or put SegmentationClassAug/ and "
            f"ImageSets/Segmentation/train_aug.txt into {voc}; or use --train-split train"
        )
    val = set(_read_list(sets / "val.txt"))
    voc_train = _read_list(sets / "train.txt")
    sbd_names = _read_list(sbd / "train.txt") + _read_list(sbd / "val.txt")
    voc_labelled = set(voc_train) | val
    names = sorted({n for n in voc_train + sbd_names if n not in val})
    sbd_only = [n for n in names if n not in voc_labelled]
    missing = [sbd / "cls" / f"{n}.mat" for n in sbd_only if not (sbd / "cls" / f"{n}.mat").is_file()]
    if missing:
        raise PixelsegError(
            f"{missing[0]}: listed in SBD's train.txt/val.txt but not found ({len(missing)} label file(s) missing)"
        )
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        pngs = dict(zip(sbd_only, pool.map(lambda n: _sbd_png(sbd / "cls" / f"{n}.mat"), sbd_only), strict=True))
    return [Sample(n, img(n), pngs.get(n) or voc / "SegmentationClass" / f"{n}.png") for n in names]


def _check_files(samples: list[Sample], split: str) -> None:
    missing = [s for s in samples if not s.image.is_file() or not paired_mask(s).is_file()]
    if missing:
        s = missing[0]
        gone = s.image if not s.image.is_file() else s.mask
        raise PixelsegError(f"{gone}: listed in split {split} but not found ({len(missing)} pair(s) incomplete)")


def read_target(sample: Sample) -> np.ndarray:
    from .io import read_id_mask

    return read_id_mask(sample.mask, LABEL_MAP, VALID_VALUES, "are outside VOC's ids 0..20 and 255")


def full_res_samples(root: Path | None, split: str):
    root = resolve_root(root, split)
    samples = list_samples(root, split)
    _check_files(samples, split)
    return samples, read_target


def load(
    root: Path | None,
    split: str,
    image_size: tuple[int, int],
    limit: int | None = None,
    use_cache: CacheArg = True,
    download: bool = True,
):
    root = resolve_root(root, split, download)
    samples = list_samples(root, split)
    if limit:
        samples = samples[:limit]
    _check_files(samples, split)
    return decode_samples(
        samples,
        image_size,
        INFO,
        label_map=LABEL_MAP,
        valid_values=VALID_VALUES,
        use_cache=use_cache,
        desc=f"decoding voc {split}",
    )
