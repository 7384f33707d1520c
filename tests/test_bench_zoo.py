"""benchmarks/speed/bench_zoo.py measures the backbone it is asked for (ARCH/BACKBONE), not the default."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "speed" / "bench_zoo.py"


def test_bench_zoo_takes_arch_slash_backbone(tmp_path):
    out = tmp_path / "zoo.json"
    r = subprocess.run([sys.executable, str(BENCH), "--models", "fpn/mobilenet_v1,unet", "--sizes", "64x64@2",
                        "--steps", "1", "--warmup", "0", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["arch"], row["backbone"]) for row in rows] == [("fpn", "mobilenet_v1"), ("unet", "mobilenet_v2")]
    for row in rows:
        assert row["train_images_per_s"] > 0 and row["infer_images_per_s"] > 0 and row["gflops_per_image"] > 0


def test_bench_zoo_rejects_unknown_arch():
    r = subprocess.run([sys.executable, str(BENCH), "--models", "nosuch/vgg16"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown nosuch/vgg16" in r.stderr


def test_bench_infer_variants_compares_against_the_eager_path():
    bench = BENCH.parent / "bench_infer_variants.py"
    r = subprocess.run([sys.executable, str(bench), "--variants", "eager", "--batch", "2", "--size", "64",
                        "--iters", "1", "--latency-iters", "1", "--precision", "fp32"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in r.stdout.splitlines() if line.startswith("| eager")}
    assert set(rows) == {"eager"}, r.stdout
    assert float(rows["eager"][3]) == 0.0  # the reference against itself
