"""Unreadable samples met inside DataLoader workers (`--cache none`, shards) reach the run summary."""
import json
from pathlib import Path

from pixelseg.data.shards_write import write_shards
from pixelseg.data.synthetic import write_folder
from pixelseg.training.train import train

RUN = {"image_size": 32, "batch_size": 5, "epochs": 1, "weights": "none", "device": "cpu", "figure_samples": 0,
       "precision": "fp32", "workers": 1}


def test_cache_none_workers_report_unreadable_files(tmp_path):
    root = tmp_path / "data"
    write_folder(root, 12, (32, 32), seed=2)
    broken = sorted((root / "images").iterdir())[3]
    broken.write_bytes(b"not a jpeg")  # found only when a worker reads it
    summary = train({**RUN, "dataset": "folder", "data_root": str(root), "cache": "none",
                     "run_dir": str(tmp_path / "run")})
    assert summary["skipped_files"] == [str(broken)]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_files"] == [str(broken)]
    assert "1 unreadable sample(s) skipped during the run" in (tmp_path / "run" / "train.log").read_text()


def test_shard_workers_report_a_damaged_shard(tmp_path):
    root, out = tmp_path / "data", tmp_path / "shards"
    write_folder(root, 12, (32, 32), seed=2)
    for split in ("train", "val"):
        write_shards("folder", root, split, out, maxcount=3, progress=False)
    damaged = out / "train-000001.tar"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    summary = train({**RUN, "dataset": "shards", "data_root": str(out), "run_dir": str(tmp_path / "run")})
    assert str(damaged) in summary["skipped_files"]
    assert all(Path(s.split(" sample ")[0]).name == damaged.name for s in summary["skipped_files"])
