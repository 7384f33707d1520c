"""Fuzzing the serve upload path through the ASGI app in-process (httpx.ASGITransport, no sockets): raw bodies
and multipart forms holding good, damaged and hostile images (tests/test_fuzz_images.py's generator), odd field
names, file names and content types, and hostile query values (format, uncertainty, mc_samples, keep_exif_grid).

Property: 200 with a mask of the photo's size in the asked format, or a 4xx whose JSON body is one line naming the
upload or the field; never a 5xx (a 503 only while the queue is full, which one client at a time never fills),
and the app keeps answering. Profiles: tests/_fuzz.py.
"""
import asyncio
import io
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("fastapi", reason="pixelseg[serve] extra not installed")
import httpx  # noqa: E402

from _fakes import fake_checkpoint  # noqa: E402
from _fuzz import TEXT, count, examples, no_hang  # noqa: E402
from test_fuzz_images import image_bytes  # noqa: E402
from pixelseg.inference.server import _warm_up, create_app  # noqa: E402
from pixelseg.inference.serving import Engine  # noqa: E402
from pixelseg.core.sizes import Limits  # noqa: E402

LIMITS = Limits(max_upload_mb=1, max_pixels=1_000_000, max_mc_samples=4, upload_timeout_s=10.0, max_queue=8)
FIELDS = {"format": st.one_of(st.sampled_from(["png", "palette", "json", "rle", "PNG", "", "jpeg"]), TEXT),
          "uncertainty": st.one_of(st.sampled_from(["true", "false", "1", "0", "yes", "maybe"]), TEXT),
          "mc_samples": st.one_of(st.integers(-3, 100).map(str), TEXT),
          "keep_exif_grid": st.one_of(st.sampled_from(["true", "false", "on"]), TEXT)}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    engine = Engine(fake_checkpoint(tmp_path_factory.mktemp("fuzz_serve") / "model.pt"))
    app = create_app(engine, LIMITS, warm=False)
    loop = asyncio.new_event_loop()
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    _warm_up(app.state)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fuzz")
    yield loop, http
    loop.run_until_complete(http.aclose())
    loop.run_until_complete(lifespan.__aexit__(None, None, None))
    loop.close()


@st.composite
def requests(draw):
    data, suffix = draw(image_bytes())
    params = {k: draw(v) for k, v in FIELDS.items() if draw(st.integers(0, 9)) == 0}
    how = draw(st.sampled_from(["raw", "multipart", "multipart", "bad multipart"]))
    if how == "raw":
        ctype = draw(st.sampled_from(["application/octet-stream", "image/png", "image/jpeg", "text/plain", ""]))
        return dict(params=params, content=data, headers={"content-type": ctype} if ctype else {})
    if how == "bad multipart":
        boundary = draw(st.sampled_from(["x", "", "--", "a" * 80]))
        body = draw(st.sampled_from([b"", b"--x\r\n", b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n"
                                     + data[:50]])) + draw(st.binary(max_size=30))
        return dict(params=params, content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    field = draw(st.sampled_from(["file"] * 6 + ["image", "File", ""]))
    filename = draw(st.one_of(st.sampled_from(["photo.jpg", "ünï cødé.png", "a b", "", "../../etc/passwd"]), TEXT))
    mime = draw(st.sampled_from(["image/jpeg", "application/octet-stream", "text/plain"]))
    return dict(params=params, files={field: (filename, data, mime)})


@examples(60)
@given(req=requests())
def test_predict_upload(client, req):
    loop, http = client
    count("serve./v1/predict")
    with no_hang("POST /v1/predict"):
        try:
            r = loop.run_until_complete(http.post("/v1/predict", **req))
        except UnicodeEncodeError:  # httpx itself cannot put this file name in a header: nothing was sent
            return
    count(f"serve.status.{r.status_code}")
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code == 200:
        w, h = map(int, r.headers["X-Image-Size"].split("x"))
        fmt = str(req["params"].get("format", "png"))
        if r.headers["content-type"].startswith("image/png"):
            mask = np.array(Image.open(io.BytesIO(r.content)))
            assert mask.shape[:2] == (h, w)
        else:
            assert fmt in ("json", "rle")
            assert isinstance(json.loads(r.content), dict)
        return
    body = r.json()
    assert body["status"] == r.status_code and isinstance(body["error"], str)
    msg = body["error"]
    assert msg and "\n" not in msg, msg
    named = ["upload", "request body", "multipart", "file", *FIELDS]
    assert any(n in msg for n in named), msg


def test_still_serving_after_the_fuzz(client):
    """Runs after test_predict_upload (file order): a normal photo still gets its mask."""
    loop, http = client
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    r = loop.run_until_complete(http.post("/v1/predict", files={"file": ("ok.png", buf.getvalue(), "image/png")}))
    assert r.status_code == 200 and r.headers["X-Image-Size"] == "30x20"
