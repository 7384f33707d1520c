"""Quality on the real pets sample: time-to-quality, and the fast path's quality parity with plain fp32.

1. time-to-quality: `pixelseg train` (defaults, random weights, all layers) on the Oxford-IIIT Pet
   sample (trainval -> train, test -> test) for a wall-clock budget counted from launch; the weights of
   the last epoch that ended inside the budget are scored on the test split (mIoU at 128×128, the
   same arrays and arithmetic as compare/run.py, via compare/pixelseg_runner.py).
2. parity: the same seed and number of epochs twice, pixelseg's default fast path (bf16 autocast where
   native, channels_last) against `--precision fp32 --no-channels-last`; per-epoch test mIoU and loss
   side by side. bf16 changes rounding, so runs are not bit-identical; the check is that the final
   mIoU gap stays within --tolerance (and, with several --seeds, within the seed-to-seed spread).

    python benchmarks/quality/bench_quality.py                                # 120 s budget, parity over 15 epochs
    python benchmarks/quality/bench_quality.py --budgets 60,120,240 --no-parity
    python benchmarks/quality/bench_quality.py --no-budget --epochs 10 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

common = _common.load("compare/common.py")  # the comparison's data and scoring

import numpy as np  # noqa: E402

FP32_FLAGS = ["--precision", "fp32", "--no-channels-last"]


def time_to_quality(budget: float, pets: Path, extra: list[str], timeout: float) -> dict:
    t0 = time.time()
    cmd = [sys.executable, str(_common.BENCH / "compare" / "pixelseg_runner.py"), "quality", "--data-root", str(pets),
           "--freeze", "no", "--budget", str(budget), "--t0", repr(t0)]
    if extra:
        cmd += ["--extra", *extra]
    r = common.run_measured(cmd, env=dict(os.environ, TQDM_DISABLE="1"), timeout=budget + timeout)
    res = common.parse_last_json(r["stdout"])
    if r["rc"] or res is None:
        return {"budget_s": budget, "error": (r["stderr"] or r["stdout"]).strip()[-800:]}
    return res


def train_run(pets: Path, epochs: int, seed: int, flags: list[str], cache: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="pixelseg-parity-")) / "run"
    cmd = [sys.executable, "-m", "pixelseg", "train", "--dataset", "oxford-pet", "--data-root", str(pets),
           "--weights", "none", "--epochs", str(epochs), "--seed", str(seed), "--run-dir", str(run_dir), *flags]
    t = time.time()
    env = _common.repo_env(PIXELSEG_CACHE=str(cache), TQDM_DISABLE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        if r.returncode:
            return {"error": (r.stderr or r.stdout).strip()[-800:]}
        hist = json.loads((run_dir / "metrics.json").read_text())
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
    return {"wall_s": time.time() - t, "val_miou": [h["val_miou"] for h in hist],
            "train_loss": [h["train_loss"] for h in hist], "val_loss": [h["val_loss"] for h in hist],
            "train_images_per_s": [h["train_images_per_s"] for h in hist]}


def parity(pets: Path, epochs: int, seeds: list[int], tolerance: float) -> dict:
    cache = _common.OUT / "cache"
    runs = {"default": [], "fp32": []}
    for seed in seeds:
        for name, flags in (("default", []), ("fp32", FP32_FLAGS)):
            r = train_run(pets, epochs, seed, flags, cache)
            runs[name].append(r)
            print(f"[parity] seed {seed} {name}: " + (r.get("error") or
                  f"test mIoU per epoch {', '.join(f'{v:.3f}' for v in r['val_miou'])} ({r['wall_s']:.0f} s)"), flush=True)
    ok = all("error" not in r for rs in runs.values() for r in rs)
    out = {"epochs": epochs, "seeds": seeds, "runs": runs}
    if not ok:
        out["verdict"] = "error"
        return out
    final = {k: [r["val_miou"][-1] for r in v] for k, v in runs.items()}
    gap = statistics.mean(final["default"]) - statistics.mean(final["fp32"])
    spread = max(statistics.pstdev(final["default"]), statistics.pstdev(final["fp32"])) if len(seeds) > 1 else 0.0
    # A model that still predicts only the most frequent class scores the same in every configuration, so
    # the check says nothing until both runs clear that floor (computed from the test labels themselves).
    _, labels = common.eval_arrays(pets, "test", 128)
    counts = np.bincount(labels[labels < common.NUM_CLASSES].ravel(), minlength=common.NUM_CLASSES)
    floor = counts.max() / counts.sum() / common.NUM_CLASSES
    verdict = "parity" if abs(gap) <= max(tolerance, 2 * spread) else "differs"
    if max(max(v) for v in final.values()) < floor + 0.02:
        verdict = "uninformative (both runs still at the majority-class mIoU; use more --epochs)"
    out.update({"final_miou": final, "gap": gap, "seed_spread": spread, "majority_class_miou": floor,
                "verdict": verdict})
    lines = ["| epoch | " + " | ".join(f"default s{s} mIoU | fp32 s{s} mIoU | default s{s} loss | fp32 s{s} loss"
                                        for s in seeds) + " |"]
    lines.append("|---|" + "---|" * (4 * len(seeds)))
    for e in range(epochs):
        cells = []
        for i in range(len(seeds)):
            d, f = runs["default"][i], runs["fp32"][i]
            cells += [f"{d['val_miou'][e]:.3f}", f"{f['val_miou'][e]:.3f}", f"{d['train_loss'][e]:.3f}",
                      f"{f['train_loss'][e]:.3f}"]
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    out["table"] = "\n".join(lines)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--pets-root", type=Path, default=_common.PETS_SAMPLE)
    p.add_argument("--budgets", default="120", help="comma list of wall-clock budgets in seconds")
    p.add_argument("--no-budget", action="store_true", help="skip time-to-quality")
    p.add_argument("--no-parity", action="store_true", help="skip the fast-path vs fp32 parity check")
    p.add_argument("--epochs", type=int, default=15, help="epochs of each parity run (from random weights the "
                   "model needs ~10 epochs of the 300-image sample to leave the majority-class prediction)")
    p.add_argument("--seeds", default="0", help="comma list of seeds for the parity runs")
    p.add_argument("--tolerance", type=float, default=0.01, help="largest acceptable final mIoU gap (absolute)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `pixelseg train` flags for the "
                   "time-to-quality run")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, help="JSON results (default benchmarks/out/quality-<time>.json)")
    args = p.parse_args(argv)
    if not (args.pets_root / "annotations" / "test.txt").is_file():
        p.error(f"--pets-root {args.pets_root}: not an Oxford-IIIT Pet folder (needs annotations/test.txt)")

    result = {"pets_root": str(args.pets_root)}
    if not args.no_budget:
        result["time_to_quality"] = []
        for b in [float(x) for x in args.budgets.split(",")]:
            r = time_to_quality(b, args.pets_root, args.extra, args.timeout)
            result["time_to_quality"].append(r)
            miou = "—" if r.get("test_miou") is None else f"{r['test_miou']:.3f}"
            print(f"[quality] budget {b:g} s: " + (r.get("error") or
                  f"test mIoU {miou} after {r['epochs_in_budget']} epoch(s) {r.get('note', '')}"), flush=True)
    if not args.no_parity:
        seeds = [int(s) for s in args.seeds.split(",")]
        par = parity(args.pets_root, args.epochs, seeds, args.tolerance)
        result["parity"] = par
        if "table" in par:
            print(par["table"])
            print(f"final test mIoU default {statistics.mean(par['final_miou']['default']):.3f} vs fp32 "
                  f"{statistics.mean(par['final_miou']['fp32']):.3f}: gap {par['gap']:+.3f} "
                  f"(tolerance {args.tolerance}, seed spread {par['seed_spread']:.3f}, majority-class mIoU "
                  f"{par['majority_class_miou']:.3f}) -> {par['verdict']}")
    out = args.out or _common.out_path("quality", stamped=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"results: {out}")
    return 0 if result.get("parity", {}).get("verdict") != "differs" else 1


if __name__ == "__main__":
    sys.exit(main())
