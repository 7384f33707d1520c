"""Shared test helpers (not a test module): a real S3-compatible server (moto's server mode) on 127.0.0.1
with the standard AWS_* environment pointing at it, and an HTTP front that answers chosen requests with an
S3 error (503 SlowDown, 403 InvalidAccessKeyId) and forwards the others, to test the retry policy.

Used by tests/test_s3.py and tests/test_multinode.py (shards in S3 split across two nodes)."""
from __future__ import annotations

import contextlib
import http.client
import http.server
import logging
import os
import threading

ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_MAX_ATTEMPTS")


@contextlib.contextmanager
def moto_s3(*buckets: str):
    """Start moto's S3 server in a thread on 127.0.0.1 (a free port), point this process's AWS_* variables
    at it, create `buckets`; yield the environment a subprocess needs. Raises what the server raises when
    it cannot start (callers skip with that reason). Restores the environment and stops the server after."""
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in ENV_KEYS}
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_MAX_ATTEMPTS"):
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        import s3fs
        fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"])
        for bucket in buckets:
            fs.mkdir(bucket)
        yield env
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Hop-by-hop headers (RFC 9110 7.6.1) and those the front recomputes: never forwarded as they came.
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect",
        "content-length"}


class FaultFront(http.server.BaseHTTPRequestHandler):
    """A reverse proxy in front of the S3 server: the first `fail` requests get `status` with an S3 error
    body, the others are forwarded. `seen` counts every request that reached the front.

    It speaks HTTP/1.1 as a real endpoint does (aiohttp, under s3fs, keeps connections alive and sends
    `Expect: 100-continue` on PUT): every response has an exact Content-Length (HEAD: the object's), a
    request body is read whole (Content-Length or chunked) before answering, so the connection stays in
    step, and the connection closes only when the client asks."""
    protocol_version = "HTTP/1.1"
    target: tuple = None
    fail, status, seen = 0, 503, 0
    lock = threading.Lock()
    bodies = {503: b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
              403: b"<Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you provided does not "
                   b"exist in our records.</Message></Error>"}

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()  # the CRLF after each chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _any(self):
        cls = type(self)
        body = self._body()
        with cls.lock:
            cls.seen += 1
            failing = cls.seen <= cls.fail
        if failing:
            out = cls.bodies[cls.status]
            status, headers, length = cls.status, [("Content-Type", "application/xml")], len(out)
        else:
            conn = http.client.HTTPConnection(*cls.target, timeout=30)
            try:
                conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                             headers={k: v for k, v in self.headers.items() if k.lower() not in _HOP})
                r = conn.getresponse()
                out = r.read()
                status, headers = r.status, [(k, v) for k, v in r.getheaders() if k.lower() not in _HOP]
                length = int(r.getheader("Content-Length") or 0) if self.command == "HEAD" else len(out)
            finally:
                conn.close()
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)
        self.wfile.flush()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _any


@contextlib.contextmanager
def fault_front(endpoint: str):
    """A FaultFront (a fresh subclass: its counters are its own) serving on 127.0.0.1; yields (class, URL)."""
    host, port = endpoint.rsplit("//", 1)[1].split(":")
    handler = type("Front", (FaultFront,), {"target": (host, int(port)), "seen": 0, "fail": 0,
                                            "lock": threading.Lock()})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)
