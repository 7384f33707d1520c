"""--time-budget, --early-stop: the step estimator on injected timings, and short real runs on tiny data."""
import dataclasses
import json

import pytest
import torch

from conftest import tiny_run
from pixelseg.training.budget import Pacer, epochs_without_improvement, format_seconds, steps_that_fit
from pixelseg.core.checkpoint import load_checkpoint
from pixelseg.cli import main
from pixelseg.training.config import TrainConfig, parse_value
from pixelseg.core.errors import PixelsegError
from pixelseg.training.optim import build_scheduler, lr_factor

TINY = tiny_run(precise_bn=0)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _scheduler(total=100, name="cosine"):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return build_scheduler(opt, name, total_steps=total, warmup_steps=0)


@pytest.mark.parametrize("text, seconds", [("15m", 900), ("90s", 90), ("1h30m", 5400), ("2.5h", 9000), (42, 42),
                                           ("600", 600)])
def test_durations_parse(text, seconds):
    assert parse_value("time_budget", text) == seconds


def test_bad_duration_is_one_line_error():
    with pytest.raises(PixelsegError, match="--time-budget 10x: give a duration"):
        parse_value("time_budget", "10x")
    with pytest.raises(PixelsegError, match="positive"):
        parse_value("time_budget", "0s")


def test_steps_that_fit():
    # epochs of 10 steps × 1 s + 5 s validation: 6 whole epochs in 98 s (90 s), 8 s left = 3 steps + validation
    assert steps_that_fit(98, 1.0, 5.0, 10) == 63
    # 4 steps of the current epoch done: its 6 others + validation (11 s) first
    assert steps_that_fit(98, 1.0, 5.0, 10, in_epoch=4) == 6 + 5 * 10 + 7  # then 12 s: 7 steps + validation
    # not even the rest of the current epoch: what fits before its validation
    assert steps_that_fit(8, 1.0, 5.0, 10, in_epoch=4) == 3
    assert steps_that_fit(3, 1.0, 5.0, 10) == 0


def test_pacer_estimates_after_probe_and_respans_after_each_epoch():
    clock = FakeClock()
    cfg = TrainConfig(**{"time_budget": 100.0, "epochs": None, "iterations": None, "val_every": 1})
    sched = _scheduler()
    pacer = Pacer(cfg, steps_per_epoch=10, n_val=12, batch_size=4, clock=clock)
    for step in range(1, 7):  # 2 s per step; the first step is warm-up and not counted
        clock.t += 2.0
        assert not pacer.on_step(sched, step, step)
    assert pacer.step_s == pytest.approx(2.0)
    assert pacer.overhead_s == pytest.approx(12 / 4 * 2.0 / 3)  # validation guessed from the step time
    first = pacer.total
    assert sched.lr_lambdas[0].total_steps == first
    # the epoch really took 12 s of training (1.2 s/step) and 3 s after it: more steps fit
    clock.t = 1000.0 + 15.0
    pacer.end_of_epoch(sched, 10, train_s=12.0, steps=10, epoch_s=15.0)
    left = 100 * 0.98 - 15
    assert pacer.total == 10 + steps_that_fit(left, 1.2, 3.0, 10)
    assert pacer.total != first and sched.lr_lambdas[0].total_steps == pacer.total
    # the next lr follows the re-spanned curve
    expected = lr_factor(sched.last_epoch, name="cosine", total_steps=pacer.total, warmup_steps=0, power=0.9,
                         min_lr_ratio=0.0)
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_explicit_epochs_bound_the_budget_and_budget_stops_inside_epoch():
    clock = FakeClock()
    pacer = Pacer(TrainConfig(**{"time_budget": 3600.0, "epochs": 3, "iterations": None}), 10, 4, 4, clock=clock)
    sched = _scheduler()
    pacer.end_of_epoch(sched, 10, train_s=1.0, steps=10, epoch_s=2.0)
    assert pacer.total == 30  # an hour holds far more, --epochs 3 bounds it
    tight = Pacer(TrainConfig(**{"time_budget": 10.0, "epochs": None, "iterations": None}), 100, 4, 4, clock=clock)
    stops = []
    for step in range(1, 101):
        clock.t += 1.0
        if tight.on_step(sched, step, step):
            stops.append(step)
            break
    assert stops and stops[0] < 10 and tight.stopped_by == "time_budget"
    assert "cannot hold one epoch" in tight.cannot_hold_epoch()


def test_resuming_a_budget_run_that_stopped_inside_an_epoch_runs_another_epoch():
    """A budget that ran out one step into the 7th epoch of 2 steps each (13 steps) ends that epoch early;
    a resume with a larger total must plan an 8th epoch, not 14 steps = 7 epochs, which trains nothing."""
    from types import SimpleNamespace
    clock = FakeClock()
    sched = _scheduler()
    sched.lr_lambdas[0].total_steps = 13  # the span the checkpoint holds
    state = SimpleNamespace(global_step=13, epoch=7, step_in_epoch=0)
    pacer = Pacer(TrainConfig(**{"time_budget": 600.0, "epochs": 8, "iterations": None}), steps_per_epoch=2, n_val=4,
                  batch_size=4, used_s=6.0, timing={"train": 1.3, "validation": 0.7}, clock=clock)
    pacer.resumed(sched, state, "run")
    assert pacer.planned_epochs == 8 > state.epoch and pacer.total > state.global_step


def test_epochs_without_improvement():
    rows = [{"val_miou": v} for v in (0.1, 0.3, 0.3005, 0.2, 0.31)]
    assert epochs_without_improvement(rows, 0.001) == 0   # 0.31 beats 0.3 by more than 0.001
    assert epochs_without_improvement(rows, 0.05) == 3    # nothing beat 0.3 by 0.05 since epoch 2
    assert format_seconds(5400) == "1h30m" and format_seconds(42.5) == "42.5s"


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_budget_stops_early_keeps_best_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "200", "--time-budget", "6s", "--schedule", "cosine",
                 "--val-every", "1", "--run-dir", str(run)]) == 0
    s = _summary(run)
    assert s["stopped_by"] == "time_budget" and 1 <= s["epochs_done"] < 200
    assert s["epochs_done"] == len(json.loads((run / "metrics.json").read_text()))
    assert {"setup", "train", "validation", "checkpoints"} <= set(s["time_s"])
    best = load_checkpoint(run / "best.pt")
    assert best["metrics"]["val_miou"] == pytest.approx(s["best_val_miou"])
    assert "stopped after" in (run / "train.log").read_text()
    # the budget is spent: resuming needs a larger total, said in one line
    assert main(["train", "--resume", str(run)]) == 2
    assert "--time-budget" in capsys.readouterr().err
    # a larger total resumes; --epochs bounds it to one more epoch however slow the machine is
    total = s["time_used_s"] + 120
    assert main(["train", "--resume", str(run), "--time-budget", f"{total:.0f}",
                 "--epochs", str(s["epochs_done"] + 1)]) == 0
    again = _summary(run)
    assert again["epochs_done"] > s["epochs_done"]
    assert [h["epoch"] for h in json.loads((run / "metrics.json").read_text())] == \
        list(range(1, again["epochs_done"] + 1))


def test_early_stop_fires_and_says_why(tmp_path):
    run = tmp_path / "run"
    # a delta no mIoU gain can beat: epoch 1 sets the best, epochs 2 and 3 do not improve -> stop after 3
    assert main(["train", *TINY, "--epochs", "10", "--early-stop", "2", "--early-stop-delta", "1",
                 "--run-dir", str(run)]) == 0
    s = _summary(run)
    assert s["epochs_done"] == 3 and s["stopped_by"] == "early_stop"
    assert "did not improve by more than 1 for 2 epochs" in s["stop_reason"]
    assert "did not improve" in (run / "train.log").read_text()


def test_resuming_a_finished_budget_run_with_a_larger_budget_respans_over_what_is_left():
    """Defect 13: a run that spent its 60 s budget in 10 epochs of 10 steps (0.5 s a step, 1 s of validation
    each), resumed with --time-budget 120: the schedule is re-spanned over the ~57 s left (9 more epochs
    and a partial one), not extended by one step (a one-step epoch at lr ~ 0, then a validation)."""
    from types import SimpleNamespace
    clock = FakeClock()
    sched = _scheduler(total=100)
    for _ in range(100):  # where the finished run left its schedule: at the end, lr ~ 0
        sched.optimizer.step()
        sched.step()
    assert sched.optimizer.param_groups[0]["lr"] < 1e-3
    state = SimpleNamespace(global_step=100, epoch=10, step_in_epoch=0)
    pacer = Pacer(TrainConfig(**{"time_budget": 120.0, "epochs": None, "iterations": None}), steps_per_epoch=10, n_val=4,
                  batch_size=4, used_s=60.0, timing={"setup": 2.0, "train": 50.0, "validation": 10.0}, clock=clock)
    pacer.resumed(sched, state, "run")
    left = 120 * 0.98 - 60
    assert pacer.total == 100 + steps_that_fit(left, 0.5, 1.0, 10) > 100 + 10  # full epochs, not one step
    assert sched.lr_lambdas[0].total_steps == pacer.total and pacer.planned_epochs == 10 + 10
    assert sched.optimizer.param_groups[0]["lr"] > 0.3  # a warm restart on the new span, not lr ~ 0
    # the first resumed steps do not stop the run: no early end, no one-step epoch
    assert not any(pacer.on_step(sched, step, step - 100) for step in range(101, 111))


def test_resuming_a_budget_run_whose_last_epoch_ended_early_keeps_epoch_boundaries():
    """The run stopped 1 step into its 7th epoch of 4 steps (25 steps): epochs now start at 25, 29, ...; the
    resumed plan counts its epochs from there and --epochs 9 still means two more whole epochs."""
    from types import SimpleNamespace
    clock = FakeClock()
    sched = _scheduler(total=25)
    state = SimpleNamespace(global_step=25, epoch=7, step_in_epoch=0)
    pacer = Pacer(TrainConfig(**{"time_budget": 600.0, "epochs": 9, "iterations": None}), steps_per_epoch=4, n_val=4,
                  batch_size=4, used_s=30.0, timing={"train": 25.0, "validation": 3.5}, clock=clock)
    pacer.resumed(sched, state, "run")
    assert pacer.total == 25 + 2 * 4 and pacer.planned_epochs == 9


# ---- --val-every ---------------------------------------------------------------------------------------
def test_val_every_auto_keeps_validation_near_a_tenth_of_a_budget_run():
    clock = FakeClock()
    sched = _scheduler()
    cfg = TrainConfig(**{"time_budget": 600.0, "epochs": None, "iterations": None})
    assert Pacer(dataclasses.replace(cfg, val_every=3), 10, 4, 4, clock=clock).val_every() == 3
    assert Pacer(TrainConfig(**{"time_budget": None, "epochs": 5, "iterations": None}), 10, 4, 4, clock=clock).val_every() == 1
    pacer = Pacer(cfg, 10, 4, 4, clock=clock)
    assert pacer.val_every() == 1  # nothing measured yet
    # 10 s of training an epoch, 5 s after a validated one, 0.5 s after a plain one (last.pt): validating
    # (4.5 s) every 4 epochs keeps it under 10 % of the run
    clock.t += 15.0
    pacer.end_of_epoch(sched, 10, train_s=10.0, steps=10, epoch_s=15.0, validated=True, epochs_done=1)
    clock.t += 10.5
    pacer.end_of_epoch(sched, 20, train_s=10.0, steps=10, epoch_s=10.5, validated=False, epochs_done=2)
    n = pacer.val_every()
    assert n == 4
    val, epoch = 5.0 - 0.5, 10.5
    assert val / n / (epoch + val / n) <= 0.10 < val / (n - 1) / (epoch + val / (n - 1))
    assert pacer.avg_overhead() == pytest.approx(0.5 + 4.5 / n)
    # the schedule spans the steps that fit with validation every n epochs and a validated last epoch
    left = 600 * 0.98 - 25.5
    assert pacer.total == 20 + steps_that_fit(left, 1.0, 0.5 + 4.5 / n, 10, final_s=5.0)
    assert pacer.total > 20 + steps_that_fit(left, 1.0, 5.0, 10)  # more than validating every epoch
    # due every n epochs after the last validation, and always at the last epoch
    assert not pacer.validation_due(2, 20) and pacer.validation_due(1 + n, 10 * (1 + n))
    assert pacer.validation_due(pacer.planned_epochs, pacer.total)
    clock.t = 1000.0 + 600 * 0.98 - 12.0  # 12 s left: room for steps and a validation after a plain end
    assert not pacer.validation_due(3, 30)
    clock.t = 1000.0 + 600 * 0.98 - 5.0  # 5 s: not even one step and a validation; this epoch is the last one
    assert pacer.validation_due(3, 30)


def test_steps_that_fit_reserves_the_last_validation():
    assert steps_that_fit(98, 1.0, 1.0, 10, final_s=5.0) == steps_that_fit(94, 1.0, 1.0, 10)
    assert steps_that_fit(98, 1.0, 5.0, 10, final_s=5.0) == steps_that_fit(98, 1.0, 5.0, 10)


def test_val_every_validates_every_n_epochs_and_the_last(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "5", "--val-every", "2", "--run-dir", str(run)]) == 0
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [2, 4, 5]
    s = _summary(run)
    assert s["epochs_done"] == 5 and s["final"]["epoch"] == 5
    best = load_checkpoint(run / "best.pt")
    assert best["metrics"]["val_miou"] == pytest.approx(max(r["val_miou"] for r in rows))
    assert best["epoch"] == max(rows, key=lambda r: r["val_miou"])["epoch"]
    assert load_checkpoint(run / "last.pt")["epoch"] == 5
    assert sorted(p.name for p in (run / "figures").iterdir()) == ["epoch_002.png", "epoch_004.png",
                                                                     "epoch_005.png"]
    assert "not validated (every 2 epochs)" in (run / "train.log").read_text()
    # resumed with more epochs: counts from the last validated epoch
    assert main(["train", "--resume", str(run), "--epochs", "7"]) == 0
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())] == [2, 4, 5, 7]


def test_val_every_auto_under_a_budget_ends_on_a_validated_epoch(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "200", "--time-budget", "6s", "--run-dir", str(run)]) == 0
    s = _summary(run)
    rows = json.loads((run / "metrics.json").read_text())
    assert rows and rows[-1]["epoch"] == s["epochs_done"]
    assert load_checkpoint(run / "best.pt")["metrics"]["val_miou"] == pytest.approx(s["best_val_miou"])


def test_val_every_bad_value_is_one_line_error():
    assert parse_value("val_every", "auto") == "auto" and parse_value("val_every", "3") == 3
    with pytest.raises(PixelsegError, match="--val-every"):
        parse_value("val_every", "0")
