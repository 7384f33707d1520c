"""Optimiser parameter groups and lr schedules against hand-written formulas."""

import math

import pytest
import torch
from torch import nn

from pixelseg.core.errors import PixelsegError
from pixelseg.training.optim import build_optimizer, build_scheduler


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3)             # frozen below
        self.conv = nn.Conv2d(4, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        for p in self.encoder.parameters():
            p.requires_grad_(False)


def _wd_of(optimizer, param):
    groups = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    assert len(groups) <= 1
    return groups[0]["weight_decay"] if groups else None


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_param_groups(name, cls):
    model = Tiny()
    opt = build_optimizer(model, name, lr=0.01, weight_decay=1e-4)
    assert type(opt) is cls
    assert _wd_of(opt, model.conv.weight) == 1e-4
    assert _wd_of(opt, model.head.weight) == 1e-4
    assert _wd_of(opt, model.conv.bias) == 0.0
    assert _wd_of(opt, model.bn.weight) == 0.0
    assert _wd_of(opt, model.bn.bias) == 0.0
    assert _wd_of(opt, model.encoder.weight) is None  # frozen: not optimised at all
    assert _wd_of(opt, model.encoder.bias) is None
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(g["lr"] == 0.01 for g in opt.param_groups)


def test_sgd_momentum_no_nesterov():
    opt = build_optimizer(Tiny(), "SGD", lr=0.1, momentum=0.8)
    assert all(g["momentum"] == 0.8 and g["nesterov"] is False for g in opt.param_groups)


def test_frozen_weights_do_not_move_and_decay_skips_bn():
    torch.manual_seed(0)
    model = Tiny()
    before_enc = model.encoder.weight.clone()
    opt = build_optimizer(model, "adamw", lr=0.1, weight_decay=0.5)
    # zero gradients everywhere: only decoupled weight decay can move a parameter
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    conv_before, bn_before = model.conv.weight.clone(), model.bn.weight.clone()
    opt.step()
    assert torch.equal(model.encoder.weight, before_enc)
    assert torch.allclose(model.conv.weight, conv_before * (1 - 0.1 * 0.5))  # AdamW: p -= lr*wd*p
    assert torch.equal(model.bn.weight, bn_before)


@pytest.mark.parametrize("kwargs", [dict(name="rmsprop"), dict(name="sgd", lr=0.0), dict(name="adam", weight_decay=-1)])
def test_optimizer_errors(kwargs):
    kwargs = {"lr": 0.01, **kwargs}
    with pytest.raises(PixelsegError):
        build_optimizer(Tiny(), **kwargs)


def test_no_trainable_params():
    model = nn.Conv2d(1, 1, 1).requires_grad_(False)
    with pytest.raises(PixelsegError, match="no trainable"):
        build_optimizer(model, "adam", lr=0.01)


def _lrs(name, steps, **kw):
    opt = build_optimizer(nn.Conv2d(1, 1, 1), "sgd", lr=0.1)
    sched = build_scheduler(opt, name, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # the lr used by this optimiser step
        assert all(g["lr"] == out[-1] for g in opt.param_groups)
        opt.step()
        sched.step()
    return out


def test_constant_with_warmup():
    lrs = _lrs("constant", 8, total_steps=6, warmup_steps=4)
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1])


def test_poly_deeplab_formula():
    base, total, power = 0.1, 10, 0.9
    lrs = _lrs("poly", 12, total_steps=total, power=power)
    for t in (0, 1, 5, 9):
        assert lrs[t] == pytest.approx(base * (1 - t / total) ** power)
    assert lrs[5] == pytest.approx(0.1 * 0.5 ** 0.9)
    assert lrs[10] == 0.0 and lrs[11] == 0.0  # reaches 0 after the last step and stays there


def test_poly_with_warmup_and_floor():
    lrs = _lrs("poly", 11, total_steps=10, warmup_steps=2, power=2.0, min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)
    # after warm-up the decay runs over the remaining 8 steps: t = step - 2
    assert lrs[2] == pytest.approx(0.1)
    assert lrs[6] == pytest.approx(0.1 * (0.1 + 0.9 * (1 - 4 / 8) ** 2))  # = 0.0325
    assert lrs[10] == pytest.approx(0.01)


def test_cosine():
    lrs = _lrs("cosine", 11, total_steps=10, min_lr_ratio=0.0)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.05)  # halfway: cos(pi/2) = 0
    assert lrs[2] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lrs[10] == pytest.approx(0.0, abs=1e-12)
    warm = _lrs("cosine", 11, total_steps=10, warmup_steps=5, min_lr_ratio=0.2)
    assert warm[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert warm[5] == pytest.approx(0.1)
    assert warm[10] == pytest.approx(0.02)
    assert all(a >= b for a, b in zip(warm[4:], warm[5:]))


def test_scheduler_resume_from_state_dict():
    def make():
        model = nn.Conv2d(1, 1, 1)
        opt = build_optimizer(model, "adamw", lr=0.1, weight_decay=0.01)
        return model, opt, build_scheduler(opt, "cosine", total_steps=20, warmup_steps=3)

    _, opt, sched = make()
    full = []
    for _ in range(20):
        full.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    _, opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    state = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    _, opt2, sched2 = make()
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    resumed = []
    for _ in range(13):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(full[7:])


@pytest.mark.parametrize("kwargs", [dict(name="step"), dict(name="poly", total_steps=5, warmup_steps=5),
                                    dict(name="poly", warmup_steps=-1), dict(name="poly", power=0.0),
                                    dict(name="cosine", min_lr_ratio=1.5)])
def test_scheduler_errors(kwargs):
    kwargs = {"total_steps": 10, **kwargs}
    opt = build_optimizer(nn.Conv2d(1, 1, 1), "sgd", lr=0.1)
    with pytest.raises(PixelsegError):
        build_scheduler(opt, **kwargs)
