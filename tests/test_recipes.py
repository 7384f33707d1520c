"""Recipes in configs/: they parse, cite a source, reject bad keys/types in one line, and (slow) each
starts and finishes one short training step on a fake tree of its dataset."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pixelseg.cli import main
from pixelseg.training.config import read_yaml
from pixelseg.core.errors import PixelsegError
from conftest import tiny_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_every_recipe_parses_and_cites_a_source():
    assert {p.stem for p in RECIPES} >= {"pets_tutorial", "segnet_camvid", "bayesian_segnet_camvid",
                                         "deeplabv3_resnet101_voc", "deeplabv3_resnet101_cityscapes", "fcn8s_voc",
                                         "unet_folder"}
    for path in RECIPES:
        raw = yaml.safe_load(path.read_text())
        assert isinstance(raw.get("source"), str) and len(raw["source"]) > 10, path.name
        cfg = read_yaml(path)
        assert "source" not in cfg and cfg["dataset"] and cfg["model"]


def test_published_settings_are_the_ones_the_issue_names():
    voc = read_yaml(CONFIGS / "deeplabv3_resnet101_voc.yaml")
    assert (voc["backbone"], voc["output_stride"], voc["image_size"], voc["batch_size"], voc["schedule"],
            voc["train_split"], voc["crop"]) == ("resnet101", 16, 513, 16, "poly", "train_aug", True)
    city = read_yaml(CONFIGS / "deeplabv3_resnet101_cityscapes.yaml")
    assert city["output_stride"] == 8 and city["crop"] is True and city["iterations"] == 80000
    for name in ("segnet_camvid", "bayesian_segnet_camvid"):
        c = read_yaml(CONFIGS / f"{name}.yaml")
        assert c["image_size"] == "360x480" and c["class_weighting"] == "median"


def test_unknown_key_names_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: unet\nlearning_rate: 0.1\n")
    rc = main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(bad) in err and "learning_rate" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,key,expected", [
    ("epochs: ten\n", "epochs", "expected int, got str"),
    ("lr: fast\n", "lr", "expected float, got str"),
    ("hflip: 1\n", "hflip", "expected bool, got int"),
    ("iterations: 1.5\n", "iterations", "expected int, got float"),
    ("batch_size: true\n", "batch_size", "expected int, got bool"),
    ("model: [unet]\n", "model", "expected str, got list"),
])
def test_wrong_type_names_file_and_key(tmp_path, capsys, text, key, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    rc = main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{bad}: {key}: {expected}" in err
    assert not (tmp_path / "run").exists()


def test_exponent_floats_without_dot_are_accepted(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("weight_decay: 5e-4\nlr: 1e-2\n")  # PyYAML reads these as strings
    assert read_yaml(cfg) == {"weight_decay": 5e-4, "lr": 1e-2}


def test_iterations_stop_mid_epoch_and_schedule_spans_them(tmp_path):
    run = tmp_path / "run"
    rc = main(["train", *tiny_run(model="unet", backbone="mobilenet_v2", batch_size=4, iterations=3, epochs=50,
                                  schedule="poly", precise_bn=0, figure_samples=0, limit=24, run_dir=run, device="cpu")])
    assert rc == 0
    ck = __import__("torch").load(run / "last.pt", weights_only=True)
    hist = json.loads((run / "metrics.json").read_text())
    assert ck["global_step"] == 3 and len(hist) == 1       # 3 steps, inside the first epoch
    assert hist[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # poly reached its end at step 3, not at epoch 50


# ---- slow: each recipe runs one step on a fake tree of its dataset ---------------------------------------
def _camvid(root: Path):
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(4):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(
                root / split / f"f{i}.png")
            m = np.zeros((36, 48), np.uint8)
            m[:12], m[12:24], m[24:] = 0, 3, 8 + i % 4
            Image.fromarray(m).save(root / f"{split}annot" / f"f{i}.png")
    return root


def _pets(root: Path):
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    names = [f"Abyssinian_{i}" for i in range(1, 7)]
    for i, n in enumerate(names):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            root / "images" / f"{n}.jpg")
        m = np.full((40, 40), 2, np.uint8)
        m[10:30, 10:30], m[10, 10:30] = 1, 3
        Image.fromarray(m).save(root / "annotations" / "trimaps" / f"{n}.png")
    (root / "annotations" / "trainval.txt").write_text("".join(f"{n} 1 1 1\n" for n in names[:4]))
    (root / "annotations" / "test.txt").write_text("".join(f"{n} 1 1 1\n" for n in names[4:]))
    return root


def _folder(root: Path):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            root / "images" / f"im{i}.png")
        m = np.zeros((40, 40), np.uint8)
        m[:, 20:] = 1
        Image.fromarray(m).save(root / "masks" / f"im{i}.png")
    return root


def _fake_root(dataset: str, root: Path) -> Path:
    from tests.test_benchmark_datasets import _city_tree, _voc_tree
    return {"camvid": _camvid, "oxford-pet": _pets, "folder": _folder, "voc": _voc_tree,
            "cityscapes": _city_tree}[dataset](root)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [p.name for p in RECIPES])
def test_recipe_runs_one_step(tmp_path, recipe):
    cfg = read_yaml(CONFIGS / recipe)
    root = _fake_root(cfg["dataset"], tmp_path / "data")
    run = tmp_path / "run"
    rc = main(["train", "--config", str(CONFIGS / recipe), *tiny_run(dataset=None, data_root=root, iterations=1,
               batch_size=2, image_size=64, limit=4, precise_bn=0, cache="memory", device="cpu", run_dir=run)])
    assert rc == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("model", "optimizer", "lr", "schedule", "loss", "class_weighting", "output_stride"):
        if key in cfg:
            assert saved[key] == cfg[key], key          # the recipe's own settings were used
    hist = json.loads((run / "metrics.json").read_text())
    assert len(hist) == 1 and np.isfinite(hist[0]["train_loss"]) and 0 <= hist[0]["val_miou"] <= 1
