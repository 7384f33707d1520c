"""Fuzzing the configuration: `--config` YAML files (text that may not be YAML, mappings of real and unknown
options with hostile values), every typed option parser (as YAML/Python values and as flag strings), the one
image-size syntax and the serve limits.

Property: the parse gives a value (a config dict every later step can use), or PixelsegError in one line naming
the file and/or the flag; for flag strings argparse's ArgumentTypeError; never another exception or a hang.
Profiles: tests/_fuzz.py.
"""
import argparse
import tempfile
from pathlib import Path

import yaml
from hypothesis import given
from hypothesis import strategies as st

from _fuzz import HOSTILE, TEXT, count, examples, no_hang, one_line_naming
from pixelseg.training.config import OPTIONS, _argparse_type, flag, load_yaml, parse_value, resolve_config
from pixelseg.core.errors import PixelsegError
from pixelseg.core.sizes import Limits, size_hw

KEYS = sorted(OPTIONS)
# values a person plausibly writes, beside the hostile ones: numbers as text, sizes, durations, lists
PLAUSIBLE = st.one_of(st.sampled_from(["128", "360x480", "0", "-1", "1e-4", "15m", "1h30m", "auto", "yes", "no",
                                       "none", "null", "0.5,2.0", "3,2,1", "unet", "mobilenet_v2", "synthetic",
                                       "ce", "dice", "ce+dice", "imagenet", "8x", "x8", "1e400", "nan", "inf"]),
                      st.lists(st.integers(-5, 600), max_size=3))
VALUES = st.one_of(HOSTILE, PLAUSIBLE)


@examples(120)
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_option_parsers(key, value):
    count("config.parse_value")
    try:
        with no_hang(f"parse_value {key}"):
            parse_value(key, value, "--config x.yaml")
    except PixelsegError as exc:
        one_line_naming(exc, flag(key))


@examples(120)
@given(key=st.sampled_from(KEYS), text=st.one_of(TEXT, PLAUSIBLE.map(str)))
def test_flag_strings(key, text):
    count("config.flag")
    try:
        _argparse_type(key)(text)
    except argparse.ArgumentTypeError as exc:
        assert "\n" not in str(exc)


@examples(80)
@given(doc=st.one_of(st.dictionaries(st.one_of(st.sampled_from(KEYS), st.sampled_from([k.replace("_", "-") for k in KEYS]),
                                               TEXT), VALUES, max_size=6),
                     HOSTILE),
       raw=st.one_of(st.none(), st.text(max_size=60)))
def test_config_yaml(tmp_path, doc, raw):
    """A YAML file -> load_yaml -> resolve_config (what `train --config` does before it touches data)."""
    count("config.yaml")
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        path = Path(d) / "ünï config.yaml"
        path.write_text(raw if raw is not None else yaml.safe_dump(doc, allow_unicode=True))
        try:
            with no_hang(f"--config {path}"):
                cfg = resolve_config(load_yaml(path))
        except PixelsegError as exc:
            one_line_naming(exc, path, "--")
            return
        assert set(cfg.to_dict()) >= set(OPTIONS)


@examples(60)
@given(size=VALUES)
def test_size_syntax(size):
    count("sizes.size_hw")
    try:
        h, w = size_hw(size)
    except PixelsegError as exc:
        one_line_naming(exc, "--image-size")
        return
    assert isinstance(h, int) and isinstance(w, int) and h >= 8 and w >= 8


LIMIT_FIELDS = ["max_upload_mb", "max_pixels", "max_mc_samples", "max_queue", "deadline_s", "upload_timeout_s",
                "max_batch", "batch_wait_ms"]


@examples(60)
@given(values=st.dictionaries(st.sampled_from(LIMIT_FIELDS),
                              st.one_of(st.integers(-10, 10 ** 12), st.floats(allow_nan=True, allow_infinity=True)),
                              max_size=4))
def test_serve_limits(values):
    count("sizes.Limits")
    try:
        limits = Limits(**values).check()
    except PixelsegError as exc:
        one_line_naming(exc, "--")
        return
    assert limits.max_upload_bytes >= 0
