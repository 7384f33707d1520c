"""--oversample-rare: LVIS's repeat factors, the fixed-length sampler that draws by them, and a run using it."""
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_run
from pixelseg.cli import main
from pixelseg.core.distributed import DistInfo
from pixelseg.core.errors import PixelsegError
from pixelseg.data import synthetic
from pixelseg.data.loader import RepeatFactorSampler, make_loader, repeat_factors
from pixelseg.data.shards import ShardDataset


def test_repeat_factors_follow_the_lvis_formula():
    # 10 images; class 0 everywhere, class 1 in 5, class 2 in 1, class 3 in none
    present = np.zeros((10, 4), bool)
    present[:, 0] = True
    present[:5, 1] = True
    present[9, 2] = True
    per_image, per_class = repeat_factors(present, 0.4)
    assert per_class == pytest.approx([1.0, 1.0, math.sqrt(0.4 / 0.1), 1.0])  # 0.4/0.5 < 1 -> 1
    assert per_image[9] == pytest.approx(2.0) and (per_image[:9] == 1).all()
    # an image holding two rare classes takes the larger factor
    present[9, 1] = True
    present[8, 2] = True
    per_image, per_class = repeat_factors(present, 0.8)
    assert per_class[2] == pytest.approx(2.0) and per_image[9] == pytest.approx(2.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.1, 10), min_size=1, max_size=40), st.integers(1, 3), st.integers(0, 5))
def test_every_sample_gets_the_floor_or_ceiling_of_its_share(factors, world, epoch):
    draws = []
    for rank in range(world):
        s = RepeatFactorSampler(factors, DistInfo(rank=rank, world_size=world), seed=3)
        s.set_epoch(epoch)
        mine = list(s)
        assert len(mine) == len(s) == math.ceil(len(factors) / world)  # epochs keep the split's length
        draws += mine
    total = len(draws)
    counts = Counter(draws)
    f = np.asarray(factors)
    for i, expected in enumerate(total * f / f.sum()):
        assert math.floor(expected + 1e-9) <= counts.get(i, 0) <= math.ceil(expected - 1e-9), (i, expected)


def test_the_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch):
        s = RepeatFactorSampler([1, 1, 3, 1, 1, 1, 2, 1], DistInfo(), seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 1) == order(0, 1)  # a resumed run replays its epoch
    assert order(0, 1) != order(0, 2) or order(0, 2) != order(0, 3)
    assert Counter(order(0, 1))[2] >= 2  # the rare image comes back within the epoch


@pytest.mark.parametrize("bad", [[], [1.0, 0.0], [1.0, float("nan")]])
def test_bad_factors_are_refused(bad):
    with pytest.raises(PixelsegError, match="repeat factors"):
        RepeatFactorSampler(bad, DistInfo())


def test_streamed_shards_refuse_oversampling():
    shards = ShardDataset(["s-000000.tar"], [3], synthetic.INFO, (8, 8))
    with pytest.raises(PixelsegError, match="--oversample-rare.*streamed"):
        make_loader(shards, 2, train=True, repeat=np.ones(3))


def test_a_run_oversamples_and_says_which_classes(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny_run(epochs=1, oversample_rare=1.0), "--run-dir", str(run)]) == 0
    log = (run / "train.log").read_text()
    line = next(x for x in log.splitlines() if "oversampling rare classes (--oversample-rare 1)" in x)
    assert "images x" in line or "no class is that rare" in line
    assert "oversample_rare: 1.0" in (run / "config.yaml").read_text()
