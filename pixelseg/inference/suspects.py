"""Confident learning for segmentation, the method behind `pixelseg audit` and the "next to label" list:
per-class thresholds from held-out probabilities, connected suspect regions of four kinds, an image's label
quality, and suspects as review regions (the full method, with its citation: audit.py's docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

KINDS = ("missing_label", "wrong_class", "spurious_label", "boundary")
BOUNDARY_SHARE = 0.9  # a region this much inside the band along a labelled edge is a boundary error
REVIEW_MAX_REGIONS = 25  # per image in review/, heaviest first: a reviewer fixes the big ones, then re-audits


# ---- the scoring core: probabilities + labels -> thresholds, suspects, score ------------------------
@dataclass
class Suspect:
    kind: str
    given: int  # the class the label says
    suggested: int  # the class the held-out model is confident in
    area: int
    bbox: list  # x, y, w, h in pixels
    confidence: float  # mean p_suggested over the region
    margin: float  # mean p_suggested - p_given
    crop: np.ndarray | None = field(repr=False, default=None)  # the region's pixels within its bbox

    @property
    def mass(self) -> float:
        return self.margin * self.area

    def mask(self, h: int, w: int) -> np.ndarray:
        """The region as an H×W bool mask (kept as a bbox crop: an image may have hundreds of regions)."""
        x, y, bw, bh = self.bbox
        out = np.zeros((h, w), bool)
        out[y : y + bh, x : x + bw] = self.crop
        return out


class Thresholds:
    """Confident learning's per-class thresholds: mean self-confidence of the pixels labelled each class."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.sums = np.zeros(num_classes, np.float64)
        self.counts = np.zeros(num_classes, np.int64)
        self.ignore_index = ignore_index

    def add(self, probs: np.ndarray, label: np.ndarray) -> None:
        """probs C×H×W, label H×W class ids (ignore_index and ids >= C are left out)."""
        c = probs.shape[0]
        valid = (label != self.ignore_index) & (label < c)
        lab = label[valid].astype(np.int64)
        self_conf = np.take_along_axis(probs.reshape(c, -1)[:, valid.ravel()], lab[None], 0)[0]
        self.sums += np.bincount(lab, weights=self_conf, minlength=c)[:c]
        self.counts += np.bincount(lab, minlength=c)[:c]

    def values(self) -> np.ndarray:
        """t_j; a class no pixel is labelled with gets +inf (never confidently predicted: no evidence to set it)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.inf)


def confident_class(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """H×W: the class each pixel is confidently (p_j >= t_j; the most probable such j), -1 where none."""
    above = probs >= thresholds[:, None, None]
    out = np.where(above, probs, -1.0).argmax(0)
    out[~above.any(0)] = -1
    return out


def edge_distance(label: np.ndarray) -> np.ndarray:
    """Distance (pixels) from each pixel to the nearest edge of the labelled mask (a 4-neighbour differs)."""
    import cv2

    edge = np.zeros(label.shape, bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[1:] != label[:-1]
    if not edge.any():
        return np.full(label.shape, np.inf, np.float32)
    return cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 3)


def default_band(h: int, w: int) -> int:
    """The boundary band: 2% of the longer side (10 px on a 500-px photo), at least 3 px."""
    return max(3, math.ceil(0.02 * max(h, w)))


def default_min_area(h: int, w: int) -> int:
    """Smallest suspect region: 0.025% of the image (47 px on 500×375), at least 16 px."""
    return max(16, math.ceil(2.5e-4 * h * w))


def find_suspects(
    probs: np.ndarray,
    label: np.ndarray,
    thresholds: np.ndarray,
    background: set,
    ignore_index: int = 255,
    band: int | None = None,
    min_area: int | None = None,
) -> list[Suspect]:
    """The suspect regions of one image (module doc, steps 3-4); probs C×H×W, label H×W."""
    import cv2

    c, h, w = probs.shape
    band = default_band(h, w) if band is None else band
    min_area = default_min_area(h, w) if min_area is None else min_area
    valid = (label != ignore_index) & (label < c)
    conf = confident_class(probs, thresholds)
    issue = valid & (conf >= 0) & (conf != label)
    if not issue.any():
        return []
    lab = np.where(valid, label, 0).astype(np.int64)
    p_given = np.take_along_axis(probs, lab[None], 0)[0]
    p_sugg = np.take_along_axis(probs, np.maximum(conf, 0)[None], 0)[0]
    dist = edge_distance(label)
    out = []
    code = label.astype(np.int64) * c + conf  # one int per (given, suggested) pair
    for pair in np.flatnonzero(np.bincount(code[issue], minlength=1)):
        g, s = divmod(int(pair), c)
        m = issue & (code == pair)
        n, comps, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        for k in range(1, n):
            x, y, bw, bh, area = (int(v) for v in stats[k])
            if area < min_area:
                continue
            sl = (slice(y, y + bh), slice(x, x + bw))
            comp = comps[sl] == k
            if (dist[sl][comp] <= band).mean() >= BOUNDARY_SHARE:
                kind = "boundary"
            elif int(g) in background:
                kind = "missing_label"
            elif int(s) in background:
                kind = "spurious_label"
            else:
                kind = "wrong_class"
            out.append(
                Suspect(
                    kind,
                    int(g),
                    int(s),
                    area,
                    [x, y, bw, bh],
                    float(p_sugg[sl][comp].mean()),
                    float((p_sugg[sl][comp] - p_given[sl][comp]).mean()),
                    comp,
                )
            )
    out.sort(key=lambda r: -r.mass)
    return out


REST_WEIGHT = 0.25  # in an image's score, its suspect regions after the heaviest count this much


def label_quality(suspects: list[Suspect], labelled_pixels: int) -> float:
    """1 - (the heaviest suspect region's mass + REST_WEIGHT × the others') / labelled pixels (module doc,
    step 5); 1 = no suspects. A region's mass is its area × mean margin p_suggested - p_given."""
    if labelled_pixels <= 0:
        return 1.0
    masses = sorted((r.mass for r in suspects), reverse=True)
    weighted = (masses[0] + REST_WEIGHT * sum(masses[1:])) if masses else 0.0
    return float(max(0.0, 1.0 - weighted / labelled_pixels))


def background_ids(class_names: list[str]) -> set:
    """The classes that mean "no object" (named background, as the pre-annotation writers treat them)."""
    from ..labels.write import labelled_classes

    return set(range(len(class_names))) - set(labelled_classes(class_names))


# ---- the run: which model scores which image ---------------------------------------------------------
def suspect_regions(src_names: list, sus: list[Suspect], bg: set, h: int, w: int) -> list:
    """Suspects as pre-annotation Regions: labelled with the class the model suggests, or, where it suggests
    background (a spurious label), with the labelled class, so the tool shows what to delete; kind, given and
    suggested classes ride along as attributes. Holes are filled: a review region marks where to look."""
    import cv2

    from ..labels.rle import coco_rle_encode
    from ..labels.write import Region, mask_polygons

    regions = []
    for r in sus[:REVIEW_MAX_REGIONS]:
        label = r.given if r.suggested in bg else r.suggested
        if label in bg:  # background both ways cannot happen (they differ), but a tool has no label for it
            continue
        attrs = {"kind": r.kind, "given": src_names[r.given], "suggested": src_names[r.suggested]}
        x, y, bw, bh = r.bbox
        assert r.crop is not None  # find_suspects gives every region its crop
        padded = np.pad(r.crop, 1).astype(np.uint8)  # polygons of the crop, moved back into the image
        contours, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        filled = cv2.drawContours(np.zeros_like(padded), contours, -1, 1, -1) > 0
        offset = np.array([x - 1, y - 1])  # crop corner in the image, less the 1-pixel pad
        for poly, comp in mask_polygons(filled, min_area=0):
            full = np.zeros((h, w), bool)
            full[y : y + bh, x : x + bw] = comp[1:-1, 1:-1]
            regions.append(
                Region(src_names[label], coco_rle_encode(full), r.confidence, [poly + offset], attributes=attrs)
            )
    return regions
