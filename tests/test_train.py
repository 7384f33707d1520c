"""End-to-end training on tiny data: run directory contents, repeatability, checkpoints, CLI errors."""
import json

import pytest
import torch
import yaml
from PIL import Image

from conftest import tiny_run
from pixelseg.core.checkpoint import atomic_save, load_checkpoint
from pixelseg.cli import main
from pixelseg.core.errors import PixelsegError

TINY = tiny_run(figure_samples=2)


def _train(tmp_path, name, *extra):
    run = tmp_path / name
    assert main(["train", *TINY, "--run-dir", str(run), *extra]) == 0
    return run


def test_run_directory_holds_everything(tmp_path):
    run = _train(tmp_path, "run", "--epochs", "2")
    for f in ("config.yaml", "metrics.csv", "metrics.json", "best.pt", "last.pt", "curves.png", "train.log",
              "summary.json", "figures/epoch_001.png", "figures/epoch_002.png"):
        assert (run / f).is_file(), f
    hist = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(0 <= h["val_miou"] <= 1 and h["train_loss"] > 0 for h in hist)
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 3
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("background", "object", "edge"):   # per-class IoU and Dice, as the README promises
        assert f"val_iou_{name}" in header and f"val_dice_{name}" in header
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["epochs"] == 2 and cfg["backbone"] == "mobilenet_v2" and cfg["weights"] is None
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["model_config"]["num_classes"] == 3
    assert ckpt["dataset"]["class_names"] == ["background", "object", "edge"]
    with Image.open(run / "figures" / "epoch_002.png") as im:
        assert im.size[0] > 300 and im.size[1] > 300
    log = (run / "train.log").read_text()
    assert "encoder trained" in log  # --freeze-encoder no (the default): the header line says so


def test_same_seed_same_weights(tmp_path):
    a = load_checkpoint(_train(tmp_path, "a", "--epochs", "1", "--seed", "3", "--deterministic") / "last.pt")
    b = load_checkpoint(_train(tmp_path, "b", "--epochs", "1", "--seed", "3", "--deterministic") / "last.pt")
    c = load_checkpoint(_train(tmp_path, "c", "--epochs", "1", "--seed", "4", "--deterministic") / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"] if a["model"][k].is_floating_point())


def test_yaml_config_and_flag_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": "synthetic", "limit": 16, "image-size": 32, "batch_size": 8,
                                   "weights": "none", "epochs": 3, "lr": 0.01}))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--run-dir", str(run)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.01 and saved["image_size"] == 32


def test_run_dir_reuse_without_resume_is_refused(tmp_path, capsys):
    run = _train(tmp_path, "run", "--epochs", "1")
    assert main(["train", *TINY, "--run-dir", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--sync-bn"], "--sync-bn needs several processes"),
    (["--accumulate", "3"], "must divide by world size 1 × --accumulate 3"),
    (["--model", "nosuchnet"], "nosuchnet"),
    (["--dataset", "imagenet"], "--dataset 'imagenet'"),
])
def test_bad_training_flags_give_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_data_root_error(tmp_path, capsys):
    assert main(["train", "--data-root", str(tmp_path / "nowhere"), "--weights", "none",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "nowhere: directory not found" in capsys.readouterr().err


def test_checkpoint_is_atomic_and_never_unpickles_code(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"model": {}, "model_config": {}}, path)
    assert list(tmp_path.iterdir()) == [path]

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))
    torch.save({"model": {}, "model_config": {}, "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(PixelsegError, match="evil.pt: not a pixelseg checkpoint: it holds Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:20])
    with pytest.raises(PixelsegError, match="trunc.pt"):
        load_checkpoint(tmp_path / "trunc.pt")


def test_evaluate_and_predict_end_to_end(tmp_path, capsys):
    run = _train(tmp_path, "run", "--epochs", "1")
    assert main(["evaluate", str(run), "--limit", "16", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "background" in out
    result = json.loads((tmp_path / "ev" / "eval_val.json").read_text())
    assert result["images"] == 16 and sum(map(sum, result["confusion_matrix"])) == 16 * 32 * 32
    assert (tmp_path / "ev" / "confusion_val.png").is_file()

    img = tmp_path / "photo.jpg"
    Image.new("RGB", (75, 50), (200, 80, 60)).save(img)
    assert main(["predict", str(run), str(img), "--out", str(tmp_path / "pred")]) == 0
    with Image.open(tmp_path / "pred" / "photo.png") as m:
        assert m.mode == "P" and m.size == (75, 50)   # original resolution, palette PNG of class ids
    assert (tmp_path / "pred" / "photo_overlay.png").is_file()


def test_predict_on_non_image_fails_before_writing_anything(tmp_path, capsys):
    run = _train(tmp_path, "run", "--epochs", "1")
    good = tmp_path / "ok.png"
    Image.new("RGB", (20, 20)).save(good)
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "image" in err
    assert not out.exists() or not any(out.iterdir())


def test_checkpoint_for_other_architecture_or_classes_is_rejected(tmp_path, capsys):
    run = _train(tmp_path, "run", "--epochs", "1")
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["model_config"]["num_classes"] = 5
    torch.save(ckpt, tmp_path / "edited.pt")
    img = tmp_path / "p.png"
    Image.new("RGB", (20, 20)).save(img)
    assert main(["predict", str(tmp_path / "edited.pt"), str(img), "--out", str(tmp_path / "o")]) == 2
    assert "edited.pt: weights do not fit" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "edited.pt")]) == 2
    assert "predicts 5 classes but dataset synthetic has 3" in capsys.readouterr().err
