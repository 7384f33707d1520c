"""OpenVINO as a deployment backend: `export --format openvino [--int8]` behind a parity gate measured on
a real split, and the runner `--backend openvino` uses, which falls back to ONNX Runtime when OpenVINO
cannot compile the model on this CPU.

Files: OUT.xml + OUT.bin (OpenVINO IR, fp32 or NNCF int8) and OUT.onnx, the fp32 ONNX graph the IR was
converted from, kept beside it as the fallback. Class names, palette and training size travel in the
IR's rt_info["pixelseg"] (the same JSON as the ONNX file's metadata).

Why a subprocess probe: OpenVINO's CPU plugin has crashed the whole process (SIGSEGV/SIGILL, not an
exception) while compiling on some virtualised AMD CPUs. A child process compiles the file first; if it
dies or fails, the caller gets ONNX Runtime on the fp32 sidecar and one line saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..core.errors import PixelsegError
from ..core.metrics import class_ids

OPENVINO_HINT = "pip install 'pixelseg[openvino]' (openvino and nncf)"
METADATA_KEY = "pixelseg"
# The gate (issue 19): agreement with PyTorch fp32 over the split and on its worst image, and the mIoU change.
GATE = {"min_agreement": 0.995, "min_image_agreement": 0.98, "max_miou_drop": 0.005}
PROBE = (
    "import sys, openvino as ov; core = ov.Core(); m = core.read_model(sys.argv[1]); "
    "core.compile_model(m, 'CPU'); print('compiled')"
)
_probed: dict = {}


def require_openvino():
    try:
        import openvino
    except ImportError:
        raise PixelsegError(f"the OpenVINO backend needs openvino: {OPENVINO_HINT}") from None
    return openvino


def compile_failure(path, timeout: float = 600) -> str | None:
    """None if OpenVINO compiles `path` for the CPU in a child process, else why not (cached per file)."""
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _probed:
        try:
            r = subprocess.run(
                [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=timeout
            )
            if r.returncode == 0 and "compiled" in r.stdout:
                _probed[key] = None
            else:
                last = (r.stderr.strip().splitlines() or [""])[-1][:200]
                how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
                _probed[key] = f"the compile probe ended with {how}" + (f": {last}" if last else "")
        except subprocess.TimeoutExpired:
            _probed[key] = f"the compile probe did not finish within {timeout:g} s"
    return _probed[key]


class OpenVinoModel:
    """An exported OUT.xml under OpenVINO (CPU), callable like the model: float [0,1] N×C×H×W -> logits.
    `backend` says what actually runs: "openvino", or "onnxruntime (fallback)"."""

    def __init__(self, path, device="cpu", probe=compile_failure):
        ov = require_openvino()
        path = Path(path)
        if not path.is_file() or path.suffix.lower() != ".xml":
            raise PixelsegError(
                f"{path}: not an OpenVINO .xml file; create one with "
                "`pixelseg export RUN --format openvino --out model.xml`"
            )
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for bad files
            raise PixelsegError(f"{path}: not a loadable OpenVINO model ({str(exc).splitlines()[0][:200]})") from None
        self.metadata = read_metadata(model, path)
        self.path, self.backend, self.fallback = path, "openvino", None
        reason = probe(path)
        if reason is None:
            try:
                # As exported: on CPUs with AMX or AVX-512-BF16 OpenVINO would run an fp32 IR in bf16 and
                # miss the parity gate (98.5% pixel agreement on the pets run vs 100% in f32; docs/export.md).
                self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            except Exception as exc:  # the probe passed but this process could not: same fallback
                reason = f"compile_model raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if reason is not None:
            from .loading import OnnxModel

            sidecar = path.with_suffix(".onnx")
            if not sidecar.is_file():
                raise PixelsegError(
                    f"{path}: OpenVINO cannot compile it on this CPU ({reason}) and the ONNX "
                    f"fallback {sidecar.name} written beside it by `pixelseg export` is missing"
                )
            print(
                f"pixelseg: OpenVINO could not compile {path.name} on this CPU ({reason}); falling back to "
                f"ONNX Runtime on {sidecar.name} (fp32)",
                file=sys.stderr,
                flush=True,
            )
            self.fallback, self.backend = OnnxModel(sidecar, device), "onnxruntime (fallback)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback(x)
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(np.array(self.compiled(arr)[0])).to(x.device)

    def eval(self):  # used where a torch model would be (loop.evaluate_loader)
        return self


def read_metadata(model, path) -> dict:
    try:
        return json.loads(model.get_rt_info([METADATA_KEY]).astype(str))
    except Exception:  # absent key: OpenVINO raises a generic RuntimeError
        raise PixelsegError(
            f"{path}: no pixelseg metadata (class names, training size) in this OpenVINO file; "
            "export it with `pixelseg export RUN --format openvino`"
        ) from None


def load_openvino_predictor_parts(path, device="cpu"):
    """(callable, DatasetInfo, training size), as loading.load_onnx_predictor_parts."""
    from ..data import DatasetInfo

    model = OpenVinoModel(path, device)
    meta = model.metadata
    return model, DatasetInfo.from_dict(meta["dataset"]), tuple(meta["image_size"])


# ---- export -------------------------------------------------------------------------------------------
def split_arrays(ckpt: dict, split: str, limit: int | None, what: str):
    """(images N×C×H×W float [0,1], masks N×H×W) of the run's own dataset split at the training size."""
    from ..data import dataset_options, load_split
    from .loading import input_size, model_channels, recorded_data_root

    cfg = ckpt["config"]
    root = recorded_data_root(ckpt, f"the {what} needs the run's dataset")
    try:
        ds = load_split(
            cfg["dataset"],
            root,
            split,
            input_size(ckpt),
            limit,
            use_cache=cfg.get("cache", "mmap"),
            channels=model_channels(ckpt),
            **dataset_options(cfg),
        )
    except PixelsegError as exc:
        raise PixelsegError(f"cannot read {cfg['dataset']}/{split} for the {what} ({exc})") from None
    images, masks = [], []
    for i in range(len(ds)):
        img, mask = ds[i]
        images.append(img.float().div(255) if img.dtype == torch.uint8 else img.float())
        masks.append(mask)
    return torch.stack(images), torch.stack(masks), ds.info


@torch.no_grad()
def gate(reference, candidate, images, masks, info, batch: int = 16, thresholds=None) -> dict:
    """Agreement of `candidate`'s argmax with `reference`'s (fp32 PyTorch) over the split and per image,
    and both mIoUs against the ground truth; `ok` when every threshold of GATE holds."""
    from ..core.metrics import ConfusionMatrix

    t = {**GATE, **(thresholds or {})}
    c = info.num_classes
    cm_ref, cm_new = ConfusionMatrix(c, info.ignore_index), ConfusionMatrix(c, info.ignore_index)
    per_image = []
    for i in range(0, len(images), batch):
        x, y = images[i : i + batch], masks[i : i + batch]
        a, b = class_ids(reference(x)), class_ids(candidate(x))
        per_image += (a == b).flatten(1).float().mean(1).tolist()
        cm_ref.update(a, y)
        cm_new.update(b, y)
    miou_ref, miou_new = cm_ref.compute()["miou"], cm_new.compute()["miou"]
    agreement, worst = float(np.mean(per_image)), float(np.min(per_image))
    return {
        "images": len(per_image),
        "agreement": agreement,
        "worst_image_agreement": worst,
        "worst_image": int(np.argmin(per_image)),
        "miou_torch_fp32": miou_ref,
        "miou": miou_new,
        "miou_change": miou_new - miou_ref,
        "thresholds": t,
        "ok": agreement >= t["min_agreement"]
        and worst >= t["min_image_agreement"]
        and miou_ref - miou_new <= t["max_miou_drop"],
    }


def format_gate(g: dict) -> str:
    t = g["thresholds"]
    return (
        f"pixel agreement with PyTorch fp32 {100 * g['agreement']:.2f}% over {g['images']} images (need >= "
        f"{100 * t['min_agreement']:g}%), worst image {100 * g['worst_image_agreement']:.2f}% (need >= "
        f"{100 * t['min_image_agreement']:g}%), mIoU {g['miou']:.4f} vs {g['miou_torch_fp32']:.4f} "
        f"({100 * g['miou_change']:+.2f} points; may drop at most {100 * t['max_miou_drop']:g})"
    )


CONV_TYPES = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData")


def sensitive_layers(ov_model) -> list[str]:
    """Names of the first convolution and of the one that makes the logits (a U-Net's head is a transposed
    conv, and ordered ops list the decoder last, so it is found by walking back from the output): the usual
    int8 casualties, named as NNCF's IgnoredScope wants them."""
    convs = [op.get_friendly_name() for op in ov_model.get_ordered_ops() if op.get_type_name() in CONV_TYPES]
    if not convs:
        return []
    node = ov_model.get_results()[0]
    while node.get_type_name() not in CONV_TYPES and node.get_input_size() > 0:
        node = node.input_value(0).get_node()
    head = node.get_friendly_name() if node.get_type_name() in CONV_TYPES else convs[-1]
    return list(dict.fromkeys([convs[0], head]))


INT8_KEEP_GROUPS = ("ends", "encoder")


def resolve_ignored(ov_model, ignore: list[str]) -> list[str]:
    """``--int8-ignore`` names, with two group words: ``ends`` (the stem and the layer that makes the logits,
    ``sensitive_layers``) and ``encoder`` (every convolution of the encoder, plus the ends: only the decoder runs
    in int8). On the pretrained pets U-Net the encoder's int8 convolutions cost the gate (ImageNet features
    quantize with more near-ties) while the decoder, most of the compute at 128 px, quantizes cleanly:
    docs/export.md."""
    names: list[str] = []
    for item in ignore:
        if item == "ends":
            names += sensitive_layers(ov_model)
        elif item == "encoder":
            names += sensitive_layers(ov_model)
            names += [
                op.get_friendly_name()
                for op in ov_model.get_ordered_ops()
                if op.get_type_name() in CONV_TYPES and op.get_friendly_name().startswith("/encoder/")
            ]
        else:
            names.append(item)
    return list(dict.fromkeys(names))


def _quantize(ov_model, calib: torch.Tensor, ignore: list[str] | None):
    """NNCF post-training int8 on the calibration images, the `ignore`d layers (names or groups) kept as they are."""
    import nncf

    data = nncf.Dataset([calib[i : i + 1].numpy() for i in range(len(calib))])
    names = resolve_ignored(ov_model, list(ignore)) if ignore else []
    scope = nncf.IgnoredScope(names=names, validate=False) if names else None
    kwargs = {"ignored_scope": scope} if scope else {}
    return nncf.quantize(ov_model, data, subset_size=len(calib), **kwargs)


def _int8_hint(ov_model, ignore: list[str] | None) -> str:
    """What to try after an int8 export failed its gate: the next --int8-ignore group, or the fp32 export."""
    tried = set(ignore or ())
    if not tried:
        return (
            " Keep layers in higher precision with NNCF's ignored scope: --int8-ignore ends (the first "
            "and last convolutions, " + ",".join(sensitive_layers(ov_model)) + "), or "
            "--int8-ignore encoder (only the decoder in int8)"
        )
    if "encoder" not in tried:
        return " Try --int8-ignore encoder (the encoder in fp32, only the decoder in int8)"
    return " Even with those layers kept in higher precision it fails: use the fp32 export."


def _convert(ov, model, ckpt: dict, meta: dict, tmp: Path, calib: torch.Tensor | None, ignore: list[str] | None):
    """TMP/model.onnx (fp32, the fallback) and TMP/model.xml/.bin: OpenVINO's model, int8 when `calib` is given."""
    from .export import _export_onnx
    from .loading import input_size, model_channels

    onnx_path = tmp / "model.onnx"
    example = torch.rand(1, model_channels(ckpt), *input_size(ckpt), generator=torch.Generator().manual_seed(0))
    _export_onnx(model, example, onnx_path, meta, 17)
    ov_model = ov.convert_model(str(onnx_path))
    if calib is not None:
        ov_model = _quantize(ov_model, calib, ignore)
    ov_model.set_rt_info(json.dumps(meta), [METADATA_KEY])
    ov.save_model(ov_model, str(tmp / "model.xml"), compress_to_fp16=False)
    return ov_model


def export_openvino(
    checkpoint,
    out,
    int8: bool = False,
    calibration_split: str | None = None,
    calibration_images: int = 100,
    check_split: str | None = None,
    check_limit: int | None = None,
    ignore: list[str] | None = None,
    thresholds: dict | None = None,
    progress: bool = True,
) -> dict:
    """Write OUT.xml/.bin (+ OUT.onnx fallback) only if the gate on the run's `check_split` passes."""
    ov = require_openvino()
    from ..core.checkpoint import load_checkpoint
    from ..core.files import check_output_dir, make_output_dir
    from .export import _metadata
    from .loading import load_model

    out = Path(out)
    if out.suffix.lower() != ".xml":
        raise PixelsegError(f"--out {out}: an OpenVINO model is an .xml file (its weights go to a .bin beside it)")
    check_output_dir(out.parent, "--out")
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["config"]
    model = load_model(ckpt, torch.device("cpu"), fast=False).float().eval()
    name = f"{ckpt['model_config'].get('arch')}/{ckpt['model_config'].get('backbone')}"
    check_split = check_split or cfg.get("val_split")
    images, masks, info = split_arrays(ckpt, check_split, check_limit, "parity gate")
    calib = None
    if int8:
        require_nncf()
        calibration_split = calibration_split or cfg.get("train_split")
        calib, _, _ = split_arrays(ckpt, calibration_split, calibration_images, "int8 calibration")
    meta = _metadata(ckpt)
    make_output_dir(out.parent, "--out")
    tmp = out.parent / f".{out.stem}.partial"
    tmp.mkdir(exist_ok=True)
    t0 = time.time()
    try:
        ov_model = _convert(ov, model, ckpt, meta, tmp, calib, ignore)
        candidate = OpenVinoModel(tmp / "model.xml")
        if candidate.fallback is not None:
            raise PixelsegError(
                f"OpenVINO cannot compile the exported {name} on this CPU, so the gate cannot "
                f"run; nothing written to {out} (use --format onnx)"
            )
        g = gate(model, candidate, images, masks, info, thresholds=thresholds)
        g.update(
            check_split=check_split,
            calibration_split=calibration_split if int8 else None,
            calibration_images=len(calib) if calib is not None else 0,
            precision="int8" if int8 else "fp32",
        )
        if not g["ok"]:
            raise PixelsegError(
                f"{name} exported to OpenVINO ({g['precision']}) fails the gate on "
                f"{cfg['dataset']}/{check_split}: {format_gate(g)}; nothing written to {out}."
                + (_int8_hint(ov_model, ignore) if int8 else "")
            )
        os.replace(tmp / "model.onnx", out.with_suffix(".onnx"))
        os.replace(tmp / "model.bin", out.with_suffix(".bin"))
        os.replace(tmp / "model.xml", out)  # last: a .xml exists only once its weights do
    finally:
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()
    size = out.with_suffix(".bin").stat().st_size
    return {"out": str(out), "format": "openvino", "model": name, "export_s": time.time() - t0, "bytes": size, **g}


def require_nncf():
    try:
        import nncf  # noqa: F401
    except ImportError:
        raise PixelsegError(f"--int8 needs nncf: {OPENVINO_HINT}") from None
