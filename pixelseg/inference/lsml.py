"""Label Studio ML backend, the parts without a web framework: the project's labelling config, predictions in
its result format, annotations back to class-id masks, fetching task images, and the retrain job that
`pixelseg serve RUN --label-studio` runs in a background process (`python -m pixelseg.inference.lsml ROUND_DIR`).

Protocol (Label Studio 1.x's `ml/api_connector.py`, what `label-studio-ml`'s Flask app answers):
    GET  /health    {"status": "UP"}                          Label Studio's health check (1 s timeout)
    POST /setup     {project, schema, hostname, access_token}  -> {"model_version"}; 3 s timeout
    POST /predict   {tasks, project, label_config, params}     -> {"results": [one prediction per task]}
    POST /webhook   {action, annotation, task, project}        ANNOTATION_CREATED/UPDATED, ANNOTATIONS_DELETED,
                                                                START_TRAINING; 1 s timeout (WEBHOOK_TIMEOUT)
    POST /train     {annotations: [tasks], project, label_config}   the older "train" call
    GET  /versions  {"versions": [...]}

Label mapping: a config label matches a model class by name (exactly, else ignoring case); classes named
background get no regions (the tools have no background label). Labels the model does not know and classes
the config does not list are reported (in /setup's answer and one log line); a config with no label the model
knows is refused (422).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError
from ..labels.rle import RLEError, coco_rle_decode, ls_rle_decode, ls_rle_encode

REGION_TAGS = {"brushlabels": "mask", "polygonlabels": "polygon"}
BACKGROUND = ("background", "_background_")
FETCH_TIMEOUT_S = 30


class BadRequest(Exception):
    """A payload or task the backend refuses: HTTP status + one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---- the labelling config ----------------------------------------------------------------------------------
@dataclass
class LabelConfig:
    kind: str  # "brushlabels" or "polygonlabels"
    from_name: str  # the labels tag's name
    to_name: str  # the <Image> it labels
    image_key: str  # data key of that image ($image -> "image")
    labels: list[str]  # the tag's <Label value>s
    to_label: dict = field(default_factory=dict)  # model class id -> config label
    unknown: list = field(default_factory=list)  # config labels no model class matches
    unlisted: list = field(default_factory=list)  # model classes (not background) the config does not list

    @property
    def shapes(self) -> str:
        return REGION_TAGS[self.kind]

    def report(self) -> str:
        parts = [f"{self.kind} {self.from_name!r} -> {len(self.to_label)} of {len(self.labels)} labels mapped"]
        if self.unknown:
            parts.append("labels the model does not know (never predicted): " + ", ".join(self.unknown))
        if self.unlisted:
            parts.append("model classes the config does not list (left out): " + ", ".join(self.unlisted))
        return "; ".join(parts)


def parse_config(text, class_names: list[str]) -> LabelConfig:
    """The first BrushLabels or PolygonLabels tag of a labelling config, mapped to the model's classes."""
    if not isinstance(text, str) or not text.strip():
        raise BadRequest(422, "label_config is missing or empty: send the project's labelling config (XML)")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise BadRequest(422, f"label_config is not valid XML ({exc})") from None
    images = {el.get("name"): el.get("value", "") for el in root.iter() if el.tag.lower() == "image"}
    tag = next((el for el in root.iter() if el.tag.lower() in REGION_TAGS), None)
    if tag is None:
        kinds = sorted({el.tag for el in root.iter() if el.tag.lower().endswith("labels")})
        raise BadRequest(
            422,
            "label_config has no BrushLabels or PolygonLabels tag (pixelseg predicts masks)"
            + (f"; it has {', '.join(kinds)}" if kinds else ""),
        )
    to_name = tag.get("toName", "")
    value = images.get(to_name)
    if value is None or not value.startswith("$"):
        raise BadRequest(422, f'label_config: <{tag.tag} toName={to_name!r}> names no <Image value="$KEY"> tag')
    labels = [v for el in tag if el.tag.lower() == "label" and (v := el.get("value"))]
    cfg = LabelConfig(tag.tag.lower(), tag.get("name", ""), to_name, value[1:], labels)
    by_name = {n: i for i, n in enumerate(class_names)}
    by_lower = {n.lower(): i for i, n in reversed(list(enumerate(class_names)))}
    for lab in labels:
        k = by_name.get(lab, by_lower.get(lab.lower()))
        if k is None or class_names[k].lower() in BACKGROUND:
            cfg.unknown.append(lab)
        elif k not in cfg.to_label:
            cfg.to_label[k] = lab
    cfg.unlisted = [n for i, n in enumerate(class_names) if i not in cfg.to_label and n.lower() not in BACKGROUND]
    if not cfg.to_label:
        raise BadRequest(
            422,
            f"label_config's {tag.tag} labels ({', '.join(labels) or 'none'}) match none of the "
            f"model's classes ({', '.join(class_names)}); name the labels as the classes",
        )
    return cfg


# ---- predictions -------------------------------------------------------------------------------------------
def segment(engine, image: np.ndarray):
    """(class ids uint8 H×W, top-class probability float32 H×W, mean entropy in nats) of one image, with the
    engine's own predictor (resize or tile, TTA): the same mask as `predict`."""
    import torch

    with torch.no_grad():
        p = engine.predictor(image, probs=True)[0].float()
        top, ids = p.max(0)
        entropy = float(-(p * p.clamp_min(1e-12).log()).sum(0).mean())
    return ids.to(torch.uint8).cpu().numpy(), top.cpu().numpy(), entropy


def prediction(
    mask: np.ndarray,
    top: np.ndarray,
    entropy: float,
    class_names: list[str],
    cfg: LabelConfig,
    model_version: str,
    min_area: int = 16,
) -> dict:
    """One Label Studio prediction: a region per class (brush) or per connected part (polygon), each with its
    mean top-class probability as score; the prediction's score is 1 - mean entropy / ln(classes)."""
    from ..labels.write import image_regions

    named = [cfg.to_label.get(i, "background") for i in range(len(class_names))]  # unmapped: no regions
    it = image_regions(Path("task"), mask, top, named, entropy, cfg.shapes, min_area)
    h, w = mask.shape
    result = []
    for k, r in enumerate(it.regions):
        base = {
            "id": f"r{k}",
            "from_name": cfg.from_name,
            "to_name": cfg.to_name,
            "type": cfg.kind,
            "original_width": w,
            "original_height": h,
            "image_rotation": 0,
            "score": round(r.score, 6),
        }
        if cfg.kind == "polygonlabels":
            pts = (r.polygons[0] * [100.0 / w, 100.0 / h]).round(4).tolist()
            result.append({**base, "value": {"points": pts, "closed": True, "polygonlabels": [r.label]}})
        else:
            rle = ls_rle_encode(coco_rle_decode(r.rle, h, w))
            result.append({**base, "value": {"format": "rle", "rle": rle, "brushlabels": [r.label]}})
    return {"result": result, "score": round(it.confidence, 6), "model_version": model_version}


# ---- task images -------------------------------------------------------------------------------------------
def image_ref(task, key: str) -> str:
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise BadRequest(422, "a task is not an object with a 'data' object")
    ref = task["data"].get(key)
    if not isinstance(ref, str) or not ref:
        raise BadRequest(
            422, f'task {task.get("id")}: data has no image under {key!r} (the config\'s <Image value="${key}">)'
        )
    return ref


def fetch(ref: str, host: str | None, token: str | None, max_bytes: int) -> bytes:
    """The bytes of a task's image: a data: URI, an http(s) URL, or a path on the Label Studio server
    (/data/upload/..., /data/local-files/?d=...) fetched from `host` with the project's token."""
    if ref.startswith("data:"):
        try:
            head, payload = ref.split(",", 1)
            data = (
                base64.b64decode(payload, validate=True)
                if head.endswith(";base64")
                else urllib.parse.unquote_to_bytes(payload)
            )
        except ValueError as exc:
            raise BadRequest(422, f"image data: URI does not decode ({exc})") from None
        if len(data) > max_bytes:
            raise BadRequest(413, f"image in the data: URI is over {max_bytes / 2**20:g} MiB (--max-upload-mb)")
        return data
    url = ref
    if ref.startswith("/"):
        if not host:
            raise BadRequest(
                422,
                f"image {ref} is a path on the Label Studio server, whose address is unknown: "
                "connect the backend in Label Studio (its /setup names it) or pass "
                "--label-studio-url",
            )
        url = host.rstrip("/") + ref
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise BadRequest(
            422,
            f"image {ref!r}: only http(s) URLs, data: URIs and Label Studio paths are fetched "
            f"(not {scheme or 'a bare name'}); use Label Studio's uploads or local files",
        )
    headers = {}
    if token and host and url.startswith(host.rstrip("/") + "/"):  # the token goes to Label Studio only
        headers["Authorization"] = f"Token {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=FETCH_TIMEOUT_S) as r:
            data = r.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise BadRequest(422, f"image {url} could not be fetched (HTTP {exc.code} {exc.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise BadRequest(422, f"image {url} could not be fetched ({getattr(exc, 'reason', exc)})") from None
    if len(data) > max_bytes:
        raise BadRequest(413, f"image {url} is over {max_bytes / 2**20:g} MiB (--max-upload-mb)")
    return data


# ---- annotations -------------------------------------------------------------------------------------------
def annotation_mask(results, class_names: list[str], h: int, w: int) -> tuple[np.ndarray, list[str]]:
    """(class-id mask h×w, problems) of an annotation's results: brush and polygon regions whose label names a
    model class (same rule as the config mapping), painted in order; other regions are named in `problems`."""
    from ..labels.raster import BadShape, polygons_rle

    by_name: dict[str | None, int] = {n: i for i, n in enumerate(class_names)}
    by_lower = {n.lower(): i for i, n in reversed(list(enumerate(class_names)))}
    mask, problems = np.zeros((h, w), np.uint8), []
    for r in results if isinstance(results, list) else []:
        kind = r.get("type") if isinstance(r, dict) else None
        if kind not in REGION_TAGS:
            continue
        v = r.get("value") or {}
        names = v.get(kind)
        label = names[0] if isinstance(names, list) and names else None
        k = by_name.get(label, by_lower.get(str(label).lower()))
        if k is None:
            problems.append(f"label {label!r} is not a model class")
            continue
        try:
            if kind == "brushlabels":
                region = ls_rle_decode(v.get("rle") or [], h, w)
            else:
                xy = np.asarray(v.get("points"), np.float64).reshape(-1, 2) * [w / 100.0, h / 100.0]
                region = coco_rle_decode(polygons_rle([xy], h, w)[0], h, w).astype(bool)
        except (RLEError, BadShape, TypeError, ValueError) as exc:
            problems.append(f"{kind} region {r.get('id')!r}: {exc}")
            continue
        mask[region] = k
    return mask, problems


def holdout_tasks(task_ids: list, fraction: float) -> set:
    """The held-out tasks: a task is held out by a hash of its id (so it stays held out in every round and is
    never trained on), at least one and never all of them."""
    ids = sorted(task_ids, key=str)
    if len(ids) < 2:
        return set()
    h = {t: int(hashlib.sha1(str(t).encode()).hexdigest()[:8], 16) / 2**32 for t in ids}
    out = {t for t in ids if h[t] < fraction}
    order = sorted(ids, key=lambda t: h[t])
    if not out:
        out = {order[0]}
    if len(out) == len(ids):
        out.discard(order[-1])
    return out


# ---- the retrain job (runs in its own process) ---------------------------------------------------------------
# Options of the served run kept for the fine-tune: what builds the model and how it trains, not its data,
# length or outputs.
_DROP = {
    "epochs",
    "iterations",
    "time_budget",
    "early_stop",
    "folds",
    "fold",
    "weights",
    "freeze_encoder",
    "resume",
    "run_dir",
    "checkpoint_every",
    "logger",
    "figure_samples",
    "device",
    "limit",
    "workers",
    "cache",
    "cache_max_side",
    "compile",
    "crop",
    "precise_bn",
}


def _train_overrides(ckpt: dict, job: dict, data: Path, run_dir: Path) -> dict:
    from ..training import config as C

    recorded = ckpt.get("config") or {}
    out = {
        k: v
        for k, v in recorded.items()
        if k in C.OPTIONS and k not in _DROP and C.OPTIONS[k].metadata["group"] != "data"
    }
    mc = ckpt.get("model_config") or {}
    out["model"] = mc.get("arch", out.get("model"))
    if mc.get("backbone"):
        out["backbone"] = mc["backbone"]
    out.update(
        {
            "dataset": "folder",
            "data_root": str(data),
            "image_size": recorded.get("image_size", job["image_size"]),
            "weights": job["checkpoint"],
            "freeze_encoder": "no",
            "time_budget": job["time_budget"],
            "run_dir": str(run_dir),
            "workers": 0,
            "cache": "memory",
            "figure_samples": 0,
            "logger": "none",
            "device": job.get("device", "auto"),
        }
    )
    if recorded.get("in_channels"):
        out["in_channels"] = recorded["in_channels"]
    return out


def miou(engine, pairs) -> float:
    """Mean IoU over the classes present in the labels of `pairs` [(image, mask)], one confusion matrix."""
    c = len(engine.info.class_names)
    conf = np.zeros((c, c), np.int64)
    for image, truth in pairs:
        pred = segment(engine, image)[0]
        conf += np.bincount(truth.astype(np.int64).ravel() * c + pred.ravel(), minlength=c * c).reshape(c, c)
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    present = conf.sum(1) > 0
    return float((inter[present] / np.maximum(union[present], 1)).mean()) if present.any() else 0.0


def run_job(round_dir: Path) -> dict:
    """Fetch the annotated tasks' images, paint their masks, fine-tune from the serving checkpoint on all but
    the held-out tasks within the time budget, score old and new on the held-out ones; writes result.json."""
    from PIL import Image

    from ..core.checkpoint import load_checkpoint
    from ..core.files import atomic_write_text
    from ..core.logs import logger as log
    from ..training.train import train
    from .serving import Engine, HTTPProblem, decode_upload

    t0 = time.time()
    job = json.loads((round_dir / "job.json").read_text())
    host, token = os.environ.get("PIXELSEG_LS_URL"), os.environ.get("PIXELSEG_LS_TOKEN")
    names = job["class_names"]
    data = round_dir / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "masks").mkdir(parents=True, exist_ok=True)
    pairs, skipped = {}, 0
    for rec in job["tasks"]:
        tid = rec["task_id"]
        try:
            raw = fetch(image_ref({"id": tid, "data": rec["data"]}, rec["image_key"]), host, token, job["max_bytes"])
            image = decode_upload(raw, job["max_pixels"], f"task {tid}'s image")
        except (BadRequest, HTTPProblem) as exc:
            log.warning("task %s left out of the fine-tune: %s", tid, exc.message)
            skipped += 1
            continue
        h, w = image.shape[:2]
        mask, problems = annotation_mask(rec["result"], names, h, w)
        for p in problems:
            log.warning("task %s: %s (region left out)", tid, p)
        pairs[tid] = (image, mask)
        Image.fromarray(image).save(data / "images" / f"task_{tid}.png")
        Image.fromarray(mask).save(data / "masks" / f"task_{tid}.png")
    held = holdout_tasks(list(pairs), job["holdout"])
    train_ids = [t for t in pairs if t not in held]
    if not held or not train_ids:
        raise PixelsegError(
            f"{len(pairs)} annotated task(s) with readable images: need at least 2 (one to train "
            f"on, one held out to judge the new model)"
        )
    # val = the training tasks again (links named fit_*: a pair belongs to one split): best.pt is picked by fit to
    # them, and the held-out tasks, never trained on nor used to pick, judge old against new
    for t in train_ids:
        for sub in ("images", "masks"):
            os.link(data / sub / f"task_{t}.png", data / sub / f"fit_{t}.png")
    with open(data / "classes.csv", "w", newline="") as f:  # the served model's classes, ids and names
        rows = csv.writer(f)
        rows.writerow(["id", "name", "r", "g", "b"])
        palette = job.get("palette") or [(k, k, k) for k in range(len(names))]
        rows.writerows([k, n, *palette[k]] for k, n in enumerate(names))
    (data / "train.txt").write_text("".join(f"task_{t}\n" for t in train_ids))
    (data / "val.txt").write_text("".join(f"fit_{t}\n" for t in train_ids))
    ckpt = load_checkpoint(job["checkpoint"])
    run_dir = round_dir / "run"
    train(_train_overrides(ckpt, job, data, run_dir))
    best = run_dir / "best.pt"
    if not best.is_file():
        raise PixelsegError(f"the fine-tune wrote no {best}")
    held_pairs = [pairs[t] for t in sorted(held, key=str)]
    old = miou(Engine(job["checkpoint"], device="cpu", precision="fp32"), held_pairs)
    new = miou(Engine(best, device="cpu", precision="fp32"), held_pairs)
    result = {
        "old_miou": round(old, 6),
        "new_miou": round(new, 6),
        "accepted": new >= old - 1e-9,
        "checkpoint": str(best),
        "train_tasks": len(train_ids),
        "holdout_tasks": len(held),
        "skipped_tasks": skipped,
        "wall_s": round(time.time() - t0, 1),
    }
    atomic_write_text(round_dir / "result.json", json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pixelseg.inference.lsml ROUND_DIR", file=sys.stderr)
        return 2
    try:
        r = run_job(Path(argv[0]))
    except PixelsegError as exc:
        print(f"retrain: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
