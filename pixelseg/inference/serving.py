"""What `pixelseg serve` runs behind HTTP: one loaded model, uploads decoded under limits, and the
response encodings (class-id PNG, palette PNG, JSON, COCO RLE). No web framework in here, so the
pieces are testable on their own and `predict` and the server share the model code.

The model is loaded with the same calls as `pixelseg predict` (checkpoint -> `load_model` ->
`torch_logits_fn`, or an exported .onnx under onnxruntime) and run through the same `Predictor`
(resize-and-restore, sliding window, flip TTA), and uploads are decoded with the same
`to_rgb_array` as image files, so a served mask equals the one `predict` writes, pixel for pixel.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..core import viz
from ..core.errors import PixelsegError
from ..core.files import file_sha256
from ..core.metrics import class_ids
from ..data.io import UnreadableImage, decode_jpeg_fast, exif_orientation, to_rgb_array, upright
from ..labels.rle import coco_rle_encode

FORMATS = ("png", "color", "json", "rle")
# zlib level of the PNGs the server sends: 1 encodes a mask several times faster than PIL's default 6 (measured
# side by side: docs/benchmarks.md, "Numbers behind choices in the code"), and a class-id mask is mostly long runs,
# so the file grows little.
FAST_PNG = 1
# Formats PIL decodes that people upload; anything else PIL might open (EPS via ghostscript, PSD, ...) is 415.
IMAGE_FORMATS = {"JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "MPO"}


class HTTPProblem(Exception):
    """A request the server refuses: HTTP status + one line saying what was wrong and what to do."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def decode_upload(data: bytes, max_pixels: int, name: str = "upload", exif_transpose: bool = True) -> np.ndarray:
    """Uploaded bytes -> RGB uint8 H×W×3, refusing non-images (415), images over `max_pixels` (413,
    checked from the header before any pixel is decoded, so decompression bombs cost nothing) and
    truncated or corrupt data (400). `exif_transpose`: turned upright as the EXIF Orientation tag
    says, as `predict` does by default (the server's --keep-exif-grid / ?keep_exif_grid=true turn it off)."""
    if not data:
        raise HTTPProblem(422, f"{name} is empty: send the image bytes as the body or as the multipart field 'file'")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise HTTPProblem(413, f"{name}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise HTTPProblem(
            415, f"{name} is not an image format the server reads (JPEG, PNG, GIF, BMP, TIFF, WebP)"
        ) from None
    if img.format not in IMAGE_FORMATS:
        raise HTTPProblem(
            415, f"{name} is {img.format}, not an image format the server reads (JPEG, PNG, GIF, BMP, TIFF, WebP)"
        )
    w, h = img.size
    if w * h > max_pixels:
        raise HTTPProblem(
            413,
            f"{name} is {w}x{h} = {w * h / 1e6:.1f} MP, over the server's limit of "
            f"{max_pixels / 1e6:.1f} MP (--max-pixels); downscale it first",
        )
    turn = exif_transpose and exif_orientation(img) != 1
    try:
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            # the decoder `predict` uses for JPEGs (torchvision, bit-identical to PIL and faster); None: PIL
            out = decode_jpeg_fast(io.BytesIO(data), turn)
            if out is not None:
                return out
        if img.format != "JPEG":
            img.load()
        return to_rgb_array(upright(img, name) if turn else img, name)
    except UnreadableImage as exc:
        raise HTTPProblem(400, f"{exc}; the file is truncated or corrupt") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise HTTPProblem(400, f"{name}: image data is truncated or corrupt ({exc})") from None


class Engine:
    """One model ready to segment uint8 RGB arrays; not thread-safe (the server runs it on one thread)."""

    def __init__(
        self,
        source,
        device: str = "auto",
        precision: str = "auto",
        tile=None,
        overlap: float = 0.25,
        tta=False,
        backend: str = "auto",
    ):
        from .runner import open_model

        runner = open_model(source, device, precision, tile, overlap, tta, backend)
        self.backend, self.device, self.path = runner.backend, runner.device, runner.source
        self.info, self.size, self.model_config = runner.info, runner.size, runner.model_config
        self.model, self.amp, self.predictor = runner.model, runner.amp, runner.predictor
        self.sha256 = file_sha256(self.path)
        self.mc_dropout = runner.mc_dropout
        arch, backbone = self.model_config.get("arch"), self.model_config.get("backbone")
        self.id = f"{arch}/{backbone}@{self.sha256[:12]}"

    def describe(self) -> dict:
        return {
            "id": self.id,
            "architecture": self.model_config.get("arch"),
            "backbone": self.model_config.get("backbone"),
            "backend": self.backend,
            "device": str(self.device),
            "precision": str(self.amp).replace("torch.", "") if self.amp else "fp32",
            "dataset": self.info.name,
            "classes": [
                {"id": i, "name": n, "color": list(c)}
                for i, (n, c) in enumerate(zip(self.info.class_names, self.info.palette, strict=False))
            ],
            "input_size": list(self.size),
            "mode": self.predictor.describe(),
            "mc_dropout": self.mc_dropout,
            "checkpoint": self.path.name,
            "checkpoint_sha256": self.sha256,
        }

    @torch.no_grad()
    def masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Class-id masks (uint8 H×W) for several images in one forward pass (resize mode)."""
        return [class_ids(p)[0].to(torch.uint8).cpu().numpy() for p in self.predictor.batch(images, probs=False)]

    @torch.no_grad()
    def mask(self, image: np.ndarray, mc_samples: int = 0) -> tuple[np.ndarray, dict | None]:
        """(class-id mask uint8 H×W, None) or, with `mc_samples`, (mask of the mean MC-dropout
        prediction, {"entropy": H×W, "variance": H×W} float32) — what `predict --mc-samples` computes."""
        if mc_samples:
            from .runner import mc_uncertainty

            probs, maps = mc_uncertainty(self.model, image, self.size, self.device, self.amp, mc_samples)
            return class_ids(probs)[0].to(torch.uint8).cpu().numpy(), {k: v.cpu().numpy() for k, v in maps.items()}
        return class_ids(self.predictor(image, probs=False))[0].to(torch.uint8).cpu().numpy(), None

    def warm_up(self, batch: int = 1, repeats: int = 2) -> float:
        """Run a few dummy images so the first real request does not pay for allocator/kernel set-up."""
        t0 = time.perf_counter()
        img = np.zeros((*self.size, 3), np.uint8)
        for _ in range(repeats):
            self.masks([img] * max(1, batch)) if batch > 1 else self.mask(img)
        return time.perf_counter() - t0


# ---- encodings --------------------------------------------------------------------------------------
def areas(mask: np.ndarray, class_names) -> dict:
    counts = np.bincount(mask.ravel(), minlength=len(class_names))
    return {n: float(counts[i] / mask.size) for i, n in enumerate(class_names)}


def encode(
    fmt: str, engine: Engine, mask: np.ndarray, maps: dict | None, timing: dict, exif_transposed: bool = True
) -> tuple[bytes, str]:
    """(body, media type) for one mask in format `fmt`; JSON says whether the photo was turned upright
    (EXIF), so a client draws the photo the same way before laying the mask over it."""
    info = engine.info
    if fmt == "png":
        return viz.png_bytes(mask, compress_level=FAST_PNG), "image/png"
    if fmt == "color":
        return viz.png_bytes(mask, info.palette, compress_level=FAST_PNG), "image/png"
    import json

    h, w = mask.shape
    classes = [
        {"id": i, "name": n, "color": list(c)}
        for i, (n, c) in enumerate(zip(info.class_names, info.palette, strict=False))
    ]
    body = {
        "model": engine.id,
        "width": w,
        "height": h,
        "classes": classes,
        "areas": areas(mask, info.class_names),
        "latency_ms": timing,
        "exif_transposed": exif_transposed,
    }
    if fmt == "json":
        body["mask_png"] = base64.b64encode(viz.png_bytes(mask, compress_level=FAST_PNG)).decode("ascii")
        if maps is not None:
            entropy = maps["entropy"]
            body["uncertainty"] = {
                "entropy_png": base64.b64encode(
                    viz.png_bytes(viz.heatmap_rgb(entropy, vmax=float(np.log(info.num_classes))))
                ).decode("ascii"),
                "colormap": "inferno, 0 to ln(classes) nats",
                "mean_entropy": float(entropy.mean()),
                "mean_variance": float(maps["variance"].mean()),
            }
    else:
        body["rle"] = [{"id": i, "name": n, "rle": coco_rle_encode(mask == i)} for i, n in enumerate(info.class_names)]
    return json.dumps(body).encode(), "application/json"


def check_source(source) -> None:
    if not Path(source).exists():
        raise PixelsegError(f"{source}: no such run directory, checkpoint or .onnx file")
