"""When a run stops: --time-budget (the lr schedule spans the steps that fit), --early-stop, --epochs.

`Pacer` owns the run's length. Without a budget it is the configured one (--epochs or --iterations).
With one, the number of optimiser steps is estimated from measured speed: after a few steps of the
first epoch (validation cost guessed from the step time), then again after every epoch from its
measured train time and its overhead (PreciseBN, validation, figures, checkpoints), and the schedule
is re-spanned to that total (`optim.set_total_steps`). A guard inside the epoch stops training when
the next step would leave no time for the epoch's validation; --epochs/--iterations given explicitly
stay upper bounds. The time used is kept in the checkpoints, so a resumed run spends what is left.
"""

from __future__ import annotations

import math
import time

from .config import TrainConfig
from .optim import set_total_steps

PROBE_STEPS = 5  # steps of the first epoch timed for the first estimate (after one warm-up step)
VAL_COST_GUESS = 1 / 3  # validation image / training image cost before validation has been timed
MARGIN = 0.02  # share of the budget kept free for what the estimate misses (process exit, jitter)
VAL_SHARE = 0.10  # --val-every auto under --time-budget: validation's share of the run, at most about this


def steps_that_fit(
    left_s: float,
    step_s: float,
    overhead_s: float,
    steps_per_epoch: int,
    in_epoch: int = 0,
    final_s: float | None = None,
) -> int:
    """Optimiser steps that fit into ``left_s`` seconds when each takes ``step_s`` and every epoch (a
    partial last one too) ends with ``overhead_s`` of validation, figures and checkpoints (on average: with
    --val-every N a validation every N epochs); ``in_epoch`` steps of the current epoch are already done.
    ``final_s``: what the last epoch's end costs when more than the average (it is always validated)."""
    if step_s <= 0:
        return 0
    if final_s is not None and final_s > overhead_s:
        left_s -= final_s - overhead_s
    steps = 0
    if in_epoch:  # the current epoch first
        rest = steps_per_epoch - in_epoch
        if left_s < rest * step_s + overhead_s:
            return max(0, int((left_s - overhead_s) // step_s))
        steps, left_s = rest, left_s - rest * step_s - overhead_s
    epoch_s = steps_per_epoch * step_s + overhead_s
    full = int(left_s // epoch_s)
    left_s -= full * epoch_s
    partial = max(0, min(steps_per_epoch - 1, int((left_s - overhead_s) // step_s)))
    return steps + full * steps_per_epoch + partial


def epochs_without_improvement(history: list[dict], delta: float) -> int:
    """Epochs since val mIoU last beat the best so far by more than ``delta`` (from the history, so a
    resumed run counts the same)."""
    best, since = -math.inf, 0
    for row in history:
        if row["val_miou"] > best + delta:
            best, since = row["val_miou"], 0
        else:
            since += 1
    return since


class Pacer:
    """The run's total of optimiser steps, the stop decisions and where the time went."""

    def __init__(
        self,
        cfg: TrainConfig,
        steps_per_epoch: int,
        n_val: int,
        batch_size: int,
        used_s: float = 0.0,
        timing: dict | None = None,
        t_start: float | None = None,
        clock=time.time,
    ):
        self.budget = cfg.time_budget
        self.spe = steps_per_epoch
        self.n_val, self.batch = n_val, batch_size
        self.used_before = used_s
        self.clock = clock  # injectable, for tests of the estimates
        self.t0 = clock() if t_start is None else t_start
        self.timing = dict(timing or {})
        self.cap_in_epochs = not cfg.iterations and bool(cfg.epochs)
        self.cap: int | None
        if cfg.iterations:
            self.cap = int(cfg.iterations)
        elif cfg.epochs:
            self.cap = int(cfg.epochs) * steps_per_epoch
        else:
            self.cap = None  # the budget alone decides
        self.total = self.cap if self.cap is not None else 1000 * steps_per_epoch  # until measured
        self.step_s: float | None = None
        self.overhead_s: float | None = None  # the end of a validated epoch (PreciseBN, validation, figures, saves)
        self.plain_s: float | None = None  # the end of an epoch without validation (last.pt)
        self.val_every_opt = cfg.val_every or "auto"
        self.last_val_epoch = 0  # the last validated epoch (1-based; 0: none yet)
        # global_step at the start of epoch e is e * spe + offset: a budget that ran out inside an epoch ended
        # it early (offset < 0 from then on; set on --resume, the only time an epoch starts after such a one)
        self.offset = 0
        self._probe: list[float] = []
        self.stopped_by = "iterations" if cfg.iterations else "epochs"
        self.reason = ""

    # ---- time ----
    def elapsed(self) -> float:
        return self.used_before + self.clock() - self.t0

    def left(self) -> float:
        """Seconds of the budget left (asked only under --time-budget)."""
        assert self.budget is not None
        return self.budget * (1 - MARGIN) - self.elapsed()

    def add(self, what: str, seconds: float) -> None:
        self.timing[what] = self.timing.get(what, 0.0) + seconds

    @property
    def epoch_cap(self) -> int | None:
        """The epochs --epochs or --iterations allow (None: the budget alone decides)."""
        return None if self.cap is None else math.ceil(self.cap / self.spe)

    @property
    def planned_epochs(self) -> int:
        return max(1, math.ceil((self.total - self.offset) / self.spe))

    def resumed(self, scheduler, state, run_dir) -> None:
        """After --resume: a budget run needs time left and is re-spanned over what is left, from the run's own
        measured step and epoch-end costs (a finished run resumed with a larger --time-budget continues with
        full epochs on a warm-restarted schedule, not a one-step epoch at the old schedule's end, lr ~ 0);
        otherwise the span follows the configured length (--epochs may grow on resume)."""
        if not self.budget:
            set_total_steps(scheduler, self.total)
            return
        self.offset = (state.global_step - state.step_in_epoch) - state.epoch * self.spe
        if self.cap and self.cap_in_epochs:
            self.cap += self.offset  # --epochs N counts epochs, some of which ended early
        # the run's own measured costs: resuming is refused exactly when its stop rule would fire at once
        if state.global_step and self.timing.get("train"):
            self.step_s = self.timing["train"] / state.global_step
            after = sum(v for k, v in self.timing.items() if k not in ("setup", "train", "planning"))
            self.overhead_s = after / max(1, state.epoch)
        if self.left() <= (self.step_s or 0) + (self.overhead_s or 0):
            from ..core.errors import PixelsegError

            raise PixelsegError(
                f"--resume {run_dir}: the run has used {format_seconds(self.elapsed())} of its "
                f"--time-budget {format_seconds(self.budget)}; continue it with a larger total, "
                f"e.g. --time-budget {format_seconds(self.budget * 2)} (the budget counts the "
                "whole run, all sessions)"
            )
        if self.step_s is not None and self.overhead_s is not None:  # measured together above: the steps that fit
            # what is left, from where the run stands
            fit = state.global_step + steps_that_fit(
                self.left(), self.step_s, self.overhead_s, self.spe, state.step_in_epoch
            )
        else:  # nothing measured yet: the rest of this epoch, re-estimated after PROBE_STEPS as in a new run
            fit = state.global_step + self.spe - state.step_in_epoch
        # at least one step more (the refusal above guarantees the time for it), never past --epochs/--iterations
        self.total = max(fit, state.global_step + 1)
        if self.cap:
            self.total = min(self.total, max(self.cap, state.global_step))
        set_total_steps(scheduler, self.total)

    # ---- validation ----
    def val_every(self) -> int:
        """Epochs between validations: --val-every N, or auto: 1 without a budget; with one, as few validations
        as keep their measured cost (PreciseBN, validation, figure) to about VAL_SHARE of the run."""
        if self.val_every_opt != "auto":
            return int(self.val_every_opt)
        if not self.budget or not self.step_s or self.overhead_s is None:
            return 1
        plain = self.plain_s or 0.0
        val = max(0.0, self.overhead_s - plain)
        epoch = self.spe * self.step_s + plain
        return max(1, math.ceil(val * (1 - VAL_SHARE) / (VAL_SHARE * epoch) - 1e-9))

    def avg_overhead(self) -> float | None:
        """The end-of-epoch cost averaged over epochs with and without validation."""
        if self.overhead_s is None:
            return None
        plain = min(self.plain_s or 0.0, self.overhead_s)
        return plain + (self.overhead_s - plain) / self.val_every()

    def validation_due(self, epochs_done: int, global_step: int) -> bool:
        """Whether the epoch just trained (``epochs_done`` counts it) ends with validation: every val_every()
        epochs since the last one, and always the run's last (planned, --iterations reached, or the last the
        budget holds), so best.pt and the final metrics come from a validated epoch."""
        if epochs_done - self.last_val_epoch >= self.val_every():
            return True
        if global_step >= self.total or epochs_done >= self.planned_epochs:
            return True
        if self.budget and self.step_s is not None:  # would the budget stop the run after a plain epoch end?
            return self.left() - (self.plain_s or 0.0) < self.step_s + (self.overhead_s or 0.0)
        return False

    # ---- estimates ----
    def _respan(self, scheduler, global_step: int, in_epoch: int) -> None:
        step_s, overhead_s = self.step_s, self.avg_overhead()
        # called once a step time is measured; the epoch-end cost comes with it (the probe's guess, or the first
        # epoch's, which is always validated)
        assert step_s is not None and overhead_s is not None
        fit = global_step + steps_that_fit(self.left(), step_s, overhead_s, self.spe, in_epoch, final_s=self.overhead_s)
        self.total = max(global_step + (1 if in_epoch else 0), min(fit, self.cap) if self.cap else fit)
        set_total_steps(scheduler, self.total)

    def on_step(self, scheduler, global_step: int, in_epoch: int) -> bool:
        """After each optimiser step: the first estimate once PROBE_STEPS are timed; True = stop now."""
        if self.budget and self.step_s is None:
            self._probe.append(self.clock())
            n = min(PROBE_STEPS, self.spe - 1)
            if n >= 1 and len(self._probe) == n + 1:  # the first step pays for warm-up; not counted
                self.step_s = (self._probe[-1] - self._probe[0]) / n
                self.overhead_s = self.n_val / self.batch * self.step_s * VAL_COST_GUESS
                self._respan(scheduler, global_step, in_epoch)
        if global_step >= self.total:
            if self.budget and (self.cap is None or self.total < self.cap):
                self.stopped_by = "time_budget"
                self.reason = f"the steps that fit the time budget of {format_seconds(self.budget)} are done"
            return True
        if self.budget and self.step_s is not None and self.left() < self.step_s + (self.overhead_s or 0):
            self.total = global_step
            self.stopped_by, self.reason = "time_budget", "the time budget leaves no room for another step"
            return True
        return False

    def end_of_epoch(
        self,
        scheduler,
        global_step: int,
        train_s: float,
        steps: int,
        epoch_s: float,
        validated: bool = True,
        epochs_done: int | None = None,
    ) -> None:
        """Re-estimate from the epoch just measured: its step time and everything after training (the cost of
        a validated epoch end and of a plain one are kept apart)."""
        if validated and epochs_done is not None:
            self.last_val_epoch = epochs_done
        if not self.budget or steps <= 0:
            return
        self.step_s = train_s / steps
        if validated:
            self.overhead_s = max(0.0, epoch_s - train_s)
        else:
            self.plain_s = max(0.0, epoch_s - train_s)
        self._respan(scheduler, global_step, 0)

    def should_stop(self, global_step: int, history: list[dict], early_stop: int | None, delta: float) -> bool:
        """At the end of an epoch: the budget, the planned steps, or --early-stop."""
        if early_stop and epochs_without_improvement(history, delta) >= early_stop:
            best = max(history, key=lambda r: r["val_miou"])
            self.stopped_by = "early_stop"
            self.reason = (
                f"val mIoU did not improve by more than {delta:g} for {early_stop} epochs (best "
                f"{best['val_miou']:.4f} at epoch {best['epoch']})"
            )
            return True
        if self.budget and self.step_s is not None and self.left() < self.step_s + (self.overhead_s or 0):
            self.stopped_by = "time_budget"
            self.reason = f"the time budget of {format_seconds(self.budget)} is spent"
            return True
        if global_step >= self.total:
            if self.budget and (self.cap is None or self.total < self.cap):
                self.stopped_by = "time_budget"
                self.reason = f"the steps that fit the time budget of {format_seconds(self.budget)} are done"
            elif not self.reason:
                self.reason = f"{self.stopped_by} done"
            return True
        return False

    def cannot_hold_epoch(self) -> str | None:
        """A warning when one measured epoch (training + overhead) is longer than the whole budget."""
        if not self.budget or self.step_s is None:
            return None
        epoch_s = self.spe * self.step_s + (self.overhead_s or 0)
        if epoch_s <= self.budget:
            return None
        return (
            f"--time-budget {format_seconds(self.budget)} cannot hold one epoch: one takes about "
            f"{format_seconds(epoch_s)} here ({self.spe} steps × {self.step_s:.2f} s + "
            f"{self.overhead_s or 0:.1f} s validation and checkpoints); the run stops inside the first epoch. "
            "Give a longer budget or a smaller recipe (--image-size, --limit, a lighter model)"
        )

    def summary(self, epochs_done: int) -> dict:
        out = {
            "stopped_by": self.stopped_by,
            "stop_reason": self.reason,
            "epochs_done": epochs_done,
            "optimizer_steps_planned": self.total,
            "time_s": {k: round(v, 3) for k, v in self.timing.items()},
        }
        if self.budget:
            out["time_budget_s"] = self.budget
            out["time_used_s"] = round(self.elapsed(), 3)
        return out


def format_seconds(seconds: float) -> str:
    """900 -> "15m", 5400 -> "1h30m", 42.5 -> "42.5s"."""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.3g}s"
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v)
