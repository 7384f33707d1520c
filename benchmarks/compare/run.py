"""pixelseg side by side with what users would otherwise pick, in one invocation, on the same data and machine:

  tf        the TensorFlow tutorial's Keras pipeline and U-Net/MobileNetV2 (compare/tf_tutorial.py), in its
            own virtualenv benchmarks/.envs/tf (`pip install tensorflow pillow`, made on first use)
  smp       segmentation_models_pytorch Unet("mobilenet_v2") in a plain fp32 training loop
            (compare/smp_unet.py), installed with `pip --target benchmarks/.envs/smp --no-deps`
  pixelseg  `pixelseg train` / the model with pixelseg's defaults (compare/pixelseg_runner.py)
  openvino, openvino_int8
            inference only: the same model through pixelseg's OpenVINO export path, fp32 or NNCF int8
            (the `openvino` extra; skipped where it is not installed)

Throughput runs on random images and blob masks written once in the official Oxford-IIIT Pet layout
(benchmarks/out/random-pets-*), so every framework reads files through its normal pets path; images/s
is the whole training loop (data included), epoch 2 onward. Every (runner, task) is a fresh process
whose peak RSS is read with os.wait4; on CUDA the runners also report peak device memory.
Time-to-quality trains each from random weights (all layers) on the real pets sample
(trainval -> train, test -> test) for the same wall-clock budget, counted from process launch, and
scores the weights of the last epoch that ended inside it on the same test arrays with the same mIoU.
On CPU it ends with each runner's achieved GFLOP/s as a share of this machine's measured fp32 and bf16 GEMM
peaks (benchmarks/speed/gemm_peak.py, run after the runners; `--no-peak` skips it).

    python benchmarks/compare/run.py                          # defaults: 3 repeats, 120 s quality budget
    python benchmarks/compare/run.py --repeats 1 --epochs 2 --train-images 128 --budget 30   # smoke test
    python benchmarks/compare/run.py --runners pixelseg,smp --no-quality
    python benchmarks/compare/run.py --runners tf,pixelseg,openvino,openvino_int8 --no-quality

Nothing here is a pixelseg dependency, and no test depends on it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/compare/: the runners
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)
import common  # noqa: E402  (this folder)

ENVS = _common.ENVS
RUNNERS = ("tf", "smp", "pixelseg", "openvino", "openvino_int8")
LABELS = {"tf": "TensorFlow tutorial (Keras fit)", "smp": "SMP Unet, plain loop", "pixelseg": "pixelseg defaults",
          "openvino": "pixelseg, OpenVINO fp32", "openvino_int8": "pixelseg, OpenVINO int8"}
INFER_ONLY = ("openvino", "openvino_int8")


# ---- environments ------------------------------------------------------------------------------

def _check(cmd: list[str], env=None) -> tuple[bool, str]:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return r.returncode == 0, (r.stdout + r.stderr).strip()[-600:]


def ensure_tf(spec: str) -> tuple[list[str] | None, dict, str]:
    """benchmarks/.envs/tf: a venv holding only TensorFlow (+ Pillow for the pets files); cached."""
    venv = ENVS / "tf"
    py = venv / "bin" / "python"
    ready = venv / ".ready"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if not (ready.is_file() and ready.read_text().strip() == spec and py.is_file()):
        print(f"[compare] creating {venv} (pip install {spec} pillow; a few minutes, once)", flush=True)
        ENVS.mkdir(parents=True, exist_ok=True)
        for cmd in ([sys.executable, "-m", "venv", "--clear", str(venv)],
                    [str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                    [str(py), "-m", "pip", "install", "-q", spec, "pillow"]):
            ok, out = _check(cmd)
            if not ok:
                return None, env, f"could not build {venv}: {' '.join(cmd[-3:])}: {out}"
        ready.write_text(spec)
    ok, out = _check([str(py), "-c", "import tensorflow as tf, PIL; print(tf.__version__)"], env)
    if not ok:
        return None, env, f"{venv}: tensorflow does not import ({out}); delete the folder to rebuild it"
    return [str(py), str(HERE / "tf_tutorial.py")], env, ""


def ensure_smp(spec: str) -> tuple[list[str] | None, dict, str]:
    """benchmarks/.envs/smp: SMP alone (--no-deps); torch, torchvision, timm come from the project venv."""
    target = ENVS / "smp"
    ready = target / ".ready"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])))
    if not (ready.is_file() and ready.read_text().strip() == spec):
        print(f"[compare] installing {spec} into {target}", flush=True)
        ok, out = _check([sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--target", str(target),
                          "--no-deps", spec])
        if not ok:
            return None, env, f"could not install {spec} into {target}: {out}"
        ready.write_text(spec)
    ok, out = _check([sys.executable, "-c", "import segmentation_models_pytorch as smp; "
                      "smp.Unet('mobilenet_v2', encoder_weights=None, classes=3)"], env)
    if not ok:
        return None, env, f"{target}: segmentation_models_pytorch does not import with this venv's torch ({out})"
    return [sys.executable, str(HERE / "smp_unet.py")], env, ""


def ensure_pixelseg() -> tuple[list[str], dict, str]:
    env = dict(os.environ, PIXELSEG_CACHE=str(_common.OUT / "cache"), TQDM_DISABLE="1")
    return [sys.executable, str(HERE / "pixelseg_runner.py")], env, ""


def ensure_openvino(backend: str) -> tuple[list[str] | None, dict, str]:
    ok, out = _check([sys.executable, "-c", "import openvino, nncf"])
    if not ok:
        return None, {}, f"openvino/nncf not importable here (pip install -e '.[openvino]'): {out.splitlines()[-1:]}"
    cmd, env, _ = ensure_pixelseg()
    return [*cmd, "--backend", backend], env, ""


# ---- running ---------------------------------------------------------------------------------

def run_task(cmd, env, args_list, timeout) -> dict:
    r = common.run_measured([*cmd, *args_list], env=env, timeout=timeout)
    res = common.parse_last_json(r["stdout"])
    if r["rc"] != 0 or res is None:
        tail = (r["stderr"] or r["stdout"]).strip()[-1500:]
        return {"error": f"exit {r['rc']}: {tail}"}
    res["peak_rss_bytes"] = r["peak_rss_bytes"]
    res["wall_s"] = r["wall_s"]
    return res


def median_of(results: list[dict], key: str):
    vals = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def peak_mem(results: list[dict]):
    """Device memory on CUDA, else RSS (median over repeats)."""
    dev = median_of(results, "peak_device_mem_bytes")
    return dev if dev is not None else median_of(results, "peak_rss_bytes")


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    info["cpu"] = _common.cpu_model()
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def fmt(v, spec=".1f", unit=""):
    return "—" if v is None else f"{v:{spec}}{unit}"


def ratio(ours, theirs, lower_is_better=False):
    if ours is None or theirs is None or theirs == 0 or ours == 0:
        return "—"
    r = theirs / ours if lower_is_better else ours / theirs
    return f"{r:.2f}×"


def print_table(rows: dict, budget: float, mem_label: str) -> str:
    cols = [("train img/s, encoder frozen", "train_frozen", ".1f", False),
            ("train img/s, all layers", "train_full", ".1f", False),
            ("inference img/s, b64", "infer", ".1f", False),
            ("latency b1, ms", "latency", ".1f", True),
            (f"{mem_label}, frozen train, GB", "mem_frozen", ".2f", True),
            (f"{mem_label}, full train, GB", "mem_full", ".2f", True),
            (f"{mem_label}, inference, GB", "mem_infer", ".2f", True),
            (f"test mIoU after {budget:g} s (epochs)", "miou", ".3f", False)]
    names = [n for n in RUNNERS if n in rows]
    others = [n for n in names if n not in ("pixelseg", *INFER_ONLY)] if "pixelseg" in rows else []
    head = "| metric | " + " | ".join(LABELS[n] for n in names) + " |" + "".join(f" pixelseg vs {n} |" for n in others)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    p = rows.get("pixelseg", {})
    for label, key, spec, lower in cols:
        cells = []
        for n in names:
            v = rows[n].get(key)
            if key.startswith("mem") and v is not None:
                v = v / 1e9
            cell = fmt(v, spec)
            if key == "miou" and rows[n].get("epochs") is not None:
                cell += f" ({rows[n]['epochs']})"
            cells.append(cell)
        # ratios read "how many times better pixelseg is": >1 is better for every row
        rats = [ratio(p.get(key), rows[n].get(key), lower) if key != "miou" else
                (fmt(p.get(key) - rows[n].get(key), "+.3f") if p.get(key) is not None and rows[n].get(key) is not None
                 else "—") for n in others]
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + "".join(f" {r} |" for r in rats))
    table = "\n".join(lines)
    print(table)
    return table


def goals(rows: dict) -> list[str]:
    """The issue's targets against the TensorFlow tutorial, measured in this same run."""
    tf, px = rows.get("tf"), rows.get("pixelseg")
    if not tf or not px:
        return []
    out = []
    for label, key, target, lower in [("train, encoder frozen ≥ 2×", "train_frozen", 2.0, False),
                                      ("train, all layers ≥ 2×", "train_full", 2.0, False),
                                      ("inference b64 ≥ 2×", "infer", 2.0, False),
                                      ("latency b1 ≤ 0.5×", "latency", 0.5, True),
                                      ("peak memory (frozen train) ≤ 0.5×", "mem_frozen", 0.5, True)]:
        a, b = px.get(key), tf.get(key)
        if a is None or b is None:
            out.append(f"  {label}: not measured")
            continue
        r = a / b
        met = r <= target if lower else r >= target
        out.append(f"  {label}: pixelseg/TF = {r:.2f} -> {'met' if met else 'NOT met'}")
    for name in INFER_ONLY:  # issue 19: the OpenVINO deployment path against the same TF inference
        ov = rows.get(name)
        if not ov or ov.get("infer") is None or tf.get("infer") is None:
            continue
        r, lat = ov["infer"] / tf["infer"], ov["latency"] / tf["latency"]
        out.append(f"  {LABELS[name]} inference b64 ≥ 2×: {r:.2f} -> {'met' if r >= 2 else 'NOT met'}; "
                   f"latency b1 ≤ 0.5×: {lat:.2f} -> {'met' if lat <= 0.5 else 'NOT met'}")
    return out


def share_of_peak(rows: dict, gemm_repeats: int) -> dict:
    """Achieved GFLOP/s of each runner's training and inference (the model's FLOPs per image, counted by
    bench_throughput.flops_per_image, × its images/s) as a share of this CPU's measured GEMM peaks, measured
    after the runs so the probe does not share the cores with them. TF trains in fp32 (Keras' default),
    pixelseg in bf16 where the CPU has it: both are set against both peaks."""
    from types import SimpleNamespace

    throughput = _common.load("speed/bench_throughput.py")
    flops_per_image, measure_peaks = throughput.flops_per_image, throughput.measure_peaks
    peaks = measure_peaks(SimpleNamespace(device="cpu", gemm_repeats=gemm_repeats))
    if not (peaks.get("fp32") and peaks.get("bf16")):
        print("share of peak: the GEMM probe failed; skipped")
        return {}
    flops = flops_per_image(128)
    print(f"share of this CPU's GEMM peak (fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s; model "
          f"{flops['train_full'] / 1e9:.2f} GFLOP per image per training step, {flops['infer'] / 1e9:.2f} per inference):")
    out = {"peaks_gflops": {k: peaks[k] for k in ("fp32", "bf16")}, "gflop_per_image": {k: v / 1e9 for k, v in flops.items()}}
    for name, row in rows.items():
        for task in ("train_full", "train_frozen", "infer"):
            if row.get(task) is None:
                continue
            gflops = row[task] * flops[task] / 1e9
            out.setdefault(name, {})[task] = {"gflops": gflops, "fp32_share": gflops / peaks["fp32"],
                                              "bf16_share": gflops / peaks["bf16"]}
            print(f"  {name} {task}: {gflops:.0f} GFLOP/s = {100 * gflops / peaks['bf16']:.1f}% of the bf16 peak "
                  f"({100 * gflops / peaks['fp32']:.0f}% of fp32)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--runners", default=",".join(RUNNERS), help="comma list of tf, smp, pixelseg")
    p.add_argument("--train-images", type=int, default=384, help="random training images (a multiple of 64 keeps "
                   "every batch full in every framework)")
    p.add_argument("--test-images", type=int, default=64, help="random validation images")
    p.add_argument("--epochs", type=int, default=3, help="epochs per training run; epochs 2.. are measured")
    p.add_argument("--repeats", type=int, default=3, help="runs per (runner, task); the median is reported")
    p.add_argument("--infer-iters", type=int, default=10, help="timed batch-64 forward passes per inference run")
    p.add_argument("--latency-iters", type=int, default=30, help="timed batch-1 forward passes")
    p.add_argument("--budget", type=float, default=120.0, help="time-to-quality wall-clock budget in seconds")
    p.add_argument("--no-quality", action="store_true", help="skip the time-to-quality row")
    p.add_argument("--no-peak", action="store_true", help="skip the share-of-GEMM-peak lines (CPU only)")
    p.add_argument("--gemm-repeats", type=int, default=3, help="GEMM products per dtype for the peak")
    p.add_argument("--pets-root", type=Path, default=_common.PETS_SAMPLE, help="Oxford-IIIT Pet folder (official layout)")
    p.add_argument("--tf-spec", default="tensorflow", help="pip requirement for the TF env (GPU: 'tensorflow[and-cuda]')")
    p.add_argument("--smp-spec", default="segmentation-models-pytorch", help="pip requirement for the SMP env")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a single run is killed")
    p.add_argument("--out", type=Path, help="JSON results file (default benchmarks/out/compare-<time>.json)")
    args = p.parse_args(argv)

    wanted = [r.strip() for r in args.runners.split(",") if r.strip()]
    bad = sorted(set(wanted) - set(RUNNERS))
    if bad:
        p.error(f"--runners: unknown {', '.join(bad)}; choose from {', '.join(RUNNERS)}")
    runners, skipped = {}, {}
    for name in wanted:
        cmd, env, why = {"tf": lambda: ensure_tf(args.tf_spec), "smp": lambda: ensure_smp(args.smp_spec),
                         "pixelseg": ensure_pixelseg, "openvino": lambda: ensure_openvino("openvino"),
                         "openvino_int8": lambda: ensure_openvino("openvino_int8")}[name]()
        if cmd is None:
            skipped[name] = why
            print(f"[compare] skipping {name}: {why}", flush=True)
        else:
            runners[name] = (cmd, env)

    data = common.make_random_pets(_common.OUT / f"random-pets-{args.train_images}-{args.test_images}",
                                   args.train_images, args.test_images)
    tasks = {
        "train_frozen": ["train", "--data-root", str(data), "--freeze", "yes", "--epochs", str(args.epochs)],
        "train_full": ["train", "--data-root", str(data), "--freeze", "no", "--epochs", str(args.epochs)],
        "infer": ["infer", "--iters", str(args.infer_iters), "--latency-iters", str(args.latency_iters)],
    }
    raw = {n: {t: [] for t in tasks} for n in runners}
    for rep in range(args.repeats):  # interleaved, so slow drifts in machine load hit every runner alike
        for name, (cmd, env) in runners.items():
            for task, targs in tasks.items():
                if name in INFER_ONLY and task != "infer":
                    continue
                t = time.time()
                res = run_task(cmd, env, targs, args.timeout)
                raw[name][task].append(res)
                msg = res.get("error") or ", ".join(f"{k}={res[k]:.3g}" for k in
                                                    ("train_images_per_s", "infer_images_per_s", "latency_b1_ms")
                                                    if res.get(k) is not None)
                print(f"[compare] repeat {rep + 1}/{args.repeats} {name} {task}: {msg} "
                      f"(peak RSS {res.get('peak_rss_bytes', 0) / 1e9:.2f} GB, {time.time() - t:.0f} s)", flush=True)

    quality = {}
    if not args.no_quality:
        if not (args.pets_root / "annotations" / "test.txt").is_file():
            print(f"[compare] skipping time-to-quality: {args.pets_root} is not an Oxford-IIIT Pet folder "
                  "(pass --pets-root)", flush=True)
        else:
            for name, (cmd, env) in runners.items():
                if name in INFER_ONLY:
                    continue
                qargs = ["quality", "--data-root", str(args.pets_root), "--freeze", "no", "--budget", str(args.budget),
                         "--t0", repr(time.time())]
                res = run_task(cmd, env, qargs, args.budget + args.timeout)
                quality[name] = res
                print(f"[compare] quality {name}: " + (res.get("error") or
                      f"test mIoU {fmt(res.get('test_miou'), '.3f')} after {res.get('epochs_in_budget')} epoch(s) "
                      f"{res.get('note', '')}"), flush=True)

    rows = {}
    for name in runners:
        r = raw[name]
        rows[name] = {
            "train_frozen": median_of(r["train_frozen"], "train_images_per_s"),
            "train_full": median_of(r["train_full"], "train_images_per_s"),
            "infer": median_of(r["infer"], "infer_images_per_s"),
            "latency": median_of(r["infer"], "latency_b1_ms"),
            "mem_frozen": peak_mem(r["train_frozen"]),
            "mem_full": peak_mem(r["train_full"]),
            "mem_infer": peak_mem(r["infer"]),
            "miou": quality.get(name, {}).get("test_miou"),
            "epochs": quality.get(name, {}).get("epochs_in_budget"),
        }
    on_gpu = any(res.get("peak_device_mem_bytes") for r in raw.values() for t in r.values() for res in t)
    machine = machine_info()
    print()
    print(f"machine: {machine.get('gpu') or machine.get('cpu')} ({machine['cpus']} CPUs); U-Net/MobileNetV2, "
          f"128×128, batch 64, random init; median of {args.repeats}; {args.train_images} training images, "
          f"epochs 2..{args.epochs}")
    table = print_table(rows, args.budget, "peak GPU memory" if on_gpu else "peak RSS")
    goal_lines = goals(rows)
    if goal_lines:
        print("issue targets vs the TensorFlow tutorial (same run):")
        print("\n".join(goal_lines))
    for name, why in skipped.items():
        print(f"not run: {name}: {why}")
    peak_share = {} if args.no_peak or on_gpu else share_of_peak(rows, args.gemm_repeats)

    out = args.out or _common.OUT / f"compare-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                               "rows": rows, "raw": raw, "quality": quality, "skipped": skipped,
                               "table": table, "goals": goal_lines, "peak_share": peak_share}, indent=1))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
