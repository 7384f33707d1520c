"""Oxford-IIIT Pet loader on the real sample (skipped when ../shared/data is absent) and on fakes."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pixelseg.data.base as base
from pixelseg.data import load_split
from pixelseg.data.io import read_image
from pixelseg.core.errors import PixelsegError


def test_splits_sizes_and_labels(pets_root):
    tv = load_split("oxford-pet", pets_root, "trainval", 64)
    te = load_split("oxford-pet", pets_root, "test", 64)
    assert len(tv) == 300 and len(te) == 298          # official lists of the sample
    assert tv.images.shape == (300, 64, 64, 3) and tv.images.dtype == np.uint8
    assert set(np.unique(tv.masks)) == {0, 1, 2}
    assert tv.info.class_names == ["pet", "background", "border"]
    assert not set(tv.names) & set(te.names)


def test_label_meaning_verified_on_the_data(pets_root):
    """Independent check of the trimap semantics: 1=pet sits in the middle, 2=background at the corners,
    3=border is a thin band between them (so the tutorial's text, which swaps 2 and 3, is wrong)."""
    ds = load_split("oxford-pet", pets_root, "trainval", 64)
    m = ds.masks.astype(int)
    corners = np.concatenate([m[:, 0, 0], m[:, 0, -1], m[:, -1, 0], m[:, -1, -1]])
    assert np.mean(corners == 1) > 0.8                 # background at the corners
    assert np.mean(m[:, 32, 32] == 0) > 0.6            # pet in the centre
    frac = np.bincount(m.ravel(), minlength=3) / m.size
    assert frac[2] < frac[0] and frac[2] < frac[1]     # border is the thin class
    # border pixels touch both pet and background far more often than chance
    pet = m == 0
    near_pet = np.zeros_like(pet)
    near_pet[:, 1:] |= pet[:, :-1]; near_pet[:, :-1] |= pet[:, 1:]
    near_pet[:, :, 1:] |= pet[:, :, :-1]; near_pet[:, :, :-1] |= pet[:, :, 1:]
    assert near_pet[m == 2].mean() > 3 * near_pet[m == 1].mean()


def test_decodes_gif_and_rgba_png_named_jpg(pets_root):
    gif, png = pets_root / "images" / "Abyssinian_34.jpg", pets_root / "images" / "Abyssinian_5.jpg"
    assert Image.open(gif).format == "GIF" and Image.open(png).format == "PNG"
    for p in (gif, png):
        arr = read_image(p, (32, 32))
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8


def _fake_pets(root: Path, names, size=(40, 30), trimap_values=(1, 2, 3)):
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / f"{n}.jpg")
        tri = rng.choice(trimap_values, (size[1], size[0])).astype(np.uint8)
        Image.fromarray(tri).save(root / "annotations" / "trimaps" / f"{n}.png")
    lines = "".join(f"{n} 1 1 1\n" for n in names)
    (root / "annotations" / "trainval.txt").write_text(lines)
    (root / "annotations" / "test.txt").write_text(lines)
    return root


def test_unreadable_image_is_skipped_and_counted(tmp_path, capsys):
    root = _fake_pets(tmp_path / "pets", ["a_1", "a_2", "a_3"])
    (root / "images" / "a_2.jpg").write_bytes(b"MATLAB 5.0 MAT-file, not an image")
    ds = load_split("oxford-pet", root, "trainval", 16, use_cache=False)
    assert len(ds) == 2 and ds.names == ["a_1", "a_3"]
    assert len(ds.skipped) == 1 and ds.skipped[0].endswith("a_2.jpg")
    assert "a_2.jpg" in capsys.readouterr().err


def test_mask_value_outside_trimap_range_names_the_file(tmp_path):
    root = _fake_pets(tmp_path / "pets", ["b_1"], trimap_values=(1, 2, 7))
    with pytest.raises(PixelsegError, match=r"b_1\.png.*\[7\]"):
        load_split("oxford-pet", root, "trainval", 16, use_cache=False)


def test_image_mask_size_mismatch_names_the_file(tmp_path):
    root = _fake_pets(tmp_path / "pets", ["c_1"])
    Image.fromarray(np.ones((10, 10), np.uint8)).save(root / "annotations" / "trimaps" / "c_1.png")
    with pytest.raises(PixelsegError, match=r"c_1\.png.*same size"):
        load_split("oxford-pet", root, "trainval", 16, use_cache=False)


def test_missing_dir_and_empty_split(tmp_path):
    with pytest.raises(PixelsegError, match="directory not found"):
        load_split("oxford-pet", tmp_path / "nope", "trainval", 16)
    root = _fake_pets(tmp_path / "pets", ["d_1"])
    (root / "annotations" / "test.txt").write_text("# only comments\n")
    with pytest.raises(PixelsegError, match="test.txt: the split is empty"):
        load_split("oxford-pet", root, "test", 16)
    with pytest.raises(PixelsegError, match="splits trainval, test"):
        load_split("oxford-pet", root, "train", 16)


def test_decode_cache_skips_decoding_on_rerun(tmp_path, monkeypatch):
    root = _fake_pets(tmp_path / "pets", ["e_1", "e_2"])
    first = load_split("oxford-pet", root, "trainval", 16)

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")
    monkeypatch.setattr(base, "read_image", boom)
    second = load_split("oxford-pet", root, "trainval", 16)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.masks, second.masks)
    # a changed file invalidates the cache key
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "images" / "e_1.jpg")
    with pytest.raises(AssertionError, match="decoded again"):
        load_split("oxford-pet", root, "trainval", 16)


def test_batched_fetch_matches_single_items(tmp_path):
    root = _fake_pets(tmp_path / "pets", ["f_1", "f_2", "f_3"])
    ds = load_split("oxford-pet", root, "trainval", 16)
    imgs, masks = ds.__getitems__([2, 0])
    one_img, one_mask = ds[2]
    assert imgs.shape == (2, 3, 16, 16) and imgs.dtype.is_floating_point is False
    assert (imgs[0] == one_img).all() and (masks[0] == one_mask).all()
