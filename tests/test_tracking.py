"""--logger tensorboard / mlflow: per-epoch scalars and figures go to the tracker; the run dir stays the record."""
import json

import pytest

from conftest import tiny_run
from pixelseg.cli import main
from pixelseg.training.tracking import scalars

TINY = tiny_run(epochs=2, precise_bn=1)


def test_scalars_flatten_per_class_values():
    row = {"epoch": 3, "train_loss": 0.5, "val_iou": {"cat": 0.25, "dog": 0.75}, "note": "x", "flag": True}
    assert scalars(row) == {"train_loss": 0.5, "val_iou/cat": 0.25, "val_iou/dog": 0.75}


def test_tensorboard_gets_every_epoch_scalar_and_figure(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run), "--logger", "tensorboard"]) == 0
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    history = json.loads((run / "metrics.json").read_text())
    tags = acc.Tags()
    assert set(scalars(history[-1])) <= set(tags["scalars"])
    val = acc.Scalars("val_miou")
    assert [e.step for e in val] == [1, 2]
    assert [round(e.value, 5) for e in val] == [round(h["val_miou"], 5) for h in history]
    assert "val_iou/object" in tags["scalars"]
    assert [e.step for e in acc.Images("predictions")] == [1, 2]


def test_mlflow_logs_metrics_params_and_figures_to_a_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is an extra: pip install pixelseg[mlflow]")
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run), "--logger", "mlflow"]) == 0
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("pixelseg")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.data.params["dataset"] == "synthetic" and r.data.params["weights"] == "null"
    history = json.loads((run / "metrics.json").read_text())
    steps = client.get_metric_history(r.info.run_id, "val_miou")
    assert sorted((m.step, round(m.value, 5)) for m in steps) == [(h["epoch"], round(h["val_miou"], 5))
                                                                    for h in history]
    arts = [a.path for a in client.list_artifacts(r.info.run_id, "predictions")]
    assert sorted(a.rsplit("/", 1)[-1] for a in arts) == ["epoch_001.png", "epoch_002.png"]
