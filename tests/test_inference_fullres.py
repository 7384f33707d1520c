"""Full-resolution inference: sliding window, flip TTA, resize-and-restore, evaluate --full-res / predict."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelseg.cli import main
from pixelseg.core.errors import PixelsegError
from pixelseg.inference.evaluate import evaluate
from pixelseg.inference.predict import predict
from pixelseg.inference.runner import tile_size
from pixelseg.inference.tiling import (TTA, Predictor, TTAModel, parse_scales, sliding_window, tta_fn,
                                       window_starts)
from conftest import tiny_run


def pixelwise_fn(num_classes=4, seed=0):
    """A 1×1 convolution: each output pixel depends on its input pixel only, so any tiling must give
    exactly the untiled answer (an independent oracle for the blending arithmetic)."""
    conv = torch.nn.Conv2d(3, num_classes, 1)
    torch.manual_seed(seed)
    torch.nn.init.normal_(conv.weight, std=3.0)
    return conv.eval().requires_grad_(False)


@pytest.mark.parametrize("length, window, overlap", [(100, 32, 0.25), (97, 32, 0.5), (64, 64, 0.25), (20, 32, 0.25),
                                                     (1000, 128, 0.0)])
def test_window_starts_cover_everything_once_flush(length, window, overlap):
    starts = window_starts(length, window, overlap)
    covered = np.zeros(length, int)
    w = min(window, length)
    for s in starts:
        covered[s: s + w] += 1
    assert covered.min() >= 1                                  # every pixel seen
    assert starts[0] == 0 and starts[-1] + w == length         # first at 0, last flush with the edge
    stride = max(1, int(w * (1 - overlap)))
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # never a gap larger than the stride


@pytest.mark.parametrize("window, overlap", [((32, 32), 0.25), ((48, 40), 0.5), ((200, 200), 0.25)])
def test_sliding_window_equals_one_pass_for_a_pixelwise_model(window, overlap):
    fn = pixelwise_fn()
    x = torch.rand(1, 3, 75, 101)
    with torch.no_grad():
        expected = fn(x).softmax(1)
        got = sliding_window(fn, x, window, overlap, batch_size=3)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(1, 75, 101), atol=1e-5, rtol=0)


def test_sliding_window_never_runs_more_than_a_batch_of_windows_on_a_big_photo():
    seen = []

    def fn(x):
        seen.append(tuple(x.shape))
        return torch.stack([x[:, 0], 1 - x[:, 0]], 1)  # 2 classes: "bright red" vs not

    x = torch.zeros(1, 3, 3000, 4000)
    x[:, 0, :, 2000:] = 1.0
    probs = sliding_window(fn, x, (512, 512), 0.25, batch_size=4)
    assert probs.shape == (1, 2, 3000, 4000)
    assert max(s[0] for s in seen) <= 4 and all(s[2:] == (512, 512) for s in seen)
    pred = probs.argmax(1)[0]
    assert (pred[:, 2000:] == 0).all() and (pred[:, :2000] == 1).all()


def test_flip_tta_averages_the_mirrored_prediction():
    def fn(x):  # deliberately not flip-equivariant: favours class 0 on the left
        ramp = torch.linspace(1, -1, x.shape[-1]).expand(x.shape[0], 1, x.shape[-2], -1)
        return torch.cat([ramp * 3, torch.zeros_like(ramp)], 1)

    x = torch.rand(2, 3, 8, 10)
    p = fn(x).softmax(1)
    expected = (p + fn(x.flip(-1)).softmax(1).flip(-1)) / 2
    torch.testing.assert_close(tta_fn(fn, True)(x).softmax(1), expected)
    # a symmetric field: TTA makes left and right equally likely
    torch.testing.assert_close(expected[:, 0], torch.full_like(expected[:, 0], 0.5))
    conv = pixelwise_fn()
    with torch.no_grad():
        torch.testing.assert_close(TTAModel(conv)(x).softmax(1), conv(x).softmax(1), atol=1e-5, rtol=1e-5)


def test_multi_scale_tta_averages_each_scale_at_the_input_size():
    def fn(x):  # scale-dependent on purpose: class 1 only where the input is taller than 12 rows
        logit = torch.full((x.shape[0], 1, *x.shape[-2:]), 4.0 if x.shape[-2] > 12 else -4.0)
        return torch.cat([torch.zeros_like(logit), logit], 1)

    x = torch.rand(2, 3, 8, 10)
    out = tta_fn(fn, TTA(scales=(1.0, 2.0)))(x)
    assert out.shape == (2, 2, 8, 10)                       # back at the input's size
    p_small, p_big = torch.tensor([0.0, -4.0]).softmax(0), torch.tensor([0.0, 4.0]).softmax(0)
    expected = (p_small + p_big) / 2
    torch.testing.assert_close(out.softmax(1)[0, :, 3, 4], expected)
    # the flip and the scales compose; no augmentation hands back fn itself
    both = tta_fn(fn, TTA(flip=True, scales=(1.0, 2.0)))(x).softmax(1)
    torch.testing.assert_close(both, out.softmax(1))        # fn ignores left/right, so the flip changes nothing
    assert tta_fn(fn, TTA()) is fn and tta_fn(fn, False) is fn and not TTA() and TTA(scales=(1.0, 1.5))


def test_tta_scales_are_checked():
    assert parse_scales("1,1.25,1.5") == (1.0, 1.25, 1.5) and parse_scales(None) == (1.0,)
    for bad in ("1,x", "", "0,1", "1,9"):
        with pytest.raises(ValueError, match="--tta-scales"):
            parse_scales(bad)
    assert TTA(flip=True, scales=(1.0, 1.25)).tag() == "_tta_ms1-1.25"
    assert TTA(flip=True, scales=(1.0, 1.25)).describe() == "flip + scales 1, 1.25 TTA"


def test_predictor_with_scales_returns_probabilities_at_the_image_size():
    img = (np.random.default_rng(1).random((45, 61, 3)) * 255).astype(np.uint8)
    probs = Predictor(pixelwise_fn(3), (32, 32), tta=TTA(flip=True, scales=(0.75, 1.0, 1.5)))(img)
    assert probs.shape == (1, 3, 45, 61)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 45, 61))


def test_resize_mode_returns_the_input_size():
    fn = pixelwise_fn(3)
    img = (np.random.default_rng(0).random((123, 77, 3)) * 255).astype(np.uint8)
    pred = Predictor(fn, (32, 32))
    probs = pred(img)
    assert probs.shape == (1, 3, 123, 77)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 123, 77))
    # a flat-colour image gives the same answer whatever the resolution
    flat = np.full((50, 90, 3), 77, np.uint8)
    want = fn(torch.full((1, 3, 1, 1), 77 / 255)).softmax(1)
    torch.testing.assert_close(pred(flat), want.expand(1, 3, 50, 90), atol=1e-5, rtol=1e-5)
    # scores without the softmax: the same classes, and their softmax is the probabilities
    scores = pred(img, probs=False)
    torch.testing.assert_close(scores.softmax(1), probs)
    assert torch.equal(scores.max(1).indices, probs.max(1).indices)
    assert not torch.allclose(scores.sum(1), torch.ones(1, 123, 77))


def test_resize_mode_feeds_the_model_what_training_resize_feeds_it():
    """A uint8 photo reaches the model as PIL's antialiased resize of it (the training data path) would:
    resizing the [0, 1] floats instead is off by a quarter of a grey level on average."""
    seen = []

    def fn(x):
        seen.append(x)
        return pixelwise_fn(3)(x)
    rng = np.random.default_rng(1)
    img = (rng.random((47, 61, 3)) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(img).resize((300, 230), Image.BILINEAR))  # smooth, like a photo
    Predictor(fn, (32, 40))(img)
    pil = np.asarray(Image.fromarray(img).resize((40, 32), Image.BILINEAR, reducing_gap=None))
    want = torch.from_numpy(pil).permute(2, 0, 1)[None].float() / 255
    assert seen[0].shape == want.shape and seen[0].dtype == torch.float32
    assert (seen[0] - want).abs().max() <= 1 / 255 + 1e-6
    assert (seen[0] - want).abs().mean() < 0.05 / 255


def test_predictor_modes_and_descriptions():
    fn = pixelwise_fn()
    img = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    a = Predictor(fn, (32, 32))
    b = Predictor(fn, (32, 32), tile=(32, 32), tta=True)
    assert a(img).shape == b(img).shape == (1, 4, 70, 90)
    assert "resized to 32x32" in a.describe()
    assert "sliding window 32x32" in b.describe() and "flip TTA" in b.describe()


def test_predictor_batch_keeps_each_image_its_own_answer():
    """One forward pass for images of several sizes: the answers come back in the order given, each at
    its own size and equal to the image's own one-image pass (a mix-up between two same-size images fails)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    model.eval()
    from pixelseg.inference.tiling import torch_logits_fn
    fn = torch_logits_fn(model, torch.device("cpu"))
    rng = np.random.default_rng(0)
    shapes = [(40, 60), (33, 47), (40, 60), (32, 32), (33, 47), (40, 60)]
    images = [(rng.random((*hw, 3)) * 255).astype(np.uint8) for hw in shapes]
    pred = Predictor(fn, (32, 32))
    batched = pred.batch(images)
    assert [tuple(p.shape[-2:]) for p in batched] == shapes
    for img, got in zip(images, batched):
        torch.testing.assert_close(got, pred(img), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[2])  # same size, different photos, different answers
    floats = [rng.random((40, 60, 3), dtype=np.float32) for _ in range(2)]  # N-band inputs come as [0, 1]
    for img, got in zip(floats, pred.batch(floats)):
        torch.testing.assert_close(got, pred(img), atol=1e-6, rtol=1e-5)


def test_torch_logits_fn_hands_back_nchw_logits_from_a_channels_last_model():
    from pixelseg.inference.tiling import torch_logits_fn
    model = torch.nn.Conv2d(3, 4, 1).eval().to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 16, 16)
    out = torch_logits_fn(model, torch.device("cpu"))(x)
    assert out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("value, expected", [(None, None), (True, (64, 64)), ("", (64, 64)), ("128", (128, 128)),
                                             ("360x480", (360, 480))])
def test_tile_flag_values(value, expected):
    assert tile_size(value, (64, 64)) == expected


@pytest.mark.parametrize("value", ["big", "0", "4x4x4"])
def test_tile_flag_errors(value):
    with pytest.raises(PixelsegError, match="--tile"):
        tile_size(value, (64, 64))


# ---- end to end on a tiny run ---------------------------------------------------------------------
def _index_dataset(root: Path, n=10, seed=0):
    """Index masks (0 = background, 1 = square) on images of varied, non-square sizes."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        h, w = int(rng.integers(50, 90)), int(rng.integers(60, 120))
        m = np.zeros((h, w), np.uint8)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        m[y: y + h // 2, x: x + w // 2] = 1
        img = np.where(m[..., None] == 1, [220, 40, 40], [40, 40, 40]).astype(np.uint8)
        img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"p{i}.png")
        Image.fromarray(m).save(root / "masks" / f"p{i}.png")
    return root


@pytest.fixture(scope="module")
def fullres_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("fullres")
    data = _index_dataset(base / "data")
    run = base / "run"
    assert main(["train", *tiny_run(dataset="folder", data_root=data, limit=None, epochs=2, batch_size=4, lr=0.01,
                                    run_dir=run, val_fraction=0.3)]) == 0
    return run, data


def test_evaluate_full_res_matches_an_independent_score_of_the_predicted_masks(fullres_run, tmp_path):
    run, data = fullres_run
    res = evaluate(run, device="cpu", precision="fp32", full_res=True, progress=False, out_dir=tmp_path)
    assert res["full_res"] and "full resolution" in res["resolution"]
    assert Path(res["files"][0]).name == "eval_val_fullres.json" and Path(res["files"][0]).is_file()
    # Independent: predict the val images (same mode), then score the written PNGs against the original masks.
    val_names = [n for n in json.loads(Path(res["files"][0]).read_text())["per_class"]]
    assert val_names == ["class_0", "class_1"]
    from pixelseg.data.folder import discover
    val = discover(data, val_fraction=0.3).splits["val"]
    predict(run, [s.image for s in val], tmp_path / "pred", device="cpu", precision="fp32", progress=False)
    cm = np.zeros((2, 2), np.int64)
    for s in val:
        pred = np.asarray(Image.open(tmp_path / "pred" / f"{s.name}.png"))
        true = np.asarray(Image.open(s.mask))
        assert pred.shape == true.shape                     # full resolution, not 32×32
        np.add.at(cm, (true.ravel(), pred.ravel()), 1)
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    assert res["images"] == len(val)
    assert res["miou"] == pytest.approx(np.nanmean(iou), abs=1e-9)
    assert sum(map(sum, res["confusion_matrix"])) == sum(np.asarray(Image.open(s.mask)).size for s in val)


def test_evaluate_default_stays_at_training_resolution_and_says_so(fullres_run, tmp_path, capsys):
    run, _ = fullres_run
    assert main(["evaluate", str(run), "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "32x32 (training resolution)" in out and (tmp_path / "eval_val.json").is_file()
    assert main(["evaluate", str(run), "--device", "cpu", "--out", str(tmp_path), "--full-res", "--tile", "--tta"]) == 0
    out = capsys.readouterr().out
    assert "full resolution" in out and "sliding window 32x32" in out and "flip TTA" in out
    assert (tmp_path / "eval_val_fullres_tile_tta.json").is_file()
    assert (tmp_path / "confusion_val_fullres_tile_tta.png").is_file()
    assert (tmp_path / "eval_val.json").is_file()          # the training-resolution score is kept beside it
    assert main(["evaluate", str(run), "--device", "cpu", "--out", str(tmp_path), "--tta-scales", "1,1.5"]) == 0
    assert "scales 1, 1.5 TTA" in capsys.readouterr().out
    res = json.loads((tmp_path / "eval_val_ms1-1.5.json").read_text())
    assert res["tta_scales"] == [1.0, 1.5] and res["tta"] is False and 0 <= res["miou"] <= 1
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(run), "--device", "cpu", "--tta-scales", "1,0"])
    assert e.value.code == 2
    assert "every scale must be in (0, 4]" in capsys.readouterr().err


def test_bench_tta_times_every_setting_on_a_run(fullres_run, tmp_path):
    import subprocess
    import sys
    run, data = fullres_run
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "speed" / "bench_tta.py"
    out = tmp_path / "tta.json"
    r = subprocess.run([sys.executable, str(bench), str(run), "--images", str(data / "images"), "--limit", "2",
                        "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert list(res["ms_per_image"]) == ["none", "flip", "flip + 0.75,1,1.25", "flip + 1,1.25,1.5"]
    assert res["images"] == 2 and res["ratio"]["none"] == 1.0 and all(v > 0 for v in res["ms_per_image"].values())


def test_evaluate_tile_without_full_res_is_refused(fullres_run, capsys):
    run, _ = fullres_run
    assert main(["evaluate", str(run), "--device", "cpu", "--tile"]) == 2
    assert "--tile needs --full-res" in capsys.readouterr().err


def test_predict_tiled_with_tta_writes_full_size_masks(fullres_run, tmp_path, capsys):
    run, data = fullres_run
    big = np.asarray(Image.open(data / "images" / "p0.png").resize((160, 120)))
    Image.fromarray(big).save(tmp_path / "big.png")
    assert main(["predict", str(run), str(tmp_path / "big.png"), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--tile", "--tta"]) == 0
    assert "sliding window 32x32" in capsys.readouterr().out
    with Image.open(tmp_path / "o" / "big.png") as m:
        assert m.size == (160, 120) and m.mode == "P"


def test_mc_samples_cannot_be_tiled(fullres_run, tmp_path, capsys):
    run, data = fullres_run
    assert main(["predict", str(run), str(data / "images" / "p0.png"), "--out", str(tmp_path), "--device", "cpu",
                 "--mc-samples", "4", "--tile"]) == 2
    assert "--mc-samples" in capsys.readouterr().err


def test_pets_full_resolution_targets_match_the_raw_trimaps(pets_root):
    """evaluate --full-res on pets: original sizes, trimap 1/2/3 -> 0/1/2 (checked against the raw PNGs)."""
    from pixelseg.data import iter_full_res
    n = 0
    for name, img, target in iter_full_res("oxford-pet", pets_root, "test", (64, 64), limit=3):
        raw = np.asarray(Image.open(pets_root / "annotations" / "trimaps" / f"{name}.png"))
        assert img.shape[:2] == raw.shape == target.shape
        assert np.array_equal(target, raw - 1)
        n += 1
    assert n == 3
