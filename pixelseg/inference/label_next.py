"""One "next to label" list: audit suspects (labelled images whose labels look wrong) and unlabelled images
(the model unsure of them), merged into one ranking and written in the labelling tool's format.

`pixelseg audit RUN --unlabelled DIR` writes it to OUT/next/ (docs/labels.md, "The next-to-label list").

Both kinds are ranked on one scale, the **expected share of the image's pixels a person will change**:
    suspect     1 - label quality (pixelseg.inference.audit): the probability mass by which the held-out model prefers
                another class over the label, over the suspect regions (the heaviest whole, the others at a
                quarter), per labelled pixel;
    unlabelled  the mean over the pixels of 1 - max_j p_j under the run's model (the fold ensemble of a
                --folds run): the expected share of the pre-annotation's pixels that are wrong.
So a label with a dropped object covering a third of the photo (~0.3) comes before a new photo the model
segments well (~0.05), which comes before a label drawn a few pixels off (~0.01). Within the unlabelled
images the order is close to `predict --rank uncertainty` (mean entropy, also written as `uncertainty`).

What each item carries into the tool: a suspect image its suspect regions (audit's review/ regions: the class
the model suggests, kind and classes as attributes; in Label Studio tasks also the label as it is, as the
task's annotation, so the reviewer corrects it in place); an unlabelled image the model's pre-annotation (as
`predict --format`), its regions with kind "prediction". Written by pixelseg.labels.write, so they import as
audit's review/ and predict's pre-annotations do; next.csv/next.json hold the ranking.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import PixelsegError
from ..core.files import atomic_write_text

if TYPE_CHECKING:
    from ..labels.write import ImageRegions

PREDICTION = "prediction"  # the kind attribute of an unlabelled image's pre-annotation regions
SOURCES = ("suspect", "unlabelled")
CSV_FIELDS = ["rank", "image", "source", "priority", "quality", "uncertainty", "regions", "reason"]


@dataclass
class NextItem:
    source: str  # "suspect" or "unlabelled"
    priority: float  # expected share of the image's pixels a person will change (module doc)
    item: ImageRegions  # the image, its size and the regions shown
    reason: str  # what a person is asked to do, in words
    quality: float | None = None  # suspects: audit's label quality
    uncertainty: float | None = None  # unlabelled: mean per-pixel entropy (nats)
    current: list | None = None  # suspects: the label as it is (Regions), for tools that take it along

    @property
    def name(self) -> str:
        return str(self.item.image)


def merge(suspects: list[NextItem], unlabelled: list[NextItem], top: int | None = None) -> list[NextItem]:
    """The two lists in one order: highest priority first (ties: suspects first, then by image path)."""
    both = sorted([*suspects, *unlabelled], key=lambda n: (-n.priority, SOURCES.index(n.source), n.name))
    return both[:top] if top else both


def suspect_item(
    image: Path, h: int, w: int, score: float, suspects: list, class_names: list[str], label: np.ndarray | None = None
) -> NextItem | None:
    """A flagged audit image as a list item (None: no region a tool can show); `label` (H×W class ids), the
    mask as it is, rides along as `current` (Label Studio tasks carry it as the annotation to correct)."""
    from ..labels.write import ImageRegions, image_regions
    from .suspects import KINDS, background_ids, suspect_regions

    regions = suspect_regions(class_names, suspects, background_ids(class_names), h, w)
    if not regions:
        return None
    counts = [(sum(r.kind == k for r in suspects), k) for k in KINDS]
    reason = "fix the label: " + ", ".join(f"{n} {k.replace('_', ' ')}" for n, k in counts if n)
    current = None
    if label is not None:
        current = image_regions(
            Path(image),
            np.where(label < len(class_names), label, 0).astype(np.uint8),
            np.ones(label.shape, np.float32),
            class_names,
            0.0,
        ).regions
    return NextItem(
        "suspect",
        round(1.0 - score, 6),
        ImageRegions(Path(image), h, w, regions, score, 1.0 - score),
        reason,
        quality=round(score, 6),
        current=current,
    )


def unlabelled_item(image: Path, probs: np.ndarray, class_names: list[str], min_area: int = 16) -> NextItem:
    """An unlabelled image (probs C×H×W at its own size) as a list item with its pre-annotation."""
    from ..labels.write import image_regions

    top = probs.max(0)
    mask = probs.argmax(0).astype(np.uint8)
    entropy = float(-(probs * np.log(np.clip(probs, 1e-12, None))).sum(0).mean())
    item = image_regions(Path(image), mask, top, class_names, entropy, "polygon", min_area)
    for r in item.regions:
        r.attributes = {"kind": PREDICTION}
    priority = float((1.0 - top).mean())
    return NextItem(
        "unlabelled",
        round(priority, 6),
        item,
        f"label it (pre-annotated; expected {100 * priority:.1f}% of pixels wrong)",
        uncertainty=round(entropy, 6),
    )


def unlabelled_files(paths, audited: list) -> tuple[list[Path], int]:
    """The image files under `paths` (files or folders), less those the audit already has labels for
    (same resolved path); returns (files, how many were left out as labelled)."""
    from ..data.io import collect_images

    labelled = {Path(p).resolve() for p in audited if p is not None}
    files = collect_images(paths)
    keep = [f for f in files if f.resolve() not in labelled]
    if not keep:
        raise PixelsegError(
            f"--unlabelled: all {len(files)} images in {', '.join(map(str, paths))} are labelled "
            "images of the run's dataset; name a folder of new images"
        )
    return keep, len(files) - len(keep)


def check_names(files: list[Path], audited: list, fmt: str) -> None:
    """COCO and CVAT refer to images by file name: two different images of one name cannot share a list."""
    if fmt not in ("coco", "cvat"):
        return
    seen: dict[str, Path] = {}
    for p in [*(Path(a) for a in audited if a is not None), *files]:
        other = seen.setdefault(p.name, p)
        if other.resolve() != p.resolve():
            raise PixelsegError(
                f"--unlabelled: {p} and {other} share the file name {p.name}, which {fmt} uses to "
                "refer to an image; rename one, or use --format labelstudio (full paths)"
            )


def score_unlabelled(src, files: list[Path], device, amp, progress: bool = True, min_area: int = 16) -> list[NextItem]:
    """Each unlabelled image through the run's model (a --folds run: the ensemble of its fold models, as
    `predict` uses it), at its own size."""
    from ..core.progress import progress as progress_bar
    from ..data.io import read_input
    from .loading import input_size, load_model
    from .tiling import Predictor, torch_logits_fn

    channels_last = src.ckpt["config"].get("channels_last", True)
    model = load_model(src.ckpt, device, amp, channels_last)
    predictor = Predictor(torch_logits_fn(model, device, amp, channels_last), input_size(src.ckpt), device=device)
    out = []
    for f in progress_bar(files, desc="next: unlabelled images", unit="img", enabled=progress):
        img = read_input(f, src.channels, exif_transpose=True)
        probs = predictor(img, probs=True)[0].float().cpu().numpy()
        out.append(unlabelled_item(f, probs, src.class_names, min_area))
    return out


def _rows(items: list[NextItem]) -> list[dict]:
    return [
        {
            "rank": k,
            "image": n.name,
            "source": n.source,
            "priority": n.priority,
            "quality": n.quality,
            "uncertainty": n.uncertainty,
            "regions": len(n.item.regions),
            "reason": n.reason,
        }
        for k, n in enumerate(items, 1)
    ]


def write_next(
    items: list[NextItem],
    fmt: str,
    class_names: list[str],
    palette,
    out: Path,
    model_version: str = "pixelseg-next",
    image_url: str | None = None,
) -> list[Path]:
    """next.csv, next.json and (fmt != none) the list in the tool's format, into the folder `out`."""
    from ..labels import write as pre
    from .suspects import KINDS

    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(items)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "next.csv", buf.getvalue())
    atomic_write_text(out / "next.json", json.dumps(rows, indent=1))
    files = [out / "next.csv", out / "next.json"]
    if fmt == "none":
        return files
    regions = [n.item for n in items]
    labels = [class_names[k] for k in pre.labelled_classes(class_names)]
    attrs = {"kind": [*KINDS, PREDICTION], "given": ["-", *labels], "suggested": ["-", *class_names]}
    if fmt == "labelstudio":  # the tasks carry their place in the list, for the Data Manager to sort by
        colours = {class_names[k]: tuple(palette[k]) for k in pre.labelled_classes(class_names)}
        tasks = pre.labelstudio_tasks(regions, model_version, image_url)
        for t, row, n in zip(tasks, rows, items, strict=False):
            t["data"].update(
                {
                    "next_rank": row["rank"],
                    "next_source": row["source"],
                    "next_priority": row["priority"],
                    "next_reason": row["reason"],
                }
            )
            if n.current is not None:  # the label as it is: the annotation a reviewer corrects and submits
                it = n.item
                label = pre.ImageRegions(it.image, it.height, it.width, n.current, 1.0, 0.0)
                t["annotations"] = [
                    {"result": pre.labelstudio_tasks([label], model_version)[0]["predictions"][0]["result"]}
                ]
        atomic_write_text(out / "labelstudio_config.xml", pre.labelstudio_config(labels, colours, "polygon"))
        atomic_write_text(out / "labelstudio_tasks.json", json.dumps(tasks))
        return [*files, out / "labelstudio_tasks.json", out / "labelstudio_config.xml"]
    written = pre.write(
        fmt, regions, class_names, palette, out, model_version=model_version, image_url=image_url, attributes=attrs
    )
    if fmt == "coco":  # each image entry also says its place in the list
        doc = json.loads(written[0].read_text())
        for im, row in zip(doc["images"], rows, strict=False):
            im.update({"next_rank": row["rank"], "next_source": row["source"], "next_priority": row["priority"]})
        atomic_write_text(written[0], json.dumps(doc))
    return files + written


def format_summary(items: list[NextItem], top: int = 10) -> str:
    n_s = sum(n.source == "suspect" for n in items)
    lines = [
        f"next to label: {len(items)} images ({n_s} labelled with suspects, {len(items) - n_s} unlabelled), "
        "by expected share of pixels to change",
        f"{'rank':>4}  {'priority':>8}  {'source':<10}  image",
    ]
    for k, n in enumerate(items[:top], 1):
        lines.append(f"{k:>4}  {n.priority:>8.4f}  {n.source:<10}  {Path(n.name).name}  ({n.reason})")
    return "\n".join(lines)
