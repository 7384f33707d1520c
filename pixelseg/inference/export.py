"""`pixelseg export`: a checkpoint as an ONNX or TorchScript file, checked against PyTorch before it is kept.

The exported graph takes float32 N×3×H×W RGB in [0, 1] (normalisation is inside, as in the PyTorch
model) with dynamic batch, height and width, and returns N×C×H×W logits. Class names, palette and
training size travel inside the file (ONNX metadata_props / TorchScript extra file), so
`pixelseg predict model.onnx ...` needs nothing else.

Parity: the export is written to a temporary file, run on real images at their own sizes (and a
batch of two at the training size, to exercise the dynamic batch axis) by the target runtime, and
compared with PyTorch: max |logit difference| and the share of pixels whose argmax agrees. Only
if agreement >= 99.9 % and the logit difference is within tolerance is it moved to --out.

ONNX export uses torch's TorchScript-based exporter (`dynamo=False`): the dynamo exporter needs
the extra `onnxscript` package, and the TorchScript-based one handles every pixelseg model.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._version import __version__
from ..core.checkpoint import load_checkpoint
from ..core.errors import PixelsegError
from ..core.files import check_output_dir, make_output_dir
from ..core.metrics import class_ids
from ..data.io import collect_images
from .loading import METADATA_KEY, ONNX_HINT, OnnxModel, input_size, load_model, load_torchscript, require_onnxruntime

FORMATS = ("onnx", "torchscript")
MIN_AGREEMENT = 0.999
REL_TOL = 1e-3  # max |Δlogit| allowed, relative to max(1, max |logit|)


def require_onnx():
    try:
        import onnx
    except ImportError:
        raise PixelsegError(f"the onnx package is not installed; {ONNX_HINT}") from None
    return onnx


def _metadata(ckpt: dict) -> dict:
    size = list(input_size(ckpt))
    return {
        "pixelseg_version": __version__,
        "dataset": ckpt["dataset"],
        "image_size": size,
        "model_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ckpt["model_config"].items()},
        "input": (
            f"image: float32 N×{ckpt['model_config'].get('in_channels', 3)}×H×W, "
            + ("RGB" if ckpt["model_config"].get("in_channels", 3) == 3 else "bands (8-bit / 255, 16-bit / 65535)")
            + " in [0, 1] (normalised inside the graph)"
        ),
        "rgb_bands": ckpt["config"].get("rgb_bands"),
        "output": "logits: float32 N×C×H×W",
    }


# ---- writing ------------------------------------------------------------------------------------
def _export_onnx(model, example: torch.Tensor, path: Path, meta: dict, opset: int) -> None:
    onnx = require_onnx()
    require_onnxruntime()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic: it is meant to be dynamic
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={
                "image": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "height", 3: "width"},
            },
        )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    proto.doc_string = (
        f"pixelseg {meta['model_config'].get('arch')}/{meta['model_config'].get('backbone')}: "
        f"{meta['input']} -> {meta['output']}"
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _export_torchscript(model, example: torch.Tensor, path: Path, meta: dict) -> None:
    # Tracing, not scripting: the timm/FX encoders are not scriptable, and the only shape-dependent
    # code (padding to the output stride, cropping back) traces to size ops, so H/W stay dynamic;
    # parity at other sizes below proves it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape arithmetic, and "torch.jit is deprecated"
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})


# ---- parity ----------------------------------------------------------------------------------------
def _parity_inputs(ckpt: dict, check_images, limit: int, max_side: int) -> tuple[list[torch.Tensor], str]:
    """Real images (each at its own size, longest side capped) plus a batch of two at the training size."""
    from ..data.io import UnreadableImage, read_input
    from .loading import model_channels

    channels = model_channels(ckpt)
    arrays = []
    if check_images:
        for f in collect_images(check_images)[:limit]:
            try:
                arrays.append(read_input(f, channels))
            except UnreadableImage as exc:
                raise PixelsegError(f"--check-images: {exc}") from None
        source = f"{len(arrays)} image(s) from --check-images"
    else:
        cfg = ckpt["config"]
        from .loading import recorded_data_root

        dataset, root = cfg.get("dataset"), recorded_data_root(ckpt, "pass --check-images PATH (a few real images)")
        if root is None and dataset != "synthetic":
            raise PixelsegError(
                f"{ckpt['path']}: the run's dataset has no --data-root recorded, so there are no "
                "images to check parity on; pass --check-images PATH (a few real images)"
            )
        from ..data import dataset_options, iter_full_res

        try:
            for _, img, _ in iter_full_res(
                dataset, root, cfg.get("val_split"), input_size(ckpt), limit, channels=channels, **dataset_options(cfg)
            ):
                arrays.append(img)
        except PixelsegError as exc:
            raise PixelsegError(
                f"cannot read the run's validation images for the parity check ({exc}); pass --check-images PATH"
            ) from None
        source = f"{len(arrays)} image(s) of {dataset}/{cfg.get('val_split')}"
    if not arrays:
        raise PixelsegError("no images for the parity check; pass --check-images PATH")
    inputs = []
    for a in arrays:
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()
        x = x.div(255) if a.dtype == np.uint8 else x  # N-band inputs are already [0, 1]
        h, w = x.shape[-2:]
        if max(h, w) > max_side:  # keeps the check quick on big photos; sizes stay varied and odd
            s = max_side / max(h, w)
            x = F.interpolate(
                x,
                size=(max(1, round(h * s)), max(1, round(w * s))),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        inputs.append(x)
    size = input_size(ckpt)
    batch = torch.cat(
        [
            F.interpolate(inputs[i % len(inputs)], size=size, mode="bilinear", antialias=True, align_corners=False)
            for i in range(2)
        ]
    )
    return [*inputs, batch], source


@torch.no_grad()
def check_parity(reference, candidate, inputs: list[torch.Tensor]) -> dict:
    """Max |logit difference| and argmax agreement of `candidate` against `reference` over `inputs`."""
    max_diff, max_ref, agree, total, shapes = 0.0, 0.0, 0, 0, []
    for x in inputs:
        ref = reference(x).float()
        out = candidate(x).float()
        if out.shape != ref.shape:
            raise PixelsegError(
                f"exported model returned shape {tuple(out.shape)} for input {tuple(x.shape)}, "
                f"PyTorch {tuple(ref.shape)}: the export is not dynamic in that axis"
            )
        max_diff = max(max_diff, float((out - ref).abs().max()))
        max_ref = max(max_ref, float(ref.abs().max()))
        agree += int((class_ids(out) == class_ids(ref)).sum())
        total += ref.shape[0] * ref.shape[2] * ref.shape[3]
        shapes.append(tuple(x.shape))
    agreement = agree / max(total, 1)
    tol = REL_TOL * max(1.0, max_ref)
    return {
        "max_abs_diff": max_diff,
        "tolerance": tol,
        "argmax_agreement": agreement,
        "pixels": total,
        "inputs": [list(s) for s in shapes],
        "ok": agreement >= MIN_AGREEMENT and max_diff <= tol,
    }


def format_parity(p: dict) -> str:
    text = (
        f"max |logit difference| {p['max_abs_diff']:.3g} (tolerance {p['tolerance']:.3g}), identical argmax on "
        f"{100 * p['argmax_agreement']:.4f}% of {p['pixels']} pixels (need >= {100 * MIN_AGREEMENT:g}%)"
    )
    if "pool_decisions" in p:
        tied = p["pool_gap"] <= POOL_TIE_RTOL
        text += (
            f"; pooling indices: {p['pool_differ']} of {p['pool_decisions']} decisions differ from PyTorch's, "
            + ("all between maxima equal up to rounding" if tied else "some between maxima that are NOT tied")
            + f" (largest gap {p['pool_gap']:.2g} of the layer's largest value, allowed {POOL_TIE_RTOL:g}); "
            "logits compared with PyTorch following the file's decisions"
        )
        if p.get("probe_diff", 0) > 1e-6:
            text += f"; the index probe's logits differ from the file's by {p['probe_diff']:.3g}"
    return text


# Two maxima of a pooling window this close (relative to the layer's largest value) are equal up to rounding.
POOL_TIE_RTOL = 1e-5


class _RoutedReference:
    """PyTorch following the exported graph's own pooling decisions (SegNet's argmax indices).

    Why: in flat image regions the four values of a 2x2 window are equal in exact arithmetic and differ
    by 1-ulp rounding, which differs between PyTorch (oneDNN) and onnxruntime (MLAS) convolutions; the two
    then pick different argmaxes and unpooling puts a whole activation one pixel away (a 0.1 logit
    difference on a trained CamVid SegNet). Neither answer is wrong. So the check runs PyTorch with the
    graph's indices, requires every differing decision to be a tie up to rounding, and compares the logits
    strictly - which still catches any real export error."""

    def __init__(self, model, probe_session, n_pools: int):
        self.model, self.session, self.n_pools = model, probe_session, n_pools
        self.input_name = probe_session.get_inputs()[0].name
        self.decisions = self.differ = 0
        self.worst_gap = 0.0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from ..models import segnet

        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(x.float().numpy())})
        forced = [torch.from_numpy(o) for o in outs[1:]]
        if len(forced) != self.n_pools:
            raise PixelsegError(f"the exported graph has {len(forced)} unpooling steps, the model {self.n_pools}")
        queue = list(forced)  # graph order: the decoder unpools deepest first; pop() gives the shallowest

        def routed_pool(t):
            value, idx = F.max_pool2d(t, 2, 2, return_indices=True)
            theirs = queue.pop().view(idx.shape).to(idx.device)
            chosen = t.flatten(2).gather(2, theirs.flatten(2)).view(value.shape)
            # rounding error scales with the magnitudes summed, not with the result: relative to the largest |t|
            gap = (value - chosen) / t.abs().amax().clamp(min=1e-12)
            differ = theirs != idx
            self.decisions += idx.numel()
            self.differ += int(differ.sum())
            self.worst_gap = max(self.worst_gap, float(gap.max()) if differ.any() else 0.0)
            return chosen, theirs

        original = segnet.max_pool2x2
        segnet.max_pool2x2 = routed_pool
        try:
            return self.model(x)
        finally:
            segnet.max_pool2x2 = original


def _probe_with_indices(path: Path, probe_path: Path):
    """The exported ONNX graph with each unpooling's index tensor as an extra output (same nodes)."""
    onnx = require_onnx()
    ort = require_onnxruntime()
    proto = onnx.load(str(path))
    names = [n.input[1] for n in proto.graph.node if n.op_type == "ScatterElements"]
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    onnx.save(proto, str(probe_path))
    return ort.InferenceSession(str(probe_path), providers=["CPUExecutionProvider"]), len(names)


def _check_routed_parity(model, candidate, tmp: Path, inputs: list[torch.Tensor]) -> dict:
    probe_path = tmp.with_name(tmp.name + ".probe")
    try:
        session, n = _probe_with_indices(tmp, probe_path)
        reference = _RoutedReference(model, session, 5)
        # the probe is the shipped graph plus outputs: its logits must be the shipped file's
        probe_logits = lambda x: torch.from_numpy(session.run(None, {reference.input_name: x.float().numpy()})[0])  # noqa: E731
        same = check_parity(candidate, probe_logits, inputs[:1])
        parity = check_parity(reference, candidate, inputs)
    finally:
        probe_path.unlink(missing_ok=True)
    tied = reference.worst_gap <= POOL_TIE_RTOL
    parity.update(
        pool_decisions=reference.decisions,
        pool_differ=reference.differ,
        pool_gap=reference.worst_gap,
        probe_diff=same["max_abs_diff"],
        ok=parity["ok"] and tied and same["max_abs_diff"] <= 1e-6 and n == 5,
    )
    return parity


# ---- the command ------------------------------------------------------------------------------------
def export(
    checkpoint, fmt: str, out, check_images=None, check_limit: int = 4, max_side: int = 512, opset: int = 17
) -> dict:
    """Export `checkpoint` to `out` as ONNX or TorchScript; raises PixelsegError (and writes nothing) if the
    model cannot be exported or the export disagrees with PyTorch."""
    if fmt not in FORMATS:
        raise PixelsegError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
        require_onnxruntime()
    out = Path(out)
    if out.is_dir():
        suggestion = out / ("model." + ("onnx" if fmt == "onnx" else "pt"))
        raise PixelsegError(f"--out {out} is a directory; give a file name such as {suggestion}")
    check_output_dir(out.parent, "--out")
    ckpt = load_checkpoint(checkpoint)
    model = load_model(ckpt, torch.device("cpu"), fast=False).float().eval()
    cfg = ckpt["model_config"]
    name = f"{cfg.get('arch')}/{cfg.get('backbone')}"
    inputs, source = _parity_inputs(ckpt, check_images, check_limit, max_side)
    meta = _metadata(ckpt)
    from .loading import model_channels

    example = torch.rand(1, model_channels(ckpt), *input_size(ckpt), generator=torch.Generator().manual_seed(0))
    make_output_dir(out.parent, "--out")
    tmp = out.with_name(f".{out.name}.partial")
    t0 = time.time()
    try:
        try:
            if fmt == "onnx":
                _export_onnx(model, example, tmp, meta, opset)
            else:
                _export_torchscript(model, example, tmp, meta)
        except PixelsegError:
            raise
        except Exception as exc:  # exporter failures come as many types; the model is what the user can change
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise PixelsegError(
                f"{name} cannot be exported to {fmt}: {type(exc).__name__}: {first} "
                f"(see docs/export.md for what exports)"
            ) from exc
        export_s = time.time() - t0
        candidate = OnnxModel(tmp) if fmt == "onnx" else load_torchscript(tmp)[0]
        if fmt == "onnx" and getattr(model, "pooling_indices", False):
            parity = _check_routed_parity(model, candidate, tmp, inputs)
        else:
            parity = check_parity(model, candidate, inputs)
        if not parity["ok"]:
            raise PixelsegError(
                f"{name} exported to {fmt}, but it disagrees with PyTorch on {source}: "
                f"{format_parity(parity)}; nothing written to {out}"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "out": str(out),
        "format": fmt,
        "model": name,
        "bytes": out.stat().st_size,
        "export_s": export_s,
        "parity_source": source,
        **parity,
    }
