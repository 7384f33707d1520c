"""One way to open a model for inference — a checkpoint, a `--folds` run, an ONNX or OpenVINO export — into a
`Predictor` with its classes and input size: shared by evaluate, predict, audit and the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.checkpoint import load_checkpoint
from ..core.errors import PixelsegError
from ..core.runtime import autocast, resolve_precision, select_device, to_model_input
from ..core.sizes import size_hw
from ..data import DatasetInfo
from ..models.uncertainty import has_dropout
from .loading import input_size, load_model, load_onnx_predictor_parts, model_channels
from .tiling import Predictor, torch_logits_fn


@dataclass
class Runner:
    """A model opened for inference. `model`/`amp` are the PyTorch model and its autocast dtype (None for an
    export); `size` is the training input (h, w); `channels`/`bands` what the inputs must have."""

    source: Path
    backend: str
    device: torch.device
    predictor: Predictor
    info: DatasetInfo
    size: tuple[int, int]
    channels: int
    bands: list | None
    model_config: dict
    model: torch.nn.Module | None = None
    amp: torch.dtype | None = None
    logits_fn: object = field(default=None, repr=False)

    @property
    def mc_dropout(self) -> bool:
        """Whether Monte-Carlo dropout can sample this model (a PyTorch model with dropout layers)."""
        return self.model is not None and has_dropout(self.model)


def open_model(
    source, device="auto", precision="auto", tile=None, overlap: float = 0.25, tta=False, backend: str = "auto"
) -> Runner:
    """`source`: a checkpoint, a run directory (its best.pt, or a `--folds` run's ensemble), or an exported
    .onnx/.xml; `backend` auto picks by the suffix. Bad combinations fail in one line before any loading."""
    backend = resolve_backend(backend, source)
    dev = select_device(device)
    if backend in ("onnx", "openvino"):
        fn, info, size = exported_predictor_parts(backend)(source, dev)
        run_dev = dev if dev.type == "cuda" else torch.device("cpu")
        meta = fn.metadata
        return Runner(
            Path(source),
            getattr(fn, "backend", backend),
            dev,
            Predictor(fn, size, tile_size(tile, size), overlap, tta, device=run_dev),
            info,
            size,
            model_channels(meta),
            meta.get("rgb_bands"),
            dict(meta.get("model_config", {})),
            logits_fn=fn,
        )
    ckpt = load_checkpoint(source)
    amp = resolve_precision(precision, dev)
    size = input_size(ckpt)
    model = load_model(ckpt, dev, amp)
    fn = torch_logits_fn(model, dev, amp, True)
    predictor = Predictor(fn, size, tile_size(tile, size), overlap, tta, device=dev)
    return Runner(
        Path(ckpt["path"]),
        backend,
        dev,
        predictor,
        DatasetInfo.from_dict(ckpt["dataset"]),
        size,
        model_channels(ckpt),
        ckpt["config"].get("rgb_bands"),
        dict(ckpt["model_config"]),
        model,
        amp,
        fn,
    )


def tile_size(tile, train_size: tuple[int, int]) -> tuple[int, int] | None:
    """--tile: None (off), True/'' (windows of the training size) or N / 'HxW' (windows of that size)."""
    if tile is None or tile is False:
        return None
    if tile is True or tile == "":
        return train_size[0], train_size[1]  # a tuple, whatever sequence was given
    try:
        return size_hw(tile, "--tile")
    except PixelsegError:
        raise PixelsegError(
            f"--tile {tile}: give a window size in pixels (e.g. --tile 512 or --tile 360x480), "
            "at least 8, or --tile alone for the training size"
        ) from None


def resolve_backend(backend: str, path) -> str:
    suffix = Path(path).suffix.lower()
    if backend == "auto":
        return {".onnx": "onnx", ".xml": "openvino"}.get(suffix, "torch")
    if backend not in ("torch", "onnx", "openvino"):
        raise PixelsegError(f"--backend {backend!r}: choose auto, torch, onnx or openvino")
    if backend == "openvino" and suffix != ".xml":
        raise PixelsegError(
            f"--backend openvino runs an OpenVINO .xml file, and {path} is not one; create it with "
            f"`pixelseg export RUN --format openvino --out model.xml` and pass model.xml"
        )
    if backend == "onnx" and suffix != ".onnx":
        raise PixelsegError(
            f"--backend onnx runs an .onnx file, and {path} is not one; create it with "
            f"`pixelseg export {path} --format onnx --out model.onnx` and pass model.onnx"
        )
    if backend == "torch" and suffix in (".onnx", ".xml"):
        raise PixelsegError(
            f"{path}: an exported file needs --backend {'onnx' if suffix == '.onnx' else 'openvino'} (or auto)"
        )
    return backend


def exported_predictor_parts(backend: str):
    if backend == "openvino":
        from .openvino import load_openvino_predictor_parts

        return load_openvino_predictor_parts
    return load_onnx_predictor_parts


@torch.no_grad()
def mc_uncertainty(model, img: np.ndarray, size: tuple[int, int], dev, amp, samples: int):
    """MC-dropout at the training size, brought back to the image's H×W: (mean probabilities 1×C×H×W,
    {"entropy": H×W, "variance": H×W}). Shared by `predict --mc-samples` and `pixelseg serve`."""
    from ..models import mc_predict

    h, w = img.shape[:2]
    x = to_model_input(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None], dev, True)
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    with autocast(dev, amp):
        r = mc_predict(model, x, samples)
    probs = F.interpolate(r["mean"].float(), size=(h, w), mode="bilinear", align_corners=False)
    maps = {
        key: F.interpolate(r[key].float()[:, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        for key in ("entropy", "variance")
    }
    return probs, maps
