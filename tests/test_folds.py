"""`train --folds K`: grouped folds that hold every image out once, the K runs and cv.json/cv.png, the folds
run dir as an ensemble (mean of the members' softmax) in evaluate/predict/serve, and the bad input."""
import dataclasses
import json
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from pixelseg.training import config, folds
from pixelseg.training import train as train_mod
from pixelseg.core.checkpoint import load_checkpoint
from pixelseg.cli import main
from pixelseg.core.errors import PixelsegError
from pixelseg.inference.loading import Ensemble, load_model
from pixelseg.models import create_model
from conftest import tiny_run

TRAIN = tiny_run(dataset=None, limit=None, batch_size=4, epochs=1, precision="fp32", device="cpu", figure_samples=0,
                 precise_bn=0, workers=0)


def write_folder(root, names, size=32, seed=0):
    """images/ + masks/ of class-1 squares on class 0, one pair per name."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in names:
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(0, size - 10, 2)
        mask[y:y + 10, x:x + 10] = 1
        img = (rng.integers(0, 80, (size, size, 3)) + 150 * mask[..., None]).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


def test_ensemble_is_mean_of_member_softmax():
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None).eval())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = Ensemble(members).eval()(x)
        each = [m(x).softmax(1) for m in members]
    mean = sum(each) / 3
    assert torch.allclose(out.softmax(1), mean, atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(2, 32, 32), atol=1e-5)
    # not simply one member, nor the softmax of the mean logits
    assert not torch.allclose(mean, each[0], atol=1e-4)


def test_assign_folds_partitions_whole_groups_deterministically():
    names = [f"seq{s}_{f:03d}" for s in range(7) for f in range(3 + s % 3)]  # 7 sequences of 3-5 frames
    key = lambda n: n.split("_")[0]  # noqa: E731
    a = folds.assign_folds(names, 3, seed=0, key=key)
    assert a == folds.assign_folds(list(reversed(names))[::-1], 3, seed=0, key=key)  # same input, same folds
    assert sorted(set(a)) == [0, 1, 2] and len(a) == len(names)  # every image in exactly one fold
    for s in range(7):  # a sequence never straddles two folds
        assert len({f for n, f in zip(names, a) if key(n) == f"seq{s}"}) == 1
    sizes = [a.count(f) for f in range(3)]
    assert max(sizes) - min(sizes) <= 5  # within one group of each other
    # independent of the order the files are listed in
    shuffled = names[3:] + names[:3]
    b = folds.assign_folds(shuffled, 3, seed=0, key=key)
    assert dict(zip(shuffled, b)) == dict(zip(names, a))
    # ungrouped: sizes differ by at most one
    c = folds.assign_folds([f"x{i}" for i in range(10)], 3, seed=1)
    assert sorted(c.count(f) for f in range(3)) == [3, 3, 4]
    with pytest.raises(ValueError):
        folds.assign_folds(names, 8, seed=0, key=key)  # 7 groups cannot make 8 folds


def test_folder_pool_is_train_plus_carved_val_and_respects_val_group(tmp_path):
    names = [f"tile{t}_{i}" for t in range(5) for i in range(3)]
    root = write_folder(tmp_path / "d", names)
    cfg = config.resolve_config({"dataset": "folder", "data_root": str(root), "folds": 3, "val_group": "prefix",
                                 "run_dir": str(tmp_path / "run")})
    fold_of, about = folds.pool_folds(cfg, folds._loader(cfg))
    assert about["splits"] == ["train", "val"]  # --val-fraction's val is part of the pool, not left out
    assert sorted(n for _, n in fold_of) == sorted(names)  # each pair exactly once
    for t in range(5):
        assert len({f for (_, n), f in fold_of.items() if n.startswith(f"tile{t}_")}) == 1
    assert sum(about["fold_images"]) == 15 and about["groups"] == 5
    # an official val split (val.txt) stays out of the pool
    (root / "train.txt").write_text("\n".join(names[:12]))
    (root / "val.txt").write_text("\n".join(names[12:]))
    fold_of, about = folds.pool_folds(cfg, folds._loader(cfg))
    assert about["splits"] == ["train"] and sorted(n for _, n in fold_of) == sorted(names[:12])


@pytest.mark.parametrize("fmt", ["coco", "cvat", "labelstudio", "labelme", "yolo"])
def test_annotation_formats_fold_like_folders(tmp_path, fmt):
    import _labels_exports as ex
    from pixelseg.data.base import CacheSpec
    root = getattr(ex, f"write_{fmt}")(tmp_path / fmt)
    cfg = config.resolve_config({"dataset": fmt, "data_root": str(root), "folds": 2, "fold": 1, "image_size": 32,
                                 "run_dir": str(tmp_path / "run")})
    fold_of, about = folds.pool_folds(cfg, folds._loader(cfg))
    assert about["splits"] == ["train", "val"] and about["images"] == 2 and sorted(fold_of.values()) == [0, 1]
    train_ds, held_ds = folds.fold_datasets(cfg, folds._loader(cfg), CacheSpec("memory"), CacheSpec("memory"))
    assert len(train_ds) == len(held_ds) == 1
    assert sorted(train_ds.names + held_ds.names) == sorted(n for _, n in fold_of)
    assert [fold_of[(s, n)] for s, n in fold_of if n in held_ds.names] == [1]
    assert set(train_ds.names).isdisjoint(held_ds.names)
    images, masks = held_ds.__getitems__([0])
    assert images.shape == (1, 3, 32, 32) and masks.shape == (1, 32, 32)
    with pytest.raises(PixelsegError, match="--folds 3: the training pool .* has 2 image"):
        folds.pool_folds(dataclasses.replace(cfg, folds=3), folds._loader(cfg))


def test_too_small_for_k_folds_is_one_line_and_leaves_nothing(tmp_path, capsys):
    root = write_folder(tmp_path / "d", ["a_1", "a_2", "b_1", "b_2", "c_1"])
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-root", str(root), "--folds", "4", "--val-group", "prefix",
                 "--run-dir", str(run), *TRAIN]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("pixelseg train: error:")]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1] and "Traceback" not in err
    err = errors[0]
    assert "--folds 4" in err and "5 image(s) in 3 group(s)" in err and "at least 4" in err
    assert not run.exists()
    with pytest.raises(SystemExit) as exc:  # K < 2: argparse's one line, exit status 2
        main(["train", "--dataset", "folder", "--data-root", str(root), "--folds", "1"])
    assert exc.value.code == 2
    assert "--folds: 1: must be >= 2" in capsys.readouterr().err.replace("argument ", "")
    assert main(["train", "--dataset", "folder", "--data-root", str(root), "--folds", "2", "--fold", "2",
                 "--run-dir", str(run), *TRAIN]) == 2
    assert "--fold 2: folds are numbered 0..1" in capsys.readouterr().err


def test_auto_plans_once_then_folds(tmp_path):
    from pixelseg.training import plan
    root = write_folder(tmp_path / "d", ["a", "b", "c"])
    run = tmp_path / "run"
    probe = plan.fixed_machine(train_ips_128=400.0, eval_ips_128=1600.0)
    with pytest.raises(PixelsegError, match="--folds 5: the training pool"):
        train_mod.train_auto({"dataset": "folder", "data_root": str(root), "folds": 5, "run_dir": str(run)}, probe)
    assert not run.exists()  # the plan was made, the folds refused, nothing left behind


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    names = [f"s{s}_{i}" for s in range(4) for i in range(2)]
    root = write_folder(tmp / "d", names)
    run = tmp / "run"
    assert main(["train", "--dataset", "folder", "--data-root", str(root), "--folds", "2", "--val-group", "prefix",
                 "--run-dir", str(run), *TRAIN]) == 0
    return run, root, names


def test_two_fold_run_writes_folds_cv_json_and_figure(cv_run):
    run, _, names = cv_run
    summaries = [json.loads((run / f"fold_{i}" / "summary.json").read_text()) for i in range(2)]
    for i in range(2):
        for f in ("best.pt", "last.pt", "metrics.json", "config.yaml", "train.log"):
            assert (run / f"fold_{i}" / f).is_file(), f
        assert load_checkpoint(run / f"fold_{i}")["config"]["fold"] == i
    cv = json.loads((run / "cv.json").read_text())
    per_fold = [s["best_val_miou"] for s in summaries]
    assert cv["miou"]["per_fold"] == per_fold
    assert cv["miou"]["mean"] == pytest.approx(statistics.mean(per_fold))
    assert cv["miou"]["std"] == pytest.approx(statistics.stdev(per_fold))
    for cls, stats in cv["per_class_iou"].items():
        best = [max(json.loads((run / f"fold_{i}" / "metrics.json").read_text()), key=lambda h: h["val_miou"])
                for i in range(2)]
        assert stats["per_fold"] == pytest.approx([b["val_iou"][cls] for b in best])
        assert stats["mean"] == pytest.approx(statistics.mean(stats["per_fold"]))
    assert cv["pool"]["images"] == 8 and cv["pool"]["splits"] == ["train", "val"]
    assert [m["checkpoint"] for m in cv["members"]] == ["fold_0/best.pt", "fold_1/best.pt"]
    with Image.open(run / "cv.png") as im:
        assert im.format == "PNG" and im.width > 300
    # folds.csv: every image held out exactly once, groups whole, and each fold validated on its own
    rows = [line.split(",") for line in (run / "folds.csv").read_text().splitlines()[1:]]
    assert sorted(r[1] for r in rows) == sorted(names)
    for s in range(4):
        assert len({r[2] for r in rows if r[1].startswith(f"s{s}_")}) == 1
    held = {int(f): sum(1 for r in rows if r[2] == f) for f in ("0", "1")}
    assert held == {0: 4, 1: 4}
    log0 = (run / "fold_0" / "train.log").read_text()
    assert "train=train+val less fold 0 (4 images) val=fold 0 of train+val (4 images)" in log0
    log = (run / "train.log").read_text()  # the whole cross-validation, folds included
    assert "fold 2/2 (--fold 1): training on 4 images of the other folds, validating on the 4 held out" in log
    assert "cross-validation done" in log


def _mean_softmax(run, x):
    members = [load_model(load_checkpoint(run / f"fold_{i}" / "best.pt"), torch.device("cpu")) for i in range(2)]
    with torch.no_grad():
        return torch.stack([m(x).float().softmax(1) for m in members]).mean(0), members


def test_folds_dir_loads_as_ensemble_in_evaluate_predict_and_serve(cv_run, tmp_path):
    from pixelseg.data import load_split
    from pixelseg.inference.evaluate import evaluate
    from pixelseg.inference.predict import predict
    from pixelseg.core.metrics import ConfusionMatrix
    from pixelseg.inference.serving import Engine
    run, root, names = cv_run
    ckpt = load_checkpoint(run)
    assert len(ckpt["members"]) == 2 and ckpt["path"] == str(run / "cv.json")
    model = load_model(ckpt, torch.device("cpu"))
    assert isinstance(model, Ensemble)
    ds = load_split("folder", str(root), "val", 32, use_cache="memory", val_group="prefix")
    x, y = ds.__getitems__(list(range(len(ds))))
    x = x.float() / 255
    mean, members = _mean_softmax(run, x)
    with torch.no_grad():
        assert torch.allclose(model(x).softmax(1), mean, atol=1e-5)
        assert not torch.allclose(members[0](x).softmax(1), mean, atol=1e-4)
    # evaluate RUN scores the mean softmax (it warns: val was in the pool)
    result = evaluate(run, out_dir=tmp_path / "eval", precision="fp32", device="cpu", progress=False)
    cm = ConfusionMatrix(ckpt["model_config"]["num_classes"])
    cm.update(mean.argmax(1), y)
    assert result["checkpoint"] == str(run / "cv.json")
    assert result["miou"] == pytest.approx(cm.compute()["miou"], abs=1e-3)
    # predict RUN: the masks are the argmax of the members' mean softmax at the image's size
    image = root / "images" / f"{names[0]}.png"
    predict(run, [image], tmp_path / "pred", precision="fp32", device="cpu", progress=False)
    got = np.asarray(Image.open(tmp_path / "pred" / f"{names[0]}.png"))
    img = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    expect = _mean_softmax(run, img)[0].argmax(1)[0].numpy()
    assert (got == expect).mean() > 0.99
    engine = Engine(run, device="cpu", precision="fp32")
    assert isinstance(engine.model, Ensemble) and engine.describe()["checkpoint"] == "cv.json"


def test_members_that_disagree_are_refused_naming_the_key(cv_run, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(cv_run[0], run)
    ckpt = torch.load(run / "fold_1" / "best.pt", weights_only=True)
    ckpt["config"]["image_size"] = 64
    torch.save(ckpt, run / "fold_1" / "best.pt")
    with pytest.raises(PixelsegError, match=r"fold_1/best.pt and fold_0/best.pt differ in config.image_size \(64 vs 32\)"):
        load_checkpoint(run)
    (run / "cv.json").unlink()  # unfinished: refused with the command that finishes it
    with pytest.raises(PixelsegError, match="cross-validation not finished.*--resume"):
        load_checkpoint(run)


def test_resume_keeps_finished_folds_and_continues_the_rest(cv_run, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(cv_run[0], run)
    before = (run / "fold_0" / "best.pt").stat().st_mtime_ns
    (run / "fold_1" / "summary.json").unlink()  # fold 1 stopped after its last checkpoint
    (run / "cv.json").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "fold_0" / "best.pt").stat().st_mtime_ns == before  # finished fold kept as it was
    assert (run / "fold_1" / "summary.json").is_file() and (run / "cv.json").is_file()
    log = (run / "train.log").read_text()
    assert "fold 1/2: finished earlier" in log and "fold 2/2: resuming" in log


def test_under_torchrun_the_folds_loop_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PixelsegError, match="under torchrun launch one fold at a time: --folds K --fold I"):
        folds.train_folds({"dataset": "synthetic", "folds": 2, "run_dir": str(tmp_path / "r")}, None)
