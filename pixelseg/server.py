"""`pixelseg serve`: the HTTP API and web page around a `serving.Engine` (FastAPI + uvicorn).

Concurrency: the event loop only reads bodies and answers; decoding, inference and encoding run on
worker threads, and inference on exactly one (torch already uses every core inside an operator, so
two inferences at once only fight for them). Every request that has a full body takes a slot
before any decoding; with `max_queue` slots taken, new requests get 503 + Retry-After at once,
so memory and latency stay bounded under any load. Bodies are read by the handler itself, counted
as they arrive (413 past --max-upload-mb whatever Content-Length says) and under a deadline (408
for a client that stops sending; it never holds a slot or a thread while it dawdles).
"""

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from .serving import FORMATS, Engine, HTTPProblem, Limits, decode_upload, encode

SERVE_HINT = "pip install 'pixelseg[serve]'"


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps in one process stay apart)."""

    def __init__(self, queue_depth):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = CollectorRegistry()
        self.requests = Counter("pixelseg_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.latency = Histogram("pixelseg_request_latency_seconds", "Time from the request's arrival to its "
                                 "answer (body upload included)", ["endpoint"], buckets=buckets,
                                 registry=self.registry)
        self.inference = Histogram("pixelseg_inference_seconds", "Model time per forward pass (one batch)",
                                   buckets=buckets, registry=self.registry)
        self.batch = Histogram("pixelseg_batch_size", "Requests per forward pass", buckets=(1, 2, 4, 8, 16, 32),
                               registry=self.registry)
        depth = Gauge("pixelseg_queue_depth", "Requests holding a slot (decoding, waiting or in inference)",
                      registry=self.registry)
        depth.set_function(queue_depth)
        self.ready = Gauge("pixelseg_ready", "1 once the model is loaded and warmed up", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Scheduler:
    """Slots (bounded queue) and the single inference thread, with optional micro-batching."""

    def __init__(self, engine: Engine, limits: Limits, metrics: Metrics):
        self.engine, self.limits, self.metrics = engine, limits, metrics
        self.slots = 0
        self.infer_pool = ThreadPoolExecutor(1, thread_name_prefix="pixelseg-infer")
        self.io_pool = ThreadPoolExecutor(2, thread_name_prefix="pixelseg-io")
        self.ema_s = 0.1  # recent seconds per request, for Retry-After
        self._pending: asyncio.Queue | None = None
        self._batcher: asyncio.Task | None = None

    def acquire(self) -> None:
        if self.slots >= self.limits.max_queue:
            retry = max(1, math.ceil(self.slots * self.ema_s))
            raise HTTPProblem(503, f"server busy: {self.slots} requests queued (--max-queue "
                                   f"{self.limits.max_queue}); retry after {retry} s", {"Retry-After": str(retry)})
        self.slots += 1

    def release(self) -> None:
        self.slots -= 1

    async def run_io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
        self.metrics.inference.observe(dt)
        return out, dt

    async def mask(self, image, mc_samples: int = 0):
        """(mask, maps, inference seconds) for one decoded image."""
        loop = asyncio.get_running_loop()
        if self.limits.max_batch > 1 and not mc_samples and not self.engine.predictor.tile:
            fut = loop.create_future()
            if self._batcher is None:
                self._pending = asyncio.Queue()
                self._batcher = asyncio.create_task(self._batch_loop())
            await self._pending.put((image, fut))
            mask, dt = await fut
            return mask, None, dt
        (mask, maps), dt = await loop.run_in_executor(self.infer_pool, self._timed, self.engine.mask, image,
                                                      mc_samples)
        self.metrics.batch.observe(1)
        return mask, maps, dt

    async def _batch_loop(self):
        """Take the first waiting image, gather more for up to --batch-wait-ms (at most --max-batch),
        run them as one forward pass. Waits only while other admitted requests (still decoding) could
        join: a lone client never pays the wait."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._pending.get()]
            deadline = loop.time() + self.limits.batch_wait_ms / 1000
            while len(jobs) < self.limits.max_batch and (self.slots > len(jobs) or not self._pending.empty()):
                try:
                    jobs.append(await asyncio.wait_for(self._pending.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            try:
                masks, dt = await loop.run_in_executor(self.infer_pool, self._timed, self.engine.masks,
                                                       [img for img, _ in jobs])
                self.metrics.batch.observe(len(jobs))
                for (_, fut), m in zip(jobs, masks):
                    if not fut.done():
                        fut.set_result((m, dt))
            except Exception as exc:  # hand the failure to every waiting request; keep batching
                for _, fut in jobs:
                    if not fut.done():
                        fut.set_exception(exc)

    def shutdown(self):
        if self._batcher:
            self._batcher.cancel()
        self.infer_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=False, cancel_futures=True)


def page_html() -> str:
    return resources.files("pixelseg").joinpath("static/serve.html").read_text(encoding="utf-8")


async def read_body(request, limits: Limits) -> bytes:
    """The whole body, counted as it arrives: 413 as soon as it passes the limit (a missing or lying
    Content-Length changes nothing), 408 if the client has not finished within --upload-timeout."""
    declared = request.headers.get("content-length")
    limit = limits.max_upload_bytes
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, f"upload of {int(declared) / 1e6:.1f} MB is over the server's limit of "
                               f"{limits.max_upload_mb:g} MiB (--max-upload-mb)")

    async def collect():
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise HTTPProblem(413, f"upload is over the server's limit of {limits.max_upload_mb:g} MiB "
                                       "(--max-upload-mb)")
            chunks.append(chunk)
        return b"".join(chunks)
    try:
        return await asyncio.wait_for(collect(), limits.upload_timeout_s)
    except asyncio.TimeoutError:
        raise HTTPProblem(408, f"the upload did not finish within {limits.upload_timeout_s:g} s "
                               "(--upload-timeout)", {"Connection": "close"}) from None


async def image_bytes(request, body: bytes) -> tuple[bytes, str]:
    """(image bytes, name) from a multipart form's `file` field or a raw body."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        return body, "request body"
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception as exc:  # starlette raises its own MultiPartException / HTTPException subclasses
        raise HTTPProblem(400, f"malformed multipart body ({exc})") from None
    field = form.get("file")
    if not isinstance(field, UploadFile):
        got = ", ".join(repr(k) for k in form.keys()) or "no fields"
        raise HTTPProblem(422, f"multipart upload has no file field named 'file' (got {got}); "
                               "send it as -F file=@photo.jpg")
    return await field.read(), f"upload {field.filename!r}" if field.filename else "upload"


def create_app(engine: Engine, limits: Limits | None = None, warm: bool = True, keep_exif_grid: bool = False):
    """The FastAPI app serving `engine`. /readyz turns 200 once warm-up (in a thread) has finished."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    limits = limits or Limits()
    state = {"ready": threading.Event(), "started": time.time()}
    sched_box: dict = {}

    def queue_depth():
        s = sched_box.get("s")
        return s.slots if s else 0
    metrics = Metrics(queue_depth)
    sched = Scheduler(engine, limits, metrics)
    sched_box["s"] = sched

    def warm_up():
        engine.warm_up(batch=limits.max_batch)
        state["ready"].set()
        metrics.ready.set(1)

    async def lifespan(app):
        if warm:
            await asyncio.get_running_loop().run_in_executor(sched.infer_pool, warm_up)
        else:
            warm_up_later = threading.Thread(target=warm_up, daemon=True)
            warm_up_later.start()
        yield
        sched.shutdown()

    app = FastAPI(title="pixelseg", version=_version(), lifespan=_lifespan_factory(lifespan),
                  docs_url="/docs", redoc_url=None)
    app.state.engine, app.state.limits, app.state.scheduler, app.state.metrics = engine, limits, sched, metrics
    app.state.keep_exif_grid = keep_exif_grid

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        endpoint = request.url.path if request.url.path in _ENDPOINTS else "other"
        try:
            response = await call_next(request)
        except Exception:
            metrics.requests.labels(endpoint, "500").inc()
            raise
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(HTTPProblem)
    async def problem(request: Request, exc: HTTPProblem):
        return JSONResponse({"error": exc.message, "status": exc.status}, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        msgs = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"error": "; ".join(msgs), "status": 422}, 422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"].is_set():
            return JSONResponse({"status": "warming up", "ready": False}, 503, headers={"Retry-After": "1"})
        return {"status": "ready", "ready": True}

    @app.get("/v1/model")
    async def model():
        return {**engine.describe(), "limits": {
            "max_upload_mb": limits.max_upload_mb, "max_pixels": limits.max_pixels,
            "max_mc_samples": limits.max_mc_samples if engine.mc_dropout else 0,
            "default_mc_samples": limits.default_mc_samples, "max_queue": limits.max_queue,
            "upload_timeout_s": limits.upload_timeout_s, "max_batch": limits.max_batch,
            "batch_wait_ms": limits.batch_wait_ms}, "formats": list(FORMATS),
            "exif_transpose": not app.state.keep_exif_grid}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/v1/predict", responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def predict(request: Request, format: str = "png", uncertainty: bool = False,
                      mc_samples: int | None = None, keep_exif_grid: bool | None = None):
        """Segment one image: multipart field `file`, or the raw image as the body. Photos are turned upright
        as their EXIF Orientation says unless keep_exif_grid=true (default: the server's --keep-exif-grid)."""
        t0 = time.perf_counter()
        if format not in FORMATS:
            raise HTTPProblem(422, f"format={format!r} is not one of {', '.join(FORMATS)}")
        mc = 0
        if uncertainty or mc_samples:
            if not engine.mc_dropout:
                raise HTTPProblem(422, f"uncertainty needs a model with dropout (Bayesian SegNet); {engine.id} has "
                                       "none" + (" (an ONNX graph has no dropout)" if engine.backend == "onnx" else ""))
            mc = min(limits.default_mc_samples, limits.max_mc_samples) if mc_samples is None else mc_samples
            if not 2 <= mc <= limits.max_mc_samples:
                raise HTTPProblem(422, f"mc_samples={mc} is outside 2..{limits.max_mc_samples} "
                                       "(the server's --max-mc-samples)")
            if format != "json":
                raise HTTPProblem(422, "uncertainty maps come back in format=json only")
            if engine.predictor.tile or engine.predictor.tta:
                raise HTTPProblem(422, "uncertainty runs at the training size; this server was started with "
                                       "--tile/--tta")
        if not state["ready"].is_set():
            raise HTTPProblem(503, "model is still warming up", {"Retry-After": "1"})
        body = await read_body(request, limits)
        t_upload = time.perf_counter()
        data, name = await image_bytes(request, body)
        sched.acquire()
        try:
            upright = not (keep_exif_grid if keep_exif_grid is not None else app.state.keep_exif_grid)
            image = await sched.run_io(decode_upload, data, limits.max_pixels, name, upright)
            del data, body
            t_decode = time.perf_counter()
            mask, maps, infer_s = await sched.mask(image, mc)
            t_infer = time.perf_counter()
            timing = {"upload": _ms(t_upload - t0), "decode": _ms(t_decode - t_upload),
                      "queue": _ms(t_infer - t_decode - infer_s), "inference": _ms(infer_s)}
            out, ctype = await sched.run_io(encode, format, engine, mask, maps, timing, upright)
            total = time.perf_counter() - t0
            sched.ema_s = 0.8 * sched.ema_s + 0.2 * (time.perf_counter() - t_upload)
        finally:
            sched.release()
        h, w = mask.shape
        return Response(out, media_type=ctype, headers={
            "X-Model-Id": engine.id, "X-Image-Size": f"{w}x{h}", "X-Latency-Ms": f"{total * 1000:.1f}",
            "X-Inference-Ms": f"{infer_s * 1000:.1f}"})

    return app


_ENDPOINTS = {"/", "/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics"}


def _ms(s: float) -> float:
    return round(max(s, 0.0) * 1000, 2)


def _version() -> str:
    from . import __version__
    return __version__


def _lifespan_factory(fn):
    import contextlib
    return contextlib.asynccontextmanager(fn)


def serve(source, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None, device: str = "auto",
          precision: str = "auto", tile=None, overlap: float = 0.25, tta: bool = False, log_level: str = "info",
          keep_exif_grid: bool = False):
    """Load the model (errors are one line before anything listens), then serve until interrupted."""
    try:
        import fastapi  # noqa: F401  (the serve extra: one line saying so instead of a traceback)
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as exc:
        from .errors import PixelsegError
        raise PixelsegError(f"`pixelseg serve` needs the serve extra ({exc.name} is missing): {SERVE_HINT}") from None
    from .serving import check_source
    limits = (limits or Limits()).check()
    check_source(source)
    engine = Engine(source, device=device, precision=precision, tile=tile, overlap=overlap, tta=tta)
    app = create_app(engine, limits, warm=False, keep_exif_grid=keep_exif_grid)
    print(f"pixelseg serve: {engine.id} ({engine.backend}, {engine.predictor.describe()}) on http://{host}:{port}/ "
          "- /readyz turns 200 after warm-up", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5, access_log=False,
                limit_concurrency=None)
