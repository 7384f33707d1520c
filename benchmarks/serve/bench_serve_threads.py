"""Where `pixelseg serve`'s CPU goes under load: CPU time per request of each of its threads (Linux /proc).

Starts `pixelseg serve RUN` on 127.0.0.1, warms it up, then for each client count drives it with
bench_serve.py's closed-loop clients and reads every server thread's user+system time before and after.
Threads are listed by id (Python threads share the process name): the two busiest are the torch thread and
its OpenMP worker, then the decode/encode pool, then the main thread (the event loop, marked).

    python benchmarks/serve/bench_serve_threads.py runs/pets [--photo JPEG] [--clients 1,16] [--duration 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of `pid`."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main():
    import bench_serve
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--photo", default=str(_common.PETS_PHOTO))
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--port", type=int, default=8771)
    ap.add_argument("--serve-args", default="")
    args = ap.parse_args()
    photo = Path(args.photo).read_bytes()
    srv = bench_serve.start_server(args.run, args.port, args.serve_args.split())
    url = f"http://127.0.0.1:{args.port}"
    try:
        bench_serve.wait_ready(url, srv)
        bench_serve.run_level(url, 4, 3, 10**6, [photo])  # warm-up
        for clients in (int(c) for c in args.clients.split(",")):
            before, c0 = thread_cpu(srv.pid), time.process_time()
            level = bench_serve.run_level(url, clients, args.duration, 10**6, [photo])
            after, c1 = thread_cpu(srv.pid), time.process_time()
            n = max(1, level["requests"])
            used = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
            print(f"{clients} clients: {level['requests']} requests, {level['req_per_s']:.1f} req/s; server "
                  f"{1000 * sum(used.values()) / n:.2f} ms CPU per request "
                  f"({100 * sum(used.values()) / level['wall_s']:.0f}% of a core), client {1000 * (c1 - c0) / n:.2f} ms")
            for tid, cpu in sorted(used.items(), key=lambda kv: -kv[1]):
                if cpu > 0.01:
                    print(f"   thread {tid}{' (main: event loop)' if tid == srv.pid else ''}: "
                          f"{1000 * cpu / n:6.2f} ms CPU per request ({100 * cpu / level['wall_s']:.0f}% of a core)")
    finally:
        srv.terminate()
        srv.wait()


if __name__ == "__main__":
    main()
