"""`pixelseg serve` under load (locust), beside a plain ONNX Runtime loop as the ceiling.

For each server configuration (micro-batching off, and `--max-batch N`) a fresh `pixelseg serve`
process is started on the model, warmed up, and driven by locust (headless, closed loop: each
simulated client sends the next photo as soon as the last answer came) at 1, 4 and 16 clients for
--duration seconds each. Photos are real pets JPEGs sent as raw bodies; the answer is the class-id
PNG at the photo's size. Reported: requests/s, p50/p95/p99 latency (client side, every request
recorded, not locust's rounded buckets), errors by kind (any non-200, 5xx, dropped connections).

Reference numbers in-process on the same photos: the per-image cost of decode (JPEG -> RGB),
`predict`'s batch-1 inference (`Predictor`, resize to the training size and back) and PNG encode
- the issue's goal is p95 at 1 client <= 1.5 x their sum - and the ONNX Runtime ceiling: the
exported model in a plain loop (decode + resize + session.run + argmax + encode, one image at a
time, no HTTP), plus session.run alone.

    python benchmarks/bench_serve.py RUN_DIR                          # 20 s per level
    python benchmarks/bench_serve.py RUN_DIR --duration 60 --batch 1,4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's pixelseg, installed or not

LOCUSTFILE = r'''
import json, os, random, time
from locust import FastHttpUser, constant, events, task

PHOTOS = [open(p, "rb").read() for p in json.loads(os.environ["BENCH_PHOTOS"])]
RECORDS = []


@events.request.add_listener
def record(request_type, name, response_time, response_length, response=None, exception=None, **kw):
    status = getattr(response, "status_code", None) if response is not None else None
    RECORDS.append((response_time, status or 0, repr(exception)[:80] if exception else ""))


@events.quitting.add_listener
def dump(environment, **kw):
    with open(os.environ["BENCH_OUT"], "w") as f:
        json.dump(RECORDS, f)


class Client(FastHttpUser):
    wait_time = constant(0)
    connection_timeout = 60.0
    network_timeout = 120.0

    @task
    def predict(self):
        with self.client.post("/v1/predict", data=random.choice(PHOTOS), headers={"Content-Type": "image/jpeg"},
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
'''


def percentile(values, q):
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


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


def run_level(url, clients, duration, photos, workdir) -> dict:
    lf = Path(workdir) / "locustfile.py"
    lf.write_text(LOCUSTFILE)
    out = Path(workdir) / f"records_{clients}.json"
    env = {**os.environ, "BENCH_PHOTOS": json.dumps([str(p) for p in photos]), "BENCH_OUT": str(out)}
    cmd = [sys.executable, "-m", "locust", "-f", str(lf), "--headless", "-u", str(clients), "-r", str(clients),
           "-t", f"{duration}s", "--host", url, "--only-summary", "--stop-timeout", "30", "--loglevel", "WARNING"]
    subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = json.loads(out.read_text())
    ok = [t for t, s, e in records if s == 200]
    statuses = {}
    for _, s, e in records:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {"clients": clients, "duration_s": duration, "requests": len(records), "ok": len(ok),
            "req_per_s": len(ok) / duration, "p50_ms": percentile(ok, 0.5), "p95_ms": percentile(ok, 0.95),
            "p99_ms": percentile(ok, 0.99), "errors": len(records) - len(ok),
            "5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
            "dropped": statuses.get("0", 0), "statuses": statuses}


def reference(run, photos, onnx_path, repeats) -> dict:
    """In-process per-image costs on the same photos: decode, predict's batch-1 inference, encode;
    and the ONNX Runtime loop."""
    import numpy as np
    import torch
    from PIL import Image

    from pixelseg import viz
    from pixelseg.data.io import to_rgb_array
    from pixelseg.serving import Engine

    datas = [p.read_bytes() for p in photos]
    import io

    def decode(d):
        return to_rgb_array(Image.open(io.BytesIO(d)), "photo")
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
            viz.png_bytes(mask)
            t3 = time.perf_counter()
            t_dec.append(t1 - t0), t_inf.append(t2 - t1), t_enc.append(t3 - t2)
    med = {k: 1000 * statistics.median(v) for k, v in (("decode_ms", t_dec), ("inference_ms", t_inf),
                                                         ("encode_ms", t_enc))}
    med["sum_ms"] = med["decode_ms"] + med["inference_ms"] + med["encode_ms"]
    med["precision"] = engine.describe()["precision"]
    result = {"pixelseg_in_process": med}
    if onnx_path:
        import onnxruntime as ort

        from pixelseg.export import load_onnx_predictor_parts
        from pixelseg.tiling import Predictor
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
    if onnx_path:
        cmd += ["--onnx", onnx_path]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run directory or checkpoint (the tutorial model)")
    ap.add_argument("--photos", default=str(HERE.parent.parent / "shared/data/oxford-iiit-pet-sample/images"))
    ap.add_argument("--n-photos", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--duration", type=int, default=20, help="seconds per level (the issue asks 60)")
    ap.add_argument("--batch", default="1,4", help="server --max-batch values to compare (1 = off)")
    ap.add_argument("--batch-wait-ms", type=float, default=5)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--onnx", help="exported model for the ceiling (default: export the run to a temp file)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-repeats", type=int, default=3, help="passes over the photos in-process")
    ap.add_argument("--reference-only", action="store_true",
                    help="print the in-process reference as JSON and exit (run in a fresh process by the main mode)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", default=str(HERE / "out" / "bench_serve.json"))
    args = ap.parse_args()

    photos = sorted(Path(args.photos).glob("*.jpg"))[: args.n_photos]
    if not photos:
        raise SystemExit(f"no .jpg photos in {args.photos}")
    if args.reference_only:
        print(json.dumps(reference(args.run, photos, args.onnx, args.reference_repeats)))
        return
    results = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}, "photos": len(photos),
               "servers": []}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = args.onnx
        if not args.no_reference:  # right before the 1-client level, which it is the yardstick for
            if not onnx_path:
                from pixelseg.export import export
                onnx_path = str(Path(tmp) / "model.onnx")
                export(args.run, "onnx", onnx_path, check_images=[str(p) for p in photos[:2]], check_limit=2)
            results["reference"] = fresh_reference(args, onnx_path)
            print(json.dumps({"reference": results["reference"]}), flush=True)
        for batch in [int(b) for b in args.batch.split(",")]:
            url = f"http://127.0.0.1:{args.port}"
            cmd = [sys.executable, "-m", "pixelseg", "serve", args.run, "--port", str(args.port),
                   "--max-queue", str(args.max_queue), "--max-batch", str(batch),
                   "--batch-wait-ms", str(args.batch_wait_ms)]
            proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(HERE.parent)},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_ready(url, proc)
                run_level(url, 1, 3, photos, tmp)  # warm the connection path and allocator
                levels = []
                for c in [int(c) for c in args.clients.split(",")]:
                    r = run_level(url, c, args.duration, photos, tmp)
                    r["load_avg"] = os.getloadavg()[0]
                    print(json.dumps({"max_batch": batch, **r}), flush=True)
                    levels.append(r)
                results["servers"].append({"max_batch": batch, "batch_wait_ms": args.batch_wait_ms, "levels": levels})
            finally:
                proc.terminate()
                proc.wait(30)
        if not args.no_reference:  # again after the load test: on a shared machine both ends are worth seeing
            results["reference_after"] = fresh_reference(args, onnx_path)
            print(json.dumps({"reference_after": results["reference_after"]}), flush=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
