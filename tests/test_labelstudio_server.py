"""`predict --format labelstudio` against a real Label Studio server: the tasks import through its API with
their predictions, and the regions read back from it decode to the masks we wrote.

Label Studio lives in a venv of its own (it pins many packages): the executable is $PIXELSEG_LABEL_STUDIO or
.venv-ls/bin/label-studio under the project root (`python3 -m venv .venv-ls && .venv-ls/bin/pip install
label-studio`, as .ci/run does). The test skips, saying why, where it is missing or does not come up.
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pixelseg.labels import write as pre
from pixelseg.labels.rle import ls_rle_decode, ls_rle_encode

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", "object", "edge"]
PALETTE = [(0, 0, 0), (200, 60, 60), (240, 240, 240)]
# A first start creates its database (Django migrations): about a minute on a quiet 2-core machine, over ten
# minutes on a loaded one. The migrated database of a first start is kept beside the executable's venv
# (TEMPLATE) and copied into later runs' temp data dirs, which then start in seconds.
STARTUP_S = float(os.environ.get("PIXELSEG_LABEL_STUDIO_TIMEOUT", 300))
TOKEN = "pixelseg-test-token-0123456789abcdef"   # a throwaway server on 127.0.0.1; fixed so the template works


def _executable() -> Path | None:
    env = os.environ.get("PIXELSEG_LABEL_STUDIO")
    path = Path(env) if env else ROOT / ".venv-ls" / "bin" / "label-studio"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, token: str, body=None, timeout: float = 60):
    req = urllib.request.Request(url, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    exe = _executable()
    if exe is None:
        pytest.skip("Label Studio is not installed: set PIXELSEG_LABEL_STUDIO to its label-studio executable, or "
                    "`python3 -m venv .venv-ls && .venv-ls/bin/pip install label-studio` in the project root")
    data = tmp_path_factory.mktemp("ls")
    port, token = _free_port(), TOKEN
    template = exe.parent.parent / "pixelseg-test-db.sqlite3"
    if template.is_file():
        shutil.copy(template, data / "label_studio.sqlite3")
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data),
           # the ML backend test (test_ls_backend_e2e.py) connects a backend on 127.0.0.1, which Label Studio
           # refuses by default (SSRF protection): allow loopback for this throwaway server
           "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false"}
    env.pop("PYTHONPATH", None)   # its own venv, not our checkout
    log = open(data / "server.log", "wb")
    proc = subprocess.Popen([str(exe), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port),
                             "--username", "test@example.com", "--password", secrets.token_hex(8),
                             "--user-token", token, "--enable-legacy-api-token"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.skip(f"label-studio exited with status {proc.returncode} while starting; its log: "
                            + (data / "server.log").read_text(errors="replace")[-300:].replace("\n", " | "))
            try:
                if _call(url + "/health", token, timeout=5).get("status") == "UP":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.skip(f"label-studio did not answer /health within {STARTUP_S:g} s "
                            "(PIXELSEG_LABEL_STUDIO_TIMEOUT sets the limit)")
            time.sleep(1)
        yield url, token, exe
    finally:
        os.killpg(proc.pid, signal.SIGTERM)   # its own session: the server and the workers it forked
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    if not template.is_file():
        try:
            shutil.copy(data / "label_studio.sqlite3", template.with_suffix(".partial"))
            os.replace(template.with_suffix(".partial"), template)
        except OSError:
            pass   # a read-only venv: every run migrates


def _masks():
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((30, 40), (36, 28)):
        m = np.zeros((h, w), np.uint8)
        m[3:18, 4:25] = 1
        m[7:12, 9:15] = 0                               # a hole
        m[rng.integers(15, h - 6):, rng.integers(12, w - 6):] = 2   # a block of the other class in a corner
        out.append(m)
    return out


@pytest.mark.parametrize("shapes", ["mask", "polygon"])
def test_tasks_import_and_read_back(label_studio, tmp_path, shapes):
    url, token, _ = label_studio
    masks = _masks()
    items = []
    for i, m in enumerate(masks):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.zeros((*m.shape, 3), np.uint8)).save(p)
        items.append(pre.image_regions(p, m, np.full(m.shape, 0.8, np.float32), CLASSES, 0.2 + 0.3 * i, shapes, 0))
    tasks_file, config_file = pre.write("labelstudio", items, CLASSES, PALETTE, tmp_path, shapes=shapes,
                                        model_version="pixelseg-test")
    project = _call(url + "/api/projects", token, {"title": f"pixelseg {shapes}",
                                                   "label_config": config_file.read_text()})
    imported = _call(f"{url}/api/projects/{project['id']}/import", token, json.loads(tasks_file.read_text()))
    assert imported["task_count"] == 2 and imported["prediction_count"] == 2
    tasks = _call(f"{url}/api/tasks?project={project['id']}&fields=all", token)["tasks"]
    assert len(tasks) == 2
    for task in tasks:
        i = int(task["data"]["image"].rsplit("img", 1)[-1][0])
        m, it = masks[i], items[i]
        (pred,) = task["predictions"]
        assert pred["model_version"] == "pixelseg-test"
        assert task["predictions_score"] == pytest.approx(it.confidence, abs=1e-5)  # the column it sorts by
        got = np.zeros(m.shape, np.uint8)
        for r in pred["result"]:
            assert (r["original_width"], r["original_height"]) == (m.shape[1], m.shape[0])
            if shapes == "mask":
                region = ls_rle_decode(r["value"]["rle"], *m.shape)
                label = r["value"]["brushlabels"][0]
            else:
                xy = np.asarray(r["value"]["points"]) * [m.shape[1] / 100, m.shape[0] / 100]
                region = mask_utils.decode(mask_utils.frPyObjects([xy.ravel().tolist()], *m.shape)[0]).astype(bool)
                label = r["value"]["polygonlabels"][0]
            got[region] = CLASSES.index(label)
        np.testing.assert_array_equal(got, m)


def test_our_brush_rle_matches_label_studios_codec(label_studio, tmp_path):
    """The brush RLE we write decodes with Label Studio's own codec (label_studio_sdk.converter.brush), and
    its encoding of a mask decodes with ours."""
    _, _, exe = label_studio
    python = exe.parent / "python"
    if not python.is_file():
        pytest.skip(f"no python next to {exe} to run Label Studio's brush codec")
    m = _masks()[0] > 0
    script = ("import json, sys, numpy as np\n"
              "from label_studio_sdk.converter.brush import decode_rle, mask2rle\n"
              "d = json.load(open(sys.argv[1]))\n"
              "alpha = decode_rle(d['ours']).reshape(d['h'], d['w'], 4)[:, :, 3]\n"
              "theirs = mask2rle((np.array(d['mask'], np.uint8) * 255))\n"
              "print(json.dumps({'decoded': (alpha > 0).astype(int).tolist(), 'theirs': [int(v) for v in theirs]}))\n")
    (tmp_path / "in.json").write_text(json.dumps({"ours": ls_rle_encode(m), "h": m.shape[0], "w": m.shape[1],
                                                  "mask": m.astype(int).tolist()}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", script, str(tmp_path / "in.json")], capture_output=True, text=True,
                          env=env, timeout=120)
    if done.returncode and "ModuleNotFoundError" in done.stderr:
        pytest.skip("this Label Studio has no label_studio_sdk.converter.brush: " + done.stderr.strip()[-200:])
    assert done.returncode == 0, done.stderr[-500:]
    out = json.loads(done.stdout)
    np.testing.assert_array_equal(np.array(out["decoded"], bool), m)
    np.testing.assert_array_equal(ls_rle_decode(out["theirs"], *m.shape), m)
