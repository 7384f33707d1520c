"""`pixelseg export` (ONNX, TorchScript) with parity checks, and predict --backend onnx."""
import json
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pixelseg.core.checkpoint import atomic_save, load_checkpoint
from pixelseg.cli import main
from pixelseg.core.errors import PixelsegError
from pixelseg.inference.export import check_parity, export, load_torchscript
from pixelseg.inference.loading import load_model
from pixelseg.models import create_model

onnx = pytest.importorskip("onnx", reason="onnx (a pixelseg dependency) not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime (a pixelseg dependency) not installed")

from _fakes import NEW_ARCHS, ONE_PER_ARCH, fake_checkpoint  # noqa: E402
from conftest import tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Photos of odd, different sizes: the export must be dynamic in H and W."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(37, 53), (64, 48), (90, 121)]):
        yy, xx = np.mgrid[:h, :w]
        img = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
        Image.fromarray(img).save(d / f"photo{i}.png")
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", *tiny_run(limit=8, epochs=1), "--run-dir", str(r)]) == 0
    return r


@pytest.fixture(scope="module")
def onnx_run(run, images, tmp_path_factory):
    """The run exported through the CLI: (file, what the command printed)."""
    import contextlib
    import io
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--check-images", str(images)]) == 0
    return out, buf.getvalue()


def _numbers(out: str):
    diff = float(re.search(r"max \|logit difference\| ([0-9.e+-]+)", out).group(1))
    agree = float(re.search(r"identical argmax on ([0-9.]+)%", out).group(1))
    return diff, agree


def test_onnx_export_prints_parity_and_is_dynamic(run, onnx_run):
    out, text = onnx_run
    diff, agree = _numbers(text)
    # the export's own gate is relative: |Δlogit| <= 1e-3 · max(1, |logit|); these logits stay below ~10
    assert agree >= 99.9 and diff < 1e-2 and "batch of 2" in text
    proto = onnx.load(str(out))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["pixelseg"])
    assert meta["dataset"]["class_names"] == ["background", "object", "edge"] and meta["image_size"] == [32, 32]
    # Independent parity at a size and batch the export never saw, straight through onnxruntime.
    model = load_model(load_checkpoint(run), torch.device("cpu"), fast=False)  # what export traced
    x = torch.rand(3, 3, 45, 70)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == ref.shape == (3, 3, 45, 70)
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, float(np.abs(ref).max()))
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.999


def test_predict_backend_onnx_matches_pytorch(run, onnx_run, images, tmp_path):
    onnx_file = onnx_run[0]
    # the export's H and W are dynamic, so multi-scale TTA runs on it as on the checkpoint
    assert main(["predict", str(onnx_file), str(images), "--out", str(tmp_path / "a"), "--backend", "onnx",
                 "--tta", "--tta-scales", "0.75,1,1.25"]) == 0
    assert main(["predict", str(run), str(images), "--out", str(tmp_path / "b"), "--precision", "fp32",
                 "--device", "cpu", "--tta", "--tta-scales", "0.75,1,1.25"]) == 0
    agree = total = 0
    for p in sorted(images.iterdir()):
        a = np.asarray(Image.open(tmp_path / "a" / f"{p.stem}.png"))
        b = np.asarray(Image.open(tmp_path / "b" / f"{p.stem}.png"))
        with Image.open(p) as src:
            assert a.shape == (src.size[1], src.size[0])
        agree, total = agree + (a == b).sum(), total + a.size
    assert agree / total >= 0.999


def test_torchscript_export_runs_at_other_sizes(run, images, tmp_path, capsys):
    out = tmp_path / "model.ts.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out), "--check-images",
                 str(images)]) == 0
    diff, agree = _numbers(capsys.readouterr().out)
    assert agree >= 99.9 and diff < 1e-3
    module, meta = load_torchscript(out)
    assert meta["model_config"]["arch"] == "unet"
    model = load_model(load_checkpoint(run), torch.device("cpu"), fast=False)  # what export traced
    x = torch.rand(2, 3, 41, 67)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), atol=1e-4, rtol=1e-4)


def test_deeplab_pooling_exports_to_onnx(tmp_path, images):
    """DeepLab's image pooling with dynamic sizes survives export (SegNet's unpooling - a scatter, since
    ONNX has no max_unpool - is exported, trained, in test_trained_segnet_exports_with_pooling_decisions_checked)."""
    ckpt = fake_checkpoint(tmp_path / "deeplabv3.pt", "deeplabv3", "mobilenet_v1")
    r = export(ckpt, "onnx", tmp_path / "deeplabv3.onnx", check_images=[images])
    assert r["ok"] and r["argmax_agreement"] >= 0.999 and (tmp_path / "deeplabv3.onnx").is_file()
    assert [s[2:] for s in r["inputs"][:3]] == [[37, 53], [64, 48], [90, 121]]


def test_non_exportable_model_fails_with_its_name_and_writes_nothing(tmp_path, images, monkeypatch):
    """PyTorch's own max_unpool2d does not trace (which is why SegNet hand-writes its unpooling)."""
    import pixelseg.models.segnet as segnet
    monkeypatch.setattr(segnet, "max_unpool2x2", lambda x, idx: F.max_unpool2d(x, idx, 2, 2))
    ckpt = fake_checkpoint(tmp_path / "segnet.pt", "segnet", "vgg16")
    for fmt in ("onnx", "torchscript"):
        out = tmp_path / f"segnet.{fmt}"
        with pytest.raises(PixelsegError, match=f"segnet/vgg16 cannot be exported to {fmt}: .*docs/export.md"):
            export(ckpt, fmt, out, check_images=[images])
        assert not out.exists() and not list(tmp_path.glob(".*.partial"))


def test_parity_failure_is_loud_and_keeps_nothing(run, images, tmp_path, monkeypatch):
    import pixelseg.inference.export as ex
    real = ex._export_torchscript

    def broken(model, example, path, meta):  # simulate an exporter that changes the numbers
        bad = create_model(**dict(load_checkpoint(run)["model_config"])).eval()
        real(bad, example, path, meta)

    monkeypatch.setattr(ex, "_export_torchscript", broken)
    out = tmp_path / "bad.pt"
    with pytest.raises(PixelsegError, match=r"disagrees with PyTorch .*max \|logit difference\|.*identical argmax"):
        export(run, "torchscript", out, check_images=[images], check_limit=1)
    assert not out.exists()


def test_check_parity_thresholds():
    ref = lambda x: torch.stack([x[:, 0], x[:, 1], x[:, 2]], 1) * 10  # noqa: E731
    inputs = [torch.rand(1, 3, 20, 30), torch.rand(2, 3, 8, 8)]
    assert check_parity(ref, lambda x: ref(x) + 1e-6, inputs)["ok"]
    flipped = check_parity(ref, lambda x: ref(x).flip(1), inputs)
    assert not flipped["ok"] and flipped["argmax_agreement"] < 0.999
    with pytest.raises(PixelsegError, match="not dynamic"):
        check_parity(ref, lambda x: ref(x)[..., :4], inputs)


def test_onnxruntime_missing_names_the_packages(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)     # import onnxruntime -> ImportError
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install onnx onnxruntime" in capsys.readouterr().err
    (tmp_path / "x.onnx").write_bytes(b"\0")
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    assert main(["predict", str(tmp_path / "x.onnx"), str(tmp_path / "i.png"), "--out", str(tmp_path / "o")]) == 2
    assert "pip install onnx onnxruntime" in capsys.readouterr().err


def test_backend_and_input_errors(run, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "i.png")
    assert main(["predict", str(run / "best.pt"), str(tmp_path / "i.png"), "--out", str(tmp_path / "o"),
                 "--backend", "onnx"]) == 2
    assert "pixelseg export" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["predict", str(tmp_path / "junk.onnx"), str(tmp_path / "i.png"), "--out", str(tmp_path / "o")]) == 2
    assert "not a loadable ONNX model" in capsys.readouterr().err
    ckpt = load_checkpoint(run / "best.pt")
    ckpt["config"] = dict(ckpt["config"], dataset="oxford-pet", data_root=None)
    atomic_save(ckpt, tmp_path / "pets.pt")
    assert main(["export", str(tmp_path / "pets.pt"), "--out", str(tmp_path / "p.onnx")]) == 2
    assert "--check-images" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("arch, backbone", __import__("pixelseg.models", fromlist=["list_models"]).list_models())
def test_every_model_exports_with_parity(arch, backbone, fmt, images, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "m.pt", arch, backbone, size=64)
    r = export(ckpt, fmt, tmp_path / f"m.{fmt}", check_images=[images], check_limit=2)
    assert r["ok"] and r["argmax_agreement"] >= 0.999


@pytest.fixture(scope="module")
def flat_images(tmp_path_factory):
    """Photos with flat regions (saturated white, a flat object, a black band): in a 2x2 window the values
    are then equal in exact arithmetic, and rounding decides the argmax."""
    d = tmp_path_factory.mktemp("flat")
    for i, (h, w) in enumerate([(37, 53), (64, 48), (90, 121)]):
        img = np.full((h, w, 3), 255, np.uint8)
        img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = (200, 80, 60)
        img[: h // 5] = 0
        Image.fromarray(img).save(d / f"flat{i}.png")
    return d


def test_trained_segnet_exports_with_pooling_decisions_checked(tmp_path, flat_images):
    """A briefly trained SegNet on photos with flat regions: the plain max-difference gate failed here
    (0.04 against a 0.003 tolerance) because PyTorch and onnxruntime break rounding-level ties between
    maxima differently. Parity is now checked with PyTorch following the file's pooling decisions."""
    run = tmp_path / "run"
    assert main(["train", *tiny_run(model="segnet", limit=8, epochs=1, lr=0.01), "--run-dir", str(run)]) == 0
    r = export(run, "onnx", tmp_path / "segnet.onnx", check_images=[flat_images])
    assert r["ok"] and r["max_abs_diff"] <= 1e-4 and r["pool_decisions"] > 0 and r["pool_gap"] <= 1e-5
    assert [s[2:] for s in r["inputs"][:3]] == [[37, 53], [64, 48], [90, 121]]   # dynamic H and W
    # independently: the file against plain PyTorch, argmax over every pixel of the check images
    model = load_model(load_checkpoint(run), torch.device("cpu"), fast=False)
    sess = ort.InferenceSession(str(tmp_path / "segnet.onnx"), providers=["CPUExecutionProvider"])
    for p in sorted(flat_images.iterdir()):
        x = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
        assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.999


def test_pooling_decisions_that_are_not_ties_fail_the_check(tmp_path, images, monkeypatch):
    """The routed check must not excuse a graph whose argmax is wrong: shift every index by one column."""
    import pixelseg.inference.export as ex
    ckpt = fake_checkpoint(tmp_path / "segnet.pt", "segnet", "vgg16")
    real = ex._probe_with_indices

    def shifted(path, probe_path):
        session, n = real(path, probe_path)

        class Shifted:
            def get_inputs(self):
                return session.get_inputs()

            def run(self, names, feed):
                out = session.run(names, feed)
                return [out[0]] + [i ^ 1 for i in out[1:]]   # the other column of each 2x2 window
        return Shifted(), n
    monkeypatch.setattr(ex, "_probe_with_indices", shifted)
    with pytest.raises(PixelsegError, match="NOT tied"):
        export(ckpt, "onnx", tmp_path / "s.onnx", check_images=[images])
    assert not (tmp_path / "s.onnx").exists()


# ---- ONNX parity of the models themselves (this file is the one place for ONNX parity) -----------------
@pytest.mark.parametrize(
    "arch", ["segnet", pytest.param("unet", marks=pytest.mark.slow),
             pytest.param("fcn8s", marks=pytest.mark.slow),
             pytest.param("deeplabv3", marks=pytest.mark.slow)]
)
def test_onnx_export_with_dynamic_size(arch, tmp_path):
    torch.manual_seed(0)
    backbone, opts = ONE_PER_ARCH[arch]
    model = create_model(arch, backbone, num_classes=5, **opts).eval()
    if arch == "fcn8s":  # zero-initialised score layers would make the comparison vacuous
        model = create_model("fcn8s", "vgg16", num_classes=5, head_channels=64).eval()
        with torch.no_grad():
            for conv in [model.head[-1], *model.score_skip]:
                conv.weight.normal_(0, 0.01)
    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 64, 96),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    session = ort.InferenceSession(str(path))
    x = torch.rand(2, 3, 50, 75)  # another batch and a size that needs padding
    (y,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    assert y.shape == ref.shape == (2, 5, 50, 75)
    assert np.abs(y - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


# ONNX parity for every new architecture; the two with export-specific code paths (PSPNet's
# adaptive pooling, SegFormer's transformers encoder) run by default, the rest with --runslow.
@pytest.mark.parametrize("arch", [a if a in ("pspnet", "segformer") else pytest.param(a, marks=pytest.mark.slow)
                                  for a in NEW_ARCHS])
def test_new_arch_exports_to_onnx_with_parity(arch, tmp_path):
    if arch == "segformer":
        pytest.importorskip("transformers", reason="pixelseg[segformer] extra not installed")
    backbone, opts = NEW_ARCHS[arch]
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(37, 53), (90, 71)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"p{i}.png")
    ckpt = fake_checkpoint(tmp_path / "m.pt", arch, backbone, size=64, **opts)
    r = export(ckpt, "onnx", tmp_path / "m.onnx", check_images=[images])
    assert r["ok"] and r["argmax_agreement"] >= 0.999 and (tmp_path / "m.onnx").is_file()
    assert [s[2:] for s in r["inputs"][:2]] == [[37, 53], [90, 71]]
