"""Joint image+mask augmentation: geometry agrees, padding is ignore_index, outputs are well-formed."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pixelseg.data.augment import build_train_transform
from pixelseg.core.errors import PixelsegError

IGNORE = 255
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _encoded_pair(h=40, w=60):
    """Mask of random classes 0..4; channel 0 of the image encodes the mask, 1 and 2 the position."""
    g = torch.Generator().manual_seed(1)
    mask = torch.randint(0, 5, (h, w), generator=g, dtype=torch.uint8)
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)
    image = torch.stack([mask.long() * 40 + 10, rows, cols]).to(torch.uint8)
    return image, mask


def _blocky_pair(h=60, w=80):
    """Four constant quadrants (classes 0..3), so resizing changes only the pixels at block edges.

    Channel 0 is never 0 (so padding is recognisable); channels 1 and 2 hold the two bits of the
    class as 0/255, so a bilinear blend across one block edge still decodes to one of its two sides.
    """
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[: h // 2, w // 2:] = 1
    mask[h // 2:, : w // 2] = 2
    mask[h // 2:, w // 2:] = 3
    image = torch.stack([mask * 60 + 10, (mask & 1) * 255, (mask >> 1) * 255])
    return image, mask


def _decode(image):
    """Class encoded by a (resized) `_blocky_pair` image: the bits in channels 1 and 2, thresholded.

    -1 where a bit is an (almost) even blend of both sides: either label is right there.
    """
    bits = image[1:3].long()
    decoded = (bits[0] > 127).long() + 2 * (bits[1] > 127).long()
    tie = ((bits - 127.5).abs() < 8).any(dim=0)
    return decoded.masked_fill(tie, -1)


def _assert_aligned(image, mask):
    decoded = _decode(image)
    sure = (decoded >= 0) & (mask != IGNORE)
    assert torch.equal(decoded[sure], mask[sure])
    assert sure.float().mean() > 0.9 * (mask != IGNORE).float().mean()


def test_flips_apply_to_image_and_mask_identically():
    image, mask = _encoded_pair()
    h, w = mask.shape
    transform = build_train_transform(None, hflip=True, vflip=True)
    seen = set()
    for seed in range(24):
        torch.manual_seed(seed)
        out_img, out_mask = transform(image, mask)
        assert torch.equal(out_img[0].long(), out_mask * 40 + 10)  # mask moved exactly with the image
        hflipped = out_img[2, 0, 0].item() == w - 1
        vflipped = out_img[1, 0, 0].item() == h - 1
        expected = mask.long()
        if hflipped:
            expected = expected.flip(-1)
        if vflipped:
            expected = expected.flip(-2)
        assert torch.equal(out_mask, expected)
        seen.add((hflipped, vflipped))
    assert seen == {(False, False), (True, False), (False, True), (True, True)}


def test_no_flip_when_disabled():
    image, mask = _encoded_pair()
    transform = build_train_transform(None, hflip=False, vflip=False)
    for seed in range(5):
        torch.manual_seed(seed)
        out_img, out_mask = transform(image, mask)
        assert torch.equal(out_img, image) and torch.equal(out_mask, mask.long())


def test_padding_is_ignore_index_and_black():
    image, mask = _encoded_pair(20, 30)  # smaller than the crop in both directions
    transform = build_train_transform(64, crop=True, hflip=False)
    for seed in range(5):
        torch.manual_seed(seed)
        out_img, out_mask = transform(image, mask)
        assert out_img.shape == (3, 64, 64) and out_mask.shape == (64, 64)
        pad = out_mask == IGNORE
        # the whole 20×30 input fits inside the 64×64 crop, so everything else is padding
        assert pad.sum().item() == 64 * 64 - 20 * 30
        assert torch.all(out_img[:, pad] == 0)
        assert torch.equal(out_img[0][~pad].long(), out_mask[~pad] * 40 + 10)


def test_padding_with_negative_ignore_index():
    image, mask = _encoded_pair(20, 30)
    out_img, out_mask = build_train_transform((24, 40), crop=True, ignore_index=-1)(image, mask)
    assert out_mask.dtype == torch.int64
    assert (out_mask == -1).sum().item() == 24 * 40 - 20 * 30


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize("size, expected", [(32, (32, 32)), ((24, 40), (24, 40))])
@pytest.mark.parametrize("crop", [False, True])
def test_output_shapes_and_dtypes(mask_dtype, size, expected, crop):
    image, mask = _blocky_pair()
    scale = (0.5, 1.5) if crop else None
    transform = build_train_transform(size, scale=scale, crop=crop, vflip=True, color_jitter=0.2)
    out_img, out_mask = transform(image, mask.to(mask_dtype))
    assert out_img.dtype == torch.uint8 and out_img.shape == (3, *expected)
    assert out_mask.dtype == torch.int64 and out_mask.shape == expected
    assert type(out_img) is torch.Tensor and type(out_mask) is torch.Tensor


def test_plain_resize_keeps_label_set_and_alignment():
    image, mask = _blocky_pair(60, 80)
    out_img, out_mask = build_train_transform((30, 40), hflip=False)(image, mask)
    assert set(out_mask.unique().tolist()) == {0, 1, 2, 3}  # nearest: no blended or new labels
    # half size of a blocky mask: each quadrant is exactly 15×20 ...
    assert torch.equal(out_mask[:15, 20:], torch.ones(15, 20, dtype=torch.long))
    # ... and at every pixel the image (bilinear) leans to the mask's class (nearest), edges included
    _assert_aligned(out_img, out_mask)


@pytest.mark.parametrize("h, w", [(37, 47), (29, 41), (90, 130)])
def test_resized_mask_matches_image_at_odd_scales(h, w):
    image, mask = _blocky_pair(61, 83)
    out_img, out_mask = build_train_transform((h, w), hflip=False)(image, mask)
    _assert_aligned(out_img, out_mask)


def test_scale_crop_keeps_mask_and_image_aligned():
    image, mask = _blocky_pair(60, 80)
    transform = build_train_transform((48, 64), scale=(0.5, 2.0), crop=True, hflip=True, vflip=True)
    for seed in range(20):
        torch.manual_seed(seed)
        out_img, out_mask = transform(image, mask)
        labels = set(out_mask.unique().tolist())
        assert labels <= {0, 1, 2, 3, IGNORE}
        pad = out_mask == IGNORE
        assert torch.all(out_img[:, pad] == 0)  # padding: image black where the mask is ignored
        # every pixel, block edges included: the mask is on the side the image's blend leans to
        _assert_aligned(out_img, out_mask)


def test_color_jitter_changes_image_only():
    image, mask = _encoded_pair()
    transform = build_train_transform(None, hflip=False, color_jitter=0.5)
    changed = False
    for seed in range(5):
        torch.manual_seed(seed)
        out_img, out_mask = transform(image, mask)
        assert torch.equal(out_mask, mask.long())
        changed |= not torch.equal(out_img, image)
    assert changed


def test_transform_pickles_for_dataloader_workers():
    import pickle

    image, mask = _blocky_pair()
    transform = build_train_transform((24, 32), scale=(0.5, 2.0), crop=True, color_jitter=0.1)
    clone = pickle.loads(pickle.dumps(transform))
    torch.manual_seed(5)
    a = transform(image, mask)
    torch.manual_seed(5)
    b = clone(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_seeded_reproducibility():
    image, mask = _blocky_pair()
    transform = build_train_transform(48, scale=(0.5, 2.0), crop=True, vflip=True, color_jitter=0.3)
    torch.manual_seed(123)
    a = transform(image, mask)
    torch.manual_seed(123)
    b = transform(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    outputs = []
    for seed in range(6):
        torch.manual_seed(seed)
        outputs.append(transform(image, mask)[0])
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


@pytest.mark.parametrize("kwargs", [dict(image_size=None, crop=True), dict(image_size=32, scale=(0.5, 2.0)),
                                    dict(image_size=32, crop=True, scale=(2.0, 0.5)),
                                    dict(image_size=(0, 10)), dict(image_size=(1, 2, 3)),
                                    dict(image_size="big")])
def test_bad_arguments_raise(kwargs):
    image_size = kwargs.pop("image_size")
    with pytest.raises(PixelsegError):
        build_train_transform(image_size, **kwargs)


def test_camvid_sample():
    root = DATA / "camvid"
    if not (root / "train").is_dir():
        pytest.skip(f"CamVid sample not found at {root}")
    from PIL import Image

    name = sorted((root / "train").glob("*.png"))[0].name
    image = torch.from_numpy(np.array(Image.open(root / "train" / name).convert("RGB"))).permute(2, 0, 1).contiguous()
    mask = torch.from_numpy(np.array(Image.open(root / "trainannot" / name)))
    assert image.shape == (3, 360, 480) and mask.shape == (360, 480)
    original = set(mask.unique().tolist())
    transform = build_train_transform((360, 480), scale=(0.5, 2.0), crop=True, color_jitter=0.2)
    for seed in range(3):
        torch.manual_seed(seed)
        out_img, out_mask = transform(image, mask)
        assert out_img.shape == (3, 360, 480) and out_mask.shape == (360, 480)
        assert set(out_mask.unique().tolist()) <= original | {IGNORE}
    # plain resize: the mask equals PIL's nearest-neighbour resize of the same file
    _, small = build_train_transform((180, 240), hflip=False)(image, mask)
    pil = np.array(Image.fromarray(mask.numpy()).resize((240, 180), Image.NEAREST))
    assert np.array_equal(small.numpy(), pil)
