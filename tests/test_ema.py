"""--ema: the moving average of the weights that validation, best.pt and the figures use."""
import pytest
import torch

from pixelseg.cli import main
from pixelseg.core.checkpoint import load_checkpoint
from pixelseg.training.optim import build_ema
from conftest import tiny_run


def test_ema_warms_up_then_averages_with_the_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    assert build_ema(model, 0.0) is None
    ema = build_ema(model, 0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=1)                      # the first step copies: no random start is dragged along
    torch.testing.assert_close(ema.module.weight, torch.ones(1, 2))
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=2)                      # warm-up decay 1 - 2^(-2/3) ~ 0.37, below the cap of 0.5
    d = 1 - 2 ** (-2 / 3)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), d * 1.0 + (1 - d) * 3.0))
    ema.update(model, step=1000)                   # later the cap holds
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), 0.5 * (d + (1 - d) * 3.0) + 0.5 * 3.0))
    assert not ema.module.weight.requires_grad


def test_best_pt_holds_the_average_and_last_pt_both(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny_run(epochs=2, ema=0.9, lr=0.01), "--run-dir", str(run)]) == 0
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["config"]["ema"] == 0.9 and set(last["ema"]) == set(last["model"])
    assert "ema" not in best
    assert "weights averaged (--ema 0.9, warmed up): validation, best.pt and figures use it" in (run / "train.log").read_text()
    floats = [k for k, v in last["model"].items() if v.is_floating_point() and "running" not in k]
    # the trained weights moved away from their average, and best.pt (or an earlier best) is the average
    assert any(not torch.equal(last["model"][k], last["ema"][k]) for k in floats)
    if best["epoch"] == last["epoch"]:
        assert all(torch.equal(best["model"][k], last["ema"][k]) for k in floats)
    # --resume restores the average and goes on
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


def test_ema_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *tiny_run(epochs=1, ema=1.5), "--run-dir", str(tmp_path / "r")])
    assert e.value.code == 2 and "--ema: 1.5: must be >= 0.0 and <= 0.99999" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
