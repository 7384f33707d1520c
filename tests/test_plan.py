"""`pixelseg plan` / `train --auto`: the rules respond to the data, the plan is deterministic for a dataset
and a fixed machine probe, every choice carries its reason, and the user's options win and are recorded."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from pixelseg.training import config, plan, probe
from pixelseg.training import train as train_mod
from pixelseg.core import sizes
from pixelseg.cli import main
from pixelseg.core.errors import PixelsegError
from conftest import tiny_run


def write_folder(root, n=24, size=64, obj=16, names="img{i}", up=False, rare=False, seed=0):
    """images/ + masks/ of ``n`` pairs: class 1 squares of ``obj`` px on a class 0 background; ``up``: a
    class 2 band along the top (sky over ground), ``rare``: one tiny class 2 dot per image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, size - obj, 2)
            mask[y:y + obj, x:x + obj] = 1
        if up:
            mask[: size // 4] = 2
        if rare:
            y, x = rng.integers(0, size - 2, 2)
            mask[y:y + 2, x:x + 2] = 2
        img = (rng.integers(0, 60, (size, size, 3)) + 150 * (mask[..., None] > 0)).astype(np.uint8)
        name = names.format(i=i, seq=i // 6, frame=i % 6)
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


def fp_of(root, **opts):
    cfg = config.resolve_config({"dataset": "folder", "data_root": str(root), "run_dir": str(root / "run"), **opts})
    return plan.fingerprint(cfg, progress=False)


FAST = plan.fixed_machine(train_ips_128=400.0, eval_ips_128=1600.0)


@pytest.fixture(autouse=True)
def _no_installed_weights(monkeypatch):
    """The rules under test read the data, not this machine's installed weights packages (CI installs them);
    the pretrained-encoder tests below say which weights exist."""
    monkeypatch.setattr(plan, "_pretrained", lambda backbone: False)


def test_plan_is_deterministic_every_choice_has_a_reason_and_train_reads_it(tmp_path):
    root = write_folder(tmp_path / "d")
    texts = [plan.to_yaml(plan.plan_from_options({"dataset": "folder", "data_root": str(root)}, FAST, False))
             for _ in range(2)]
    assert texts[0] == texts[1]
    lines = texts[0].splitlines()
    keys = [(i, ln) for i, ln in enumerate(lines) if not ln.startswith("#")]
    assert len(keys) > 15
    for i, ln in keys:  # every key sits under its own one-line reason
        assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 10, ln
    path = tmp_path / "plan.yaml"
    path.write_text(texts[0])
    loaded = config.load_yaml(path)  # what `train --config plan.yaml` reads
    assert loaded["dataset"] == "folder" and loaded["crop"] is True and loaded["schedule"] == "cosine"
    assert loaded["ema"] == 0.0 and "--ema 0.999 scored" in lines[lines.index("ema: 0.0") - 1]  # measured, off
    config.resolve_config(loaded)


def test_tiny_objects_get_a_larger_input_than_large_ones(tmp_path):
    # a budget that holds enough epochs at 128 px but not at 256: large objects stay at 128, objects of
    # 4 px in a 256-px image get as much of the native size as the budget allows
    probe = plan.fixed_machine(train_ips_128=20.0, eval_ips_128=80.0)
    large = plan.make_plan(fp_of(write_folder(tmp_path / "l", size=256, obj=80)), probe, 180)
    tiny = plan.make_plan(fp_of(write_folder(tmp_path / "t", size=256, obj=4)), probe, 180)
    side = lambda p: min(sizes.size_hw(p.choices["image_size"].value))  # noqa: E731
    assert side(large) == 128 and side(tiny) > 128
    assert "median object" in tiny.choices["image_size"].reason
    assert tiny.choices["scale_range"].value[0] > large.choices["scale_range"].value[0]  # no zooming out of sight


def test_rare_class_gets_ce_dice_and_weights_balanced_data_plain_ce(tmp_path):
    rare = plan.make_plan(fp_of(write_folder(tmp_path / "r", rare=True)), FAST, 600)
    assert rare.choices["loss"].value == "ce+dice" and "rare" in rare.choices["loss"].reason
    assert rare.choices["class_weighting"].value == "median"
    even = plan.make_plan(fp_of(write_folder(tmp_path / "e", obj=28)), FAST, 600)
    assert even.choices["loss"].value == "ce" and even.choices["class_weighting"].value == "none"


def test_sequence_names_give_a_grouped_val_split(tmp_path):
    seq = plan.plan_from_options({"dataset": "folder", "data_root": str(
        write_folder(tmp_path / "s", names="seq{seq}_{frame:04d}"))}, FAST, False)
    assert seq.choices["val_group"].value == "prefix" and "sequences" in seq.choices["val_group"].reason
    config.resolve_config(seq.overrides())  # the grouped split is valid for the folder reader
    ids = plan.plan_from_options({"dataset": "folder", "data_root": str(write_folder(tmp_path / "i"))}, FAST, False)
    assert "val_group" not in ids.choices
    # photos numbered per breed (Abyssinian_1 .. _200) are not frames of a sequence
    assert plan.name_groups([f"Abyssinian_{i}" for i in range(1, 60)] + [f"Bengal_{i}" for i in range(1, 60)])[0] is None


def test_aerial_like_data_gets_vflip_stated_as_a_guess(tmp_path):
    aerial = plan.make_plan(fp_of(write_folder(tmp_path / "a", n=48)), FAST, 600)
    assert aerial.choices["vflip"].value is True and "guess" in aerial.choices["vflip"].reason
    street = plan.make_plan(fp_of(write_folder(tmp_path / "u", up=True)), FAST, 600)
    assert street.choices["vflip"].value is False and "'up'" in street.choices["vflip"].reason


def test_user_options_win_and_the_plan_records_them(tmp_path):
    p = plan.make_plan(fp_of(write_folder(tmp_path / "d")), FAST, 600, {"batch_size": 3, "loss": "dice"})
    assert p.choices["batch_size"].value == 3 and p.choices["loss"].value == "dice"
    assert p.overridden == ["batch_size", "loss"]
    text = plan.to_yaml(p)
    assert "# overridden by you: batch_size, loss" in text and "set by you (the plan chose" in text


def test_train_auto_saves_the_plan_and_records_the_overrides(tmp_path):
    import json
    import time
    slept = []

    def slow_speed(model, backbone, size_hw, batch):  # a probe that takes a second (a sleep: a lower bound)
        if not slept:
            time.sleep(1.0)
            slept.append(1)
        return FAST.speed(model, backbone, size_hw, batch)
    probe = plan.Machine("cpu", 16.0, "fp32", slow_speed, 2, read_s_per_image=0.01)
    root = write_folder(tmp_path / "d", n=12, size=32, obj=8)
    run = tmp_path / "run"
    summary = train_mod.train_auto({"dataset": "folder", "data_root": str(root), "epochs": 1, "image_size": 32,
                               "run_dir": str(run), "precise_bn": 0, "figure_samples": 0, "time_budget": 600,
                               "scale_range": [0.8, 1.25]}, probe)  # needs --crop, which the plan sets
    assert summary["run_dir"] == str(run)
    # defect 15: the fingerprint and the speed probe are part of the run's --time-budget
    s = json.loads((run / "summary.json").read_text())
    assert s["time_s"]["planning"] >= 1.0
    assert s["time_used_s"] >= s["time_s"]["planning"] + s["time_s"]["setup"] + s["time_s"]["train"]
    saved = (run / "plan.yaml").read_text()
    assert "# overridden by you: image_size, scale_range, epochs" in saved
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["epochs"] == 1 and cfg["image_size"] == 32 and cfg["schedule"] == "cosine" and cfg["crop"] is True
    assert cfg["scale_range"] == [0.8, 1.25]
    assert config.load_yaml(run / "plan.yaml")["epochs"] == 1


def test_recipe_warnings_fire_for_recipes_that_cannot_work():
    cfg = config.TrainConfig(batch_size=64, image_size=128)
    lines = plan.recipe_warnings(cfg, n_train=54, n_val=5, steps_per_epoch=1, object_scale=0.01)
    text = "\n".join(lines)
    assert len(lines) == 3
    assert "larger than the training split (54 images)" in text
    assert "5 image(s)" in text and "about 1.3 px" in text
    cfg = config.TrainConfig(batch_size=16)
    assert plan.recipe_warnings(cfg, n_train=300, n_val=300, steps_per_epoch=19, object_scale=0.3) == []
    assert "1 optimiser step(s) per epoch" in plan.recipe_warnings(dataclasses.replace(cfg, batch_size=48), 60, 50, 1)[0]


def test_train_start_logs_the_warnings(tmp_path):
    # 8-px squares in 128-px images, trained on 32-px crops: 2-px objects
    root = write_folder(tmp_path / "d", n=12, size=128, obj=8)
    run = tmp_path / "run"
    assert main(["train", *tiny_run(dataset="folder", data_root=root, limit=None, batch_size=None, epochs=1, crop=True,
                                    precise_bn=0, figure_samples=0, cache="memory", run_dir=run)]) == 0
    log = (run / "train.log").read_text()
    assert "--batch-size 64 is larger than the training split" in log
    assert "validation split holds 2 image(s)" in log
    assert re.search(r"median object of the smallest class is about [23]\.\d px", log)


def test_an_edited_plan_with_a_bad_key_or_value_is_one_line(tmp_path, capsys):
    root = write_folder(tmp_path / "d")
    text = plan.to_yaml(plan.plan_from_options({"dataset": "folder", "data_root": str(root)}, FAST, False))
    capsys.readouterr()
    for bad, named in (("batch_size:", "batch_sise:"), ("lr: 0.001", "lr: fast")):
        path = tmp_path / "plan.yaml"
        path.write_text(text.replace(bad, named))
        assert main(["train", "--config", str(path), "--run-dir", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err
        assert ("batch_sise" in err) if bad == "batch_size:" else ("lr" in err and "fast" in err)
    assert not (tmp_path / "r").exists()


def test_a_budget_that_cannot_hold_one_epoch_says_the_epoch_time(tmp_path):
    slow = plan.fixed_machine(train_ips_128=0.05, eval_ips_128=0.2)
    with pytest.raises(PixelsegError, match=r"--time-budget 30s cannot hold one epoch: one epoch takes about \d+s"):
        plan.make_plan(fp_of(write_folder(tmp_path / "d")), slow, 30)


def _split_folder(root, train_names, val_names, size=32):
    """A folder dataset with its own split: images/{train,val}/ + masks/{train,val}/."""
    rng = np.random.default_rng(0)
    for split, names in (("train", train_names), ("val", val_names)):
        for d in ("images", "masks"):
            (root / d / split).mkdir(parents=True)
        for n in names:
            mask = np.zeros((size, size), np.uint8)
            mask[4:12, 4:12] = 1
            Image.fromarray((rng.integers(0, 255, (size, size, 3))).astype(np.uint8)).save(
                root / "images" / split / f"{n}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"{n}.png")
    return root


def test_val_group_only_where_val_is_carved_out_of_train_else_the_shared_sequences_note(tmp_path):
    # defect 6: a dataset with its own val split (val/ sub-folders) gets no val_group (it would do nothing
    # there), but the note that its official split shares sequences between train and val
    seqs = [f"seq{s}_{f:04d}" for s in range(4) for f in range(6)]
    root = _split_folder(tmp_path / "own", [n for n in seqs if int(n[-1]) < 4], [n for n in seqs if int(n[-1]) >= 4])
    p = plan.make_plan(fp_of(root), FAST, 600)
    assert "val_group" not in p.choices
    assert any("official split shares sequences seq0, seq1, seq2" in n for n in p.notes)
    assert "# note: the official split shares sequences" in plan.to_yaml(p)
    # the same names with val carved out of train (no val/): val_group, as before
    carved = plan.make_plan(fp_of(write_folder(tmp_path / "c", names="seq{seq}_{frame:04d}")), FAST, 600)
    assert carved.choices["val_group"].value == "prefix" and carved.notes == []
    assert carved.fingerprint.val_carved and not p.fingerprint.val_carved


def _save_image(path, arr):
    if path.suffix == ".tif":
        import tifffile
        tifffile.imwrite(path, arr)
    else:
        Image.fromarray(arr).save(path)


@pytest.mark.parametrize("kind, expected", [
    ("first_grey_then_rgb", 3),   # 8-bit grey first, RGB after: read as RGB (the plan used to say 1)
    ("all_grey8", 3),             # 8-bit grey is read as RGB: the docs promise in_channels only for 16-bit/multi-band
    ("all_grey16", 1),            # 16-bit grey: one channel
    ("multiband", 4),             # 4-band rasters: four (the fingerprint used to fail reading them as RGB)
])
def test_in_channels_decided_from_every_sampled_image(tmp_path, kind, expected):
    root = write_folder(tmp_path / "d", n=12, size=32, obj=8)
    rng = np.random.default_rng(1)
    for i, path in enumerate(sorted((root / "images").iterdir())):
        if kind == "first_grey_then_rgb" and i > 0:
            continue
        path.unlink()
        if kind in ("first_grey_then_rgb", "all_grey8"):
            _save_image(path, rng.integers(0, 255, (32, 32), dtype=np.uint8))
        elif kind == "all_grey16":
            Image.fromarray(rng.integers(0, 65535, (32, 32)).astype(np.uint16)).save(path)
        else:
            _save_image(path.with_suffix(".tif"), rng.integers(0, 65535, (32, 32, 4)).astype(np.uint16))
    p = plan.make_plan(fp_of(root), FAST, 600)
    assert p.fingerprint.channels == expected
    assert p.choices["in_channels"].value == expected if expected != 3 else "in_channels" not in p.choices
    cfg = config.resolve_config(p.overrides() | {"run_dir": str(tmp_path / "r")})
    from pixelseg.data.io import read_input
    for path in (root / "images").iterdir():  # every image reads with the planned count
        assert read_input(path, cfg.in_channels).shape[2] == expected


def test_images_that_need_different_channel_counts_are_one_line(tmp_path):
    import tifffile
    root = write_folder(tmp_path / "d", n=6, size=32, obj=8)
    rng = np.random.default_rng(2)
    for i, path in enumerate(sorted((root / "images").iterdir())):
        path.unlink()
        tifffile.imwrite(path.with_suffix(".tif"), rng.integers(0, 255, (32, 32, 4 if i % 2 else 1), dtype=np.uint8))
    with pytest.raises(PixelsegError, match=r"need different channel counts \(img\d\.tif: 1, img\d\.tif: 4\)"):
        fp_of(root)



def synthetic_fp(n_train=400, hw=(4000, 6000), n_val=100):
    """A fingerprint without files: ``n_train`` photos of ``hw`` with one mid-sized class."""
    return plan.Fingerprint(
        dataset="folder", n_train=n_train, n_val=n_val, sampled=120, sizes_hw=[hw] * min(n_train, 1000), channels=3,
        bit_depth=8, mean=[0.5] * 3, std=[0.2] * 3, class_names=["bg", "thing"], pixel_freq=[0.8, 0.2],
        image_freq=[1.0, 1.0], object_scale=[0.9, 0.2], up_asymmetry=0.2, side_asymmetry=0.01,
        train_names=[f"p{i}" for i in range(n_train)], val_names=[], val_group_option=True, val_carved=True)


def test_crop_plans_a_cache_side_that_fits_memory_and_the_epoch_estimate_pays_the_rescale():
    # defect 14: 400 photos of 6000×4000 would cache ~36 GB at source resolution; --crop only ever uses a
    # shorter side of 1.5 × the input's, so the plan caps the cache there (and lower where RAM is short)
    fp = synthetic_fp()
    p = plan.make_plan(fp, FAST, 600)
    hw = sizes.size_hw(p.choices["image_size"].value)
    side = p.choices["cache_max_side"].value
    assert p.choices["crop"].value is True and side is not None
    assert side == 32 * -(-1.5 * min(hw) * 1.5 // 32)  # hi 1.5 × the shorter side, at aspect 1.5, up to 32
    assert "would take ~35.8 GB decoded" in p.choices["cache_max_side"].reason
    cached_gb = 400 * side * (side / 1.5) * 4 / 2 ** 30
    assert cached_gb <= plan.CACHE_MEMORY_SHARE * 16
    small = plan.make_plan(fp, plan.fixed_machine(400.0, 1600.0, memory_gb=16.0, host_memory_gb=0.5), 600,
                           {"image_size": p.choices["image_size"].value})
    low = small.choices["cache_max_side"].value
    assert max(hw) <= low < side and "lowered from" in small.choices["cache_max_side"].reason
    assert 400 * low * (low / 1.5) * 4 / 2 ** 30 <= plan.CACHE_MEMORY_SHARE * 0.5
    # the epoch estimate pays for rescaling each cached image (from the capped size): the same count of
    # photos at the input size is cheaper by exactly that
    args = (FAST, "unet", "mobilenet_v2", hw, 16, True)
    assert plan.rescale_seconds(fp, FAST, hw)[1] == (side * 2 // 3, side)
    big_s, small_s = plan.epoch_seconds(fp, *args), plan.epoch_seconds(synthetic_fp(hw=hw), *args)
    extra = 400 * probe.RESIZE_S_PER_MPX * (side * (side * 2 // 3) - hw[0] * hw[1]) / 1e6 / FAST.cores
    assert extra > 0 and big_s - small_s == pytest.approx(extra)
    # images no larger than what the crops use are cached as they are; without --crop no cache side
    assert plan.make_plan(synthetic_fp(hw=(128, 128)), FAST, 600).choices["cache_max_side"].value is None
    assert "cache_max_side" not in plan.make_plan(fp, FAST, 600, {"crop": False}).choices


def test_accumulation_only_where_the_batch_does_not_fit_memory():
    # suspected defect: "no accumulation: it fits memory" was said without looking at memory
    fp = synthetic_fp(n_train=2000, hw=(512, 512))
    roomy = plan.make_plan(fp, plan.fixed_machine(400.0, 1600.0, memory_gb=64.0), 3600, {"image_size": 512})
    assert roomy.choices["accumulate"].value == 1 and "within 50% of the 64 GB RAM" in roomy.choices["accumulate"].reason
    # a batch of 16 at 512×512 needs ~7.5 GB here (U-Net/MobileNetV2's activations): a 4 GB machine accumulates
    tight = plan.make_plan(fp, plan.fixed_machine(400.0, 1600.0, memory_gb=4.0), 3600, {"image_size": 512})
    acc, batch = tight.choices["accumulate"].value, tight.choices["batch_size"].value
    assert batch == 16 and acc > 1 and batch % acc == 0
    assert tight.fingerprint is fp and "over 50% of the 4 GB RAM" in tight.choices["accumulate"].reason
    assert plan.fixed_machine(memory_gb=4.0).step_gb("unet", "mobilenet_v2", (512, 512), batch // acc) <= 2.0
    assert plan.fixed_machine(memory_gb=4.0).step_gb("unet", "mobilenet_v2", (512, 512), 2 * batch // acc) > 2.0
    config.resolve_config(tight.overrides() | {"run_dir": "r", "data_root": "x"})  # batch divides by accumulate


# -- pretrained encoders: used where installed, fitted to the data, named where missing -------------------------

def test_plan_uses_an_installed_pretrained_encoder_and_fits_it_to_the_data(tmp_path, monkeypatch):
    photos = fp_of(write_folder(tmp_path / "p", up=True))  # an 'up': photos of the world
    aerial = fp_of(write_folder(tmp_path / "a"))  # squares anywhere: no 'up', the aerial/microscopy guess
    grey = fp_of(write_folder(tmp_path / "g"))
    grey.channels = 1
    monkeypatch.setattr(plan, "_pretrained", lambda backbone: backbone == "efficientnet_lite0")
    p = plan.make_plan(photos, FAST, 600).choices
    assert p["backbone"].value == "efficientnet_lite0" and p["weights"].value == "imagenet"
    assert "installed" in p["weights"].reason and "no 'up'" not in p["weights"].reason
    assert p["freeze_encoder"].value is False and p["encoder_lr_mult"].value == 1.0
    assert p["freeze_encoder_bn"].value is False
    a = plan.make_plan(aerial, FAST, 600).choices
    assert a["weights"].value == "imagenet" and "no 'up'" in a["weights"].reason
    g = plan.make_plan(grey, FAST, 600).choices
    assert g["weights"].value is None and "1-channel" in g["weights"].reason
    text = plan.to_yaml(plan.plan_from_options({"dataset": "folder", "data_root": str(tmp_path / "p")}, FAST, False))
    cfg = config.resolve_config(yaml.safe_load(text))
    assert cfg.backbone == "efficientnet_lite0" and cfg.weights == "imagenet"


def test_plan_without_weights_trains_from_scratch_and_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "_pretrained", lambda backbone: False)
    p = plan.make_plan(fp_of(write_folder(tmp_path / "p", up=True)), FAST, 600).choices
    assert p["backbone"].value == "mobilenet_v2" and p["weights"].value is None
    assert "pip install 'pixelseg[weights]'" in p["weights"].reason
    assert p["encoder_lr_mult"].value == 1.0 and p["freeze_encoder_bn"].value is False


def test_a_pretrained_encoder_gets_the_largest_input_that_still_holds_its_epochs(monkeypatch):
    """From scratch the size is raised while twice MIN_EPOCHS fit at the next size; pretrained while
    MIN_EPOCHS_PRETRAINED do (the measured pets and cardamage runs: larger inputs beat more epochs)."""
    fp = synthetic_fp(n_train=300, hw=(640, 640), n_val=60)
    machine = plan.fixed_machine(train_ips_128=60.0, eval_ips_128=240.0)
    args = (fp, machine, 600, "unet", "efficientnet_lite0", 8, True)
    scratch_hw = plan.choose_size(*args, min_epochs=plan.MIN_EPOCHS_PRETRAINED)[0]
    hw, why, _ = plan.choose_size(*args, min_epochs=plan.MIN_EPOCHS_PRETRAINED, pretrained=True)
    assert hw[0] > scratch_hw[0]

    def epochs(side):
        return 600 / plan.epoch_seconds(fp, machine, "unet", "efficientnet_lite0", (side, side), 8, True)
    bigger = plan.SIZE_LADDER[plan.SIZE_LADDER.index(hw[0]) + 1]
    assert epochs(hw[0]) >= plan.MIN_EPOCHS_PRETRAINED > epochs(bigger)
    monkeypatch.setattr(plan, "_pretrained", lambda backbone: backbone == "efficientnet_lite0")
    c = plan.make_plan(fp, machine, 600).choices
    assert c["image_size"].value == hw[0] and "224 px" in c["image_size"].reason


def test_classes_in_few_images_are_named_with_the_oversampling_option():
    common = plan.choose_oversampling(synthetic_fp())
    assert common[:2] == ("oversample_rare", 0.0) and "every class" in common[2]
    fp = synthetic_fp()
    fp.class_names, fp.image_freq, fp.pixel_freq = ["bg", "thing", "airbag"], [1.0, 0.5, 0.03], [0.8, 0.19, 0.01]
    key, value, why = plan.choose_oversampling(fp)
    # named with the option, left off (measured within noise on coco-cardamage)
    assert key == "oversample_rare" and value == 0.0 and "airbag 3%" in why and "thing" not in why
    assert f"{plan.RARE_IMAGES:g} would draw" in why
    assert ("oversample_rare", value, why) in plan.choose_loss(fp)
