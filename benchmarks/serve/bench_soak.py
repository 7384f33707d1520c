"""`pixelseg serve` soak: 16 closed-loop clients for N minutes with good photos, bad uploads and client
disconnects, the server's RSS, open file descriptors and threads sampled every 30 s (issue 33).

A fresh `pixelseg serve` process (this checkout) is started on 127.0.0.1 (loopback only) and warmed up; then
`--clients` asyncio clients (benchmarks/serve/bench_serve.py's RawClient: light on the shared cores) each send their
next request as soon as the last one ended, for `--minutes`. Each request is drawn (seeded) from:

    good        a pets JPEG (or a synthetic photo when the sample is missing) as the raw body    -> 200
    bad         truncated JPEG (400), not an image (415), empty body (422), format=bogus (422),
                a PNG header claiming 30000x30000 (413)                                          -> 4xx
    disconnect  headers and half the body, then the connection closed; or the whole request and
                closed before the answer                                                          -> none

Every `--interval` s one row: the server's RSS (MiB), open fds and threads (from /proc/PID), p50/p95 of the
window's good requests, and the window's status counts. Goal: no 5xx; RSS after the first minute flat within
10 %; no growth in fds or threads (last sample vs the first after the first minute). The rows, the verdicts and
the machine go to --out (JSON) and stdout (a markdown table for docs/reliability.md).

    python benchmarks/serve/bench_soak.py RUN_DIR                         # 10 minutes, 16 clients
    python benchmarks/serve/bench_soak.py --minutes 1 --interval 10       # short check; random-init tutorial model
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)
from _common import percentile  # noqa: E402
from bench_serve import RawClient, start_server, wait_ready  # noqa: E402  (this folder)

MIX = (("good", 0.7), ("bad", 0.2), ("disconnect", 0.1))


def proc_stats(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    vals = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mib": int(vals["VmRSS"].split()[0]) / 1024, "threads": int(vals["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def tutorial_checkpoint(folder: Path) -> Path:
    """A random-init U-Net/MobileNetV2 at 128 px (the main job's model) when no run is given."""
    from pixelseg.core.checkpoint import atomic_save, model_checkpoint
    from pixelseg.data import synthetic
    from pixelseg.models import create_model
    model = create_model("unet", backbone="mobilenet_v2", num_classes=3)
    path = folder / "model.pt"
    atomic_save(model_checkpoint(model, synthetic.INFO, {"image_size": 128, "dataset": "synthetic",
                                                         "val_split": "val", "data_root": None}), path)
    return path


def photos(folder: Path, n: int) -> list[bytes]:
    files = sorted(folder.glob("*.jpg"))[:n] if folder.is_dir() else []
    if files:
        return [p.read_bytes() for p in files]
    import numpy as np
    from PIL import Image
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def bomb_png() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def bad_uploads(good: bytes) -> list[tuple[str, bytes, str]]:
    """(path, body, content type) of each kind of bad upload."""
    return [("/v1/predict", good[: len(good) // 2], "image/jpeg"),
            ("/v1/predict", b"this is not an image, just text" * 20, "image/jpeg"),
            ("/v1/predict", b"", "image/jpeg"),
            ("/v1/predict?format=bogus", good, "image/jpeg"),
            ("/v1/predict", bomb_png(), "image/png")]


async def disconnect(host: str, port: int, body: bytes, rng: random.Random) -> None:
    """Half a body then close, or the whole request then close before reading the answer."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
        head = (b"POST /v1/predict HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                % (host.encode(), port, len(body)))
        writer.write(head + (body[: len(body) // 2] if rng.random() < 0.5 else body))
        await writer.drain()
        writer.close()
    except OSError:
        pass


async def soak(url: str, pid: int, clients: int, seconds: float, interval: float, good: list[bytes]) -> list[dict]:
    from urllib.parse import urlsplit
    host, port = urlsplit(url).hostname, urlsplit(url).port
    bad = bad_uploads(good[0])
    window: list[tuple[str, int, float]] = []      # (kind, status, ms) since the last sample
    rows: list[dict] = []
    t_start = time.perf_counter()
    stop = t_start + seconds

    async def client(seed: int):
        rng = random.Random(seed)
        raw = RawClient(host, port)
        while time.perf_counter() < stop:
            kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
            t0 = time.perf_counter()
            if kind == "disconnect":
                await disconnect(host, port, rng.choice(good), rng)
                window.append((kind, -1, 0.0))
                continue
            path, body, ctype = (("/v1/predict", rng.choice(good), "image/jpeg") if kind == "good"
                                 else rng.choice(bad))
            try:
                status = await asyncio.wait_for(raw.post(path, body, ctype), 120)
            except asyncio.TimeoutError:
                status = 0
                await raw.close()
            window.append((kind, status, 1000 * (time.perf_counter() - t0)))
        await raw.close()

    async def sampler():
        next_t = t_start
        while True:
            now = time.perf_counter()
            if now >= next_t:
                done, window[:] = list(window), []
                ok = [ms for k, s, ms in done if k == "good" and s == 200]
                statuses: dict[str, int] = {}
                for k, s, _ in done:
                    key = "disconnect" if k == "disconnect" else str(s)
                    statuses[key] = statuses.get(key, 0) + 1
                row = {"t_s": round(now - t_start, 1), **proc_stats(pid), "requests": len(done),
                       "p50_ms": percentile(ok, 0.5), "p95_ms": percentile(ok, 0.95), "statuses": statuses}
                rows.append(row)
                print(json.dumps(row), flush=True)
                next_t += interval
            if now >= stop + 0.5:
                return
            await asyncio.sleep(min(0.5, max(0.0, next_t - now)))

    sampling = asyncio.create_task(sampler())
    await asyncio.gather(*(client(i) for i in range(clients)))
    await asyncio.sleep(1.0)  # the last answers' buffers are released before the final sample
    sampling.cancel()
    rows.append({"t_s": round(time.perf_counter() - t_start, 1), **proc_stats(pid), "requests": len(window),
                 "p50_ms": percentile([ms for k, s, ms in window if k == "good" and s == 200], 0.5),
                 "p95_ms": percentile([ms for k, s, ms in window if k == "good" and s == 200], 0.95),
                 "statuses": {}, "final": True})
    for k, s, _ in window:
        key = "disconnect" if k == "disconnect" else str(s)
        rows[-1]["statuses"][key] = rows[-1]["statuses"].get(key, 0) + 1
    return rows


def verdicts(rows: list[dict], warm_s: float) -> dict:
    total: dict[str, int] = {}
    for r in rows:
        for k, v in r["statuses"].items():
            total[k] = total.get(k, 0) + v
    after = [r for r in rows if r["t_s"] >= warm_s] or rows[-2:]
    rss = [r["rss_mib"] for r in after]
    five = sum(v for k, v in total.items() if k.startswith("5"))
    return {"statuses": total, "5xx": five, "dropped (status 0)": total.get("0", 0),
            "rss_after_warmup_mib": [min(rss), max(rss)], "rss_spread": (max(rss) - min(rss)) / min(rss),
            # fds: idle before the load vs idle after it (under load each open connection holds one);
            # threads: the first sample after warm-up (the I/O pool exists by then) vs the end
            "fds_idle_before_after": [rows[0]["fds"], rows[-1]["fds"]],
            "fds_under_load": [min(r["fds"] for r in after), max(r["fds"] for r in after)],
            "threads": [after[0]["threads"], rows[-1]["threads"]],
            "ok_no_5xx": five == 0 and total.get("0", 0) == 0,
            "ok_rss_flat_10pct": (max(rss) - min(rss)) / min(rss) <= 0.10,
            "ok_fds": rows[-1]["fds"] <= rows[0]["fds"], "ok_threads": rows[-1]["threads"] <= after[0]["threads"],
            "warmup_s": warm_s, "samples_after_warmup": len(after)}


def table(rows: list[dict]) -> str:
    out = ["| t (s) | RSS (MiB) | fds | threads | requests | p50 (ms) | p95 (ms) | statuses |",
           "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        st = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        out.append(f"| {r['t_s']:.0f}{' (end)' if r.get('final') else ''} | {r['rss_mib']:.0f} | {r['fds']} | "
                   f"{r['threads']} | {r['requests']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {st} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", help="run directory or checkpoint (default: a random-init U-Net/MobileNetV2 "
                                           "at 128 px, the main job's model)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between samples (default: 30)")
    ap.add_argument("--warmup", type=float, default=60.0, help="RSS flatness is judged after this many seconds")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--photos", default=str(_common.PETS_PHOTOS))
    ap.add_argument("--n-photos", type=int, default=32)
    ap.add_argument("--serve-args", default="", help="more `pixelseg serve` flags, e.g. '--max-batch 8'")
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--out", default=str(_common.OUT / "bench_soak.json"))
    args = ap.parse_args()

    good = photos(Path(args.photos), args.n_photos)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or tutorial_checkpoint(Path(tmp))
        url = f"http://127.0.0.1:{args.port}"
        proc = start_server(run, args.port, args.serve_args.split())
        try:
            wait_ready(url, proc)
            rows = asyncio.run(soak(url, proc.pid, args.clients, 60 * args.minutes, args.interval, good))
            alive = proc.poll() is None
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=60)
    tracebacks = err.decode(errors="replace").count("Traceback")
    result = {"machine": {"cpu": _common.cpu_model(), "cpus": os.cpu_count(), "load_avg_end": os.getloadavg()},
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "model": str(args.run or "random-init unet/mobilenet_v2 at 128 px"), "minutes": args.minutes,
              "clients": args.clients, "mix": dict(MIX), "rows": rows,
              "verdicts": {**verdicts(rows, args.warmup), "server_alive_at_end": alive,
                           "tracebacks_in_server_log": tracebacks}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(rows))
    print(json.dumps(result["verdicts"], indent=1))


if __name__ == "__main__":
    main()
