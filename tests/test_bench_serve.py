"""benchmarks/serve/bench_serve.py's own HTTP client (RawClient) reads the server's answers right: statuses,
bodies over several reads, keep-alive, and a connection the server closes."""
import asyncio
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="pixelseg[serve] extra not installed")
from pixelseg.inference.serving import Engine  # noqa: E402

from _fakes import fake_checkpoint  # noqa: E402
from test_serve import jpeg, photo, running  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve" / "bench_serve.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_raw_client_gets_the_statuses_the_server_sends(tmp_path):
    bench = _bench()
    engine = Engine(fake_checkpoint(tmp_path / "model.pt"))
    good = jpeg(photo(300, 400))
    with running(engine) as url:
        host, port = url.removeprefix("http://").split(":")

        async def go():
            client = RawClient(host, int(port))
            statuses = [await client.post("/v1/predict", good), await client.post("/v1/predict", b"hello"),
                        await client.post("/v1/predict", good)]
            conn = client.conn
            await client.close()
            return statuses, conn
        RawClient = bench.RawClient
        statuses, conn = asyncio.run(go())
        assert statuses == [200, 415, 200] and conn is not None  # one kept-alive connection for all three
        # the closed-loop driver: every answer of a short level is a 200 with the mask
        level = bench.run_level(url, 2, 2.0, 6, [good])
    assert level["ok"] == level["requests"] == 6 and level["errors"] == 0


def test_raw_client_reconnects_after_the_server_closes():
    bench = _bench()
    answers = []

    async def handle(reader, writer):  # answers once, then closes, as a server does after Connection: close
        await reader.readuntil(b"\r\n\r\n")
        body = b"x" * 70_000  # more than one read
        writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()
        answers.append(1)

    async def go():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = bench.RawClient("127.0.0.1", port)
        got = [await client.post("/v1/predict", b"\0" * 10) for _ in range(3)]
        server.close()
        return got, client.conn
    got, conn = asyncio.run(go())
    assert got == [503, 503, 503] and len(answers) == 3 and conn is None
