"""`pixelseg serve`: endpoints, same masks as `pixelseg predict`, formats, and every bad-input case
from the issue answered with its 4xx while the server keeps serving. Servers run under real
uvicorn on a local port (slow and chunked uploads need real sockets)."""
import base64
import contextlib
import hashlib
import io
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="pixelseg[serve] extra not installed")
pytest.importorskip("uvicorn", reason="pixelseg[serve] extra not installed")
pytest.importorskip("prometheus_client", reason="pixelseg[serve] extra not installed")
import httpx  # noqa: E402  (a fastapi test dependency)
import uvicorn  # noqa: E402

from pixelseg.cli import main  # noqa: E402
from pixelseg.data import synthetic  # noqa: E402
from pixelseg.inference.server import create_app  # noqa: E402
from pixelseg.labels.rle import coco_rle_decode, coco_rle_encode as rle_encode  # noqa: E402
from pixelseg.inference.serving import Engine  # noqa: E402
from pixelseg.inference.tiling import TTA  # noqa: E402
from pixelseg.core.sizes import Limits  # noqa: E402

from _fakes import fake_checkpoint  # noqa: E402


@contextlib.contextmanager
def running(engine, limits=None, **options):
    """The app under uvicorn on a free local port; yields its base URL once /readyz says 200."""
    with running_app(engine, limits, **options) as (url, _):
        yield url


@contextlib.contextmanager
def running_app(engine, limits=None, **options):
    """`running`, yielding (URL, app) for tests that look at the app's state."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(engine, limits, warm=False, **options)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        for _ in range(600):  # polls until ready; the test asserts readiness, not how fast it came
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def rle_decode(rle: dict) -> np.ndarray:
    return coco_rle_decode(rle, *rle["size"])


def png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, "PNG")
    return buf.getvalue()


def photo(h, w, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    return np.stack([xx * 255 // max(w, 1), yy * 255 // max(h, 1), rng.integers(0, 255, (h, w))], -1).astype(np.uint8)


def jpeg(arr, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def mask_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array(Image.open(io.BytesIO(response.content)))


def error_of(response, status) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["status"] == status and isinstance(body["error"], str) and "\n" not in body["error"]
    return body["error"]


LIMITS = Limits(max_upload_mb=1, max_pixels=1_000_000, max_mc_samples=6, upload_timeout_s=1.0, max_queue=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fake_checkpoint(tmp_path_factory.mktemp("serve") / "model.pt")


@pytest.fixture(scope="module")
def engine(ckpt):
    return Engine(ckpt)


@pytest.fixture(scope="module")
def url(engine):
    with running(engine, LIMITS) as u:
        yield u


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Odd sizes and the awkward encodings the issue names: 1×1, 16-bit, CMYK, palette, greyscale+alpha."""
    d = tmp_path_factory.mktemp("photos")
    base = photo(45, 61)
    files = {"odd.png": png(photo(37, 53, 1)), "photo.jpg": jpeg(base), "cmyk.jpg": jpeg(base, "CMYK"),
             "one.png": png(np.array([[[200, 10, 30]]], np.uint8)),
             "sixteen.png": png((base[..., 0].astype(np.uint16) * 257)),
             "palette.png": _palette_png(base), "tall.png": png(photo(90, 20, 2))}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def _palette_png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).quantize(16).save(buf, "PNG")
    return buf.getvalue()


def test_endpoints_describe_the_model(url, ckpt):
    assert httpx.get(url + "/healthz").json()["status"] == "alive"
    assert httpx.get(url + "/readyz").json()["ready"] is True
    m = httpx.get(url + "/v1/model").json()
    assert m["architecture"] == "unet" and m["backbone"] == "mobilenet_v2" and m["input_size"] == [32, 32]
    assert [c["name"] for c in m["classes"]] == synthetic.INFO.class_names
    assert [tuple(c["color"]) for c in m["classes"]] == [tuple(c) for c in synthetic.INFO.palette]
    assert m["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert m["mc_dropout"] is False and m["limits"]["max_upload_mb"] == 1
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # self-contained: no script, style or font from anywhere but this server
    assert "<script" in page.text and "src=\"http" not in page.text and "href=\"http" not in page.text
    assert "@import" not in page.text and "url(http" not in page.text


def test_predict_matches_cli_predict_pixel_for_pixel(url, ckpt, images, tmp_path):
    out = tmp_path / "preds"
    assert main(["predict", str(ckpt), str(images), "--out", str(out)]) == 0
    varied = 0
    for f in sorted(images.iterdir()):
        expected = np.array(Image.open(out / f"{f.stem}.png"))
        raw = mask_of(httpx.post(url + "/v1/predict", content=f.read_bytes()))
        multipart = httpx.post(url + "/v1/predict?format=color", files={"file": (f.name, f.read_bytes())})
        colored = Image.open(io.BytesIO(multipart.content))
        assert colored.mode == "P" and colored.getpalette()[:9] == [v for c in synthetic.INFO.palette for v in c]
        assert raw.shape == expected.shape == Image.open(f).size[::-1], f.name
        np.testing.assert_array_equal(raw, expected, err_msg=f.name)
        np.testing.assert_array_equal(np.array(colored), expected, err_msg=f.name)
        varied += len(np.unique(expected)) > 1
    assert varied >= 3  # the comparison means something: masks are not one class everywhere


def test_tile_and_tta_match_cli_predict(ckpt, images, tmp_path):
    out = tmp_path / "preds"
    assert main(["predict", str(ckpt), str(images / "tall.png"), str(images / "odd.png"), "--out", str(out),
                 "--tile", "24", "--tta"]) == 0
    with running(Engine(ckpt, tile=24, tta=True)) as u:
        assert "sliding window 24x24" in httpx.get(u + "/v1/model").json()["mode"]
        for name in ("tall", "odd"):
            got = mask_of(httpx.post(u + "/v1/predict", content=(images / f"{name}.png").read_bytes()))
            np.testing.assert_array_equal(got, np.array(Image.open(out / f"{name}.png")))


def test_multi_scale_tta_matches_cli_predict(ckpt, images, tmp_path):
    out = tmp_path / "preds"
    assert main(["predict", str(ckpt), str(images / "odd.png"), "--out", str(out), "--tta-scales", "1,1.5"]) == 0
    with running(Engine(ckpt, tta=TTA(scales=(1.0, 1.5)))) as u:
        assert "scales 1, 1.5 TTA" in httpx.get(u + "/v1/model").json()["mode"]
        got = mask_of(httpx.post(u + "/v1/predict", content=(images / "odd.png").read_bytes()))
        np.testing.assert_array_equal(got, np.array(Image.open(out / "odd.png")))


def test_an_onnx_file_is_served_like_predict_backend_onnx(ckpt, images, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", str(ckpt), "--out", str(onnx_file), "--check-images", str(images / "odd.png")]) == 0
    assert main(["predict", str(onnx_file), str(images), "--out", str(tmp_path / "p")]) == 0
    with running(Engine(onnx_file)) as u:
        m = httpx.get(u + "/v1/model").json()
        assert m["backend"] == "onnx" and m["architecture"] == "unet" and m["mc_dropout"] is False
        for f in sorted(images.iterdir()):
            got = mask_of(httpx.post(u + "/v1/predict", content=f.read_bytes()))
            np.testing.assert_array_equal(got, np.array(Image.open(tmp_path / "p" / f"{f.stem}.png")), f.name)


def test_sixteen_bit_cmyk_and_palette_are_decoded_not_clipped(url, images):
    base = photo(45, 61)
    eight = mask_of(httpx.post(url + "/v1/predict", content=png(base[..., 0])))
    sixteen = mask_of(httpx.post(url + "/v1/predict", content=(images / "sixteen.png").read_bytes()))
    np.testing.assert_array_equal(sixteen, eight)  # 16-bit = the same picture at 8 bits, not a white one
    white = mask_of(httpx.post(url + "/v1/predict", content=png(np.full((45, 61), 255, np.uint8))))
    assert not np.array_equal(sixteen, white)
    for name in ("cmyk.jpg", "palette.png"):
        assert mask_of(httpx.post(url + "/v1/predict", content=(images / name).read_bytes())).shape == (45, 61)
    assert mask_of(httpx.post(url + "/v1/predict", content=(images / "one.png").read_bytes())).shape == (1, 1)


def test_json_and_rle_formats(url, images):
    data = (images / "photo.jpg").read_bytes()
    mask = mask_of(httpx.post(url + "/v1/predict", content=data))
    r = httpx.post(url + "/v1/predict?format=json", content=data)
    body = r.json()
    assert r.headers["content-type"] == "application/json"
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(base64.b64decode(body["mask_png"])))), mask)
    assert (body["width"], body["height"]) == (61, 45) and body["model"] == r.headers["x-model-id"]
    counts = np.bincount(mask.ravel(), minlength=3) / mask.size
    assert [body["areas"][n] for n in synthetic.INFO.class_names] == pytest.approx(counts.tolist())
    assert set(body["latency_ms"]) == {"upload", "decode", "queue", "inference"}
    assert body["latency_ms"]["inference"] > 0 and "uncertainty" not in body
    rle = httpx.post(url + "/v1/predict?format=rle", content=data).json()
    assert [c["name"] for c in rle["rle"]] == synthetic.INFO.class_names
    for c in rle["rle"]:
        assert c["rle"]["size"] == [45, 61]
        np.testing.assert_array_equal(rle_decode(c["rle"]), mask == c["id"])


def test_rle_is_coco_compressed_rle():
    # by hand: [[0,1],[1,1],[0,0]] column-major is 0,1,0,1,1,0 -> runs 1,1,1,2,1; from the third run on
    # COCO stores the difference to the run two back (1,1,1,1,0), each as chr(48 + value) when it fits 5 bits
    m = np.array([[0, 1], [1, 1], [0, 0]], bool)
    assert rle_encode(m) == {"size": [3, 2], "counts": "11110"}
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 5), (64, 33)]:
        for density in (0.0, 0.5, 1.0):
            b = rng.random(shape) < density
            np.testing.assert_array_equal(rle_decode(rle_encode(b)), b)
    big = np.zeros((300, 300), bool)
    big[10:250, 40:290] = True  # long runs and run differences that need several 5-bit groups
    np.testing.assert_array_equal(rle_decode(rle_encode(big)), big)
    mask_util = pytest.importorskip("pycocotools.mask", reason="pycocotools not installed (optional cross-check)")
    ours = rle_encode(big)
    theirs = mask_util.encode(np.asfortranarray(big.astype(np.uint8)))
    assert ours["counts"] == theirs["counts"].decode()


# ---- bad input: each case its own status and one JSON line; the server keeps serving --------------
def test_upload_over_the_limit_is_413(url):
    big = b"\xff\xd8" + b"\0" * (LIMITS.max_upload_bytes + 10)
    assert "over the server's limit" in error_of(httpx.post(url + "/v1/predict", content=big), 413)


def test_upload_over_the_limit_without_or_with_a_lying_length_is_413(url):
    def chunks():  # chunked transfer: no Content-Length at all, the body just keeps coming
        for _ in range(40):
            yield b"\0" * 65536
    assert "--max-upload-mb" in error_of(httpx.post(url + "/v1/predict", content=chunks()), 413)
    # a Content-Length that claims 1 kB ahead of 2 MB: only the claimed bytes are read as the body (not an
    # image: 4xx), the rest is never buffered as part of it, and the connection is dropped
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(30)
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        with contextlib.suppress(OSError):
            s.sendall(b"\0" * 2_000_000)
        first = s.recv(4096)
    assert first.startswith(b"HTTP/1.1 4"), first[:40]


def test_oversized_image_and_decompression_bomb_are_413(url):
    zeros = png(np.zeros((1500, 1500), np.uint8))  # 2.25 MP in a few kB
    assert len(zeros) < 50_000
    assert "over the server's limit of 1.0 MP" in error_of(httpx.post(url + "/v1/predict", content=zeros), 413)
    bomb = _png_header_only(100_000, 100_000)  # claims 10 gigapixels
    error_of(httpx.post(url + "/v1/predict", content=bomb), 413)


def _png_header_only(w, h) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def test_not_an_image_is_415(url):
    assert "not an image format" in error_of(httpx.post(url + "/v1/predict", content=b"hello, world"), 415)
    ppm = b"P6 2 2 255\n" + bytes(12)  # PIL reads it, the server does not take it
    assert "PPM" in error_of(httpx.post(url + "/v1/predict", content=ppm), 415)


def test_truncated_jpeg_is_400(url):
    data = jpeg(photo(200, 300))
    assert "truncated" in error_of(httpx.post(url + "/v1/predict", content=data[: len(data) // 2]), 400)


def test_empty_body_wrong_field_and_unknown_format_are_422(url):
    assert "empty" in error_of(httpx.post(url + "/v1/predict", content=b""), 422)
    assert "empty" in error_of(httpx.post(url + "/v1/predict", files={"file": ("a.png", b"")}), 422)
    msg = error_of(httpx.post(url + "/v1/predict", files={"image": ("a.png", png(photo(8, 8)))}), 422)
    assert "'file'" in msg and "'image'" in msg
    assert "format='bmp'" in error_of(httpx.post(url + "/v1/predict?format=bmp", content=png(photo(8, 8))), 422)
    assert "mc_samples" in error_of(httpx.post(url + "/v1/predict?mc_samples=lots", content=png(photo(8, 8))), 422)


def test_uncertainty_on_a_model_without_dropout_is_422(url):
    msg = error_of(httpx.post(url + "/v1/predict?format=json&uncertainty=true", content=png(photo(8, 8))), 422)
    assert "dropout" in msg


def test_slow_client_times_out_without_holding_a_worker(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
                  + png(photo(8, 8))[:20])
        # while it dawdles, others are served
        assert mask_of(httpx.post(url + "/v1/predict", content=png(photo(9, 9)))).shape == (9, 9)
        s.settimeout(30)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            part = s.recv(4096)
            if not part:
                break
            reply += part
    assert reply.startswith(b"HTTP/1.1 408")
    assert b"--upload-timeout" in reply
    assert _metric(url, "pixelseg_queue_depth") == 0


def _metric(url, name) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


class BlockingEngine:
    """Wraps an engine so inference waits for a gate: the queue can be filled deterministically."""

    def __init__(self, engine):
        self.engine, self.gate, self.entered = engine, threading.Event(), threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def mask(self, image, mc_samples=0):
        self.entered.release()
        self.gate.wait(60)
        return self.engine.mask(image, mc_samples)

    def warm_up(self, batch=1):
        self.mask(np.zeros((8, 8, 3), np.uint8))


def test_a_full_queue_gives_503_with_retry_after(engine):
    blocking = BlockingEngine(engine)
    blocking.gate.set()  # warm-up passes straight through
    with running(blocking, Limits(max_queue=2, max_batch=1)) as u:
        blocking.gate.clear()
        results = []
        threads = [threading.Thread(target=lambda: results.append(httpx.post(u + "/v1/predict",
                                                                             content=png(photo(8, 8))))) for _ in range(2)]
        for t in threads:
            t.start()
        assert blocking.entered.acquire(timeout=60)  # one is in inference ...
        while _metric(u, "pixelseg_queue_depth") < 2:  # ... and one holds the other slot
            time.sleep(0.01)
        busy = httpx.post(u + "/v1/predict", content=png(photo(8, 8)))
        assert "server busy" in error_of(busy, 503) and int(busy.headers["retry-after"]) >= 1
        blocking.gate.set()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200]
        text = httpx.get(u + "/metrics").text
        assert 'pixelseg_requests_total{endpoint="/v1/predict",status="503"} 1.0' in text
        assert 'pixelseg_requests_total{endpoint="/v1/predict",status="200"} 2.0' in text
        assert "pixelseg_request_latency_seconds_bucket" in text and _metric(u, "pixelseg_queue_depth") == 0


def test_readyz_is_503_until_warmed_up(engine):
    blocking = BlockingEngine(engine)  # gate closed: warm-up cannot finish
    app = create_app(blocking, warm=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    u = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        assert blocking.entered.acquire(timeout=60)
        while True:
            try:
                alive = httpx.get(u + "/healthz")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert alive.status_code == 200
        r = httpx.get(u + "/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        error_of(httpx.post(u + "/v1/predict", content=png(photo(8, 8))), 503)
        blocking.gate.set()
        while httpx.get(u + "/readyz").status_code != 200:
            time.sleep(0.05)
        assert mask_of(httpx.post(u + "/v1/predict", content=png(photo(8, 8)))).shape == (8, 8)
    finally:
        blocking.gate.set()
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def mc_ckpt(tmp_path_factory):
    return fake_checkpoint(tmp_path_factory.mktemp("mc") / "bayes.pt", "bayesian_segnet", "mobilenet_v2",
                           upsample="nearest")


def test_uncertainty_for_mc_dropout_models(mc_ckpt):
    with running(Engine(mc_ckpt), Limits(max_mc_samples=6)) as u:
        assert httpx.get(u + "/v1/model").json()["mc_dropout"] is True
        data = png(photo(30, 50))
        body = httpx.post(u + "/v1/predict?format=json&uncertainty=true&mc_samples=4", content=data).json()
        heat = Image.open(io.BytesIO(base64.b64decode(body["uncertainty"]["entropy_png"])))
        assert heat.size == (50, 30) and heat.mode == "RGB"
        assert 0 < body["uncertainty"]["mean_entropy"] <= np.log(3) + 1e-6
        assert "2..6" in error_of(httpx.post(u + "/v1/predict?format=json&mc_samples=7", content=data), 422)
        assert "json" in error_of(httpx.post(u + "/v1/predict?format=png&uncertainty=true", content=data), 422)
        assert mask_of(httpx.post(u + "/v1/predict", content=data)).shape == (30, 50)


def test_micro_batching_gives_the_same_masks(engine, images):
    with running(engine, Limits(max_batch=4, batch_wait_ms=50)) as u:
        files = sorted(images.iterdir())
        single = {f.name: mask_of(httpx.post(u + "/v1/predict", content=f.read_bytes())) for f in files}
        got = {}

        def send(f):
            got[f.name] = mask_of(httpx.post(u + "/v1/predict", content=f.read_bytes()))
        threads = [threading.Thread(target=send, args=(f,)) for f in files]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        text = httpx.get(u + "/metrics").text
    for name, m in single.items():
        agree = (got[name] == m).mean()
        assert agree >= 0.99, name  # a batched forward pass may round differently in the last bit
    assert "pixelseg_batch_size_count" in text


def test_a_normal_request_still_succeeds_after_all_the_bad_ones(url, images):
    # the module's bad-input tests ran against this same server; send one of each again so this test
    # stands alone (-k), then a normal request
    post = url + "/v1/predict"
    data = jpeg(photo(60, 80))
    for kwargs, status in [(dict(content=b"\0" * (LIMITS.max_upload_bytes + 1)), 413),
                           (dict(content=png(np.zeros((1100, 1000), np.uint8))), 413),
                           (dict(content=b"hello"), 415), (dict(content=data[: len(data) // 2]), 400),
                           (dict(content=b""), 422), (dict(files={"image": ("a.jpg", data)}), 422)]:
        error_of(httpx.post(post, **kwargs), status)
    error_of(httpx.post(post + "?format=tiff", content=data), 422)
    r = httpx.post(url + "/v1/predict?format=json", files={"file": ("photo.jpg", (images / "photo.jpg").read_bytes())})
    assert r.status_code == 200 and r.json()["width"] == 61
    text = httpx.get(url + "/metrics").text
    for status in ("200", "400", "413", "415", "422"):
        assert f'endpoint="/v1/predict",status="{status}"' in text, status
    errors = [line for line in text.splitlines() if line.startswith("pixelseg_requests_total{endpoint=\"/v1/predict\",status=\"5")]
    assert not errors
    assert _metric(url, "pixelseg_queue_depth") == 0


def test_serve_cli_reports_a_missing_model_in_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.pt" in err


def test_serve_cli_rejects_bad_limits_in_one_line(ckpt, capsys):
    assert main(["serve", str(ckpt), "--max-queue", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--max-queue 0" in err


def test_a_client_gone_mid_upload_is_a_4xx_not_a_traceback():
    """httptools reports a client that hangs up mid-body as ClientDisconnect from the body stream: the
    handler turns it into a 499 (nobody is left to read it), so no 500 is counted and nothing is logged."""
    import asyncio

    from starlette.requests import ClientDisconnect

    from pixelseg.inference.server import read_body
    from pixelseg.inference.serving import HTTPProblem

    class GoneRequest:
        headers = {"content-length": "1000"}

        async def stream(self):
            yield b"\0" * 100
            raise ClientDisconnect()
    with pytest.raises(HTTPProblem) as err:
        asyncio.run(read_body(GoneRequest(), LIMITS))
    assert err.value.status == 499 and "closed the connection" in err.value.message
