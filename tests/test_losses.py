"""Losses and class weights against values worked out independently (by hand or with plain numpy)."""

import math
import warnings

import numpy as np
import pytest
import torch

from pixelseg.core.errors import PixelsegError
from pixelseg.training.losses import build_loss, class_weights

IGNORE = 255


def _np_softmax(logits):  # logits (N, C, H, W)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_ce(logits, target, weight=None, ignore=IGNORE):
    """Weighted-mean CE over non-ignored pixels, written out pixel by pixel."""
    p = _np_softmax(logits)
    num = den = 0.0
    n, c, h, w = logits.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                t = target[i, y, x]
                if t == ignore:
                    continue
                wt = 1.0 if weight is None else weight[t]
                num += -wt * math.log(p[i, t, y, x])
                den += wt
    return num / den


def _np_dice(logits, target, ignore=IGNORE):
    p = _np_softmax(logits)
    n, c, h, w = logits.shape
    scores = []
    for k in range(c):
        inter = psum = gsum = 0.0
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    t = target[i, y, x]
                    if t == ignore:
                        continue
                    g = 1.0 if t == k else 0.0
                    inter += p[i, k, y, x] * g
                    psum += p[i, k, y, x]
                    gsum += g
        if gsum > 0:  # classes present in the target only
            scores.append(2 * inter / (psum + gsum))
    return 1 - float(np.mean(scores))


def _np_focal(logits, target, alpha=None, gamma=2.0, ignore=IGNORE):
    p = _np_softmax(logits)
    total, count = 0.0, 0
    n, c, h, w = logits.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                t = target[i, y, x]
                if t == ignore:
                    continue
                pt = p[i, t, y, x]
                a = 1.0 if alpha is None else alpha[t]
                total += -a * (1 - pt) ** gamma * math.log(pt)
                count += 1
    return total / count


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 3, (2, 3, 5), generator=g)  # class 3 never appears
    target[0, 0, :3] = IGNORE
    target[1, 2, 4] = IGNORE
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0])
    return logits.float(), target, weight


# ---- hand-computed with uniform logits: p = 1/2 everywhere ---------------------------------------

def test_uniform_logits_by_hand():
    logits = torch.zeros(1, 2, 1, 4)
    target = torch.tensor([[[0, 0, 1, IGNORE]]])
    # CE: -log(1/2) on each of the 3 valid pixels.
    assert build_loss("ce", 2)(logits, target).item() == pytest.approx(math.log(2), rel=1e-6)
    # Dice: class 0: 2*(0.5+0.5) / (1.5 + 2) = 4/7; class 1: 2*0.5 / (1.5 + 1) = 0.4.
    assert build_loss("dice", 2)(logits, target).item() == pytest.approx(1 - (4 / 7 + 0.4) / 2, rel=1e-6)
    # Focal: (1 - 1/2)^2 * log 2.
    assert build_loss("focal", 2)(logits, target).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    # CE weighted: (w0*2 + w1) * log2 / (w0*2 + w1) = log 2 again; focal alpha: (2*w0 + w1)/3 * 0.25 log 2.
    w = torch.tensor([3.0, 1.0])
    assert build_loss("ce", 2, weight=w)(logits, target).item() == pytest.approx(math.log(2), rel=1e-6)
    assert build_loss("focal", 2, weight=w)(logits, target).item() == pytest.approx(7 / 3 * 0.25 * math.log(2), rel=1e-6)


# ---- against numpy reference formulas -------------------------------------------------------------

def test_ce_matches_numpy(case):
    logits, target, weight = case
    got = build_loss("ce", 4)(logits, target).item()
    assert got == pytest.approx(_np_ce(logits.double().numpy(), target.numpy()), rel=1e-5)
    got_w = build_loss("ce", 4, weight=weight)(logits, target).item()
    assert got_w == pytest.approx(_np_ce(logits.double().numpy(), target.numpy(), weight.numpy()), rel=1e-5)
    assert got_w != pytest.approx(got, rel=1e-3)


def test_dice_matches_numpy_and_skips_absent_class(case):
    logits, target, _ = case
    got = build_loss("dice", 4)(logits, target).item()
    assert got == pytest.approx(_np_dice(logits.double().numpy(), target.numpy()), rel=1e-5)


def test_focal_matches_numpy(case):
    logits, target, weight = case
    np_logits = logits.double().numpy()
    assert build_loss("focal", 4)(logits, target).item() == pytest.approx(
        _np_focal(np_logits, target.numpy()), rel=1e-5)
    assert build_loss("focal", 4, weight=weight)(logits, target).item() == pytest.approx(
        _np_focal(np_logits, target.numpy(), alpha=weight.numpy()), rel=1e-5)


def test_weighted_sum(case):
    logits, target, _ = case
    np_logits, np_target = logits.double().numpy(), target.numpy()
    expected = 1.0 * _np_ce(np_logits, np_target) + 0.5 * _np_dice(np_logits, np_target)
    assert build_loss("ce:1.0+dice:0.5", 4)(logits, target).item() == pytest.approx(expected, rel=1e-5)
    expected = _np_ce(np_logits, np_target) + _np_dice(np_logits, np_target) + 2 * _np_focal(np_logits, np_target)
    assert build_loss(" CE + dice + focal:2 ", 4)(logits, target).item() == pytest.approx(expected, rel=1e-5)


# ---- ignore_index ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["ce", "dice", "focal", "ce+dice"])
def test_ignored_pixels_have_no_influence(case, spec):
    logits, target, weight = case
    loss = build_loss(spec, 4, weight=weight)
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    x = logits.clone().requires_grad_(True)
    value = loss(x, target)
    value.backward()
    assert torch.all(x.grad[ignored] == 0)
    assert torch.any(x.grad[~ignored] != 0)
    changed = logits.clone()
    changed[ignored] = 50.0
    assert loss(changed, target).item() == pytest.approx(value.item(), rel=1e-6)


@pytest.mark.parametrize("spec", ["ce", "dice", "focal"])
def test_all_ignored_gives_zero_not_nan(spec):
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), IGNORE)
    value = build_loss(spec, 3)(logits, target)
    assert value.item() == 0.0
    value.backward()  # graph still connected
    assert torch.all(logits.grad == 0)


def test_custom_ignore_index(case):
    logits, target, _ = case
    t = target.clone()
    t[t == IGNORE] = -1
    assert build_loss("ce", 4, ignore_index=-1)(logits, t).item() == pytest.approx(
        _np_ce(logits.double().numpy(), t.numpy(), ignore=-1), rel=1e-5)


def test_perfect_prediction_is_near_zero():
    target = torch.tensor([[[0, 1], [2, IGNORE]]])
    logits = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 30
    for spec in ("ce", "dice", "focal"):
        assert build_loss(spec, 3)(logits, target).item() < 1e-6


# ---- numerics, devices, errors --------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["ce", "dice", "focal"])
def test_bf16_autocast_computes_in_float32(case, spec):
    logits, target, weight = case
    loss = build_loss(spec, 4, weight=weight)
    reference = loss(logits.bfloat16().float(), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits.bfloat16(), target)
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)


def test_large_logits_stay_finite():
    logits = torch.tensor([[[[1e4]], [[-1e4]]]])
    target = torch.tensor([[[1]]])
    for spec in ("ce", "dice", "focal"):
        assert torch.isfinite(build_loss(spec, 2)(logits, target))


def test_weight_follows_module_to():
    loss = build_loss("ce+focal", 3, weight=torch.ones(3))
    loss = loss.to(torch.float64)
    assert all(t.weight.dtype == torch.float64 for t in loss.terms.values())
    assert torch.isfinite(loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)))


@pytest.mark.parametrize("spec", ["", "bce", "ce+", "ce:abc", "ce:-1", "ce+ce", "dice:nan", "ce*dice"])
def test_bad_spec_raises(spec):
    with pytest.raises(PixelsegError) as err:
        build_loss(spec, 3)
    assert "\n" not in str(err.value)


def test_unknown_term_lists_valid_terms():
    with pytest.raises(PixelsegError, match="ce, dice, focal"):
        build_loss("ce+lovasz", 3)


def test_wrong_weight_length_raises():
    with pytest.raises(PixelsegError, match="one weight per class"):
        build_loss("ce", 3, weight=torch.ones(4))


def test_label_out_of_range_raises():
    loss = build_loss("ce", 3)
    with pytest.raises(PixelsegError, match=r"\[3\]"):
        loss(torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 3]]]))


def test_trains_a_tiny_model():
    """The losses give useful gradients: a 1×1 conv learns a colour→class rule."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    target = x.argmax(dim=1)
    target[:, 0, :] = IGNORE
    model = torch.nn.Conv2d(3, 3, 1)
    loss = build_loss("ce+dice", 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    first = loss(model(x), target).item()
    for _ in range(60):
        opt.zero_grad()
        value = loss(model(x), target)
        value.backward()
        opt.step()
    assert value.item() < 0.5 * first


# ---- class weights --------------------------------------------------------------------------------

def test_uniform_weights():
    assert torch.equal(class_weights([5, 0, 7], "uniform"), torch.ones(3))


def test_inverse_weights_by_hand():
    # w ∝ 1/count = 6/60, 2/60, 1/60; mean 1 -> 2, 2/3, 1/3.
    w = class_weights([10, 30, 60], "inverse")
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3, 1 / 3]))
    assert w.mean().item() == pytest.approx(1.0)


def test_median_weights_1d_by_hand():
    # freq .1 .3 .6 -> median .3 -> 3, 1, .5
    assert torch.allclose(class_weights(np.array([10, 30, 60]), "median"), torch.tensor([3.0, 1.0, 0.5]))
    # even count: median of .1 .2 .3 .4 is .25
    assert torch.allclose(class_weights([10, 20, 30, 40], "median"), torch.tensor([2.5, 1.25, 0.25 / 0.3, 0.625]))


def test_median_weights_2d_uses_images_where_class_present():
    counts = torch.tensor([[10, 0, 90],      # image total 100
                           [0, 120, 80],     # image total 200
                           [20, 30, 50]])    # image total 100
    # class 0: 30 px / (100 + 100); class 1: 150 / (200 + 100); class 2: 220 / 400
    freq = np.array([30 / 200, 150 / 300, 220 / 400])
    expected = np.median(freq) / freq
    assert torch.allclose(class_weights(counts, "median"), torch.tensor(expected, dtype=torch.float32))
    # the 1-D shortcut on the summed counts gives a different answer (per-class / global total)
    assert not torch.allclose(class_weights(counts.sum(0), "median"), torch.tensor(expected, dtype=torch.float32))


def test_sqrt_median_weights_are_the_root_of_median_ones():
    # freq .1 .3 .6 -> median weights 3, 1, .5 -> sqrt
    w = class_weights(np.array([10, 30, 60]), "sqrt_median")
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor([3.0, 1.0, 0.5]).sqrt())
    counts = torch.tensor([[10, 0, 90], [0, 120, 80], [20, 30, 50]])
    assert torch.allclose(w := class_weights(counts, "sqrt_median"), class_weights(counts, "median").sqrt())
    assert w[2] > class_weights(counts, "median")[2]  # the common class is pushed down less
    with pytest.warns(UserWarning):
        w = class_weights([10, 0, 30], "sqrt_median")
    assert w[1] == 0.0


def test_sqrt_median_is_a_config_choice():
    from pixelseg.training.config import TrainConfig
    assert "sqrt_median" in TrainConfig.__dataclass_fields__["class_weighting"].metadata.get("choices", ())


def test_absent_class_gets_zero_and_warns():
    with pytest.warns(UserWarning, match=r"\[1\]"):
        w = class_weights([10, 0, 30], "inverse")
    assert torch.allclose(w, torch.tensor([2.25, 0.0, 0.75]))  # ∝ 3/30, 0, 1/30 with mean 1
    with pytest.warns(UserWarning):
        w = class_weights([10, 0, 30], "median")
    assert torch.allclose(w, torch.tensor([2.0, 0.0, 2 / 3]))  # freq .25 .75, median .5


def test_class_weights_errors():
    with pytest.raises(PixelsegError, match="uniform, inverse, median"):
        class_weights([1, 2], "sqrt")
    with pytest.raises(PixelsegError):
        class_weights([0, 0], "median")
    with pytest.raises(PixelsegError):
        class_weights([1, -2], "inverse")
    with pytest.raises(PixelsegError):
        class_weights(np.zeros((2, 2, 2)), "median")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        class_weights([1, 2], "median")  # no warning when all classes are present
