"""The runtime's speed rewrites must not change what the model computes.

``fuse_batchnorm``/``prepare_for_inference`` (inference), ``optimize_for_training`` (CPU bf16
training) and U-Net's split skip convolutions (training) are all exact reformulations; these tests
hold each one against the plain model.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pixelseg.models import ARCHITECTURES, create_model
from pixelseg.models.unet import UNet, UNetDecoder
from pixelseg.models.rewrites import _depthwise_s2_grad_input, _FastBackwardDepthwiseConv2d, fuse_batchnorm, optimize_for_training, prepare_for_inference

# Light backbones for the architectures whose defaults are big (the folding is what is under test).
LIGHT = {"deeplabv3plus": "mobilenet_v1", "pspnet": "mobilenet_v1", "fpn": "mobilenet_v2",
         "upernet": "mobilenet_v2", "segformer": "mobilenet_v2"}


def _with_running_stats(model, x):
    """Train-mode passes so BatchNorm running statistics are far from their 0/1 initial values."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * 3 + 1)
    return model.eval()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fold_batchnorm_keeps_outputs(arch):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 96)
    model = _with_running_stats(create_model(arch, LIGHT.get(arch), num_classes=4, weights=None), x)
    n_bn = sum(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    with torch.no_grad():
        ref = model(x)
    folded = copy.deepcopy(model)
    n = fuse_batchnorm(folded)
    with torch.no_grad():
        out = folded(x)
    assert n > 0 and n_bn > 0
    assert sum(type(m) is torch.nn.BatchNorm2d for m in folded.modules()) == n_bn - n
    assert _rel(out, ref) < 1e-4
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.999


def test_fold_batchnorm_folds_every_bn_of_the_tutorial_model():
    """The property, not a count that the next torchvision may change: in this model every BatchNorm
    follows a convolution, and every such pair is folded."""
    model = create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None).eval()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    n_conv = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in model.modules())
    assert n_bn > 0 and fuse_batchnorm(model) == n_bn
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in model.modules()) == n_conv


def test_fold_batchnorm_refuses_training_mode():
    model = create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None).train()
    with pytest.raises(ValueError, match="eval-mode"):
        fuse_batchnorm(model)


def test_prepare_for_inference_bf16_weights_agree_with_fp32():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    model = _with_running_stats(create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None), x)
    with torch.no_grad():
        ref = model(x)
    fast = prepare_for_inference(copy.deepcopy(model), torch.bfloat16, channels_last=True)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    assert not fast.training
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x.contiguous(memory_format=torch.channels_last)).float()
    assert out.shape == ref.shape
    assert _rel(out, ref) < 0.05  # bf16 has 8 mantissa bits
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.95


def test_optimize_for_training_retargets_only_strided_depthwise_convs():
    model = create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None)
    keys = list(model.state_dict())
    fp32 = copy.deepcopy(model)
    assert "depthwise" not in optimize_for_training(fp32, torch.device("cpu"), None)
    assert not any(isinstance(m, _FastBackwardDepthwiseConv2d) for m in fp32.modules())
    strided_dw = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1
                  and m.groups == m.in_channels == m.out_channels and max(m.stride) > 1]
    note = optimize_for_training(model, torch.device("cpu"), torch.bfloat16)
    swapped = [n for n, m in model.named_modules() if isinstance(m, _FastBackwardDepthwiseConv2d)]
    # every strided depthwise conv, and nothing else (MobileNetV2 has some; how many is torchvision's business)
    assert strided_dw and swapped == strided_dw and note.startswith(f"{len(strided_dw)} ")
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("size", [32, 31])  # even: the hand-written bf16 backward; odd: the fp32 fallback
def test_fast_depthwise_conv_gradients_match_fp32(size):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
    fast = copy.deepcopy(plain)
    fast.__class__ = _FastBackwardDepthwiseConv2d
    x = torch.randn(2, 16, size, size)
    grads = []
    for conv, amp in ((plain, False), (fast, True)):  # the reference is plain fp32
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = conv(xx)
        if amp:
            assert y.dtype == torch.bfloat16  # the rest of the network still sees bf16
        (y.float() ** 2).sum().backward()
        grads.append((y.detach().float(), xx.grad, conv.weight.grad))
    for a, b in zip(*grads):
        assert b.shape == a.shape
        assert _rel(b, a) < 0.02  # bf16 inputs: 8 mantissa bits


def test_depthwise_stride2_input_gradient_is_the_transposed_conv():
    """The four stride-1 convs over the parities equal autograd's gradient of the strided conv, tap by tap."""
    torch.manual_seed(0)
    for c, h, w in ((3, 8, 8), (5, 6, 10)):
        weight = torch.randn(c, 1, 3, 3, dtype=torch.float64)
        x = torch.randn(2, c, h, w, dtype=torch.float64, requires_grad=True)
        g = torch.randn(2, c, h // 2, w // 2, dtype=torch.float64)
        torch.nn.functional.conv2d(x, weight, None, 2, 1, 1, c).backward(g)
        got = _depthwise_s2_grad_input(g.contiguous(memory_format=torch.channels_last), weight)
        assert got.shape == x.shape
        assert torch.allclose(got, x.grad, atol=1e-12)


@pytest.mark.parametrize("frozen", [False, True])
def test_unet_split_skip_convs_compute_the_same_function_and_gradients(frozen):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    y = torch.randint(0, 3, (2, 64, 64))
    model = _with_running_stats(create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None), x)
    model.set_encoder_frozen(frozen)
    results = []
    for split in (False, True):
        m = copy.deepcopy(model).train()
        m.set_encoder_frozen(frozen)
        if split:  # the substitution runtime applies for CPU training; the model file stays plain
            assert "skip convolutions split" in optimize_for_training(m, torch.device("cpu"), None)
            # the decoder's pieces are swapped (UNetDecoder.join, the convs), not the model's decode loop
            assert isinstance(m, UNet) and type(m.up_stack) is not UNetDecoder and type(m.last) is not nn.ConvTranspose2d
            assert list(m.state_dict()) == list(model.state_dict())
            with torch.no_grad():  # without grad the plain decode runs (one larger GEMM), same numbers
                assert _rel(m.eval()(x), copy.deepcopy(model).eval()(x)) < 1e-5
            m.train()
        logits = m(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (ref, ref_g), (out, out_g) = results
    assert _rel(out, ref) < 1e-5
    assert ref_g.keys() == out_g.keys() and len(ref_g) > 0
    a = torch.cat([out_g[n].flatten() for n in ref_g])
    b = torch.cat([ref_g[n].flatten() for n in ref_g])
    # fp32 sums in another order through ~50 layers; some BatchNorm biases have ~0 true gradient, so
    # compare against the scale of all gradients rather than tensor by tensor
    assert float((a - b).norm() / b.norm()) < 1e-4
    assert float((a - b).abs().max() / b.abs().max()) < 1e-3


@pytest.mark.parametrize("arch", ["unet", "deeplabv3", "fcn32s", "segnet"])
def test_frozen_encoder_runs_as_a_cached_inference_copy(arch):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    model = _with_running_stats(create_model(arch, num_classes=3, weights=None), x)
    model.set_encoder_frozen(True)
    keys = list(model.state_dict())
    assert "frozen encoder" in optimize_for_training(model, torch.device("cpu"), None)
    assert list(model.state_dict()) == keys  # a class swap, not a new module tree
    model.train()
    xn = (x - model.mean) / model.std
    with torch.no_grad():  # the plain encoder (the copy is for grad-enabled training steps only)
        ref = model.encoder(xn)
    feats = model.encoder(xn)
    flat = (lambda fs: [t for f in fs for t in (f if isinstance(f, tuple) else (f,))])  # noqa: E731
    assert [f.shape for f in flat(feats)] == [f.shape for f in flat(ref)]
    for f, r in zip(flat(feats), flat(ref)):
        assert (torch.equal(f, r) if not f.is_floating_point() else _rel(f, r) < 1e-4) and not f.requires_grad
    cache = lambda: model.encoder.__dict__["_inference_copy_cache"][1]  # noqa: E731
    cached = cache()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in cached.modules())  # folded
    model.encoder(x)
    assert cache() is cached  # reused while nothing changed
    # loading weights (resume, load_state_dict) rebuilds the copy
    sd = model.state_dict()
    first_bn = next(k for k in sd if k.startswith("encoder.") and k.endswith("running_mean"))
    sd[first_bn] = sd[first_bn] + 1.0
    model.load_state_dict(sd)
    model.encoder(x)
    assert cache() is not cached
    # a training step through the copy still trains the decoder, and only the decoder
    logits = model(x)
    logits.float().sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert any(p.grad is not None for n, p in model.named_parameters() if not n.startswith("encoder."))
    # unfrozen, the swapped encoder is the plain one again (gradients reach it)
    model.set_encoder_frozen(False)
    model(x).float().sum().backward()
    assert any(p.grad is not None for p in model.encoder.parameters())


_MALLOC_PROBE = r"""
import ctypes, json, resource
from pixelseg.core.runtime import tune_malloc
note = tune_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def step():  # what a training step does with each large activation: allocate, write, free
    p = libc.malloc(64 * 2**20)
    libc.memset(p, 1, 64 * 2**20)
    libc.free(p)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(json.dumps({"note": note, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def test_tune_malloc_keeps_freed_blocks_in_the_heap():
    """Five allocate-write-free rounds of 64 MB through glibc: its defaults mmap and unmap the block each
    round (all 16 k pages fault again); after tune_malloc the block stays in the heap and no page faults.
    (Through torch the reuse is partial, as its 64-byte-aligned allocations fragment the heap: the gain on
    the training step is measured by benchmarks/speed/bench_throughput.py, docs/benchmarks.md.)"""
    import json
    import os
    import platform
    import subprocess
    import sys
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt is Linux-only")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    res = {}
    for name, env in (("tuned", {}), ("system", {"PIXELSEG_MALLOC": "system"})):
        out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], env={**clean, **env}, capture_output=True,
                             text=True, check=True).stdout
        res[name] = json.loads(out.strip().splitlines()[-1])
    assert res["tuned"]["note"].startswith("freed memory kept") and res["system"]["note"].startswith("system default")
    pages = 5 * 64 * 2**20 // 4096
    assert res["system"]["faults"] >= pages  # the premise: glibc's defaults fault the pages again
    assert res["tuned"]["faults"] < pages // 100, res


def test_cpu_training_runs_activations_out_of_place_with_the_same_gradients():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    y = torch.randint(0, 3, (2, 64, 64))
    plain = create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None).train()
    assert any(m.inplace for m in plain.modules() if type(m) in (nn.ReLU, nn.ReLU6))  # the premise
    fast = copy.deepcopy(plain)
    note = optimize_for_training(fast, torch.device("cpu"), None)
    acts = [m for m in fast.modules() if type(m) in (nn.ReLU, nn.ReLU6)]
    assert acts and not any(m.inplace for m in acts) and "activations out of place" in note
    inplace = copy.deepcopy(fast)  # every other rewrite too, so only the activations differ
    for m in inplace.modules():
        if type(m) in (nn.ReLU, nn.ReLU6):
            m.inplace = True
    grads = []
    for m in (inplace, fast):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
