"""Uncertainty measured: kept-accuracy curves, ECE, reliability figure, `evaluate --uncertainty/--mc-samples`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixelseg.inference.calibration import UncertaintyStats, softmax_entropy
from pixelseg.core.checkpoint import atomic_save
from pixelseg.cli import main
from pixelseg.data import default_split
from pixelseg.models import create_model


def _probs(rows):
    """Two-class probabilities for a 1×1×N "image" from the class-0 probabilities in `rows`."""
    p0 = torch.tensor(rows, dtype=torch.float32)
    return torch.stack([p0, 1 - p0])[None, :, None, :]


def test_ece_and_kept_accuracy_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right); one ignored pixel
    probs = _probs([0.9, 0.9, 0.6, 0.6, 0.5])
    target = torch.tensor([[[0, 1, 0, 0, 255]]])
    unc = torch.tensor([[[0.1, 0.9, 0.2, 0.3, 0.0]]])   # the wrong pixel is the most uncertain
    st = UncertaintyStats({"u": 1.0})
    st.update(probs, target, 255, {"u": unc})
    # bin 0.9: acc 0.5, conf 0.9 -> |gap| 0.4 on half the pixels; bin 0.6: acc 1, conf 0.6 -> 0.4 on half
    assert st.ece() == pytest.approx(0.4, abs=1e-6)
    assert st.accuracy() == pytest.approx(0.75)
    assert st.kept_accuracy("u", 0.0) == pytest.approx(0.75)
    assert st.kept_accuracy("u", 0.25) == pytest.approx(1.0)   # the one error is dropped first
    assert st.kept_accuracy("u", 0.5) == pytest.approx(1.0)
    rel = st.reliability()
    assert sum(rel["count"]) == 4 and rel["accuracy"][13] == pytest.approx(0.5)


def test_uninformative_uncertainty_gives_a_flat_curve_and_misleading_one_falls():
    g = torch.Generator().manual_seed(0)
    n = 20000
    p0 = torch.rand(n, generator=g) * 0.5 + 0.5
    target = (torch.rand(n, generator=g) > 0.7).long()      # 70% class 0: accuracy 0.7 wherever we look
    probs = _probs(p0.tolist())
    flat = UncertaintyStats({"u": 1.0})
    flat.update(probs, target[None, None], None, {"u": torch.full((1, 1, n), 0.5)})  # all equal: pro rata
    assert flat.kept_accuracy("u", 0.3) == pytest.approx(flat.accuracy(), abs=1e-9)
    wrong_first = UncertaintyStats({"u": 1.0})
    wrong_first.update(probs, target[None, None], None, {"u": (target == 0).float()[None, None]})  # errors most certain
    assert wrong_first.kept_accuracy("u", 0.3) < 0.6 < wrong_first.accuracy()


def test_perfectly_calibrated_probabilities_have_near_zero_ece():
    g = torch.Generator().manual_seed(1)
    n = 200000
    conf = torch.rand(n, generator=g) * 0.5 + 0.5
    correct = torch.rand(n, generator=g) < conf                # right with probability = confidence
    target = torch.where(correct, 0, 1)
    st = UncertaintyStats({"entropy": 1.0})
    probs = _probs(conf.tolist())
    st.update(probs, target[None, None], None, {"entropy": softmax_entropy(probs)})
    assert st.ece() < 0.01
    over = UncertaintyStats({"entropy": 1.0})
    over.update(_probs([0.99] * n), target[None, None], None, {"entropy": torch.zeros(1, 1, n)})
    assert over.ece() > 0.2                                    # claims 99% but is right ~75% of the time


def _checkpoint(tmp_path, arch, backbone):
    torch.manual_seed(0)
    model = create_model(arch, backbone=backbone, num_classes=3, weights=None)
    for m in getattr(model, "head", model).modules():
        if isinstance(m, torch.nn.Conv2d):  # an untrained head predicts ~uniform: make the outputs differ
            torch.nn.init.normal_(m.weight, std=0.5)
    ck = {"model": model.state_dict(), "model_config": model.config,
          "config": {"dataset": "synthetic", "val_split": default_split("synthetic", "val"), "image_size": 32,
                     "data_root": None, "cache": False, "channels_last": True}}
    path = tmp_path / f"{arch}.pt"
    atomic_save(ck, path)
    return path


def test_evaluate_mc_samples_report_and_figure(tmp_path, capsys):
    path = _checkpoint(tmp_path, "deeplabv3", "mobilenet_v1")      # ASPP dropout p=0.5: an MC-dropout model
    out = tmp_path / "out"
    rc = main(["evaluate", str(path), "--mc-samples", "3", "--limit", "6", "--device", "cpu", "--out", str(out),
               "--batch-size", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "MC 3, variance" in printed and "ECE" in printed
    res = json.loads((out / "eval_val_mc3.json").read_text())
    unc = res["uncertainty"]
    # the deterministic pass's calibration stats agree with the confusion-matrix scores
    assert unc["softmax"]["pixel_acc"] == pytest.approx(res["pixel_acc"], abs=1e-9)
    assert unc["softmax"]["kept_accuracy"]["entropy"]["0%"] == pytest.approx(res["pixel_acc"], abs=1e-6)
    assert set(unc["mc"]["kept_accuracy"]) == {"entropy", "variance"}
    assert 0 <= unc["mc"]["ece"] <= 1 and 0 <= unc["mc"]["miou"] <= 1
    assert sum(unc["mc"]["reliability"]["count"]) == sum(unc["softmax"]["reliability"]["count"]) > 0
    # dropout really was sampled: the averaged prediction is calibrated differently from the single pass
    assert unc["mc"]["ece"] != pytest.approx(unc["softmax"]["ece"], abs=1e-4)
    img = Image.open(out / "uncertainty_val_mc3.png")
    assert img.size[0] > 500 and np.asarray(img.convert("L")).std() > 5


def test_plain_model_softmax_entropy_and_mc_refused(tmp_path, capsys):
    path = _checkpoint(tmp_path, "unet", "mobilenet_v2")
    out = tmp_path / "out"
    assert main(["evaluate", str(path), "--uncertainty", "--limit", "4", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads((out / "eval_val.json").read_text())
    assert "mc" not in res["uncertainty"] and (out / "uncertainty_val.png").is_file()
    capsys.readouterr()
    rc = main(["evaluate", str(path), "--mc-samples", "4", "--limit", "4", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no dropout layers" in err and str(path) in err
