"""Module rewrites that change how a model runs, never what it computes: faster CPU training steps
(strided depthwise backward, out-of-place activations, U-Net skips without the concatenation, a frozen
encoder as a cached inference copy) and inference preparation (BatchNorm fused into convolutions).
tests/test_runtime.py checks outputs and gradients against the plain model."""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, cast

import torch
import torch.fx
import torch.nn.utils.fusion


def _depthwise_s2_grad_input(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Input gradient of a 3x3, stride-2, padding-1 depthwise conv over an even-sized input.

    Each of the four (row, column) parities of the input sees a fixed subset of the taps, so the
    gradient is four *stride-1* depthwise convs over ``g`` (kernels 1x1, 1x2, 2x1, 2x2 taken from
    the 3x3 weight), written into the interleaved positions. Stride-1 depthwise convs are among
    oneDNN's fast bf16 kernels; its own strided backward-data is not (below).
    """
    n, c, h, w = g.shape
    k = weight[:, 0]  # C x 3 x 3
    gp = torch.nn.functional.pad(g, (0, 1, 0, 1))  # the taps that fall past the last output row/column read 0
    out = torch.empty((n, c, 2 * h, 2 * w), dtype=g.dtype, device=g.device, memory_format=torch.channels_last)
    zero = torch.zeros_like(k[:, 0, 0])
    # input (2i+a, 2j+b) <- output (i, j) through tap (a+1, b+1) and output (i+1, j+1) through tap (a-1, b-1)
    for (a, b), taps in {
        (0, 0): (k[:, 1, 1], zero, zero, zero),
        (0, 1): (k[:, 1, 2], k[:, 1, 0], zero, zero),
        (1, 0): (k[:, 2, 1], zero, k[:, 0, 1], zero),
        (1, 1): (k[:, 2, 2], k[:, 2, 0], k[:, 0, 2], k[:, 0, 0]),
    }.items():
        kernel = torch.stack(taps, -1).view(c, 1, 2, 2)
        out[:, :, a::2, b::2] = torch.nn.functional.conv2d(gp, kernel, None, 1, 0, 1, c)
    return out


class _DepthwiseStride2(torch.autograd.Function):
    """bf16 3x3/stride-2 depthwise conv whose backward avoids oneDNN's strided bf16 backward-data.

    Written by hand because that kernel is pathologically slow on CPU (torch 2.14, on AMX and
    AVX-512-BF16 alike): many times the layer's bf16 forward and weight gradient together
    (docs/benchmarks.md, "Numbers behind choices in the code"). The forward and the weight gradient
    stay oneDNN's.
    """

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.conv2d(x, weight, None, 2, 1, 1, x.shape[1])

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.contiguous(memory_format=torch.channels_last)
        grad_x = _depthwise_s2_grad_input(g, weight) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                g, x, weight, None, [2, 2], [1, 1], [1, 1], False, [0, 0], x.shape[1], [False, True, False]
            )[1]
        return grad_x, grad_w


class _FastBackwardDepthwiseConv2d(torch.nn.Conv2d):
    """A strided depthwise conv whose CPU bf16 training backward does not use oneDNN's slow strided
    bf16 backward-data (see ``_DepthwiseStride2``).

    The common case (3x3, stride 2, padding 1, no bias, even input: every such layer of
    MobileNetV2/EfficientNet-style encoders at even sizes) runs ``_DepthwiseStride2`` in bf16;
    anything else leaves autocast and runs in fp32, the result cast back to bf16. Eval and no-grad
    calls are plain ``nn.Conv2d``. State-dict keys are those of nn.Conv2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            x.is_cpu and torch.is_grad_enabled() and self.weight.requires_grad and torch.is_autocast_enabled("cpu")
        ):
            return super().forward(x)
        out_dtype = torch.get_autocast_dtype("cpu")
        if (
            out_dtype == torch.bfloat16
            and self.kernel_size == (3, 3)
            and self.stride == (2, 2)
            and self.padding == (1, 1)
            and self.dilation == (1, 1)
            and self.bias is None
            and self.padding_mode == "zeros"
            and x.dim() == 4
            and x.shape[2] % 2 == 0
            and x.shape[3] % 2 == 0
        ):
            with torch.autocast("cpu", enabled=False):
                return _DepthwiseStride2.apply(
                    x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last), self.weight.to(torch.bfloat16)
                )
        with torch.autocast("cpu", enabled=False):
            return super().forward(x.float()).to(out_dtype)


def optimize_for_training(model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> str:
    """Per-device rewrites for training, applied as module substitutions; returns what changed, for the log.

    - CPU with bf16 autocast: strided depthwise convs become ``_FastBackwardDepthwiseConv2d``.
    - CPU: ReLU/ReLU6 modules run out of place (an in-place one clones its input under autograd).
    - CPU: U-Net's decoder computes each skip's transposed conv without the concatenation
      (``_SplitSkipConvs`` on its ``join``, ``_ConvTransposeOverParts`` on the convs).
    - A frozen encoder runs grad-enabled training steps as a cached inference copy
      (``_InferenceCopyWhenFrozen``; SegNet's pooling-indices encoder included).

    Each swap changes ``__class__`` in place (not the module tree), so checkpoints, ``named_modules``
    and optimiser parameter lists stay as they were, and the model files stay plain models. Every
    rewrite computes the same function (tests/test_runtime.py checks outputs and gradients).
    """
    from .unet import UNet

    notes = []
    if device.type == "cpu" and amp_dtype == torch.bfloat16:
        n = 0
        for m in model.modules():
            if (
                type(m) is torch.nn.Conv2d
                and m.groups > 1
                and m.groups == m.in_channels
                and m.groups == m.out_channels
                and max(m.stride) > 1
            ):
                m.__class__ = _FastBackwardDepthwiseConv2d
                n += 1
        if n:
            notes.append(f"{n} strided depthwise convs get a hand-written backward (slow bf16 backward-data on CPU)")
    if device.type == "cpu":
        # Out-of-place activations: under autograd an in-place ReLU/ReLU6 on CPU first clones its input (a
        # copy of every activation the size of the block), then clamps it; out of place it writes once
        # (the gain: docs/benchmarks.md, "Numbers behind choices in the code").
        n = 0
        for m in model.modules():
            if (
                isinstance(m, (torch.nn.ReLU, torch.nn.Hardtanh))
                and type(m) in (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Hardtanh)
                and m.inplace
            ):
                m.inplace = False
                n += 1
        if n:
            notes.append(f"{n} activations out of place")
    # Not on CUDA: there the model is launch-bound and the extra kernels did not pay (H200, bf16; the
    # numbers: docs/benchmarks.md, "Numbers behind choices in the code").
    if device.type == "cpu" and isinstance(model, UNet) and not isinstance(model.up_stack, _SplitSkipConvs):
        _swap_class(model.up_stack, _SplitSkipConvs)
        ups = [cast(torch.nn.Sequential, up)[0] for up in model.up_stack]  # pix2pix_upsample blocks
        for conv in [*ups, model.last]:  # the convs that may read the parts
            if type(conv) is torch.nn.ConvTranspose2d:
                conv.__class__ = _ConvTransposeOverParts
        notes.append("U-Net skip convolutions split (no concatenation)")
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, torch.nn.Module) and not isinstance(encoder, _InferenceCopyWhenFrozen):
        _swap_class(encoder, _InferenceCopyWhenFrozen)
        if getattr(model, "encoder_frozen", False):
            notes.append("frozen encoder runs as a cached inference copy (BatchNorm fused into its convs)")
    return "; ".join(notes) or "none"


_SWAPPED: dict[tuple[type, type], type] = {}

if TYPE_CHECKING:  # the mixins below are put in front of a module's own class at run time (_swap_class)
    from .unet import UNetDecoder as _DecoderBase

    _EncoderBase = torch.nn.Module
else:
    _DecoderBase = _EncoderBase = object


def _swap_class(module: torch.nn.Module, mixin: type) -> None:
    """Give ``module`` the class ``mixin + type(module)``: same state, behaviour from the mixin."""
    key = (mixin, type(module))
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"{mixin.__name__.lstrip('_')}{type(module).__name__}", (mixin, type(module)), {})
    module.__class__ = _SWAPPED[key]


class _SplitSkipConvs(_DecoderBase):
    """A U-Net decoder (``UNetDecoder``) training on CPU without the skip concatenations: faster with a
    frozen encoder, no slower without (docs/benchmarks.md, "Numbers behind choices in the code").

    Each transposed conv reads ``cat([up, skip])``; by linearity it equals the sum of two convs
    over the two parts with the matching slices of the weight. With a frozen encoder autograd
    then computes no input gradient for the skip part (42-60% of each conv's input channels),
    work that a concatenated input would spend and throw away; either way the concatenation
    copy and its backward disappear. Only the decoder's ``join`` changes (it hands the parts on) and
    the convs that read them accept the parts (``_ConvTransposeOverParts``). Without grad
    (validation, figures) the plain concatenation runs: one larger GEMM is faster there.
    """

    def join(self, x: torch.Tensor, skip: torch.Tensor):
        return [x, skip] if torch.is_grad_enabled() else super().join(x, skip)


class _ConvTransposeOverParts(torch.nn.ConvTranspose2d):
    """A transposed conv that also takes its input as a list of parts: ``conv(torch.cat(parts, 1))``
    without building the concatenation. State-dict keys are those of nn.ConvTranspose2d."""

    def forward(self, x, output_size=None):
        if not isinstance(x, list):
            return super().forward(x, output_size)
        out: torch.Tensor | None = None
        start = 0
        for p in x:
            n = p.shape[1]
            # ConvTranspose2d's padding is never a string (torch types the attribute it shares with Conv2d)
            y = torch.nn.functional.conv_transpose2d(
                p,
                self.weight[start : start + n],
                None,
                self.stride,
                self.padding,  # type: ignore[arg-type]
                self.output_padding,
                self.groups,
                self.dilation,
            )
            out = y if out is None else out + y
            start += n
        if out is None:
            raise ValueError("_ConvTransposeOverParts: an empty list of parts")
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1).to(out.dtype)
        return out


class _InferenceCopyWhenFrozen(_EncoderBase):
    """An encoder whose grad-enabled training steps, while frozen, run a cached inference copy: fused
    BatchNorm and, under bf16 autocast, bf16 weights.

    Frozen means eval-mode BatchNorm and weights the optimiser never touches, so nothing about its
    forward pass is training-specific; fusing removes the normalisation passes and the per-step
    weight casts (autocast caches casts only for weights that require grad). The copy is keyed by
    device, autocast dtype and memory layout, and dropped when weights are loaded or the module is
    moved or cast (``load_state_dict``, ``.to()``); it lives outside the module tree (no state-dict
    keys). Weights edited in place by hand while frozen need ``drop_inference_copy()``.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if (
            self.training
            and torch.is_grad_enabled()
            and not x.requires_grad
            and not any(p.requires_grad for p in self.parameters())
        ):
            with torch.no_grad():
                return self._inference_copy(x)(x, *args, **kwargs)
        return super().forward(x, *args, **kwargs)

    def _inference_copy(self, x: torch.Tensor) -> torch.nn.Module:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        key = (x.device, dtype, channels_last)
        cached = self.__dict__.get("_inference_copy_cache")
        if cached is None or cached[0] != key:
            plain = copy.copy(self)  # shallow: a new __dict__ sharing the tensors, for the deepcopy below
            plain.__class__ = type(self).__mro__[2]  # the encoder's own class, without this mixin
            plain.__dict__.pop("_inference_copy_cache", None)
            enc = copy.deepcopy(plain).eval()
            prepare_for_inference(enc, dtype, channels_last=channels_last)
            self.__dict__["_inference_copy_cache"] = cached = (key, enc)
        return cached[1]

    def drop_inference_copy(self) -> None:
        self.__dict__.pop("_inference_copy_cache", None)

    def _load_from_state_dict(self, *args, **kwargs):
        self.drop_inference_copy()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.drop_inference_copy()
        return super()._apply(fn, *args, **kwargs)


def fuse_batchnorm(model: torch.nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d whose only input is a conv's output into that conv.

    For inference only (the model must stay in eval mode afterwards): the BatchNorm becomes
    ``nn.Identity`` and its affine map moves into the conv's weight and bias, so each block costs
    one oneDNN/cuDNN call instead of a conv plus a memory-bound normalisation pass (the gain:
    docs/benchmarks.md). The arithmetic is torch's own ``fuse_conv_bn_eval``. Pairs are
    found where the data flow is certain: neighbours in an ``nn.Sequential`` (torchvision's
    Conv2dNormActivation, pix2pix's upsample block) and conv -> BN edges of an FX ``GraphModule``
    whose conv feeds nothing else (torchvision encoders are tapped with FX). Returns how many.
    """
    if model.training:
        raise ValueError("fuse_batchnorm needs an eval-mode model; BatchNorm in training mode uses batch statistics")
    model.eval()  # copy.deepcopy of an FX GraphModule (torchvision encoders) rebuilds its children in training mode
    pairs: list[tuple[torch.nn.Module, str, str]] = []  # (owner, conv path, bn path) within owner
    for owner in model.modules():
        if isinstance(owner, torch.fx.GraphModule):
            for node in owner.graph.nodes:
                prev = node.args[0] if node.op == "call_module" and len(node.args) == 1 else None
                if isinstance(prev, torch.fx.Node) and prev.op == "call_module" and len(prev.users) == 1:
                    pairs.append((owner, str(prev.target), str(node.target)))  # call_module: str targets
        elif isinstance(owner, torch.nn.Sequential):
            names = list(owner._modules)
            pairs += [(owner, a, b) for a, b in itertools.pairwise(names)]
    n = 0
    for owner, conv_path, bn_path in pairs:
        conv, bn = owner.get_submodule(conv_path), owner.get_submodule(bn_path)
        if (
            isinstance(conv, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
            and type(bn) is torch.nn.BatchNorm2d
            and bn.running_mean is not None
            and conv.out_channels == bn.num_features
        ):
            transpose = isinstance(conv, torch.nn.ConvTranspose2d)
            fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn, transpose=transpose)
            fused.__class__ = type(conv)
            owner.set_submodule(conv_path, fused)
            owner.set_submodule(bn_path, torch.nn.Identity())
            n += 1
    return n


def prepare_for_inference(
    model: torch.nn.Module, amp_dtype: torch.dtype | None = None, channels_last: bool = True
) -> torch.nn.Module:
    """What evaluate/predict/benchmarks run: eval mode, fused BatchNorm, channels_last, and
    under bf16 autocast the weights stored in bf16 once, rather than cast on every call
    (autocast caches casts only for tensors that require grad, so inference re-casts each
    weight each forward; the cost: docs/benchmarks.md). fp16 weights are left fp32: fused
    BatchNorm scales can leave fp16's range."""
    model.eval()
    fuse_batchnorm(model)
    if amp_dtype == torch.bfloat16:
        model.to(torch.bfloat16)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
