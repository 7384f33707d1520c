"""Experiment trackers fed once per epoch (``--logger tensorboard`` or ``mlflow``).

The run directory (metrics.json/csv, figures/, checkpoints) stays the source of truth; a tracker
gets a copy of the per-epoch scalars (per-class IoU/Dice included) and the epoch figures, in the
places people already look. Both write local files by default: ``RUN/tensorboard`` (view with
``tensorboard --logdir RUN``) and ``RUN/mlruns`` (``mlflow ui --backend-store-uri RUN/mlruns``);
MLflow honours ``MLFLOW_TRACKING_URI`` when it is set. Only rank 0 tracks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.errors import PixelsegError

TRACKERS = ("none", "tensorboard", "mlflow")


def scalars(row: dict) -> dict[str, float]:
    """A metrics.json row -> flat {name: number}; per-class dicts become e.g. ``val_iou/cat``."""
    out = {}
    for key, value in row.items():
        if key == "epoch":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{name}": float(v) for name, v in value.items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class Tracker:
    """No tracker: every call does nothing."""

    def log_epoch(self, row: dict, epoch: int) -> None:
        pass

    def log_figure(self, tag: str, path: Path, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, cfg: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PixelsegError(
                "--logger tensorboard needs the tensorboard package: pip install pixelseg[tensorboard]"
            ) from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(cfg, sort_keys=False) + "\n```", 0)

    def log_epoch(self, row: dict, epoch: int) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def log_figure(self, tag: str, path: Path, epoch: int) -> None:
        from PIL import Image

        with Image.open(path) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    def __init__(self, run_dir: Path, cfg: dict):
        try:
            import mlflow
        except ImportError:
            raise PixelsegError(
                "--logger mlflow needs the mlflow package: pip install pixelseg[mlflow] (or mlflow-skinny)"
            ) from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # A local file store beside the run, with no server or database to set up. MLflow 3 keeps its
            # file store in maintenance mode behind this opt-in; MLFLOW_TRACKING_URI=sqlite:///... (needs
            # sqlalchemy) or a server URI selects anything else.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(run_dir) / "mlruns").resolve().as_uri())
        mlflow.set_experiment("pixelseg")
        self.run = mlflow.start_run(run_name=Path(run_dir).name)
        mlflow.log_params({k: ("null" if v is None else str(v))[:500] for k, v in cfg.items()})

    def log_epoch(self, row: dict, epoch: int) -> None:
        # MLflow metric names allow letters, digits, _ - . / and spaces; class names may have others.
        clean = {"".join(c if c.isalnum() or c in "_-./ " else "_" for c in k): v for k, v in scalars(row).items()}
        self.mlflow.log_metrics(clean, step=epoch)

    def log_figure(self, tag: str, path: Path, epoch: int) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=tag)

    def close(self) -> None:
        self.mlflow.end_run()


def open_tracker(name: str, run_dir: Path, cfg: dict) -> Tracker:
    if name in (None, "none"):
        return Tracker()
    if name == "tensorboard":
        return TensorBoardTracker(run_dir, cfg)
    if name == "mlflow":
        return MlflowTracker(run_dir, cfg)
    raise PixelsegError(f"--logger {name!r}: choose one of {', '.join(TRACKERS)}")
