"""pixelseg with its defaults, measured the way the two references are.

- train: `pixelseg train` (the CLI entry point, in this process so its peak RSS is this process's)
  on the pets-layout data with `--weights none` (nothing may be downloaded), everything else default;
  images/s is the run's own per-epoch `train_images_per_s` (whole loop incl. data), epoch 2 onward.
- infer: `create_model` + the runtime's defaults (device auto, precision auto, channels_last, folded
  BatchNorm: `rewrites.prepare_for_inference`), as `pixelseg evaluate/predict` run the model.
- infer --backend openvino / openvino_int8: the same model exported as `pixelseg export --format openvino`
  does (ONNX -> `openvino.convert_model`, int8 through NNCF post-training quantisation on 32 of the
  batch's images) and run through `openvino_backend.OpenVinoModel`, as `predict --backend openvino` runs it.
- quality: `python -m pixelseg train ... --epochs <many>` as a child, stopped when the wall-clock budget
  (counted from this runner's launch) runs out; the last per-epoch checkpoint (`last.pt`) written
  inside the budget is scored on the common test arrays.

Each task prints one JSON line. torch is imported lazily so the quality budget is not spent here.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)
import common  # noqa: E402  (this folder)

BATCH_SIZE = 64


def train_argv(data_root, run_dir, freeze: str, epochs: int, extra: list[str]) -> list[str]:
    return ["train", "--dataset", "oxford-pet", "--data-root", str(data_root), "--weights", "none",
            "--freeze-encoder", freeze, "--epochs", str(epochs), "--run-dir", str(run_dir), *extra]


def task_train(args) -> dict:
    from pixelseg.cli import main as cli_main
    from pixelseg.core.runtime import select_device

    run_dir = Path(tempfile.mkdtemp(prefix="pixelseg-bench-"))
    shutil.rmtree(run_dir)
    try:
        rc = cli_main(train_argv(args.data_root, run_dir, args.freeze, args.epochs, args.extra))
        if rc != 0:
            raise SystemExit(f"pixelseg train exited with {rc}")
        history = json.loads((run_dir / "metrics.json").read_text())
        log = (run_dir / "train.log").read_text().splitlines()[:3]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    per_epoch = [h["train_images_per_s"] for h in history]
    return {"task": "train", "freeze": args.freeze, "epochs": args.epochs, "images_per_s_per_epoch": per_epoch,
            "data_time_frac_per_epoch": [h["data_time_frac"] for h in history],
            "train_images_per_s": common.summarise_epochs(per_epoch), "log_head": log,
            "peak_device_mem_bytes": _common.peak_device_memory(select_device("auto"))}


def task_infer(args) -> dict:
    import torch

    from pixelseg.models import create_model
    from pixelseg.core.runtime import autocast, resolve_precision, select_device, to_model_input, tune_malloc
    from pixelseg.models.rewrites import prepare_for_inference

    tune_malloc()  # what every pixelseg command does first
    dev = select_device("auto")
    amp = resolve_precision("auto", dev)
    model = create_model("unet", backbone="mobilenet_v2", num_classes=3, weights=None).to(dev)
    gen = torch.Generator().manual_seed(0)
    xb_u8 = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=gen)
    x1_u8 = xb_u8[:1].clone()
    if args.backend != "pytorch":
        return _infer_openvino(model.eval(), xb_u8, x1_u8, args)
    prepare_for_inference(model, amp, channels_last=True)  # what evaluate/predict do

    @torch.no_grad()
    def run(images):
        with autocast(dev, amp):
            return model(to_model_input(images, dev, True)).float()

    res = common.time_inference(lambda: run(xb_u8), lambda: run(x1_u8).cpu(), args, sync=lambda: _common.sync(dev))
    return dict(res, precision=str(amp or torch.float32), peak_device_mem_bytes=_common.peak_device_memory(dev))


def _infer_openvino(model, xb_u8, x1_u8, args) -> dict:
    """The export path's conversion, then `OpenVinoModel`'s call (numpy in, torch logits out)."""
    import openvino as ov
    import torch

    from pixelseg.inference.openvino import OpenVinoModel
    from pixelseg.core.runtime import to_model_input

    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (to_model_input(x1_u8, cpu, False),), str(onnx_path), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "logits": {0: "batch", 2: "height", 3: "width"}})
        ov_model = ov.convert_model(str(onnx_path))
        if args.backend == "openvino_int8":
            import nncf
            calib = to_model_input(xb_u8[:32], cpu, False).numpy()
            ov_model = nncf.quantize(ov_model, nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]),
                                     subset_size=len(calib))
        ov_model.set_rt_info(json.dumps({}), ["pixelseg"])
        xml = Path(tmp) / "model.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        runner = OpenVinoModel(xml, probe=lambda _path: None)  # compiled here; a crash shows as a failed run
    xb, x1 = to_model_input(xb_u8, cpu, False), to_model_input(x1_u8, cpu, False)
    res = common.time_inference(lambda: runner(xb), lambda: runner(x1), args)
    return dict(res, precision="int8" if args.backend == "openvino_int8" else "fp32", backend=runner.backend,
                peak_device_mem_bytes=None)


def task_quality(args) -> dict:
    budget = common.Budget(args.t0, args.budget)
    work = Path(tempfile.mkdtemp(prefix="pixelseg-quality-"))
    run_dir = work / "run"
    env = _common.repo_env(PIXELSEG_CACHE=str(work / "cache"), TQDM_DISABLE="1")  # fresh cache: decoding counts
    cmd = [sys.executable, "-m", "pixelseg", *train_argv(args.data_root, run_dir, args.freeze, 10**6, args.extra)]
    try:
        with open(work / "stdout.txt", "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            while proc.poll() is None and not budget.expired():
                time.sleep(0.1)
            stopped_at = budget.elapsed()
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)  # last.pt is written atomically, so it stays whole
            proc.wait()
        result = {"task": "quality", "budget_s": args.budget, "stopped_at_s": stopped_at, "test_miou": None,
                  "epochs_in_budget": 0}
        last = run_dir / "last.pt"
        if not last.is_file():
            tail = (work / "stdout.txt").read_text()[-400:]
            result["note"] = "no epoch finished inside the budget" + (f"; output: {tail}" if proc.returncode else "")
            return result
        return {**result, **score_checkpoint(last, Path(args.data_root), args.size)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def score_checkpoint(path: Path, data_root: Path, size: int) -> dict:
    import numpy as np
    import torch

    from pixelseg.core.checkpoint import load_checkpoint
    from pixelseg.inference.loading import load_model
    from pixelseg.core.runtime import autocast, resolve_precision, select_device, to_model_input

    ckpt = load_checkpoint(path)
    dev = select_device("auto")
    amp = resolve_precision("auto", dev)
    model = load_model(ckpt, dev)
    channels_last = ckpt["config"].get("channels_last", True)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x, y = common.eval_arrays(data_root, "test", size)
    conf = np.zeros((common.NUM_CLASSES,) * 2, np.int64)
    with torch.no_grad():
        for i in range(0, len(x), BATCH_SIZE):
            xb = torch.from_numpy(x[i:i + BATCH_SIZE]).permute(0, 3, 1, 2)
            with autocast(dev, amp):
                pred = model(to_model_input(xb, dev, channels_last)).float().argmax(1).cpu().numpy()
            conf += common.confusion(pred, y[i:i + BATCH_SIZE])
    return {"test_miou": common.miou(conf), "test_images": int(len(x)), "epochs_in_budget": int(ckpt["epoch"])}


def main(argv=None) -> int:
    p = common.runner_parser(__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["pytorch", "openvino", "openvino_int8"], default="pytorch",
                   help="infer only: run the model through an OpenVINO export (fp32 or NNCF int8)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further `pixelseg train` flags (train/quality), e.g. --extra --precision fp32")
    args = p.parse_args(argv)
    if args.t0 is None:
        args.t0 = time.time()
    if args.seed:
        args.extra = ["--seed", str(args.seed), *args.extra]
    result = {"runner": "pixelseg"}
    result.update({"train": task_train, "infer": task_infer, "quality": task_quality}[args.task](args))
    import torch  # only now: the quality task's budget must not pay for it

    import pixelseg
    from pixelseg.core.runtime import select_device

    result.update(framework=f"pixelseg {pixelseg.__version__} / torch {torch.__version__}",
                  device=str(select_device("auto")))
    result["peak_rss_bytes_self"] = common.peak_rss_bytes()
    common.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
