"""Your own data: a folder of images and a folder of masks, matched by file stem.

    ROOT/images/<stem>.jpg|png|...   ROOT/masks/<stem>.png      (--images-dir, --masks-dir rename them)
    one folder: ROOT/<dir>/<stem>.jpg + <stem>_mask.png          (--images-dir D --masks-dir D --mask-suffix _mask)
    splits: images/train/, masks/train/, ... sub-folders; or ROOT/train.txt, val.txt, test.txt of stems;
            or neither: a seeded, deterministic --val-fraction of the pairs becomes val (also when only
            train/ or train.txt exists)
    ROOT/classes.csv (optional; --classes FILE reads it from elsewhere): header id,name,r,g,b; maps mask
            colours (RGB masks) to class ids and names the classes; rows with id 255 list colours to ignore.
            --class-names a,b names the classes of masks without one.
    --val-group REGEX|prefix keeps pairs whose stems share a group (video sequence, slice stack) on one
            side of the --val-fraction split.

Masks are index images (8-bit grey or palette PNG whose values are class ids; 255 = ignore) or RGB
colour-coded ones. Without classes.csv the classes are numbered from the values (or colours) found
across all splits, so train and val always agree; 0/255 binary masks become 0/1 with a notice.
Before anything trains, a report says what was found (pairs, files missing a partner, classes and
their pixel frequencies); masks with values or colours that classes.csv does not list stop the run
with the files named. The scan is cached like the decoded arrays.
"""

from __future__ import annotations

import csv
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..core.errors import PixelsegError
from ..core.images import IMAGE_SUFFIXES
from ..core.logs import logger as log
from . import base as _base
from .base import (
    CacheArg,
    CacheSpec,
    DatasetInfo,
    Sample,
    _cache_key,
    build_split,
    cache_dir,
    cache_spec,
    fit_size,
    paired_mask,
)
from .io import UnreadableImage, _open, image_hw, is_tiff, read_input

# Dataset options (train flags --images-dir, --masks-dir, --mask-suffix, --val-fraction, --val-group, --classes,
# --class-names) and their defaults.
OPTIONS = {
    "images_dir": "images",
    "masks_dir": "masks",
    "mask_suffix": "",
    "val_fraction": 0.2,
    "val_group": None,
    "classes": None,
    "class_names": None,
}
# --val-group prefix: the stem without its trailing frame/slice number ("0001TP_006690" -> "0001TP").
PREFIX_GROUP = r"^(.*?)[-_. ]*\d+$"
# Suffixes of one-folder layouts, to suggest --mask-suffix when the images and masks folders are one.
COMMON_MASK_SUFFIXES = ("_mask", "-mask", "_masks", "_seg", "_segmentation", "_label", "_labels", "_gt", "_anno")
DEFAULT_SPLITS = {"train": "train", "val": "val"}
SPLITS = ("train", "val", "test")
IGNORE = 255
SPLIT_SEED = 0  # --val-fraction order: sha1(seed, stem), so it never depends on listing order
MAX_AUTO_CLASSES = 64  # more distinct colours than this without classes.csv is almost surely JPEG/antialiasing
SCAN_VERSION = 1
_REPORTED: set[str] = set()  # one report per dataset per process, not one per split


# ---- layout: which files, which split ---------------------------------------------------------------
@dataclass
class Layout:
    root: Path
    splits: dict[str, list[Sample]]
    source: str
    missing_mask: list[Path] = field(default_factory=list)  # images without a mask
    missing_image: list[Path] = field(default_factory=list)  # masks without an image

    @property
    def all_samples(self) -> list[Sample]:
        return [s for split in self.splits.values() for s in split]


def _files(folder: Path) -> list[Path]:
    return [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]


def _index(files: list[Path], folder: Path, what: str, suffix: str = "") -> dict[str, Path]:
    """key -> file, the key being the stem less `suffix` (masks) so that it equals its image's stem."""
    by_stem: dict[str, Path] = {}
    for p in files:
        key = p.stem[: len(p.stem) - len(suffix)]
        if key in by_stem:
            raise PixelsegError(
                f"{folder}: two {what} files share the stem {p.stem!r} ({by_stem[key].name}, "
                f"{p.name}); stems pair images with masks, so each must be unique"
            )
        by_stem[key] = p
    return by_stem


def _pair(img_dir: Path, mask_dir: Path, suffix: str = "") -> tuple[list[Sample], list[Path], list[Path]]:
    if img_dir.resolve() == mask_dir.resolve():
        files = _files(img_dir)
        if not suffix:
            stems = {p.stem for p in files}
            seen = [s for s in COMMON_MASK_SUFFIXES if any(st.endswith(s) and st[: -len(s)] in stems for st in stems)]
            raise PixelsegError(
                f"--images-dir and --masks-dir are the same folder ({img_dir}): every file would be "
                "paired with itself as its own mask; for a one-folder layout (x.png + x_mask.png) "
                f"pass --mask-suffix {seen[0] if seen else '_mask'}"
                + (
                    f" (the files there look like that: *{seen[0]}.*)"
                    if seen
                    else ", or keep images and masks in two folders"
                )
            )
        image_files = [p for p in files if not p.stem.endswith(suffix)]
        mask_files = [p for p in files if p.stem.endswith(suffix)]
        other = []
    else:
        image_files = _files(img_dir)
        all_masks = _files(mask_dir)
        mask_files = [p for p in all_masks if p.stem.endswith(suffix)]
        other = [p for p in all_masks if not p.stem.endswith(suffix)]
    images, masks = _index(image_files, img_dir, "image"), _index(mask_files, mask_dir, "mask", suffix)
    samples = [Sample(stem, images[stem], masks[stem]) for stem in sorted(images) if stem in masks]
    return (
        samples,
        [images[s] for s in sorted(set(images) - set(masks))],
        [masks[s] for s in sorted(set(masks) - set(images))] + other,
    )


def group_key(pattern: str | None):
    """stem -> group for --val-group: the regex's first group (or its whole match); a stem it does not
    match is its own group. 'prefix' is the stem without its trailing number."""
    if not pattern:
        return lambda stem: stem
    import re

    try:
        rx = re.compile(PREFIX_GROUP if pattern == "prefix" else pattern)
    except re.error as exc:
        raise PixelsegError(
            f"--val-group {pattern!r}: not a regular expression ({exc}); e.g. --val-group prefix "
            "or --val-group '^(seq\\d+)_'"
        ) from None

    def key(stem: str) -> str:
        m = rx.search(stem)
        if not m:
            return stem
        return m.group(1) if rx.groups else m.group(0)

    return key


SampleT = TypeVar("SampleT", bound=Sample)


def _fraction_split(
    samples: list[SampleT], fraction: float, group: str | None = None
) -> tuple[list[SampleT], list[SampleT]]:
    """Val = the first groups in sha1 order until round(n·fraction) pairs: deterministic, independent of file
    order, and adding files moves few existing ones across the boundary. Without --val-group each pair is
    its own group; with it, frames of one video or slices of one stack never straddle the split (a random
    split of near-duplicates makes validation optimistic)."""
    if not 0 < fraction < 1:
        raise PixelsegError(f"--val-fraction {fraction}: must be between 0 and 1 (exclusive)")
    if len(samples) < 2:
        raise PixelsegError(
            f"only {len(samples)} image/mask pair(s): --val-fraction needs at least 2 "
            "(one to train on, one to validate)"
        )
    key = group_key(group)
    groups: dict[str, list[str]] = {}
    for s in samples:
        groups.setdefault(key(s.name), []).append(s.name)
    if len(groups) < 2:
        raise PixelsegError(
            f"--val-group {group!r} puts all {len(samples)} pairs into one group "
            f"({next(iter(groups))!r}), so nothing is left to validate on; give a pattern whose "
            "first group names the sequence, e.g. --val-group '^([^_]+)_'"
        )
    order = sorted(groups, key=lambda g: hashlib.sha1(f"{SPLIT_SEED}:{g}".encode()).hexdigest())
    target = min(max(1, round(len(samples) * fraction)), len(samples) - 1)
    val: set[str] = set()
    for g in order[:-1]:  # the last group always trains
        if len(val) >= target:
            break
        val.update(groups[g])
    return [s for s in samples if s.name not in val], [s for s in samples if s.name in val]


def discover(
    root: Path | None,
    images_dir: str = "images",
    masks_dir: str = "masks",
    val_fraction: float = 0.2,
    mask_suffix: str = "",
    val_group: str | None = None,
) -> Layout:
    if root is None:
        raise PixelsegError("--dataset folder needs --data-root: the folder that holds images/ and masks/")
    root = Path(root)
    if not root.is_dir():
        raise PixelsegError(f"--data-root {root}: directory not found")
    img_root, mask_root = root / images_dir, root / masks_dir
    for d, flag in ((img_root, "--images-dir"), (mask_root, "--masks-dir")):
        if not d.is_dir():
            raise PixelsegError(
                f"{d}: folder not found; put the {'images' if flag == '--images-dir' else 'masks'} "
                f"in {d.name}/ under --data-root or name the folder with {flag}"
            )
    splits: dict[str, list[Sample]] = {}
    missing_mask, missing_image = [], []
    sub = [s for s in SPLITS if (img_root / s).is_dir()]
    lists = [s for s in SPLITS if (root / f"{s}.txt").is_file()]
    if sub:
        source = f"sub-folders {', '.join(sub)}"
        for s in sub:
            if not (mask_root / s).is_dir():
                raise PixelsegError(
                    f"{mask_root / s}: folder not found, but {img_root / s} exists; split "
                    f"sub-folders must exist under both {images_dir}/ and {masks_dir}/"
                )
            splits[s], mm, mi = _pair(img_root / s, mask_root / s, mask_suffix)
            missing_mask += mm
            missing_image += mi
    else:
        pairs, missing_mask, missing_image = _pair(img_root, mask_root, mask_suffix)
        if lists:
            source = f"list files {', '.join(s + '.txt' for s in lists)}"
            by_stem = {s.name: s for s in pairs}
            owner: dict[str, str] = {}
            for s in lists:
                splits[s] = []
                lst = root / f"{s}.txt"
                for n, line in enumerate(lst.read_text().splitlines(), 1):
                    stem = line.strip()
                    if not stem or stem.startswith("#"):
                        continue
                    stem = Path(stem).stem if Path(stem).suffix.lower() in IMAGE_SUFFIXES else stem
                    if stem not in by_stem:
                        raise PixelsegError(
                            f"{lst}:{n}: {stem!r} has no image/mask pair in {images_dir}/ and "
                            f"{masks_dir}/ (list files hold file stems, one per line)"
                        )
                    if stem in owner:
                        raise PixelsegError(
                            f"{lst}:{n}: {stem!r} is also listed in {owner[stem]}.txt; a pair must belong to one split"
                        )
                    owner[stem] = s
                    splits[s].append(by_stem[stem])
        else:
            source = "all pairs"
            splits["train"] = pairs
    if "train" in splits and "val" not in splits:
        splits["train"], splits["val"] = _fraction_split(splits["train"], float(val_fraction), val_group)
        source += f", val = --val-fraction {val_fraction} of them (seeded" + (
            f", grouped by --val-group {val_group})" if val_group else ")"
        )
    if not any(splits.values()):
        raise PixelsegError(
            f"{img_root}: no image has a mask with the same stem in {mask_root} "
            f"({len(missing_mask)} image(s), {len(missing_image)} mask(s) unmatched)"
        )
    return Layout(root, splits, source, missing_mask, missing_image)


# ---- classes.csv --------------------------------------------------------------------------------
@dataclass
class ClassTable:
    names: list[str]
    palette: list[tuple[int, int, int]]
    ignore_colors: list[tuple[int, int, int]]


def read_classes_csv(path: Path) -> ClassTable:
    expect = "expected a header id,name,r,g,b and one row per class, ids 0..K-1 (255 = ignore)"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PixelsegError(f"{path}: cannot read ({exc}); {expect}") from None
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    if sorted(header) != sorted(["id", "name", "r", "g", "b"]):
        raise PixelsegError(f"{path}:1: header is {','.join(header) or '(empty)'}; {expect}")
    col = {h: i for i, h in enumerate(header)}
    rows: dict[int, tuple[str, tuple[int, int, int]]] = {}
    ignore: list[tuple[int, int, int]] = []  # colours painted 255
    seen_colors: dict[tuple[int, int, int], int] = {}  # colour -> line
    for n, row in enumerate(reader, 2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 5:
            raise PixelsegError(f"{path}:{n}: {len(row)} fields, expected 5 (id,name,r,g,b)")
        try:
            cid = int(row[col["id"]])
            r, g, b = (int(row[col[k]]) for k in "rgb")
        except ValueError:
            raise PixelsegError(f"{path}:{n}: id, r, g and b must be integers (got {','.join(row)})") from None
        rgb = (r, g, b)
        name = row[col["name"]].strip()
        if not name:
            raise PixelsegError(f"{path}:{n}: empty class name")
        if not all(0 <= c <= 255 for c in rgb):
            raise PixelsegError(f"{path}:{n}: colour {rgb} out of range; r, g, b are 0..255")
        if rgb in seen_colors:
            raise PixelsegError(
                f"{path}:{n}: colour {rgb} already used on line {seen_colors[rgb]}; each colour must mean one class"
            )
        seen_colors[rgb] = n
        if cid == IGNORE:
            ignore.append(rgb)
            continue
        if not 0 <= cid < IGNORE:
            raise PixelsegError(f"{path}:{n}: id {cid} out of range; ids are 0..254, or 255 for colours to ignore")
        if cid in rows:
            raise PixelsegError(f"{path}:{n}: id {cid} defined twice")
        rows[cid] = (name, rgb)
    if not rows:
        raise PixelsegError(f"{path}: no classes; {expect}")
    gaps = sorted(set(range(max(rows) + 1)) - set(rows))
    if gaps:
        raise PixelsegError(f"{path}: class ids must run 0..{max(rows)} without gaps; missing {gaps[:10]}")
    return ClassTable([rows[i][0] for i in sorted(rows)], [rows[i][1] for i in sorted(rows)], ignore)


# ---- mask scan: what values/colours occur where ----------------------------------------------------
def _raw_mask(img: Image.Image, path: Path) -> tuple[str, np.ndarray]:
    """('index', uint8/uint16 H×W) or ('rgb', int32 H×W of r<<16|g<<8|b): one code per pixel."""
    if img.mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
        a = np.asarray(img.convert("RGB"), dtype=np.int32)
        return "rgb", (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
    if img.mode in ("1", "LA", "La"):
        img = img.convert("L")  # mode 1 becomes 0/255: a binary mask
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise PixelsegError(
            f"{path}: mask has mode {img.mode}; use an index PNG (values = class ids) or an RGB "
            "PNG coloured as in classes.csv"
        )
    a = np.asarray(img)
    if a.max(initial=0) > 255:
        raise PixelsegError(f"{path}: mask values go up to {a.max()}; index masks hold class ids 0..254 (255 = ignore)")
    return "index", a.astype(np.uint8)


def _open_mask(path: Path) -> Image.Image:
    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise PixelsegError(
            f"{path}: JPEG masks are lossy, so their class values and colours are corrupted at "
            "every edge; save masks as PNG"
        )
    return _open(path)


def _scan_one(path: Path) -> dict:
    img = _open_mask(path)
    kind, raw = _raw_mask(img, path)
    values, counts = np.unique(raw, return_counts=True)
    pal = img.getpalette() if img.mode == "P" else None
    return {
        "kind": kind,
        "values": values.tolist(),
        "counts": counts.tolist(),
        "size": list(img.size),
        "palette": pal[:768] if pal else None,
    }


def _scan(samples: list[Sample], use_cache: CacheArg) -> dict[str, dict]:
    masks = sorted({paired_mask(s) for s in samples})
    key = _cache_key([Sample(m.stem, m, None) for m in masks], "scan", f"folder-scan-v{SCAN_VERSION}")
    cfile = cache_dir() / "folder-scan" / f"{key}.json"
    if use_cache and cfile.is_file():
        return json.loads(cfile.read_text())
    if use_cache:  # like the decode cache: one process per machine scans, torchrun's other ranks wait and read
        try:
            with _base._exclusive(cfile.with_suffix(".lock"), f"the masks of {len(masks)} pairs (scan)"):
                if cfile.is_file():
                    return json.loads(cfile.read_text())
                return _scan_masks(masks, cfile)
        except _base.CacheWriteError:
            pass  # no writable cache directory: scan without saving
    return _scan_masks(masks, None)


def _scan_masks(masks: list[Path], cfile: Path | None) -> dict[str, dict]:
    with ThreadPoolExecutor(max(1, min(8, len(masks)))) as pool:
        results = list(
            tqdm(
                pool.map(_scan_safe, masks),
                total=len(masks),
                desc="scanning masks",
                unit="mask",
                leave=False,
                disable=None,
            )
        )
    out = {str(m): r for m, r in zip(masks, results, strict=True)}
    if cfile is not None:
        try:
            cfile.parent.mkdir(parents=True, exist_ok=True)
            tmp = cfile.with_suffix(f".{id(out)}.tmp")
            tmp.write_text(json.dumps(out))
            tmp.replace(cfile)
        except OSError:
            pass  # the scan is only a speed-up on the next run
    return out


def _scan_safe(path: Path) -> dict:
    try:
        return _scan_one(path)
    except UnreadableImage as exc:
        return {"error": str(exc)}


def _fmt_code(kind: str, code: int) -> str:
    return f"({code >> 16}, {(code >> 8) & 255}, {code & 255})" if kind == "rgb" else str(code)


def _rgb_code(rgb) -> int:
    return (int(rgb[0]) << 16) | (int(rgb[1]) << 8) | int(rgb[2])


def _default_palette(n: int) -> list[tuple[int, int, int]]:
    from ..labels.raster import tab20_rgb

    colors = tab20_rgb()
    return [colors[i % len(colors)] for i in range(n)]


# ---- codec: raw mask values/colours -> class ids ----------------------------------------------------
@dataclass
class MaskCodec:
    """How raw mask codes become class ids: a 256-entry table for index masks, a sorted code list for
    RGB masks. Codes nothing maps are `UNKNOWN`; they are rejected before decoding starts."""

    info: DatasetInfo
    index_lut: np.ndarray  # uint8[256]: raw value -> class id (255 = ignore)
    index_known: np.ndarray  # bool[256]: which raw values are expected
    rgb_codes: np.ndarray  # int32[k] sorted colour codes r<<16|g<<8|b
    rgb_ids: np.ndarray  # uint8[k] their class ids (255 = ignore)
    description: str
    notices: list[str] = field(default_factory=list)

    UNKNOWN = -1

    def signature(self) -> str:
        return hashlib.sha1(
            self.index_lut.tobytes()
            + self.rgb_codes.tobytes()
            + self.rgb_ids.tobytes()
            + json.dumps(self.info.to_dict()).encode()
        ).hexdigest()[:12]

    def id_of(self, kind: str, code: int) -> int:
        if kind == "index":
            return int(self.index_lut[code]) if self.index_known[code] else self.UNKNOWN
        i = int(np.searchsorted(self.rgb_codes, code))
        return int(self.rgb_ids[i]) if i < len(self.rgb_codes) and self.rgb_codes[i] == code else self.UNKNOWN

    def encode(self, kind: str, raw: np.ndarray) -> np.ndarray:
        """Raw codes -> uint8 class ids; anything unexpected becomes ignore (the scan already refused it)."""
        if kind == "index":
            return np.where(self.index_known[raw], self.index_lut[raw], IGNORE).astype(np.uint8)
        if not len(self.rgb_codes):
            return np.full(raw.shape, IGNORE, np.uint8)
        i = np.clip(np.searchsorted(self.rgb_codes, raw), 0, len(self.rgb_codes) - 1)
        return np.where(self.rgb_codes[i] == raw, self.rgb_ids[i], IGNORE).astype(np.uint8)


def parse_class_names(value) -> list[str] | None:
    """--class-names "membrane,cell" (or a YAML list) -> names in class-id order."""
    if value is None or value == "":
        return None
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    if not all(names) or len(set(names)) != len(names):
        raise PixelsegError(
            f"--class-names {value!r}: give distinct, non-empty names in class-id order, "
            "comma-separated, e.g. --class-names membrane,cell"
        )
    return [str(n) for n in names]


def build_codec(root: Path, scan: dict[str, dict], classes: str | Path | None = None, class_names=None) -> MaskCodec:
    kinds = {r["kind"] for r in scan.values() if "kind" in r}
    names_given = parse_class_names(class_names)
    if classes is not None:
        csv_path = Path(classes)
        if not csv_path.is_file():
            raise PixelsegError(f"--classes {csv_path}: file not found (a CSV with the header id,name,r,g,b)")
    else:
        csv_path = root / "classes.csv"
    if names_given and csv_path.is_file():
        raise PixelsegError(
            f"--class-names and {csv_path} both name the classes; use one of them (classes.csv also sets colours)"
        )
    index_lut = np.full(256, IGNORE, np.uint8)
    index_known = np.zeros(256, bool)
    index_known[IGNORE] = True
    notices: list[str] = []
    if csv_path.is_file():
        return _codec_from_csv(csv_path, kinds, scan, index_lut, index_known, notices)
    if len(kinds) > 1:
        rgb = next(p for p, r in scan.items() if r.get("kind") == "rgb")
        idx = next(p for p, r in scan.items() if r.get("kind") == "index")
        raise PixelsegError(
            f"masks mix RGB colour images (e.g. {rgb}) and index images (e.g. {idx}); without "
            f"{csv_path} the classes cannot be matched up: convert them to one kind, or write "
            "classes.csv (id,name,r,g,b)"
        )
    kind = kinds.pop() if kinds else "index"
    found = sorted({v for r in scan.values() for v in r.get("values", [])})
    if kind == "index":
        names, palette, codes, ids, desc = _index_classes(found, scan, index_lut, index_known, notices)
    else:
        names, palette, codes, ids, desc = _rgb_classes(found, scan, csv_path, notices)
    if len(names) > 254:
        raise PixelsegError(f"masks hold {len(names)} distinct values; at most 254 classes are supported")
    if names_given:
        if len(names_given) != len(names):
            raise PixelsegError(
                f"--class-names gives {len(names_given)} name(s) ({', '.join(names_given)}) but the "
                f"masks hold {len(names)} classes ({', '.join(names)}, in id order)"
            )
        notices.append(
            "class names from --class-names: "
            + ", ".join(f"{old} -> {new}" for old, new in zip(names, names_given, strict=True))
        )
        names = names_given
    return MaskCodec(
        DatasetInfo("folder", names, list(palette), IGNORE), index_lut, index_known, codes, ids, desc, notices
    )


def _codec_from_csv(
    csv_path: Path, kinds: set, scan: dict[str, dict], index_lut, index_known, notices: list[str]
) -> MaskCodec:
    """The classes as classes.csv (or --classes) lists them: index value i and colour (r, g, b) -> class i."""
    table = read_classes_csv(csv_path)
    k = len(table.names)
    index_lut[:k] = np.arange(k)
    index_known[:k] = True
    pairs = sorted(
        [(_rgb_code(c), i) for i, c in enumerate(table.palette)] + [(_rgb_code(c), IGNORE) for c in table.ignore_colors]
    )
    codes = np.array([p[0] for p in pairs], np.int32)
    ids = np.array([p[1] for p in pairs], np.uint8)
    info = DatasetInfo("folder", table.names, table.palette, IGNORE)
    desc = f"{'/'.join(sorted(kinds))} masks, {k} classes from {csv_path.name}"
    if table.ignore_colors:
        desc += f" (ignored colours: {', '.join(map(str, table.ignore_colors))})"
    codec = MaskCodec(info, index_lut, index_known, codes, ids, desc, notices)
    _check_unknown(codec, scan, csv_path)
    return codec


def _index_classes(found: list[int], scan: dict[str, dict], index_lut, index_known, notices: list[str]):
    """Index masks without classes.csv: the values found, numbered in order (0/255 alone: binary)."""
    values = [v for v in found if v != IGNORE]
    if found and set(found) <= {0, IGNORE} and IGNORE in found:
        values = [0, IGNORE]
        names, palette = ["background", "foreground"], [(0, 0, 0), (255, 255, 255)]
        notices.append(
            "masks hold only 0 and 255: read as a binary mask, 0 -> class 0 (background), 255 -> class 1 (foreground)"
        )
    else:
        if IGNORE in found:
            notices.append("mask value 255 is read as 'ignore' (left out of loss and metrics)")
        names = [f"class_{v}" for v in values]
        pal = next((r["palette"] for r in scan.values() if r.get("palette")), None)
        palette = (
            [tuple(pal[3 * v : 3 * v + 3]) for v in values]
            if pal and len(pal) >= 3 * (max(values) + 1)
            else _default_palette(len(values))
        )
        if values != list(range(len(values))):
            notices.append(
                "mask values "
                + ", ".join(f"{v}->{i}" for i, v in enumerate(values))
                + " are renumbered to consecutive class ids (write classes.csv to fix the ids)"
            )
    for i, v in enumerate(values):
        index_lut[v] = i
        index_known[v] = True
    codes, ids = np.zeros(0, np.int32), np.zeros(0, np.uint8)
    desc = f"index masks, {len(names)} classes numbered from the values found"
    return names, palette, codes, ids, desc


def _rgb_classes(found: list[int], scan: dict[str, dict], csv_path: Path, notices: list[str]):
    """RGB masks without classes.csv: the colours found, numbered in RGB order (black/white alone: binary)."""
    if len(found) > MAX_AUTO_CLASSES:
        example = max(scan, key=lambda p: len(scan[p].get("values", [])))
        raise PixelsegError(
            f"RGB masks hold {len(found)} distinct colours ({example} alone has "
            f"{len(scan[example]['values'])}): they look antialiased or JPEG-compressed; "
            f"save masks without smoothing, or list the class colours in {csv_path}"
        )
    if found == [0, _rgb_code((255, 255, 255))]:
        names, palette = ["background", "foreground"], [(0, 0, 0), (255, 255, 255)]
        notices.append("masks are black/white: read as a binary mask, black -> class 0, white -> class 1")
    else:
        palette = [(c >> 16, (c >> 8) & 255, c & 255) for c in found]
        names = [f"class_{i}" for i in range(len(found))]
        notices.append(
            f"no {csv_path.name}: the {len(found)} mask colours found are numbered in RGB order "
            "(write classes.csv with id,name,r,g,b to name them and fix their ids)"
        )
    codes, ids = np.array(found, np.int32), np.arange(len(found), dtype=np.uint8)
    desc = f"RGB masks, {len(names)} classes numbered from the colours found"
    return names, palette, codes, ids, desc


def _check_unknown(codec: MaskCodec, scan: dict[str, dict], csv_path: Path) -> None:
    bad: dict[str, list[str]] = {}
    totals: dict[str, int] = {}
    for path, r in scan.items():
        if "kind" not in r:
            continue
        unknown = [
            (v, c) for v, c in zip(r["values"], r["counts"], strict=True) if codec.id_of(r["kind"], v) == codec.UNKNOWN
        ]
        if unknown:
            bad[path] = [_fmt_code(r["kind"], v) for v, _ in unknown]
            for v, c in unknown:
                totals[_fmt_code(r["kind"], v)] = totals.get(_fmt_code(r["kind"], v), 0) + c
    if bad:
        what = "colours" if any(s.startswith("(") for s in totals) else "values"
        top = ", ".join(f"{k} ({n} px)" for k, n in sorted(totals.items(), key=lambda kv: -kv[1])[:6])
        files = ", ".join(Path(p).name for p in list(bad)[:5]) + (" ..." if len(bad) > 5 else "")
        raise PixelsegError(
            f"{len(bad)} mask(s) hold {what} that {csv_path} does not list: {top}; in {files}. "
            "Add a row per class colour to classes.csv (id 255 to ignore a colour)"
        )


# ---- report -----------------------------------------------------------------------------------------
def _report(layout: Layout, codec: MaskCodec, scan: dict[str, dict]) -> str:
    counts = np.zeros(codec.info.num_classes + 1, np.int64)  # last slot: ignored
    for r in scan.values():
        for v, c in zip(r.get("values", []), r.get("counts", []), strict=True):
            cid = codec.id_of(r["kind"], v)
            counts[-1 if cid in (IGNORE, codec.UNKNOWN) else cid] += c
    total = max(int(counts.sum()), 1)
    lines = [
        f"folder dataset {layout.root}: "
        + ", ".join(f"{s} {len(v)}" for s, v in layout.splits.items())
        + f" image/mask pairs ({layout.source})"
    ]
    for paths, what in (
        (layout.missing_mask, "image(s) without a mask"),
        (layout.missing_image, "mask(s) without an image"),
    ):
        if paths:
            names = ", ".join(p.name for p in paths[:5]) + (" ..." if len(paths) > 5 else "")
            lines.append(f"  skipped {len(paths)} {what}: {names}")
    unreadable = [p for p, r in scan.items() if "error" in r]
    if unreadable:
        first = ", ".join(Path(p).name for p in unreadable[:5])
        lines.append(f"  {len(unreadable)} unreadable mask(s), skipped: {first}")
    lines.append(f"  {codec.description}; masks with unknown values/colours: 0")
    lines += [f"  note: {n}" for n in codec.notices]
    freq = ", ".join(f"{n} {100 * c / total:.1f}%" for n, c in zip(codec.info.class_names, counts, strict=False))
    lines.append(
        f"  class pixel frequencies: {freq}" + (f", ignored {100 * counts[-1] / total:.1f}%" if counts[-1] else "")
    )
    return "\n".join(lines)


# ---- loading ----------------------------------------------------------------------------------------
def _options(options: dict) -> dict:
    return {k: (OPTIONS[k] if options.get(k) is None else options[k]) for k in OPTIONS}


def prepare(root: Path | None, use_cache: CacheArg = True, **options) -> tuple[Layout, MaskCodec, dict]:
    """Discover pairs, scan every mask (all splits: class numbering must not depend on the split),
    build the codec and print the report once per process. `options`: OPTIONS' keys (None = default)."""
    o = _options(options)
    layout = discover(root, o["images_dir"], o["masks_dir"], o["val_fraction"], o["mask_suffix"], o["val_group"])
    scan = _scan(layout.all_samples, use_cache)
    codec = build_codec(layout.root, scan, o["classes"], o["class_names"])
    report = _report(layout, codec, scan)
    if report not in _REPORTED:
        _REPORTED.add(report)
        log.info(report)
    bad = {p: r["error"] for p, r in scan.items() if "error" in r}
    if bad:
        for split, samples in layout.splits.items():
            layout.splits[split] = [s for s in samples if str(s.mask) not in bad]
    return layout, codec, scan


def _split(layout: Layout, split: str) -> list[Sample]:
    if split not in layout.splits:
        raise PixelsegError(
            f"--split {split}: the folder dataset at {layout.root} has splits "
            f"{', '.join(layout.splits)} ({layout.source}); add {split}/ sub-folders or "
            f"{split}.txt to define it"
        )
    return layout.splits[split]


def read_target(sample: Sample, codec: MaskCodec, size: tuple[int, int] | None = None) -> np.ndarray:
    mask = paired_mask(sample)
    img = _open_mask(mask)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.NEAREST)  # NEAREST keeps ids and colours exact
    kind, raw = _raw_mask(img, mask)
    return codec.encode(kind, raw)


def dataset_info(root: Path | None, **options) -> DatasetInfo:
    """Classes and palette, from classes.csv or the masks' colours, without decoding a split."""
    return prepare(root, **options)[1].info


def full_res_samples(root: Path | None, split: str, **options):
    """Samples and a reader of their full-resolution targets (used by evaluate --full-res)."""
    layout, codec, _ = prepare(root, **options)
    return _split(layout, split), lambda s: read_target(s, codec)


def load(
    root: Path | None,
    split: str,
    image_size: tuple[int, int],
    limit: int | None = None,
    use_cache: CacheArg = True,
    channels: int = 3,
    **options,
):
    """``channels`` != 3 reads 8/16-bit, multi-band images (TIFF via tifffile) as float32 [0, 1]."""
    layout, codec, scan = prepare(root, use_cache, **options)
    samples = _split(layout, split)
    if limit:
        samples = samples[:limit]
    return _decode(samples, tuple(image_size), codec, scan, use_cache, split, channels)


def _decode(
    samples: list[Sample], size: tuple[int, ...], codec: MaskCodec, scan: dict, use_cache, split: str, channels: int = 3
):
    """decode_samples' job for masks it cannot read (RGB colour codes): same store, same threads."""
    key = f"folder|{codec.signature()}" + ("" if channels == 3 else f"|bands{channels}")
    if channels != 3:
        spec = cache_spec(use_cache)
        if spec.mode == "mmap":  # the on-disk store holds uint8 RGB pixels; N-band float32 inputs stay in memory
            use_cache = CacheSpec("memory", spec.full_res, spec.max_side)
    return build_split(
        samples,
        FolderReader(codec, channels),
        codec.info,
        size,
        use_cache,
        key,
        f"decoding {split}",
        min(8, max(1, len(samples))),
    )


@dataclass
class FolderReader:
    """(image, class ids) of one pair through the dataset's codec; picklable for DataLoader workers.
    ``channels`` != 3: float32 [0, 1] band arrays (read_input), a one-line error on a channel mismatch."""

    codec: MaskCodec
    channels: int = 3

    def __call__(self, s: Sample, size=None, max_side=None):
        h, w = image_hw(s.image)
        mask_wh = _open_mask(paired_mask(s)).size
        _base.check_same_size(s.mask, s.image.name, (w, h), mask_wh)  # PIL's (w, h), as both files say
        target = fit_size((h, w), size, max_side)
        if self.channels == 3 and not is_tiff(s.image):
            img = _base.read_image(s.image, target)
        else:
            img = read_input(s.image, self.channels, target)
        return img, read_target(s, self.codec, target)
