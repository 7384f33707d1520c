"""`pixelseg serve RUN --label-studio` against a real Label Studio (the server tests/test_labelstudio_server.py
starts; skipped, saying why, where it cannot start): the backend is connected through Label Studio's API, tasks
opened in Label Studio get the backend's brush predictions, submitted annotations reach the backend's webhook, a
fine-tune runs in the background, and the next task opened gets the new model_version."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="pixelseg[serve] extra not installed")

from pixelseg.labels.rle import ls_rle_decode, ls_rle_encode  # noqa: E402

from _fakes import fake_checkpoint  # noqa: E402
from test_labelstudio_server import label_studio  # noqa: E402,F401  (the module-scoped real server)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="label" toName="image">'
          '<Label value="object" background="#c83c3c"/><Label value="edge"/></BrushLabels></View>')
N_TASKS, ANNOTATE = 8, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n):
    """32x32 photos: a grey ground with one reddish block, the block's mask (an easy thing to learn)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = (np.full((32, 32, 3), 50) + rng.integers(-10, 10, (32, 32, 3))).astype(np.uint8)
        m = np.zeros((32, 32), bool)
        y, x = rng.integers(1, 14, 2)
        m[y:y + 16, x:x + 16] = True
        img[m] = (210, 70, 60)
        out.append((img, m))
    return out


def _wait(cond, what, timeout):
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what} after {timeout} s")
        time.sleep(0.5)


def _edge_everywhere(path):
    """A checkpoint whose model paints every pixel "edge": held-out mIoU 0 on annotations of objects, so the
    fine-tuned model, whatever the few seconds of training give, scores no worse and is served (the test is about
    the loop; tests/test_ls_backend.py covers a model that is not served)."""
    import torch
    from pixelseg.core.checkpoint import atomic_save, load_checkpoint
    fake_checkpoint(path, seed=0)
    ckpt = load_checkpoint(path)
    state = ckpt["model"]
    bias = [k for k, v in state.items() if k.endswith(".bias") and tuple(v.shape) == (3,)][-1]   # the class head
    weight = bias[:-len("bias")] + "weight"
    state[weight] = torch.zeros_like(state[weight])
    state[bias] = torch.tensor([0.0, 0.0, 10.0])
    ckpt.pop("path", None)
    atomic_save(ckpt, path)


@pytest.fixture
def backend(tmp_path):
    """`pixelseg serve RUN --label-studio` in a process of its own (its own session: killed with its retrain)."""
    run = tmp_path / "run"
    run.mkdir()
    _edge_everywhere(run / "best.pt")
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pixelseg", "serve", str(run), "--label-studio", "--port", str(port),
                             "--retrain-after", str(ANNOTATE), "--retrain-budget", "8s", "--holdout", "0.3",
                             "--device", "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"pixelseg serve exited {proc.returncode}: "
                                     + (tmp_path / "serve.log").read_text()[-500:])
            try:
                return httpx.get(url + "/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False
        _wait(ready, "pixelseg serve to be ready", 300)
        yield url, run, tmp_path / "serve.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_label_studio_loop(label_studio, backend, tmp_path):
    ls_url, token, _ = label_studio
    url, run, serve_log = backend
    api = httpx.Client(base_url=ls_url, headers={"Authorization": f"Token {token}"}, timeout=120)
    project = api.post("/api/projects", json={"title": "pixelseg ML backend", "label_config": CONFIG}).json()
    pid = project["id"]
    data = _images(N_TASKS)
    files = []
    for i, (img, _) in enumerate(data):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        files.append((f"file{i}", (f"img{i}.png", buf.getvalue(), "image/png")))
    r = api.post(f"/api/projects/{pid}/import", files=files)
    assert r.status_code == 201, r.text
    tasks = api.get("/api/tasks", params={"project": pid, "fields": "all"}).json()["tasks"]
    assert len(tasks) == N_TASKS and all(t["data"]["image"].startswith("/data/upload/") for t in tasks)
    order = {int(t["data"]["image"].rsplit("img", 1)[-1].split(".")[0]): t["id"] for t in tasks}

    # connect the backend: Label Studio calls /health and /setup, and creates the webhook to /webhook
    r = api.post("/api/ml", json={"url": url, "project": pid, "title": "pixelseg", "is_interactive": False})
    assert r.status_code == 201, r.text
    ml = r.json()
    status = httpx.get(url + "/v1/label-studio").json()
    v0 = status["model_version"]
    assert v0.startswith("v0-")

    # opening a task asks the backend for its prediction
    def prediction_of(task_id):
        task = api.get(f"/api/tasks/{task_id}").json()
        return task["predictions"][0] if task.get("predictions") else None
    pred = _wait(lambda: prediction_of(order[0]), "a prediction on the first task", 120)
    assert pred["model_version"] == v0 and 0 <= pred["score"] <= 1
    for res in pred["result"]:
        assert res["type"] == "brushlabels" and res["value"]["brushlabels"][0] in ("object", "edge")
        assert ls_rle_decode(res["value"]["rle"], 32, 32).shape == (32, 32)

    # annotate: each submission reaches the backend's webhook; the ANNOTATE-th starts a retrain round
    for i in range(ANNOTATE):
        _, m = data[i]
        r = api.post(f"/api/tasks/{order[i]}/annotations", json={"result": [{
            "from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": 32,
            "original_height": 32, "image_rotation": 0,
            "value": {"format": "rle", "rle": ls_rle_encode(m), "brushlabels": ["object"]}}], "lead_time": 1.0})
        assert r.status_code == 201, r.text
    status = _wait(lambda: (lambda s: s if s["annotated_tasks"] == ANNOTATE else None)(
        httpx.get(url + "/v1/label-studio").json()), "the webhooks of all annotations", 60)
    assert status["round"] == 1
    status = _wait(lambda: (lambda s: s if s["rounds"] else None)(httpx.get(url + "/v1/label-studio").json()),
                   "the retrain round to end", 240)
    (rnd,) = status["rounds"]
    assert rnd["outcome"] == "accepted", (rnd, serve_log.read_text()[-800:])
    v1 = status["model_version"]
    assert v1.startswith("v1-") and rnd["new_miou"] >= rnd["old_miou"]

    # the next task opened gets the new version's prediction, and Label Studio records the new version
    pred = _wait(lambda: prediction_of(order[N_TASKS - 1]), "a prediction on an unopened task", 120)
    assert pred["model_version"] == v1
    ml = api.get(f"/api/ml/{ml['id']}").json()
    assert ml["model_version"] == v1
    state = json.loads((run / "label-studio" / "state.json").read_text())
    assert state["version"] == v1 and Path(state["checkpoint"]).is_file()
