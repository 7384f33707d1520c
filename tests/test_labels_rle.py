"""RLE codecs both ways (CVAT masks, Label Studio brushes, COCO), and their refusals of runs that do not fit."""
import numpy as np
import pytest

from pixelseg.core.errors import PixelsegError
from pixelseg.labels.rle import (coco_counts_from_string, coco_rle_decode, coco_rle_encode, cvat_rle_decode,
                                 cvat_rle_encode, ls_rle_decode, ls_rle_encode)


def masks():
    rng = np.random.default_rng(1)
    yield np.zeros((7, 9), bool)
    yield np.ones((5, 4), bool)
    for _ in range(6):
        h, w = rng.integers(1, 30, 2)
        yield rng.random((h, w)) < rng.random()
    big = np.zeros((300, 320), bool)   # runs longer than the 16-bit run field of Label Studio's codec
    big[20:290, :] = True
    yield big


@pytest.mark.parametrize("m", list(masks()), ids=lambda m: f"{m.shape[1]}x{m.shape[0]}-{int(m.sum())}")
def test_round_trips_are_exact(m):
    h, w = m.shape
    counts, left, top, bw, bh = cvat_rle_encode(m)
    assert sum(counts) == bw * bh
    np.testing.assert_array_equal(cvat_rle_decode(counts, left, top, bw, bh, h, w), m)
    np.testing.assert_array_equal(ls_rle_decode(ls_rle_encode(m), h, w), m)
    rle = coco_rle_encode(m)
    assert sum(coco_counts_from_string(rle["counts"])) == h * w
    np.testing.assert_array_equal(coco_rle_decode(rle, h, w), m)


def test_cvat_box_is_the_mask_bounding_box():
    m = np.zeros((10, 12), bool)
    m[3:6, 4:9] = True
    counts, left, top, w, h = cvat_rle_encode(m)
    assert (left, top, w, h) == (4, 3, 5, 3) and counts == [0, 15]
    assert cvat_rle_decode("0, 15", 4, 3, 5, 3, 10, 12).sum() == 15  # the XML attribute's text form


def test_uncompressed_coco_rle_reads_like_pycocotools():
    from pycocotools import mask as mu
    m = np.zeros((6, 5), bool)
    m[1:4, 2:4] = True
    import itertools
    flat = m.T.ravel()  # COCO runs go down columns, starting with background
    runs = [len(list(g)) for _, g in itertools.groupby(flat.tolist())]
    runs = ([0] if flat[0] else []) + runs
    un = {"size": [6, 5], "counts": runs}
    np.testing.assert_array_equal(coco_rle_decode(un, 6, 5), mu.decode(mu.frPyObjects(un, 6, 5)).astype(bool))
    np.testing.assert_array_equal(coco_rle_decode(un, 6, 5), m)


@pytest.mark.parametrize("call", [
    lambda: cvat_rle_decode([3, 4], 0, 0, 3, 3, 10, 10),             # 7 runs for a 9-pixel box
    lambda: cvat_rle_decode([0, 9], 8, 8, 3, 3, 10, 10),             # box past the image edge
    lambda: ls_rle_decode(ls_rle_encode(np.ones((4, 4), bool)), 4, 5),
    lambda: ls_rle_decode(ls_rle_encode(np.ones((4, 4), bool))[:-3], 4, 4),
    lambda: coco_rle_decode({"size": [4, 4], "counts": [3, 4]}, 4, 4),
    lambda: coco_rle_decode({"size": [4, 5], "counts": "0g0"}, 4, 4),
    lambda: coco_rle_decode({"size": [4, 4], "counts": coco_rle_encode(np.ones((5, 5), bool))["counts"]}, 4, 4),
])
def test_runs_that_do_not_fit_the_image_are_refused(call):
    with pytest.raises(PixelsegError):
        call()
