"""`pixelseg serve` under load: the 1/4/16/64 closed-loop table, beside the in-process cost of the same photos.

For each server configuration (default dynamic batching, and e.g. `--max-batch 1` = off) a fresh
`pixelseg serve` process is started on the model on 127.0.0.1 (loopback only: nothing leaves the
machine), warmed up, and driven by N closed-loop clients in this process (asyncio, `RawClient` or httpx: each client
sends its next photo as soon as its last answer came), per level for at most --duration seconds and at
most --max-requests requests. Photos are real pets JPEGs sent as raw bodies; the answer is the
class-id PNG at the photo's size. Reported per level: requests/s, p50/p95/p99 latency (every request,
client side), errors by kind (any non-200, 5xx, dropped connections).

In-process reference, in a fresh process, on the same photos: decode (JPEG -> RGB), `predict`'s batch-1
inference (`Engine.mask`: resize to the training size, model, logits back, argmax) and PNG encode, the
sum being what `predict` costs per photo - the issue's goal is p95 at 1 client <= 1.5 x that sum.

    python benchmarks/serve/bench_serve.py RUN_DIR                          # 20 s or 2000 requests per level
    python benchmarks/serve/bench_serve.py RUN_DIR --duration 30 --batch 8,1 --clients 1,16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

percentile = _common.percentile  # bench_soak.py imports it from here


def wait_ready(url, proc, timeout=600):
    import httpx
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def start_server(run, port, flags=()) -> subprocess.Popen:
    """`pixelseg serve RUN` of this checkout on 127.0.0.1:port (wait for it with `wait_ready`)."""
    cmd = [sys.executable, "-m", "pixelseg", "serve", str(run), "--host", "127.0.0.1", "--port", str(port), *flags]
    return subprocess.Popen(cmd, env=_common.repo_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class RawClient:
    """One keep-alive HTTP/1.1 connection that POSTs a body and reads the answer, on asyncio streams.

    Hand-written because the load generator runs on the same cores as the server: httpx costs many times
    more CPU per request than this (benchmarks/serve/bench_http_client.py, docs/benchmarks.md), and what the
    clients burn the server cannot use. Enough HTTP for this server's answers (Content-Length bodies);
    `--client httpx` keeps the old client."""

    def __init__(self, host, port):
        self.host, self.port, self.conn = host, port, None

    async def post(self, path, body, ctype="image/jpeg") -> int:
        import asyncio
        if self.conn is None:
            self.conn = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.conn
        try:
            writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                         % (path.encode(), self.host.encode(), self.port, ctype.encode(), len(body)) + body)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.partition(b":")
                key = key.strip().lower()
                if key == b"content-length":
                    length = int(value)
                elif key == b"connection":
                    close = value.strip().lower() == b"close"
            await reader.readexactly(length)
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            close, status = True, 0
        if close:
            await self.close()
        return status

    async def close(self):
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


async def _closed_loop(url, clients, duration, max_requests, photos, kind="raw") -> list:
    """`clients` closed-loop clients (each sends its next photo when the last answer came) until
    `duration` seconds or `max_requests` requests in all; returns (latency ms, status) per request
    (status 0 for a dropped connection or client timeout)."""
    import asyncio
    import random
    from urllib.parse import urlsplit

    import httpx
    records, sent = [], [0]
    stop = time.perf_counter() + duration
    host, port = urlsplit(url).hostname, urlsplit(url).port
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def one(seed):
            rng = random.Random(seed)
            raw = RawClient(host, port)
            while time.perf_counter() < stop and sent[0] < max_requests:
                sent[0] += 1
                photo = rng.choice(photos)
                t0 = time.perf_counter()
                if kind == "raw":
                    try:
                        status = await asyncio.wait_for(raw.post("/v1/predict", photo), 120)
                    except asyncio.TimeoutError:
                        status = 0
                        await raw.close()
                else:
                    try:
                        r = await client.post("/v1/predict", content=photo, headers={"Content-Type": "image/jpeg"})
                        status = r.status_code
                    except httpx.HTTPError:
                        status = 0
                records.append((1000 * (time.perf_counter() - t0), status))
            await raw.close()
        t_start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(clients)))
        records.append((None, time.perf_counter() - t_start))
    return records


def run_level(url, clients, duration, max_requests, photos, kind="raw") -> dict:
    import asyncio
    records = asyncio.run(_closed_loop(url, clients, duration, max_requests, photos, kind))
    wall = records.pop()[1]
    ok = [t for t, s in records if s == 200]
    statuses = {}
    for _, s in records:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {"clients": clients, "wall_s": wall, "requests": len(records), "ok": len(ok),
            "req_per_s": len(ok) / wall, "p50_ms": percentile(ok, 0.5), "p95_ms": percentile(ok, 0.95),
            "p99_ms": percentile(ok, 0.99), "errors": len(records) - len(ok),
            "5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
            "dropped": statuses.get("0", 0), "statuses": statuses}


def reference(run, photos, onnx_path, repeats) -> dict:
    """In-process per-image costs on the same photos: decode, predict's batch-1 inference, encode;
    and the ONNX Runtime loop."""
    import numpy as np
    import torch

    from pixelseg.core import viz
    from pixelseg.inference.serving import FAST_PNG, Engine, decode_upload

    datas = [p.read_bytes() for p in photos]

    def decode(d):  # what the server runs on an upload
        return decode_upload(d, 10**9, "photo")
    engine = Engine(run)
    engine.warm_up()
    t_dec, t_inf, t_enc = [], [], []
    for _ in range(repeats):
        for d in datas:
            t0 = time.perf_counter()
            img = decode(d)
            t1 = time.perf_counter()
            mask, _ = engine.mask(img)
            t2 = time.perf_counter()
            viz.png_bytes(mask, compress_level=FAST_PNG)
            t3 = time.perf_counter()
            t_dec.append(t1 - t0), t_inf.append(t2 - t1), t_enc.append(t3 - t2)
    med = {k: 1000 * statistics.median(v) for k, v in (("decode_ms", t_dec), ("inference_ms", t_inf),
                                                         ("encode_ms", t_enc))}
    med["sum_ms"] = med["decode_ms"] + med["inference_ms"] + med["encode_ms"]
    med["p95_sum_ms"] = 1000 * percentile([a + b + c for a, b, c in zip(t_dec, t_inf, t_enc)], 0.95)
    med["precision"] = engine.describe()["precision"]
    result = {"pixelseg_in_process": med}
    if onnx_path:
        import onnxruntime as ort

        from pixelseg.inference.loading import load_onnx_predictor_parts
        from pixelseg.inference.tiling import Predictor
        fn, info, size = load_onnx_predictor_parts(onnx_path)
        sess = fn.session
        predictor = Predictor(fn, size)
        x = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
        for _ in range(5):
            sess.run(None, {fn.input_name: x})
        t_run = []
        for _ in range(repeats * len(datas)):
            t0 = time.perf_counter()
            sess.run(None, {fn.input_name: x})
            t_run.append(time.perf_counter() - t0)
        t_loop = []
        t_start = time.perf_counter()
        for _ in range(repeats):
            for d in datas:
                t0 = time.perf_counter()
                mask = predictor(decode(d)).argmax(1)[0].to(torch.uint8).numpy()
                viz.png_bytes(mask)
                t_loop.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t_start
        result["onnxruntime_loop"] = {
            "ort_version": ort.__version__, "intra_op_threads": sess.get_session_options().intra_op_num_threads,
            "images_per_s": len(t_loop) / wall, "p50_ms": 1000 * statistics.median(t_loop),
            "p95_ms": 1000 * percentile(t_loop, 0.95), "session_run_p50_ms": 1000 * statistics.median(t_run),
            "session_run_per_s": 1 / statistics.median(t_run)}
    return result


def fresh_reference(args, onnx_path) -> dict:
    """`reference` in a fresh process: nothing the export or earlier runs left behind in this one
    (threads, allocator state) can slow it down."""
    cmd = [sys.executable, __file__, args.run, "--reference-only", "--photos", args.photos, "--n-photos",
           str(args.n_photos), "--reference-repeats", str(args.reference_repeats)]
    if args.photo:
        cmd += ["--photo", args.photo]
    if onnx_path:
        cmd += ["--onnx", onnx_path]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run directory or checkpoint (the tutorial model)")
    ap.add_argument("--photos", default=str(_common.PETS_PHOTOS))
    ap.add_argument("--n-photos", type=int, default=32)
    ap.add_argument("--photo", help="post only this one photo (the issue's protocol: one 500x375 JPEG, "
                    "e.g. Abyssinian_105.jpg of the pets sample), instead of --n-photos of --photos")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=20, help="at most this many seconds per level")
    ap.add_argument("--max-requests", type=int, default=2000, help="at most this many requests per level")
    ap.add_argument("--batch", default="8,1", help="server --max-batch values to compare (8 = default, 1 = off)")
    ap.add_argument("--serve-args", default="", help="more `pixelseg serve` flags for every server, e.g. '--deadline 10'")
    ap.add_argument("--onnx", help="also time this exported model in-process (ONNX Runtime loop)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-repeats", type=int, default=3, help="passes over the photos in-process")
    ap.add_argument("--reference-only", action="store_true",
                    help="print the in-process reference as JSON and exit (run in a fresh process by the main mode)")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="the load generator: raw asyncio HTTP/1.1 (light on the shared cores) or httpx (earlier runs)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", default=str(_common.OUT / "bench_serve.json"))
    args = ap.parse_args()

    photos = [Path(args.photo)] if args.photo else sorted(Path(args.photos).glob("*.jpg"))[: args.n_photos]
    if not photos:
        raise SystemExit(f"no .jpg photos in {args.photos}")
    if args.reference_only:
        print(json.dumps(reference(args.run, photos, args.onnx, args.reference_repeats)))
        return
    datas = [p.read_bytes() for p in photos]
    results = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}, "photos": len(photos),
               "client": args.client,
               "servers": []}
    if not args.no_reference:  # right before the 1-client level, which it is the yardstick for
        results["reference"] = fresh_reference(args, args.onnx)
        print(json.dumps({"reference": results["reference"]}), flush=True)
    url = f"http://127.0.0.1:{args.port}"
    for batch in [int(b) for b in args.batch.split(",")]:
        proc = start_server(args.run, args.port, ["--max-batch", str(batch), *args.serve_args.split()])
        try:
            wait_ready(url, proc)
            run_level(url, 1, 3, 50, datas, args.client)  # warm the connection path and allocator
            levels = []
            for c in [int(c) for c in args.clients.split(",")]:
                r = run_level(url, c, args.duration, args.max_requests, datas, args.client)
                r["load_avg"] = os.getloadavg()[0]
                print(json.dumps({"max_batch": batch, **r}), flush=True)
                levels.append(r)
            import httpx
            metrics = httpx.get(url + "/metrics").text
            results["servers"].append({"max_batch": batch, "levels": levels, "metrics": [
                line for line in metrics.splitlines() if line.startswith(("pixelseg_batch_size_sum", "pixelseg_batch_size_count",
                                                                           "pixelseg_refused_total"))]})
        finally:
            proc.terminate()
            proc.wait(30)
    if not args.no_reference:  # again after the load test: on a shared machine both ends are worth seeing
        results["reference_after"] = fresh_reference(args, args.onnx)
        print(json.dumps({"reference_after": results["reference_after"]}), flush=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    if not args.no_reference:  # the two serve ratios, per server configuration
        ref = min(results["reference"]["pixelseg_in_process"]["sum_ms"],
                  results["reference_after"]["pixelseg_in_process"]["sum_ms"])
        for server in results["servers"]:
            by = {lv["clients"]: lv for lv in server["levels"]}
            if 1 in by:
                server["p95_1_client_vs_in_process"] = by[1]["p95_ms"] / ref
            if 1 in by and 16 in by:
                server["throughput_16_vs_1"] = by[16]["req_per_s"] / by[1]["req_per_s"]
            print(json.dumps({"max_batch": server["max_batch"], "in_process_ms": ref, **{
                k: v for k, v in server.items() if k.endswith(("_vs_1", "_in_process"))}}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
