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
    from pixelseg.data.io import UnreadableImage, image_size, read_image, read_mask
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(30000, 30000))
    for read in (image_size, read_image, read_mask):
        with pytest.raises(UnreadableImage, match="bomb.png: not read: Image size"):
            read(path)


@pytest.mark.parametrize("value", [[], ["a"], {"a": 1}])
def test_a_path_option_given_a_list(value):
    """resolve_config({'data_root': []}) used to raise TypeError from Path(); now one line naming the flag."""
    from pixelseg.config import resolve_config
    from pixelseg.errors import PixelsegError
    with pytest.raises(PixelsegError, match="^--data-root .*: expected a path$"):
        resolve_config({"data_root": value})
