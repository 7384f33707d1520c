"""Multi-band and 16-bit inputs end to end: folder dataset of 4-band uint16 TIFFs (and 16-bit grey PNGs),
per-channel statistics from the training split stored in the checkpoint, evaluate/predict/export reading
them, and one-line errors for channel mismatches and unsupported TIFF sample formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from pixelseg.core.checkpoint import load_checkpoint
from pixelseg.cli import main
from pixelseg.data import load_split
from pixelseg.data.io import read_bands, read_input
from pixelseg.core.errors import PixelsegError
from conftest import tiny_run

H, W = 36, 40


def _scene(rng):
    m = np.zeros((H, W), np.uint8)
    y, x = rng.integers(0, H // 2), rng.integers(0, W // 2)
    m[y:y + 14, x:x + 14] = 1
    return m


def make_multiband(root, n=8, bands=4, planar=False, seed=0):
    """Band 3 ("NIR") carries the class, bands 0-2 are noise: only a model reading band 3 can learn it."""
    rng = np.random.default_rng(seed)
    for sub in ("train", "val"):
        (root / "images" / sub).mkdir(parents=True)
        (root / "masks" / sub).mkdir(parents=True)
    for i in range(n):
        sub = "val" if i % 4 == 0 else "train"
        m = _scene(rng)
        img = rng.integers(0, 4000, (H, W, bands)).astype(np.uint16)
        img[..., 3] = np.where(m == 1, 30000, 2000) + rng.integers(0, 500, (H, W))
        if planar:
            tifffile.imwrite(root / "images" / sub / f"t{i}.tif", np.moveaxis(img, -1, 0), photometric="minisblack",
                             planarconfig="separate")
        else:
            tifffile.imwrite(root / "images" / sub / f"t{i}.tif", img, photometric="minisblack",
                             planarconfig="contig")
        Image.fromarray(m).save(root / "masks" / sub / f"t{i}.png")
    (root / "classes.csv").write_text("id,name,r,g,b\n0,ground,0,0,0\n1,field,0,255,0\n")


@pytest.mark.parametrize("planar", [False, True])
def test_read_bands_tiff_layouts_and_16bit_png(tmp_path, planar):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 65535, (20, 30, 5)).astype(np.uint16)
    data = np.moveaxis(img, -1, 0) if planar else img
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack",
                     planarconfig="separate" if planar else "contig")
    got = read_bands(tmp_path / "a.tif")
    assert got.dtype == np.float32 and got.shape == (20, 30, 5)
    np.testing.assert_allclose(got, img / 65535.0, rtol=1e-6)
    assert read_bands(tmp_path / "a.tif", (10, 15)).shape == (10, 15, 5)
    grey = rng.integers(0, 65535, (12, 9)).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")  # 16-bit grey PNG
    np.testing.assert_allclose(read_bands(tmp_path / "g.png")[..., 0], grey / 65535.0, rtol=1e-6)


def test_bad_inputs_are_one_line(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((8, 8, 2), np.float64), photometric="minisblack")
    with pytest.raises(PixelsegError, match=r"f.tif: TIFF sample format float64 is not supported"):
        read_bands(tmp_path / "f.tif")
    tifffile.imwrite(tmp_path / "four.tif", np.zeros((8, 8, 4), np.uint16), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(PixelsegError, match=r"four.tif: image has 4 channel\(s\) but the model takes 6"):
        read_input(tmp_path / "four.tif", 6)
    with pytest.raises(PixelsegError, match=r"four.tif: image has 4 channel\(s\) but the model takes 3"):
        read_input(tmp_path / "four.tif", 3)
    with pytest.raises(PixelsegError, match="only --dataset folder"):
        load_split("synthetic", None, "train", 32, 4, channels=4)


def test_folder_dataset_reads_bands_and_mismatch_names_the_file(tmp_path):
    make_multiband(tmp_path, n=4)
    ds = load_split("folder", tmp_path, "train", (H, W), channels=4, use_cache=False)
    assert ds.images.dtype == np.float32 and ds.images.shape == (3, H, W, 4)
    assert 0 <= ds.images.min() and ds.images.max() <= 1
    with pytest.raises(PixelsegError, match=r"t\d.tif: image has 4 channel\(s\) but the model takes 13"):
        load_split("folder", tmp_path, "train", (H, W), channels=13, use_cache=False)


def test_train_evaluate_predict_export_with_four_bands(tmp_path, capsys):
    root, run = tmp_path / "data", tmp_path / "run"
    make_multiband(root, n=8)
    assert main(["train", *tiny_run(dataset="folder", data_root=root, limit=None, in_channels=4, rgb_bands="3,2,1",
                                    image_size="32x40", batch_size=4, epochs=2, run_dir=run, cache="memory")]) == 0
    ckpt = load_checkpoint(run / "best.pt")
    mc = ckpt["model_config"]
    assert mc["in_channels"] == 4 and len(mc["mean"]) == 4 and len(mc["std"]) == 4
    # statistics of the training split (6 images): band 3 is bright where the field is
    train = load_split("folder", root, "train", (32, 40), channels=4, use_cache=False).images
    np.testing.assert_allclose(mc["mean"], train.reshape(-1, 4).mean(0), rtol=1e-4)
    np.testing.assert_allclose(mc["std"], train.reshape(-1, 4).std(0), rtol=1e-3)
    assert (run / "figures" / "epoch_001.png").is_file()
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    assert json.loads((run / "eval_val.json").read_text())["images"] == 2
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(root / "images" / "val"), "--out", str(out)]) == 0
    overlay = np.asarray(Image.open(out / "t0_overlay.png"))
    assert overlay.shape[1:] == (W, 3) and overlay.shape[0] >= H  # the RGB view, plus a legend strip below
    assert np.asarray(Image.open(out / "t0.png")).shape == (H, W)
    onnx_out = tmp_path / "m.onnx"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx", "--out", str(onnx_out)]) == 0
    assert "identical argmax" in capsys.readouterr().out
    # predicting RGB photos with the 4-band model: one line naming the file and its channel count
    Image.new("RGB", (16, 16)).save(tmp_path / "photo.png")
    assert main(["predict", str(run), str(tmp_path / "photo.png"), "--out", str(tmp_path / "p2")]) == 2
    assert "photo.png: image has 3 channel(s) but the model takes 4" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists() or not list((tmp_path / "p2").iterdir())


def test_train_with_wrong_in_channels_stops_before_training(tmp_path, capsys):
    root = tmp_path / "data"
    make_multiband(root, n=4)
    assert main(["train", "--dataset", "folder", "--data-root", str(root), "--in-channels", "3", "--image-size",
                 "32", "--epochs", "1", "--weights", "none", "--run-dir", str(tmp_path / "r"), "--cache", "memory"]) == 2
    err = capsys.readouterr().err
    assert "image has 4 channel(s) but the model takes 3 (--in-channels 3)" in err
    assert not (tmp_path / "r" / "last.pt").exists()
