"""The README's main job: its command parses (every flag a real option) and benchmarks/quality/bench_pretrained.py's
`main` variant reruns exactly it."""
import importlib.util
import re
import shlex
from pathlib import Path

from pixelseg.training import config

ROOT = Path(__file__).resolve().parents[1]


def _readme_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if "pixelseg train --data-root" in ln)
    return shlex.split(re.search(r"pixelseg train (.*)$", line).group(1))


def test_readme_main_job_parses_and_the_benchmark_reruns_it():
    args = _readme_command()
    flags = dict(zip(args[::2], args[1::2]))
    cfg = config.resolve_config({k.removeprefix("--").replace("-", "_"): v for k, v in flags.items()})
    assert cfg.val_every == int(flags["--val-every"]) and cfg.epochs == int(flags["--epochs"])
    spec = importlib.util.spec_from_file_location("bench_pretrained", ROOT / "benchmarks" / "quality" / "bench_pretrained.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    main = dict(zip(bench.VARIANTS["main"][::2], bench.VARIANTS["main"][1::2]))
    ours = {k: v for k, v in flags.items() if k not in ("--data-root", "--run-dir")}
    assert {k: v for k, v in main.items() if k != "--weights"} == ours
