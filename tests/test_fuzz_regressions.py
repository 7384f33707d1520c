"""One regression test per defect the fuzz tests (tests/test_fuzz_*.py) found: each input used to end in a
traceback from deep inside Python, PIL or numpy; now it is one line naming the file or field (docs/reliability.md)."""
import json

import pytest

from _labels_exports import WRITERS, coco_dict
from pixelseg.cli import main


def _convert_refused(tmp_path, capsys, fmt, root, *must):
    out = tmp_path / "out"
    rc = main(["convert", "--dataset", fmt, "--data-root", str(root), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    for m in must:
        assert m in last, err
    assert not out.exists()
    return last


@pytest.mark.parametrize("where", ["category id", "image id", "annotation image_id", "annotation category_id"])
def test_coco_list_where_an_id_belongs(tmp_path, capsys, where):
    """A list as an id used to raise TypeError: unhashable type: 'list'."""
    d = coco_dict()
    if where == "category id":
        d["categories"][1]["id"] = [1]
    elif where == "image id":
        d["images"][0]["id"] = [0]
    elif where == "annotation image_id":
        d["annotations"][0]["image_id"] = [0]
    else:
        d["annotations"][0]["category_id"] = [1]
    root = WRITERS["coco"](tmp_path / "coco")
    (root / "train" / "_annotations.coco.json").write_text(json.dumps(d))
    _convert_refused(tmp_path, capsys, "coco", root, str(root))


@pytest.mark.parametrize("size", [[30, ""], [None, 40], ["x", "y"]])
def test_coco_rle_size_not_numbers(tmp_path, capsys, size):
    """An RLE size of ['', ...] or [None, ...] used to raise ValueError/TypeError from int()."""
    d = coco_dict()
    d["annotations"][0]["segmentation"] = {"size": size, "counts": [1200]}
    root = WRITERS["coco"](tmp_path / "coco")
    (root / "train" / "_annotations.coco.json").write_text(json.dumps(d))
    last = _convert_refused(tmp_path, capsys, "coco", root, "_annotations.coco.json", "annotation id 1")
    assert "pass --skip-bad" in last


def test_labelstudio_brush_rle_with_null(tmp_path, capsys):
    """A null inside a brush's rle list used to raise TypeError from int(None)."""
    root = WRITERS["labelstudio"](tmp_path / "ls", brush=True)
    tasks = json.loads((root / "export.json").read_text())
    tasks[0]["annotations"][0]["result"][0]["value"]["rle"][3] = None
    (root / "export.json").write_text(json.dumps(tasks))
    _convert_refused(tmp_path, capsys, "labelstudio", root, "export.json", "result 'r00'")


def test_labelme_label_that_is_a_list(tmp_path, capsys):
    """A shape whose label is a list used to raise TypeError: unhashable type: 'list'."""
    root = WRITERS["labelme"](tmp_path / "lm")
    doc = json.loads((root / "a.json").read_text())
    doc["shapes"][0]["label"] = ["dent"]
    (root / "a.json").write_text(json.dumps(doc))
    _convert_refused(tmp_path, capsys, "labelme", root, str(root))


def test_a_decompression_bomb_file_is_one_line(tmp_path, capsys):
    """A PNG header claiming 30000×30000 used to raise PIL's DecompressionBombError (not an OSError) out of
    data/io.py; the readers now refuse it in one line naming the file (datasets skip it as unreadable)."""
    from test_fuzz_images import bomb_png
    from pixelseg.data.io import UnreadableImage, image_hw, read_image, read_mask
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(30000, 30000))
    for read in (image_hw, read_image, read_mask):
        with pytest.raises(UnreadableImage, match="bomb.png: not read: Image size"):
            read(path)


@pytest.mark.parametrize("value", [[], ["a"], {"a": 1}])
def test_a_path_option_given_a_list(value):
    """resolve_config({'data_root': []}) used to raise TypeError from Path(); now one line naming the flag."""
    from pixelseg.training.config import resolve_config
    from pixelseg.core.errors import PixelsegError
    with pytest.raises(PixelsegError, match="^--data-root .*: expected a path$"):
        resolve_config({"data_root": value})


@pytest.mark.parametrize("key,value", [("rgb_bands", [float("inf")]), ("image_size", [float("inf"), 8]),
                                       ("image_size", float("-inf"))])
def test_an_infinite_number_where_an_integer_belongs(key, value):
    """int(inf) used to escape parse_rgb_bands / parse_size as OverflowError (long fuzz profile)."""
    from pixelseg.training.config import flag, parse_value
    from pixelseg.core.errors import PixelsegError
    with pytest.raises(PixelsegError, match=f"^{flag(key)} "):
        parse_value(key, value)


def test_a_flag_or_key_with_a_newline_is_quoted_in_one_line(tmp_path):
    """`--cache $'\\n'` and a YAML key '\\n' used to print a two-line message (the value shown bare)."""
    import argparse
    from pixelseg.training.config import _argparse_type, load_yaml
    from pixelseg.core.errors import PixelsegError
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        _argparse_type("cache")("\n")
    assert "\n" not in str(exc.value) and "'\\n'" in str(exc.value)
    path = tmp_path / "c.yaml"
    path.write_text('"\\n": 1\n')
    with pytest.raises(PixelsegError) as exc:
        load_yaml(path)
    assert "\n" not in str(exc.value) and "unknown option(s) '\\n'" in str(exc.value)


@pytest.mark.parametrize("field,value", [("max_upload_mb", float("inf")), ("deadline_s", float("inf"))])
def test_an_infinite_serve_limit_is_refused(field, value):
    """`serve --max-upload-mb inf` used to start, then fail every upload with OverflowError (a 500)."""
    from pixelseg.core.errors import PixelsegError
    from pixelseg.core.sizes import Limits
    with pytest.raises(PixelsegError, match="must be a finite number"):
        Limits(**{field: value}).check()
    assert Limits(max_upload_mb=1.7e302).check().max_upload_bytes == 2 ** 62  # huge but finite: no overflow


# the last two: 1×1 TIFFs with a few bytes changed, from the long profile (tifffile raised TypeError /
# numpy a reshape ValueError on them)
DAMAGED_TIFFS = [b"II*\x00", b"II+\x00", b"MM\x00*\x00",
                 b'II*\x00\x08\x00\x00\x00\t\x00\x01\x01\x04\x00\x01\x00\x00\x00\x01\x00\x00\x00\x01\x01\x04\x00\x01\x00\x00\x00\x01\x00\x00\x00\x02\x01\x03\x00\x01\x00\x00\x00\x08\x00\x00\x00\x03\x01\x03\x00\x01\x00\x00\x00\x01\x00\x00\x00\x06\x01\x03\x00\x01\x00\x00\x00\x01\x00\x00\x00\x11\x01\x04\x00\x01\x00\x00\x00z\x00\x00\x00\x16\x01\x04\x00\x01\x00\x00\x00\x01\x00\x00\x00\x17\x01\x04\x00\x01\x00\x00\x00\x01\x00\x00\x00\x1c\x01\x03\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00~',
                 b'II*\x00\x08\x00\x00\x00\x08\x00\x00\x01\x01\x00\x01\x00\x00\x00\x01\x00\x00\x00\x01\x01\x04\x00\x01\x00\x00\x00\x01\x00\x00\x00\x03\x01\x03\x00\x01\x00\x00\x00\x01\x00\x00\x00\x06\x01\x03\x00\x01\x00\x00\x00\x01\x00\x00\x00\x11\x01\x04\x00\x01\x00\x00\x00n\x00\x00\x00\x16\x01\x04\x00\x01\x00\x00\x00\x01\x00\x00\x00\x17\x01\x04\x00\x01\x00\x00\x00\x01\x00\x00\x00\x1c\x01\x03\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00']


@pytest.mark.parametrize("data", DAMAGED_TIFFS)
def test_a_truncated_tiff_header(tmp_path, data):
    """A TIFF cut after its magic number (struct.error) or with damaged tags (TypeError, an empty array's
    ValueError) used to escape image_hw (then input_size) / read_bands as a traceback."""
    from pixelseg.data.io import UnreadableImage, image_hw, read_bands
    path = tmp_path / "cut.tif"
    path.write_bytes(data)
    refused = 0
    for read in (image_hw, read_bands):
        try:
            read(path)  # a header intact enough to give a size is an answer
        except UnreadableImage as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), exc
            refused += 1
    assert refused >= 1  # no pixels can be read from any of them


@pytest.mark.parametrize("cfg,flag_", [({"model": 128}, "--model 128: unknown architecture"),
                                       ({"backbone": "128"}, "--model unet --backbone 128: unknown backbone")])
def test_an_unknown_model_in_a_config_file_names_the_option(tmp_path, cfg, flag_):
    """`model: 128` in a --config file used to say "unknown architecture '128'" without naming the option."""
    import yaml
    from pixelseg.training.config import load_yaml, resolve_config
    from pixelseg.core.errors import PixelsegError
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({k: str(v) for k, v in cfg.items()}))
    with pytest.raises(PixelsegError, match=f"^{flag_}"):
        resolve_config(load_yaml(path))


def test_a_yolo_data_yaml_folder_name_too_long_for_the_os(tmp_path, capsys):
    """data.yaml `path:` of 5000 characters used to raise OSError (File name too long) from Path.is_dir()."""
    root = WRITERS["yolo"](tmp_path / "yolo")
    (root / "data.yaml").write_text("path: " + "x" * 5000 + "\ntrain: images/train\nnames:\n  0: dent\n  1: scratch\n")
    out = tmp_path / "out"
    rc = main(["convert", "--dataset", "yolo", "--data-root", str(root), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err, err  # the folder next to data.yaml is used, as without `path`
    assert (out / "convert_report.json").is_file()


def test_a_labelme_image_path_too_long_for_the_os(tmp_path, capsys):
    """imagePath of 5000 characters used to raise OSError (File name too long) from Path.is_file(); now the
    image is reported missing, in one line naming the JSON file."""
    root = WRITERS["labelme"](tmp_path / "lm")
    doc = json.loads((root / "a.json").read_text())
    doc["imagePath"] = "y" * 5000 + ".jpg"
    (root / "a.json").write_text(json.dumps(doc))
    last = _convert_refused(tmp_path, capsys, "labelme", root, "a.json", "not found")
    assert "pass --skip-bad" in last
