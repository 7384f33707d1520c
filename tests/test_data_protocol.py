"""Every class that holds a loaded split answers data.protocol.SplitDataset, so train/evaluate/folds ask it
instead of testing types (issue 21)."""
from pathlib import Path

import numpy as np
import pytest

from pixelseg.data import synthetic
from pixelseg.data.base import ArrayDataset, FileDataset, LabelReader, Sample
from pixelseg.data.loader import make_loader
from pixelseg.data.protocol import SplitDataset
from pixelseg.data.shards import ShardDataset
from pixelseg.training.folds import FoldSubset


def _arrays():
    return ArrayDataset(np.zeros((3, 8, 8, 3), np.uint8), np.zeros((3, 8, 8), np.uint8), ["a", "b", "c"],
                        synthetic.INFO, skipped=["bad.png"])


def _cases():
    arrays = _arrays()
    files = FileDataset([Sample("x", Path("x.png"), Path("x_mask.png"))], LabelReader(), synthetic.INFO, (8, 8))
    return {
        "arrays": (arrays, False, False),
        "files": (files, False, True),
        "shards": (ShardDataset(["s-000000.tar"], [3], synthetic.INFO, (8, 8)), True, True),
        "fold of arrays": (FoldSubset([(arrays, [0, 2])]), False, False),
        "fold of files": (FoldSubset([(files, [0]), (arrays, [1])]), False, True),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_each_split_class_answers_the_protocol(case):
    ds, streamed, reads_files = _cases()[case]
    assert isinstance(ds, SplitDataset)
    assert (ds.streamed, ds.reads_files) == (streamed, reads_files)
    assert ds.full_res is False and ds.transform is None and ds.info is synthetic.INFO
    ds.open_skip_channel()
    assert isinstance(ds.collect_skipped(), list) and isinstance(ds.skipped, list)
    if not streamed:  # random access: masks for the epoch figures, read_sample for folds
        assert len(ds.masks) == len(ds)


def test_skips_of_arrays_are_reported_through_the_protocol():
    arrays = _arrays()
    assert arrays.collect_skipped() == ["bad.png"]
    assert FoldSubset([(arrays, [0])]).collect_skipped() == ["bad.png"]


def test_make_loader_batches_map_style_splits():
    loader, _ = make_loader(_arrays(), 2)
    assert [b[0].shape[0] for b in loader] == [2, 1]
