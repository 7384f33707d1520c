"""Training learns, shown without any dataset on disk: synthetic blobs, a few epochs."""
import json

from conftest import tiny_run
from pixelseg.cli import main


def test_loss_falls_and_miou_rises_well_above_chance(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny_run(limit=32, epochs=3, lr=0.003, deterministic=True), "--run-dir", str(run)]) == 0
    hist = json.loads((run / "metrics.json").read_text())
    losses = [h["train_loss"] for h in hist]
    mious = [h["val_miou"] for h in hist]
    # chance: always predicting the majority class (background, 68% of these pixels) scores mIoU 0.23
    assert losses[-1] < 0.5 * losses[0] and hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert mious[-1] > 0.6 and mious[-1] > mious[0]
