"""config.py: one source of truth for the training options, YAML through the parser, nulls that survive."""
import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run
from pixelseg.training import config
from pixelseg.core import sizes
from pixelseg.cli import _parsers, build_parser, main
from pixelseg.core.errors import PixelsegError

PACKAGE = Path(__file__).resolve().parents[1] / "pixelseg"
TINY = tiny_run(epochs=1, precise_bn=1)


def _train_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_every_option_is_one_complete_entry():
    train_parser = _parsers()[1]
    flags = _train_flags(train_parser)
    for key, f in config.OPTIONS.items():
        meta = f.metadata
        assert meta["help"] and meta["group"] in config.GROUPS, key
        assert config.flag(key) in flags, key
        if f.default is not None:  # every default is already canonical: parsing it changes nothing
            assert config.parse_value(key, f.default) == f.default, key


def test_help_is_grouped_prints_each_default_once_and_imports_no_torch():
    code = ("import sys\nfrom pixelseg.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'train --help imported torch'\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, '--help imported torch'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "COLUMNS": "200", "PYTHONPATH": str(PACKAGE.parent)})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for title in config.GROUPS.values():
        assert f"\n{title}:\n" in text, title
    for line in text.splitlines():
        assert line.count("(default:") <= 1, line
    assert text.count("(default:") == len(config.OPTIONS)


def test_every_flag_named_in_the_package_exists():
    """An error message that names a flag the parser does not have is worse than none."""
    parser = build_parser()
    known = _train_flags(parser)
    for sub in parser._subparsers._group_actions[0].choices.values():
        known |= _train_flags(sub)
    named = {}
    for path in PACKAGE.rglob("*.py"):
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9](?![\w])", path.read_text()):
            named.setdefault(flag, path.name)
    # other programs' flags: torchrun's --nproc_per_node (the regex stops at the _) and --max-restarts,
    # tensorboard's and mlflow's
    external = {"--nproc", "--max-restarts", "--logdir", "--backend-store-uri", "--force-reinstall"}  # + pip's
    missing = {f: p for f, p in named.items() if f not in known and f not in external}
    assert not missing, f"flags named in the source but not in the parser: {missing}"
    assert "--model" in named and "--image-size" in named  # the scan does find flags


@pytest.mark.parametrize("value, expected", [
    (128, 128), ("128", 128), ("360x480", [360, 480]), ("360X480", [360, 480]), ("64×64", 64),
    ([360, 480], [360, 480]), ((64, 64), 64), ([32], 32),
])
def test_one_size_syntax(value, expected):
    assert sizes.parse_size(value) == expected
    assert sizes.size_hw(value) == ((expected, expected) if isinstance(expected, int) else tuple(expected))


@pytest.mark.parametrize("value", ["360,480", "big", "4", [1, 2, 3], True, "0x64", None])
def test_bad_sizes_name_the_flag(value):
    with pytest.raises(PixelsegError, match="--image-size"):
        sizes.size_hw(value)


def test_tristate_and_bools_are_parsed_once():
    assert [config.parse_tristate(v) for v in ("auto", "AUTO", "yes", "no", True, False, "1", "0")] == \
        ["auto", "auto", True, False, True, False, True, False]
    with pytest.raises(PixelsegError, match="--freeze-encoder maybe: expected auto, yes or no"):
        config.parse_value("freeze_encoder", "maybe")
    assert config.parse_value("weights", "None") is None and config.parse_value("weights", "IMAGENET") == "imagenet"


@pytest.mark.parametrize("key", [k for k, f in config.OPTIONS.items() if f.metadata["nullable"]])
def test_recorded_nulls_survive_the_yaml_round_trip(tmp_path, key):
    """config.yaml -> --config must give back the very same config for every option that can be null."""
    overrides = {"dataset": "synthetic", "run_dir": str(tmp_path / "r"), key: None}
    if key == "run_dir":
        overrides.pop("run_dir")
    if key == "epochs":  # no epoch limit is only valid where a time budget ends the run
        overrides["time_budget"] = "10m"
    cfg = config.resolve_config(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    parser, train_parser = _parsers()
    train_parser.set_defaults(**config.load_yaml(path))
    again = config.resolve_config(config.overrides_from_args(parser.parse_args(["train", "--config", str(path)])))
    assert again == cfg
    if key not in ("train_split", "val_split", "backbone", "run_dir"):  # those resolve to concrete values
        assert getattr(cfg, key) is None and getattr(again, key) is None


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("image-size: 360x480\nweights: null\nepochs: 3\nfreeze_encoder: 'yes'\n")
    parser, train_parser = _parsers()
    train_parser.set_defaults(**config.load_yaml(path))
    got = config.overrides_from_args(parser.parse_args(["train", "--config", str(path), "--epochs", "5"]))
    assert got == {"image_size": [360, 480], "weights": None, "epochs": 5, "freeze_encoder": True}


@pytest.mark.parametrize("text, message", [
    ("epochs: null\n", "--epochs: null (no epoch limit) needs --time-budget"),
    ("epochs: two\n", "c.yaml: epochs: expected int, got str 'two'"),
    ("epochs: 0\n", "c.yaml: --epochs 0: must be >= 1"),
    ("workers: many\n", "c.yaml: --workers many: give a number of DataLoader worker processes"),
    ("optimizer: lbfgs\n", "c.yaml: --optimizer lbfgs: choose one of adam, adamw, sgd"),
    ("learning_rate: 0.1\n", "unknown option(s) learning_rate"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_yaml_names_file_and_option(tmp_path, capsys, text, message):
    (tmp_path / "c.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--model", "nosuchnet"], "unknown architecture 'nosuchnet'"),
    (["--backbone", "nosuchbone"], "unknown backbone 'nosuchbone'"),
    (["--model", "deeplabv3", "--backbone", "vgg16"], "deeplabv3 cannot use backbone 'vgg16'"),
    (["--loss", "ce+hinge"], "unknown loss term 'hinge'"),
    (["--dataset", "imagenet"], "--dataset 'imagenet'"),
    (["--scale-range", "0.5,2"], "--scale-range needs --crop"),
    (["--precision", "fp16"], "--precision fp16 needs a CUDA device"),
    (["--batch-size", "6", "--accumulate", "4"], "must divide by world size 1 × --accumulate 4"),
    (["--data-root", "/nonexistent/pixelseg", "--dataset", "camvid"], "/nonexistent/pixelseg"),
])
def test_configuration_is_validated_before_anything_is_created(tmp_path, capsys, flags, message):
    run = tmp_path / "r"
    assert main(["train", *TINY, "--run-dir", str(run), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_bad_flag_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "0"])
    assert exc.value.code == 2 and "argument --epochs: 0: must be >= 1" in capsys.readouterr().err


def test_recorded_config_reproduces_a_weights_none_run(tmp_path):
    """`pixelseg train --config RUN/config.yaml` trains the same model again, bit for bit."""
    first = tmp_path / "first"
    assert main(["train", *TINY, "--deterministic", "--run-dir", str(first)]) == 0
    cfg_a = yaml.safe_load((first / "config.yaml").read_text())
    assert cfg_a["weights"] is None
    second = tmp_path / "second"
    assert main(["train", "--config", str(first / "config.yaml"), "--run-dir", str(second)]) == 0
    cfg_b = yaml.safe_load((second / "config.yaml").read_text())
    assert {**cfg_a, "run_dir": None} == {**cfg_b, "run_dir": None}
    a = torch.load(first / "last.pt", weights_only=True)["model"]
    b = torch.load(second / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_color_jitter_on_non_rgb_input_is_refused_by_the_config():
    with pytest.raises(PixelsegError, match="--color-jitter works on RGB images, not on 4-channel inputs"):
        config.resolve_config({"in_channels": 4, "color_jitter": 0.2, "dataset": "folder"})
    assert config.resolve_config({"in_channels": 4, "dataset": "synthetic", "run_dir": "r"}).color_jitter == 0.0
