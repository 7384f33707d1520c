"""Where encoder ImageNet weights come from, and loading a model from a state-dict file.

Nothing is fetched behind the user's back by torchvision or timm: the official file is
looked up in the torch-hub cache (``torch.hub.get_dir()/checkpoints``, where torchvision
itself caches it), then fetched with pixelseg's own downloader, and if that fails the error
says exactly which file to put where.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torchvision
from torch import nn

from pixelseg.errors import PixelsegError

from .backbones import BackboneSpec


def imagenet_source(spec: BackboneSpec) -> tuple[str, str]:
    """``(url, file name in the hub cache)`` of the backbone's ImageNet weights."""
    if spec.source == "transformers":
        from .mit import HUB_FILENAME, HUB_IDS

        hub_id = HUB_IDS[spec.library_name]
        return (f"https://huggingface.co/{hub_id}/resolve/main/{HUB_FILENAME}",
                hub_id.replace("/", "--") + "--" + HUB_FILENAME)
    if spec.source == "torchvision":
        url = torchvision.models.get_model_weights(spec.library_name).DEFAULT.url
        # Same name torchvision's load_state_dict_from_url uses, so both share the cache.
        return url, os.path.basename(urlparse(url).path)
    cfg = timm.get_pretrained_cfg(spec.library_name)
    if cfg.hf_hub_id:
        filename = cfg.hf_hub_filename or "model.safetensors"
        url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{filename}"
        # The hub file is always called model.safetensors: prefix the repo id so the
        # cache can hold several.
        local = cfg.hf_hub_id.replace("/", "--") + "--" + filename
        return url, local
    if cfg.url:
        return cfg.url, os.path.basename(urlparse(cfg.url).path)
    raise PixelsegError(
        f"backbone {spec.name!r} ({spec.source} {spec.library_name}) has no published ImageNet "
        "weights; use --weights none (random init) or a state-dict file"
    )


def _download(url: str, dest: Path) -> Path:
    """Fetch with pixelseg's downloader (kept separate so tests can replace it)."""
    from pixelseg.data.download import download_file

    return download_file(url, dest, md5=None)


def imagenet_file(spec: BackboneSpec) -> Path:
    """Local path of the backbone's ImageNet weights, downloading them if possible."""
    url, filename = imagenet_source(spec)
    dest = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if dest.is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _download(url, dest)
    except (PixelsegError, OSError, ImportError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PixelsegError(
            f"ImageNet weights for backbone {spec.name!r} are not available ({reason}): "
            f"download {url} and save it as {dest}, or use --weights none"
        ) from None
    if not dest.is_file():
        raise PixelsegError(
            f"download of {url} did not produce {dest}; save the file there by hand, "
            "or use --weights none"
        )
    return dest


def _unwrap(obj):
    """Accept a bare state dict or a training checkpoint holding one."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj


def load_state_dict_file(model: nn.Module, path) -> None:
    """Load a whole-model state dict; explain in one line why it does not fit."""
    path = Path(path)
    if not path.is_file():
        raise PixelsegError(
            f"weights file {path} does not exist; pass --weights imagenet, none, or an "
            "existing state-dict file"
        )
    try:
        state = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # corrupt file, pickle with arbitrary objects, not a torch file
        raise PixelsegError(
            f"weights file {path} is not a readable PyTorch state dict "
            f"({type(exc).__name__}); save it with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise PixelsegError(
            f"weights file {path} does not hold a state dict (name -> tensor); "
            "save it with torch.save(model.state_dict(), path)"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        what = getattr(model, "config", {})
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs "
                f"model {tuple(own[k].shape)})"
            )
        raise PixelsegError(
            f"weights file {path} does not fit model "
            f"{what.get('arch')}/{what.get('backbone')} with num_classes={what.get('num_classes')}: "
            + "; ".join(parts)
            + " - check --model/--backbone and the dataset (its number of classes) match the run that saved it"
        )
    model.load_state_dict(state)
