"""Getting a runnable model back: a checkpoint rebuilt under PyTorch, or a file from `pixelseg export`
under onnxruntime / TorchScript. Imported by inference, export and serving; imports none of them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..core.errors import PixelsegError
from ..core.sizes import size_hw
from ..data import DatasetInfo
from ..models import create_model
from ..models.rewrites import prepare_for_inference

METADATA_KEY = "pixelseg"
# onnx and onnxruntime are core dependencies; this is for installs that dropped them (e.g. no wheel for the platform)
ONNX_HINT = "pip install onnx onnxruntime (pixelseg's own dependencies; was the install incomplete?)"


def load_model(
    ckpt: dict,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = True,
    fast: bool = True,
):
    """Rebuild the architecture from the checkpoint's own config and load its weights, in eval mode.

    ``fast`` applies ``rewrites.prepare_for_inference`` (fused BatchNorm, channels_last, bf16
    weights under bf16 autocast); export passes ``fast=False`` to get the plain module. A `train --folds`
    run dir (its checkpoint dict has ``members``, checkpoint.load_ensemble) becomes the Ensemble of its folds."""
    if "members" in ckpt:
        return Ensemble([load_model(m, device, amp_dtype, channels_last, fast) for m in ckpt["members"]]).eval()
    arch = {**ckpt["model_config"], "weights": None}  # the checkpoint holds the weights
    model = create_model(**arch)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise PixelsegError(
            f"{ckpt['path']}: weights do not fit {arch.get('arch')}/{arch.get('backbone')} with "
            f"{arch.get('num_classes')} classes ({first}); was the file edited or produced by "
            "another tool?"
        ) from exc
    model.to(device).eval()
    return prepare_for_inference(model, amp_dtype, channels_last) if fast else model


class Ensemble(torch.nn.Module):
    """Several models of one task as one: log of the mean of their softmax. Returned as log-probabilities
    so that every consumer of logits (argmax, softmax, the tiling Predictor) works unchanged, and
    ``softmax(ensemble(x))`` is exactly the members' mean probability."""

    def __init__(self, members):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def input_size(ckpt: dict) -> tuple[int, int]:
    return size_hw(ckpt["config"].get("image_size", 128), f"{ckpt.get('path', 'checkpoint')}: image_size")


def model_channels(ckpt_or_meta: dict) -> int:
    """Input channels of the checkpoint's (or an export's metadata's) model; 3 for older files."""
    return int(ckpt_or_meta["model_config"].get("in_channels", 3))


def recorded_data_root(ckpt: dict, fix: str = "pass --data-root PATH") -> str | None:
    """The run's own data_root, checked here so that a wrong one is blamed on the recording, not on a
    --data-root flag the user never typed (runs before 0.2 recorded it relative to where they ran)."""
    root = ckpt["config"].get("data_root")
    if root is not None and "://" not in root and not Path(root).is_dir():  # URLs: checked when read
        where = "" if Path(root).is_absolute() else f" (a relative path, looked up from {Path.cwd()})"
        raise PixelsegError(
            f"{ckpt['path']}: the data_root recorded with this run, {root}, is not a directory"
            f"{where}; the data has moved or the run was made elsewhere: {fix}"
        )
    return root


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise PixelsegError(f"onnxruntime is not installed; {ONNX_HINT}") from None
    return onnxruntime


class OnnxModel:
    """An exported .onnx file under onnxruntime, callable like the model: float [0,1] N×3×H×W -> logits."""

    def __init__(self, path, device: str | torch.device = "cpu"):
        ort = require_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise PixelsegError(f"{path}: ONNX file not found")
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise PixelsegError(f"{path}: not a loadable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.metadata = json.loads(raw) if raw else None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0]).to(x.device)

    def eval(self):  # stands where a torch model would (evaluate --exported)
        return self


def load_torchscript(path) -> tuple[torch.jit.ScriptModule, dict | None]:
    files = {f"{METADATA_KEY}.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    raw = files[f"{METADATA_KEY}.json"]
    return module.eval(), (json.loads(raw) if raw else None)


def load_onnx_predictor_parts(path, device="cpu") -> tuple[OnnxModel, DatasetInfo, tuple[int, int]]:
    """(callable, DatasetInfo, training size) from a file written by `pixelseg export`."""
    model = OnnxModel(path, device)
    if not model.metadata:
        raise PixelsegError(
            f"{path}: no pixelseg metadata (class names, training size) in this ONNX file; "
            "export it with `pixelseg export CKPT --format onnx`"
        )
    meta = model.metadata
    return model, DatasetInfo.from_dict(meta["dataset"]), tuple(meta["image_size"])
