"""`pixelseg serve`: the HTTP API and web page around a `serving.Engine` (FastAPI + uvicorn).

Concurrency: the event loop only reads bodies and answers; decoding, inference and encoding run on
worker threads, and inference on exactly one (torch already uses every core inside an operator, so
two inferences at once only fight for them). A request with a full body is admitted into a bounded
queue (--max-queue) with a deadline (--deadline): it waits rather than being refused, and gets 503 +
Retry-After only when the queue is full or its deadline cannot be met (predicted at admission from
the recent cost per request, or passed while it waited). At most a few batches' worth of admitted
requests are decoded at a time (the rest wait as compressed bytes), so memory stays bounded. Waiting
requests are run together as one forward pass of up to --max-batch images (dynamic batching, as
TorchServe and Triton do): on a CPU a batch of 8 costs far less than 8 passes of 1. Bodies are read by
the handler itself, counted as they arrive (413 past --max-upload-mb whatever Content-Length says) and
under a deadline (408 for a client that stops sending; it never holds a slot or a thread while it dawdles).
"""

import asyncio
import contextlib
import functools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from ..core.errors import PixelsegError
from ..core.sizes import Limits
from .serving import FORMATS, Engine, HTTPProblem, decode_upload, encode

SERVE_HINT = "pip install 'pixelseg[serve]'"
try:
    from fastapi import APIRouter, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.requests import ClientDisconnect
except ImportError as exc:  # the serve extra: one line saying so instead of a traceback
    raise PixelsegError(f"`pixelseg serve` needs the serve extra ({exc.name} is missing): {SERVE_HINT}") from None


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps in one process stay apart)."""

    def __init__(self, queue_depth):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pixelseg_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.latency = Histogram(
            "pixelseg_request_latency_seconds",
            "Time from the request's arrival to its answer (body upload included)",
            ["endpoint"],
            buckets=buckets,
            registry=self.registry,
        )
        self.inference = Histogram(
            "pixelseg_inference_seconds",
            "Model time per forward pass (one batch)",
            buckets=buckets,
            registry=self.registry,
        )
        self.batch = Histogram(
            "pixelseg_batch_size", "Requests per forward pass", buckets=(1, 2, 4, 8, 16, 32), registry=self.registry
        )
        self.queue_wait = Histogram(
            "pixelseg_queue_wait_seconds",
            "Time from admission to the start of the request's forward pass (decoding included)",
            buckets=buckets,
            registry=self.registry,
        )
        self.stage = Histogram(
            "pixelseg_stage_seconds",
            "Seconds per request in each stage outside the model",
            ["stage"],
            buckets=buckets,
            registry=self.registry,
        )
        self.refused = Counter(
            "pixelseg_refused", "Requests answered 503 by the queue, by reason", ["reason"], registry=self.registry
        )
        depth = Gauge(
            "pixelseg_queue_depth", "Admitted requests (waiting, decoding or in inference)", registry=self.registry
        )
        depth.set_function(queue_depth)
        self.ready = Gauge("pixelseg_ready", "1 once the model is loaded and warmed up", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def torch_thread() -> ThreadPoolExecutor:
    """The one thread that runs torch in the server: loading, warm-up and every forward pass.

    One thread because each thread that enters an OpenMP region gets an OpenMP team of its own, and
    once the process holds more OpenMP threads than cores, libgomp stops spinning between regions
    (throttled wait): every op of a batch-1 forward pass then waits for a sleeping worker, on every
    thread, for good (docs/benchmarks.md, "Numbers behind choices in the code"). Decoding and encoding
    on the I/O threads use numpy and PIL only."""
    return ThreadPoolExecutor(1, thread_name_prefix="pixelseg-infer")


class Scheduler:
    """Admission (bounded queue, per-request deadline), the decode-ahead window and the single
    inference thread with dynamic batching."""

    def __init__(self, engine: Engine, limits: Limits, metrics: Metrics, infer_pool: ThreadPoolExecutor | None = None):
        self.engine, self.limits, self.metrics = engine, limits, metrics
        self.slots = 0  # admitted and not yet answered
        self.decoding = 0  # inside the decode-ahead window, not yet handed to the batcher
        self.infer_pool = infer_pool or torch_thread()
        self.io_pool = ThreadPoolExecutor(2, thread_name_prefix="pixelseg-io")
        # recent seconds of wall clock per answered request while busy (gaps between forward passes
        # included, so decoding, encoding and other processes' load on the cores count as they really do)
        self.per_request_s = 0.05
        self._last_done: float | None = None
        self.window = asyncio.Semaphore(max(4, 2 * limits.max_batch))
        self._pending: asyncio.Queue | None = None
        self._batcher: asyncio.Task | None = None

    def _served(self, n: int, infer_s: float) -> None:
        """Update the cost per request after a forward pass of `n`: the time since the previous pass ended
        if requests were waiting all along (the throughput seen from the queue), else the pass alone."""
        now, last = time.perf_counter(), self._last_done
        cost = (now - last if last is not None and self.slots > n else infer_s) / n
        self.per_request_s = 0.8 * self.per_request_s + 0.2 * cost
        self._last_done = now

    def admit(self) -> float:
        """Take a queue slot, or 503 if the queue is full or the wait would pass the deadline; returns the
        request's deadline (event-loop time)."""
        wait = self.slots * self.per_request_s
        full = self.slots >= self.limits.max_queue
        if full or wait > self.limits.deadline_s:
            excess = (
                wait - self.limits.deadline_s
                if not full
                else (self.slots - self.limits.max_queue + 1) * self.per_request_s
            )
            retry = max(1, math.ceil(excess))
            self.metrics.refused.labels("queue_full" if full else "deadline").inc()
            why = (
                f"{self.slots} requests queued (--max-queue {self.limits.max_queue})"
                if full
                else f"{self.slots} requests ahead would take about {wait:.1f} s, past the "
                f"{self.limits.deadline_s:g} s deadline (--deadline)"
            )
            raise HTTPProblem(503, f"server busy: {why}; retry after {retry} s", {"Retry-After": str(retry)})
        self.slots += 1
        return asyncio.get_running_loop().time() + self.limits.deadline_s

    def release(self) -> None:
        self.slots -= 1

    def late(self, deadline: float) -> HTTPProblem:
        self.metrics.refused.labels("deadline").inc()
        retry = max(1, math.ceil(self.slots * self.per_request_s - self.limits.deadline_s))
        return HTTPProblem(
            503,
            f"server busy: the request waited past its {self.limits.deadline_s:g} s deadline "
            f"(--deadline) with {self.slots} requests queued; retry after {retry} s",
            {"Retry-After": str(retry)},
        )

    async def run_io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
        self.metrics.inference.observe(dt)
        return out, dt

    async def segment(self, decode, deadline: float, mc_samples: int = 0):
        """(mask, maps, inference seconds, decode seconds) for one admitted request; `decode()` gives its image.
        Decoding waits for a place in the decode-ahead window, in arrival order, up to the deadline."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self.window.acquire(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise self.late(deadline) from None
        try:
            self.decoding += 1
            try:
                t0 = time.perf_counter()
                image = await self.run_io(decode)
                decode_s = time.perf_counter() - t0
                self.metrics.stage.labels("decode").observe(decode_s)
            finally:
                self.decoding -= 1
            return (*await self._infer(image, deadline, mc_samples), decode_s)
        finally:
            self.window.release()

    async def _infer(self, image, deadline: float, mc_samples: int):
        loop = asyncio.get_running_loop()
        if self.limits.max_batch > 1 and not mc_samples and not self.engine.predictor.tile:
            fut = loop.create_future()
            if self._batcher is None:
                self._pending = asyncio.Queue()
                self._batcher = asyncio.create_task(self._batch_loop())
            assert self._pending is not None  # made with the batcher
            await self._pending.put((image, fut, deadline))
            mask, dt = await fut
            return mask, None, dt
        if loop.time() > deadline:
            raise self.late(deadline)
        (mask, maps), dt = await loop.run_in_executor(self.infer_pool, self._timed, self.engine.mask, image, mc_samples)
        self.metrics.batch.observe(1)
        self._served(1, dt)
        return mask, maps, dt

    async def _gather(self) -> list:
        """The first waiting image and, for up to --batch-wait-ms, more (at most --max-batch). It waits only
        while admitted requests are still decoding and could join: a lone client never pays the wait."""
        loop = asyncio.get_running_loop()
        pending = self._pending
        assert pending is not None  # the batcher that calls this came with its queue
        jobs = [await pending.get()]
        until = loop.time() + self.limits.batch_wait_ms / 1000
        while len(jobs) < self.limits.max_batch:
            if not pending.empty():  # already waiting: take it without a timeout (a 0 s wait_for never yields)
                jobs.append(pending.get_nowait())
                continue
            if self.decoding == 0 or loop.time() >= until:
                break
            try:
                jobs.append(await asyncio.wait_for(pending.get(), until - loop.time()))
            except asyncio.TimeoutError:
                break
        now, live = loop.time(), []
        for job in jobs:
            if now > job[2] and not job[1].done():
                job[1].set_exception(self.late(job[2]))
            else:
                live.append(job)
        return live

    async def _batch_loop(self):
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            if not jobs:
                continue
            try:
                masks, dt = await loop.run_in_executor(
                    self.infer_pool, self._timed, self.engine.masks, [img for img, _, _ in jobs]
                )
                self.metrics.batch.observe(len(jobs))
                self._served(len(jobs), dt)
                for (_, fut, _), m in zip(jobs, masks, strict=True):
                    if not fut.done():
                        fut.set_result((m, dt))
            except Exception as exc:  # hand the failure to every waiting request; keep batching
                for _, fut, _ in jobs:
                    if not fut.done():
                        fut.set_exception(exc)

    def shutdown(self):
        if self._batcher:
            self._batcher.cancel()
        self.infer_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=False, cancel_futures=True)


def page_html() -> str:
    return resources.files("pixelseg.inference").joinpath("static/serve.html").read_text(encoding="utf-8")


async def read_body(request, limits: Limits) -> bytes:
    """The whole body, counted as it arrives: 413 as soon as it passes the limit (a missing or lying
    Content-Length changes nothing), 408 if the client has not finished within --upload-timeout."""
    declared = request.headers.get("content-length")
    limit = limits.max_upload_bytes
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(
            413,
            f"upload of {int(declared) / 1e6:.1f} MB is over the server's limit of "
            f"{limits.max_upload_mb:g} MiB (--max-upload-mb)",
        )

    async def collect():
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise HTTPProblem(
                    413, f"upload is over the server's limit of {limits.max_upload_mb:g} MiB (--max-upload-mb)"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), limits.upload_timeout_s)
    except ClientDisconnect:  # gone mid-upload (httptools reports it so): nobody to answer, no traceback in the log
        raise HTTPProblem(499, "the client closed the connection before the upload finished") from None
    except asyncio.TimeoutError:
        raise HTTPProblem(
            408,
            f"the upload did not finish within {limits.upload_timeout_s:g} s (--upload-timeout)",
            {"Connection": "close"},
        ) from None


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
        got = ", ".join(repr(k) for k in form) or "no fields"
        raise HTTPProblem(
            422, f"multipart upload has no file field named 'file' (got {got}); send it as -F file=@photo.jpg"
        )
    return await field.read(), f"upload {field.filename!r}" if field.filename else "upload"


router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index():
    return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})


@router.get("/healthz")
async def healthz():
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request):
    if not request.app.state.ready.is_set():
        return JSONResponse({"status": "warming up", "ready": False}, 503, headers={"Retry-After": "1"})
    return {"status": "ready", "ready": True}


@router.get("/v1/model")
async def model(request: Request):
    state = request.app.state
    engine, limits = state.engine, state.limits
    return {
        **engine.describe(),
        "limits": {
            "max_upload_mb": limits.max_upload_mb,
            "max_pixels": limits.max_pixels,
            "max_mc_samples": limits.max_mc_samples if engine.mc_dropout else 0,
            "default_mc_samples": limits.default_mc_samples,
            "max_queue": limits.max_queue,
            "deadline_s": limits.deadline_s,
            "upload_timeout_s": limits.upload_timeout_s,
            "max_batch": limits.max_batch,
            "batch_wait_ms": limits.batch_wait_ms,
        },
        "formats": list(FORMATS),
        "exif_transpose": not state.keep_exif_grid,
    }


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request):
    body, ctype = request.app.state.metrics.render()
    return Response(body, media_type=ctype)


def mc_samples_asked(engine: Engine, limits: Limits, format: str, uncertainty: bool, mc_samples: int | None) -> int:
    """The MC-dropout passes a /v1/predict request asks for (0: none); 422 for what this server cannot give."""
    if format not in FORMATS:
        raise HTTPProblem(422, f"format={format!r} is not one of {', '.join(FORMATS)}")
    mc = 0
    if uncertainty or mc_samples:
        if not engine.mc_dropout:
            raise HTTPProblem(
                422,
                f"uncertainty needs a model with dropout (Bayesian SegNet); {engine.id} has "
                "none" + (" (an exported graph has no dropout)" if engine.model is None else ""),
            )
        mc = min(limits.default_mc_samples, limits.max_mc_samples) if mc_samples is None else mc_samples
        if not 2 <= mc <= limits.max_mc_samples:
            raise HTTPProblem(
                422, f"mc_samples={mc} is outside 2..{limits.max_mc_samples} (the server's --max-mc-samples)"
            )
        if format != "json":
            raise HTTPProblem(422, "uncertainty maps come back in format=json only")
        if engine.predictor.tile or engine.predictor.tta:
            raise HTTPProblem(
                422, "uncertainty runs at the training size; this server was started with --tile/--tta/--tta-scales"
            )
    return mc


@router.post("/v1/predict", responses={200: {"content": {"image/png": {}, "application/json": {}}}})
async def predict(
    request: Request,
    format: str = "png",
    uncertainty: bool = False,
    mc_samples: int | None = None,
    keep_exif_grid: bool | None = None,
):
    """Segment one image: multipart field `file`, or the raw image as the body. Photos are turned upright
    as their EXIF Orientation says unless keep_exif_grid=true (default: the server's --keep-exif-grid)."""
    t0 = time.perf_counter()
    state = request.app.state
    engine, limits, sched, metrics = state.engine, state.limits, state.scheduler, state.metrics
    mc = mc_samples_asked(engine, limits, format, uncertainty, mc_samples)
    if not state.ready.is_set():
        raise HTTPProblem(503, "model is still warming up", {"Retry-After": "1"})
    body = await read_body(request, limits)
    t_upload = time.perf_counter()
    data, name = await image_bytes(request, body)
    deadline = sched.admit()
    admitted = time.perf_counter()
    try:
        upright = not (keep_exif_grid if keep_exif_grid is not None else state.keep_exif_grid)
        mask, maps, infer_s, decode_s = await sched.segment(
            functools.partial(decode_upload, data, limits.max_pixels, name, upright), deadline, mc
        )
        del data, body  # the upload's bytes are not kept while the response is built
        t_infer = time.perf_counter()
        metrics.queue_wait.observe(max(0.0, t_infer - admitted - infer_s))
        timing = {
            "upload": _ms(t_upload - t0),
            "decode": _ms(decode_s),
            "queue": _ms(t_infer - admitted - infer_s - decode_s),
            "inference": _ms(infer_s),
        }
        t_enc = time.perf_counter()
        out, ctype = await sched.run_io(encode, format, engine, mask, maps, timing, upright)
        enc_s = time.perf_counter() - t_enc
        metrics.stage.labels("encode").observe(enc_s)
        total = time.perf_counter() - t0
    finally:
        sched.release()
    h, w = mask.shape
    return Response(
        out,
        media_type=ctype,
        headers={
            "X-Model-Id": engine.id,
            "X-Image-Size": f"{w}x{h}",
            "X-Latency-Ms": f"{total * 1000:.1f}",
            "X-Inference-Ms": f"{infer_s * 1000:.1f}",
        },
    )


class CountRequests:
    """ASGI middleware: requests by endpoint and status, and their latency. Plain ASGI rather than
    `app.middleware("http")` (Starlette's BaseHTTPMiddleware), which runs every request through an extra
    task and a memory stream: a per-request cost a batch-1 client pays in full (docs/benchmarks.md)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics = scope["app"].state.metrics
        path = scope["path"]
        endpoint = path if path in scope["app"].state.endpoints else "other"
        status = [500]  # what is counted if the app raises before it starts a response

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            metrics.requests.labels(endpoint, str(status[0])).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


async def problem(request: Request, exc: HTTPProblem):
    return JSONResponse({"error": exc.message, "status": exc.status}, exc.status, headers=exc.headers)


async def invalid(request: Request, exc: RequestValidationError):
    msgs = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}" for e in exc.errors()]
    return JSONResponse({"error": "; ".join(msgs), "status": 422}, 422)


def _warm_up(state) -> None:
    state.engine.warm_up(batch=state.limits.max_batch)
    state.ready.set()
    state.metrics.ready.set(1)


@contextlib.asynccontextmanager
async def lifespan(app):
    state = app.state
    warm_up = state.scheduler.infer_pool.submit(_warm_up, state)  # on the torch thread, like every forward pass
    if state.warm:
        await asyncio.wrap_future(warm_up)
    yield
    state.scheduler.shutdown()


def _queue_depth(state) -> int:
    sched = getattr(state, "scheduler", None)
    return sched.slots if sched else 0


def create_app(
    engine: Engine,
    limits: Limits | None = None,
    warm: bool = True,
    keep_exif_grid: bool = False,
    infer_pool: ThreadPoolExecutor | None = None,
):
    """The FastAPI app serving `engine`: the module's router, with the engine, limits, scheduler and metrics on
    `app.state`. /readyz turns 200 once warm-up (on the torch thread, `infer_pool`) has finished."""
    limits = limits or Limits()
    app = FastAPI(title="pixelseg", version=_version(), lifespan=lifespan, docs_url="/docs", redoc_url=None)
    state = app.state
    state.engine, state.limits, state.keep_exif_grid, state.warm = engine, limits, keep_exif_grid, warm
    state.ready, state.started = threading.Event(), time.time()
    state.metrics = Metrics(lambda: _queue_depth(state))
    state.endpoints = set(ENDPOINTS)  # counted by name in /metrics; add-ons (the Label Studio backend) add theirs
    state.scheduler = Scheduler(engine, limits, state.metrics, infer_pool)
    app.add_middleware(CountRequests)
    # Starlette's stub wants handlers of any Exception; each is registered for its own class only
    app.add_exception_handler(HTTPProblem, problem)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]
    app.include_router(router)
    return app


ENDPOINTS = ("/", "/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics")


def _ms(s: float) -> float:
    return round(max(s, 0.0) * 1000, 2)


def _version() -> str:
    from .._version import __version__

    return __version__


def serve(
    source,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    device: str = "auto",
    precision: str = "auto",
    tile=None,
    overlap: float = 0.25,
    tta=False,
    log_level: str = "info",
    keep_exif_grid: bool = False,
    backend: str = "auto",
    label_studio=None,
):
    """Load the model (errors are one line before anything listens), then serve until interrupted.
    `label_studio` (lsml_server.LSOptions): also speak Label Studio's ML backend protocol. The options object
    brings its own `checkpoint_to_serve` and `attach`, so this module never imports the backend built on it."""
    try:
        import prometheus_client  # noqa: F401  (the serve extra: one line saying so instead of a traceback)
        import uvicorn
    except ImportError as exc:
        raise PixelsegError(f"`pixelseg serve` needs the serve extra ({exc.name} is missing): {SERVE_HINT}") from None
    from .serving import check_source

    limits = (limits or Limits()).check()
    check_source(source)
    if label_studio is not None:  # a restarted backend serves its last accepted version
        source = label_studio.check().checkpoint_to_serve(source)
    pool = torch_thread()  # the model is loaded where it will run (torch_thread says why)
    engine = pool.submit(
        Engine, source, device=device, precision=precision, tile=tile, overlap=overlap, tta=tta, backend=backend
    ).result()
    app = create_app(engine, limits, warm=False, keep_exif_grid=keep_exif_grid, infer_pool=pool)
    if label_studio is not None:
        ls = label_studio.attach(
            app, source, dict(device=device, precision=precision, tile=tile, overlap=overlap, tta=tta, backend=backend)
        )
        print(
            f"pixelseg serve: Label Studio ML backend at http://{host}:{port}/ serving {ls.version}; state in "
            f"{ls.work}",
            flush=True,
        )
    print(
        f"pixelseg serve: {engine.id} ({engine.backend}, {engine.predictor.describe()}) on http://{host}:{port}/ "
        "- /readyz turns 200 after warm-up",
        flush=True,
    )
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, timeout_keep_alive=5, access_log=False, limit_concurrency=None
    )
