"""`pixelseg serve --label-studio`: Label Studio's ML backend protocol through the ASGI app in-process
(TestClient), every bad payload answered with its 4xx while the model keeps serving, and the retrain flow
(accept, reject, failure, timeout) with a stub retrain process; one real fine-tune job on four tiny tasks.
The loop against a real Label Studio: tests/test_ls_backend_e2e.py."""
import base64
import http.server
import io
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="pixelseg[serve] extra not installed")
from fastapi.testclient import TestClient  # noqa: E402

from pixelseg.labels.rle import ls_rle_decode, ls_rle_encode  # noqa: E402
from pixelseg.inference.lsml import annotation_mask, holdout_tasks, parse_config, BadRequest  # noqa: E402
from pixelseg.inference.lsml_server import LSOptions, attach, checkpoint_to_serve  # noqa: E402
from pixelseg.inference.server import create_app  # noqa: E402
from pixelseg.inference.serving import Engine  # noqa: E402

from _fakes import fake_checkpoint  # noqa: E402

BRUSH = ('<View><Image name="img" value="$pic"/><BrushLabels name="tag" toName="img">'
         '<Label value="Object"/><Label value="edge"/><Label value="cat"/></BrushLabels></View>')
POLY = BRUSH.replace("BrushLabels", "PolygonLabels")


def png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def photo(h=40, w=52, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3)).astype(np.uint8)


def uri(arr) -> str:
    return "data:image/png;base64," + base64.b64encode(png(arr)).decode()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return fake_checkpoint(d / "a.pt", seed=0), fake_checkpoint(d / "b.pt", seed=1)


def client(ckpt, tmp_path, **options):
    app = create_app(Engine(ckpt), warm=True)
    ls = attach(app, LSOptions(work_dir=tmp_path / "ls", **options), ckpt)
    return TestClient(app), app, ls


def until(cond, what, timeout=120):
    """Poll for a state change the test then asserts on (a generous bound, not a timing assertion)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_config_mapping_by_name_and_reports():
    cfg = parse_config(BRUSH, ["background", "object", "edge"])
    assert (cfg.kind, cfg.from_name, cfg.to_name, cfg.image_key) == ("brushlabels", "tag", "img", "pic")
    assert cfg.to_label == {1: "Object", 2: "edge"} and cfg.unknown == ["cat"] and cfg.unlisted == []
    cfg = parse_config(POLY.replace('<Label value="edge"/>', ""), ["background", "object", "edge"])
    assert cfg.shapes == "polygon" and cfg.unlisted == ["edge"]
    for bad, says in [("<View", "not valid XML"), ("", "missing or empty"),
                      ('<View><Image name="i" value="$x"/><Choices name="c" toName="i"/></View>', "no BrushLabels"),
                      (BRUSH.replace('value="$pic"', 'value="pic"'), "names no <Image"),
                      (BRUSH.replace("Object", "dog").replace("edge", "bird"), "match none")]:
        with pytest.raises(BadRequest, match=says):
            parse_config(bad, ["background", "object", "edge"])


def test_holdout_is_stable_and_never_all_or_none():
    ids = list(range(1, 41))
    held = holdout_tasks(ids, 0.2)
    assert 0 < len(held) < len(ids) and held == holdout_tasks(list(reversed(ids)), 0.2)
    assert held <= holdout_tasks(ids + list(range(41, 60)), 0.2) | held  # adding tasks never moves old ones
    assert held == {t for t in holdout_tasks(ids + list(range(41, 60)), 0.2) if t <= 40}
    assert len(holdout_tasks([1, 2], 0.01)) == 1 and len(holdout_tasks([1, 2], 0.99)) == 1


def test_annotation_mask_from_brush_and_polygon():
    m = np.zeros((20, 30), bool)
    m[2:8, 3:12] = True
    results = [{"type": "brushlabels", "value": {"format": "rle", "rle": ls_rle_encode(m), "brushlabels": ["Object"]}},
               {"type": "polygonlabels", "value": {"points": [[50, 50], [100, 50], [100, 100], [50, 100]],
                                                   "polygonlabels": ["edge"]}},
               {"type": "polygonlabels", "value": {"points": [[0, 0], [10, 0], [10, 10]], "polygonlabels": ["cat"]}},
               {"type": "choices", "value": {"choices": ["x"]}}]
    mask, problems = annotation_mask(results, ["background", "object", "edge"], 20, 30)
    assert (mask[2:8, 3:12] == 1).all() and (mask[10:, 15:] == 2).all() and mask[12, 5] == 0
    assert problems == ["label 'cat' is not a model class"]


def test_setup_predict_brush_and_polygon(ckpts, tmp_path):
    c, app, ls = client(ckpts[0], tmp_path, min_area=1)   # a random model's parts are small: keep them all
    img = photo()
    engine = app.state.engine
    with c:
        health = c.get("/health").json()
        assert health["status"] == "UP" and health["model_version"].startswith("v0-")
        r = c.post("/setup", json={"project": "3.1700000000", "schema": BRUSH, "hostname": "http://ls:8080",
                                   "access_token": "tok"})
        assert r.status_code == 200 and r.json()["model_version"] == health["model_version"]
        assert r.json()["unknown_labels"] == ["cat"] and ls.hosts["3"] == ("http://ls:8080", "tok")
        want = engine.mask(img)[0]
        r = c.post("/predict", json={"tasks": [{"id": 7, "data": {"pic": uri(img)}}], "label_config": BRUSH,
                                     "project": "3.1700000000"})
        assert r.status_code == 200
        (pred,) = r.json()["results"]
        assert pred["model_version"] == health["model_version"] and 0 <= pred["score"] <= 1
        got = np.zeros(want.shape, np.uint8)
        for res in pred["result"]:
            assert (res["from_name"], res["to_name"], res["type"]) == ("tag", "img", "brushlabels")
            assert (res["original_width"], res["original_height"]) == (52, 40) and 0 < res["score"] <= 1
            got[ls_rle_decode(res["value"]["rle"], 40, 52)] = {"Object": 1, "edge": 2}[res["value"]["brushlabels"][0]]
        np.testing.assert_array_equal(got, want)   # the served mask, in the config's label names
        assert want.max() > 0
        # polygons, and a config that leaves out a class: that class gets no regions
        r = c.post("/predict", json={"tasks": [{"id": 7, "data": {"pic": uri(img)}}],
                                     "label_config": POLY.replace('<Label value="edge"/>', "")})
        (pred,) = r.json()["results"]
        assert pred["result"] and {x["value"]["polygonlabels"][0] for x in pred["result"]} == {"Object"}
        assert all(x["type"] == "polygonlabels" and len(x["value"]["points"]) >= 3 for x in pred["result"])


class _FakeLabelStudio(http.server.BaseHTTPRequestHandler):
    image = b""
    seen: list = []

    def do_GET(self):
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != "Token tok" or not self.path.startswith("/data/upload/"):
            self.send_response(401 if self.path.startswith("/data/upload/") else 404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(type(self).image)

    def log_message(self, *a):
        pass


def test_task_images_come_from_label_studio_with_its_token(ckpts, tmp_path):
    _FakeLabelStudio.image = png(photo(seed=3))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeLabelStudio)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{srv.server_address[1]}"
    c, app, ls = client(ckpts[0], tmp_path)
    try:
        with c:
            body = {"tasks": [{"id": 1, "data": {"pic": "/data/upload/3/abc-x.png"}}], "label_config": BRUSH,
                    "project": "3.1"}
            r = c.post("/predict", json=body)   # before /setup: Label Studio's address is unknown
            assert r.status_code == 422 and "address is unknown" in r.json()["error"]
            c.post("/setup", json={"project": "3.1", "schema": BRUSH, "hostname": host, "access_token": "tok"})
            r = c.post("/predict", json=body)
            assert r.status_code == 200 and "result" in r.json()["results"][0]
            assert _FakeLabelStudio.seen[-1] == ("/data/upload/3/abc-x.png", "Token tok")
            ls.hosts["3"] = (host, "wrong")
            r = c.post("/predict", json=body)
            assert r.status_code == 422 and "HTTP 401" in r.json()["error"] and "task 1" in r.json()["error"]
    finally:
        srv.shutdown()


def test_bad_payloads_get_4xx_and_the_model_keeps_serving(ckpts, tmp_path, caplog):
    c, app, ls = client(ckpts[0], tmp_path)
    good = {"tasks": [{"id": 1, "data": {"pic": uri(photo())}}], "label_config": BRUSH}
    cases = [
        ("/predict", b"{not json", 400, "not JSON"),
        ("/predict", b"[1, 2]", 422, "not an object"),
        ("/predict", {"tasks": [], "label_config": BRUSH}, 422, "non-empty list"),
        ("/predict", {"tasks": "x", "label_config": BRUSH}, 422, "non-empty list"),
        ("/predict", {**good, "label_config": "<View>"}, 422, "not valid XML"),
        ("/predict", {**good, "label_config": BRUSH.replace("Object", "dog").replace("edge", "bird")}, 422, "match none"),
        ("/predict", {"tasks": [{"id": 1, "data": {}}], "label_config": BRUSH}, 422, "no image under 'pic'"),
        ("/predict", {"tasks": [5], "label_config": BRUSH}, 422, "not an object with a 'data'"),
        ("/predict", {"tasks": [{"id": 1, "data": {"pic": "data:image/png;base64,bm90IGFuIGltYWdl"}}],
                      "label_config": BRUSH}, 415, "not an image format"),
        ("/predict", {"tasks": [{"id": 1, "data": {"pic": uri(photo())[:200]}}], "label_config": BRUSH}, 422, "data: URI"),
        ("/predict", {"tasks": [{"id": 1, "data": {"pic": "http://127.0.0.1:9/x.png"}}], "label_config": BRUSH},
         422, "could not be fetched"),
        ("/predict", {"tasks": [{"id": 1, "data": {"pic": "s3://bucket/x.png"}}], "label_config": BRUSH}, 422,
         "only http(s)"),
        ("/setup", {"project": "1.1", "schema": "<View/>"}, 422, "no BrushLabels"),
        ("/webhook", b"", 400, "not JSON"),
        ("/webhook", {"annotation": {}}, 422, "no 'action'"),
        ("/webhook", {"action": "ANNOTATION_CREATED", "task": {"id": 1}}, 422, "'annotation' and 'task'"),
        ("/webhook", {"action": "ANNOTATION_CREATED", "task": {"id": 1, "data": {}}, "annotation": {"result": []},
                      "project": {"label_config": "<oops"}}, 422, "not valid XML"),
        ("/webhook", {"action": "START_TRAINING", "project": {"id": 1}}, 422, "at least 2"),
        ("/train", {"label_config": BRUSH}, 422, "'annotations'"),
    ]
    with c:
        for path, body, status, says in cases:
            r = c.post(path, content=body) if isinstance(body, bytes) else c.post(path, json=body)
            assert r.status_code == status, (path, body if isinstance(body, bytes) else str(body)[:80], r.text)
            assert says in r.json()["error"] and "\n" not in r.json()["error"]
        assert c.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {}}).json()["status"] == "ignored"
        # a batch where one task's image is broken: the other is predicted, the broken one says why
        r = c.post("/predict", json={"tasks": [{"id": 1, "data": {"pic": "data:image/png;base64,AAAA"}},
                                               good["tasks"][0]], "label_config": BRUSH})
        assert r.status_code == 200
        bad, ok = r.json()["results"]
        assert "result" not in bad and "task 1" in bad["error"] and "result" in ok
        assert c.post("/predict", json=good).status_code == 200
        assert c.post("/v1/predict", content=png(photo())).status_code == 200
        metrics = c.get("/metrics").text
        assert 'endpoint="/predict",status="422"' in metrics and 'status="500"' not in metrics
    assert any("task 1" in rec.getMessage() for rec in caplog.records)


def _annotate(c, tid, image, label="Object"):
    m = np.zeros(image.shape[:2], bool)
    m[5:20, 5:25] = True
    return c.post("/webhook", json={
        "action": "ANNOTATION_CREATED", "project": {"id": 3, "label_config": BRUSH},
        "task": {"id": tid, "data": {"pic": uri(image)}},
        "annotation": {"id": 100 + tid, "result": [{"type": "brushlabels", "from_name": "tag", "to_name": "img",
                                                    "value": {"format": "rle", "rle": ls_rle_encode(m),
                                                              "brushlabels": [label]}}]}})


STUB = """import json, pathlib, sys, time
d = pathlib.Path(sys.argv[1]); job = json.loads((d / "job.json").read_text())
mode = {mode!r}
if mode == "fail":
    print("something broke: CUDA out of memory"); sys.exit(3)
if mode == "sleep":
    time.sleep(600)
(d / "result.json").write_text(json.dumps({{"old_miou": 0.5, "new_miou": 0.6 if mode == "accept" else 0.4,
    "accepted": mode == "accept", "checkpoint": {ckpt!r}, "holdout_tasks": 1, "train_tasks": len(job["tasks"]) - 1}}))
"""


@pytest.mark.parametrize("mode", ["accept", "reject", "fail", "sleep"])
def test_retrain_swaps_only_a_better_model(ckpts, tmp_path, mode):
    c, app, ls = client(ckpts[0], tmp_path, retrain_after=3, retrain_timeout_s=2, poll_s=0.05)
    ls.retrain_command = [sys.executable, "-c", STUB.format(mode=mode, ckpt=str(ckpts[1]))]
    v0 = ls.version
    img = photo()
    with c:
        for tid in (1, 2):
            r = _annotate(c, tid, img)
            assert r.status_code == 201 and f"{tid} of 3" in r.json()["retrain"]
        r = _annotate(c, 3, img)
        assert r.json()["retrain"].startswith("round 1 started on 3")
        job = json.loads((ls.work / "rounds" / "001" / "job.json").read_text())
        assert [t["task_id"] for t in job["tasks"]] == [1, 2, 3] and job["checkpoint"] == str(ckpts[0])
        assert c.post("/predict", json={"tasks": [{"id": 9, "data": {"pic": uri(img)}}], "label_config": BRUSH}) \
            .json()["results"][0]["model_version"] == v0   # the old model serves while the round runs
        until(lambda: c.get("/v1/label-studio").json()["rounds"], "the round to end")
        status = c.get("/v1/label-studio").json()
        (rnd,) = status["rounds"]
        pred = c.post("/predict", json={"tasks": [{"id": 9, "data": {"pic": uri(img)}}], "label_config": BRUSH})
        version = pred.json()["results"][0]["model_version"]
        if mode == "accept":
            assert rnd["outcome"] == "accepted" and status["model_version"] == version == rnd["version"]
            assert version.startswith("v1-") and version != v0
            assert app.state.engine.path == Path(ckpts[1]) and app.state.scheduler.engine is app.state.engine
            assert c.get("/v1/model").json()["checkpoint_sha256"].startswith(version[3:])
            assert c.get("/health").json()["model_version"] == version
        else:
            assert rnd["outcome"] == {"reject": "rejected", "fail": "failed", "sleep": "timeout"}[mode]
            assert status["model_version"] == version == v0 and app.state.engine.path == Path(ckpts[0])
        if mode == "fail":
            assert rnd["error"] == "something broke: CUDA out of memory"
        assert not status["retraining"] and ls.proc is None
    # a restarted backend serves the version it last accepted
    state = json.loads((ls.work / "state.json").read_text())
    assert state["version"] == version
    assert checkpoint_to_serve(ckpts[0], LSOptions(work_dir=ls.work)) == (Path(ckpts[1]) if mode == "accept"
                                                                          else ckpts[0])


def test_deleted_and_cancelled_annotations_are_forgotten(ckpts, tmp_path):
    c, app, ls = client(ckpts[0], tmp_path, retrain_after=0)
    img = photo()
    with c:
        for tid in (1, 2, 3):
            assert _annotate(c, tid, img).status_code == 201
        assert c.get("/v1/label-studio").json()["annotated_tasks"] == 3
        r = c.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotation": [{"id": 101}], "project": {}})
        assert r.status_code == 201 and r.json()["forgotten"] == 1
        r = c.post("/webhook", json={"action": "ANNOTATION_UPDATED", "project": {"id": 3, "label_config": BRUSH},
                                     "task": {"id": 2, "data": {"pic": "x"}}, "annotation": {"id": 102,
                                                                                             "was_cancelled": True}})
        assert r.status_code == 201
        assert sorted(json.loads((ls.work / "annotations.json").read_text())) == ["3"]


def test_retrain_job_fine_tunes_and_scores_old_and_new(ckpts, tmp_path):
    """The real job (the process the server starts): images painted from annotations, a fine-tune from the served
    checkpoint within its budget, old and new scored on the held-out tasks."""
    from pixelseg.inference.lsml import run_job
    rng = np.random.default_rng(0)
    tasks = []
    for tid in range(1, 6):
        img = np.full((32, 32, 3), 40, np.uint8)
        m = np.zeros((32, 32), bool)
        y, x = rng.integers(2, 14, 2)
        m[y:y + 14, x:x + 14] = True
        img[m] = (200, 80, 60)
        tasks.append({"task_id": tid, "data": {"pic": uri(img)}, "image_key": "pic",
                      "result": [{"type": "brushlabels", "value": {"rle": ls_rle_encode(m), "brushlabels": ["object"]}}]})
    tasks.append({"task_id": 6, "data": {"pic": "data:image/png;base64,AAAA"}, "image_key": "pic", "result": []})
    d = tmp_path / "round"
    d.mkdir()
    (d / "job.json").write_text(json.dumps({
        "checkpoint": str(ckpts[0]), "class_names": ["background", "object", "edge"], "image_size": [32, 32],
        "holdout": 0.2, "time_budget": 4, "device": "cpu", "max_bytes": 1 << 20, "max_pixels": 10 ** 6,
        "tasks": tasks}))
    r = run_job(d)
    assert r["skipped_tasks"] == 1 and r["holdout_tasks"] >= 1 and r["train_tasks"] + r["holdout_tasks"] == 5
    assert 0 <= r["old_miou"] <= 1 and 0 <= r["new_miou"] <= 1 and r["accepted"] == (r["new_miou"] >= r["old_miou"])
    assert Path(r["checkpoint"]).is_file() and json.loads((d / "result.json").read_text()) == r
    assert np.array(Image.open(d / "data" / "masks" / "task_1.png")).max() == 1
