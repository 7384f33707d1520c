"""Per-request cost of a metrics middleware in FastAPI: none vs Starlette's BaseHTTPMiddleware
(`app.middleware("http")`) vs a plain ASGI middleware (what `server.CountRequests` is).

Each app answers a POST of a 20 kB body with an 11.7 kB body (a pets photo's size and its mask PNG's);
requests are driven straight through the ASGI interface in this process (no sockets), 2000 per round,
rounds interleaved. Prints microseconds per request.

    python benchmarks/serve/bench_middleware.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

BODY, PHOTO = b"x" * 11700, b"y" * 20000


def make(kind):
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(request: Request):
        await request.body()
        return Response(BODY, media_type="image/png")

    if kind == "BaseHTTPMiddleware":
        @app.middleware("http")
        async def count(request, call_next):
            return await call_next(request)
    elif kind == "plain ASGI":
        class Count:
            def __init__(self, inner):
                self.app = inner

            async def __call__(self, scope, receive, send):
                status = [500]

                async def send_status(message):
                    if message["type"] == "http.response.start":
                        status[0] = message["status"]
                    await send(message)
                await self.app(scope, receive, send_status)
        app.add_middleware(Count)
    return app


async def call(app):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"image/jpeg"), (b"content-length", str(len(PHOTO)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "scheme": "http"}
    done = [False]

    async def receive():
        if not done[0]:
            done[0] = True
            return {"type": "http.request", "body": PHOTO, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects

    async def send(message):
        pass
    await app(scope, receive, send)


async def main(rounds, n):
    apps = {k: make(k) for k in ("none", "BaseHTTPMiddleware", "plain ASGI")}
    for app in apps.values():
        for _ in range(200):
            await call(app)
    times = {k: [] for k in apps}
    for _ in range(rounds):
        for k, app in apps.items():
            t0 = time.perf_counter()
            for _ in range(n):
                await call(app)
            times[k].append(1e6 * (time.perf_counter() - t0) / n)
    for k, v in times.items():
        print(f"{k:20s} {statistics.median(v):6.0f} us/request (rounds: {', '.join(f'{x:.0f}' for x in v)})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=2000)
    a = ap.parse_args()
    asyncio.run(main(a.rounds, a.requests))
