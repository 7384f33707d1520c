"""CPU per request of bench_serve.py's load generators (`RawClient` vs httpx), against a trivial server.

bench_serve.py's clients share the cores with the server they measure, so what a client burns per request
the server cannot use. This drives a minimal asyncio HTTP/1.1 server in another process (it reads the body
and answers a fixed 11.7 kB body, the size of a pets mask PNG) and reports this process's CPU time per
request, for each client kind and number of clients. Loopback only.

    python benchmarks/serve/bench_http_client.py [--photo JPEG] [--duration 5] [--rounds 2]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
import _common  # noqa: E402  (this checkout's pixelseg first on sys.path, paths, device, timing)

SERVER = r'''
import asyncio, sys
BODY = b"x" * 11700
async def handle(r, w):
    try:
        while (line := await r.readline()):
            n = 0
            while (h := await r.readline()) not in (b"\r\n", b""):
                if h.lower().startswith(b"content-length"):
                    n = int(h.split(b":")[1])
            await r.readexactly(n)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
            await w.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    w.close()
async def main():
    async with await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1])) as s:
        await s.serve_forever()
asyncio.run(main())
'''


def main():
    import bench_serve
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photo", default=str(_common.PETS_PHOTO))
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--max-requests", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=8799)
    args = ap.parse_args()
    photo = Path(args.photo).read_bytes()
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(args.port)])
    try:
        deadline = time.time() + 30
        while True:  # wait for the socket
            try:
                bench_serve.run_level(url, 1, 0.2, 1, [photo], "raw")
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the test server did not start")
                time.sleep(0.2)
        print("round  client  clients  requests  req/s  client CPU us/request")
        for rnd in range(args.rounds):
            for kind in ("raw", "httpx"):
                for c in (int(v) for v in args.clients.split(",")):
                    t0 = time.process_time()
                    r = bench_serve.run_level(url, c, args.duration, args.max_requests, [photo], kind)
                    cpu = time.process_time() - t0
                    print(f"{rnd:5d}  {kind:6s}  {c:7d}  {r['requests']:8d}  {r['req_per_s']:5.0f}  "
                          f"{1e6 * cpu / max(1, r['requests']):8.0f}")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
