"""`pixelseg serve` under a burst: requests wait in the bounded queue instead of being refused, 503 +
Retry-After only past the deadline, concurrent requests share forward passes, /metrics shows the wait.
A gated fake engine makes every case deterministic: nothing here depends on how fast the machine is."""
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="pixelseg[serve] extra not installed")
import httpx  # noqa: E402

from pixelseg.inference.serving import Engine  # noqa: E402
from pixelseg.core.sizes import Limits  # noqa: E402

from _fakes import fake_checkpoint  # noqa: E402
from test_serve import _metric, error_of, mask_of, photo, png, running, running_app  # noqa: E402


class GatedEngine:
    """The real engine behind a gate: each forward pass (batched or not) waits until the test opens it,
    and every call is recorded with its batch size."""

    def __init__(self, engine):
        self.engine, self.gate, self.calls = engine, threading.Event(), []
        self.entered = threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _wait(self, n):
        self.calls.append(n)
        self.entered.release()
        assert self.gate.wait(60)

    def masks(self, images):
        self._wait(len(images))
        return self.engine.masks(images)

    def mask(self, image, mc_samples=0):
        self._wait(1)
        return self.engine.mask(image, mc_samples)

    def warm_up(self, batch=1):
        self.engine.warm_up(batch)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(fake_checkpoint(tmp_path_factory.mktemp("queue") / "model.pt"))


def _burst(url, n, size=(12, 16)):
    results = [None] * n

    def send(i):
        results[i] = httpx.post(url + "/v1/predict", content=png(photo(*size, seed=i)), timeout=120)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return results, threads


def _until(cond):
    for _ in range(2400):  # polls for a state, asserts nothing about time
        if cond():
            return
        time.sleep(0.025)
    raise AssertionError("state not reached")


def test_a_burst_beyond_the_old_queue_waits_instead_of_503(engine):
    """20 requests at once (the old default queue held 8): all admitted, all answered 200, none 503; the
    waiting ones shared forward passes."""
    gated = GatedEngine(engine)
    with running(gated, Limits(max_batch=8)) as u:
        results, threads = _burst(u, 20)
        assert gated.entered.acquire(timeout=60)  # the first forward pass is running (gate closed) ...
        _until(lambda: _metric(u, "pixelseg_queue_depth") == 20)  # ... and every other request is queued
        gated.gate.set()
        for t in threads:
            t.join(120)
        assert [r.status_code for r in results] == [200] * 20
        assert all(mask_of(r).shape == (12, 16) for r in results)
        assert sum(gated.calls) == 20 and max(gated.calls) <= 8
        assert len(gated.calls) < 20  # batched: fewer forward passes than requests
        text = httpx.get(u + "/metrics").text
        assert 'endpoint="/v1/predict",status="503"' not in text
        assert _metric(u, "pixelseg_queue_wait_seconds_count") == 20
        assert _metric(u, "pixelseg_batch_size_count") == len(gated.calls)


def test_batching_groups_the_requests_that_waited(engine):
    """While one forward pass runs, the requests that arrive are decoded and then run as one batch."""
    gated = GatedEngine(engine)
    with running(gated, Limits(max_batch=8, batch_wait_ms=0)) as u:
        first, t1 = _burst(u, 1)
        assert gated.entered.acquire(timeout=60)
        assert gated.calls == [1]  # a lone request does not wait for company
        rest, t2 = _burst(u, 6)
        _until(lambda: _metric(u, 'pixelseg_stage_seconds_count{stage="decode"}') == 7)
        gated.gate.set()
        for t in t1 + t2:
            t.join(120)
        assert [r.status_code for r in first + rest] == [200] * 7
        assert gated.calls == [1, 6]  # two forward passes for seven requests


def test_past_the_deadline_is_503_with_retry_after(engine):
    """A request still waiting when its deadline passes gets 503 + Retry-After; the one being served
    is answered normally."""
    gated = GatedEngine(engine)
    with running(gated, Limits(max_batch=8, deadline_s=0.5)) as u:
        first, t1 = _burst(u, 1)
        assert gated.entered.acquire(timeout=60)
        late, t2 = _burst(u, 1)
        _until(lambda: _metric(u, "pixelseg_queue_depth") == 2)
        time.sleep(0.6)  # past the second request's deadline (a state to reach, not a speed to assert)
        gated.gate.set()
        for t in t1 + t2:
            t.join(120)
        assert first[0].status_code == 200
        assert "deadline" in error_of(late[0], 503) and int(late[0].headers["retry-after"]) >= 1
        assert gated.calls == [1]  # the late request never reached the model
        assert _metric(u, 'pixelseg_refused_total{reason="deadline"}') == 1


def test_a_deadline_that_cannot_be_met_is_refused_at_admission(engine):
    """When the recent cost per request says the queue ahead cannot be served within the deadline,
    the request is refused at once (no waiting just to fail), with a Retry-After."""
    gated = GatedEngine(engine)
    with running_app(gated, Limits(max_batch=8, deadline_s=2)) as (u, app):
        first, t1 = _burst(u, 1)
        assert gated.entered.acquire(timeout=60)
        sched = app.state.scheduler
        sched.per_request_s = 5.0  # recent requests took 5 s each: one ahead already passes a 2 s deadline
        r = httpx.post(u + "/v1/predict", content=png(photo(8, 8)))
        msg = error_of(r, 503)
        assert "deadline" in msg and int(r.headers["retry-after"]) >= 3
        gated.gate.set()
        for t in t1:
            t.join(120)
        assert first[0].status_code == 200
        sched.per_request_s = 0.01
        assert mask_of(httpx.post(u + "/v1/predict", content=png(photo(8, 8)))).shape == (8, 8)


class ThreadRecordingEngine(GatedEngine):
    """Records which thread runs each forward pass and the warm-up (the gate stays open)."""

    def __init__(self, engine):
        super().__init__(engine)
        self.gate.set()
        self.threads = []

    def _wait(self, n):
        self.threads.append(threading.current_thread().name)
        super()._wait(n)

    def warm_up(self, batch=1):
        self.threads.append(threading.current_thread().name)
        self.engine.warm_up(batch)


@pytest.mark.parametrize("max_batch", [8, 1])
def test_warm_up_and_every_forward_pass_run_on_one_torch_thread(engine, max_batch):
    """Each thread that runs torch brings an OpenMP team of its own, and more OpenMP threads than cores
    slow every op (server.torch_thread): warm-up, batched and lone passes all share one thread."""
    rec = ThreadRecordingEngine(engine)
    with running(rec, Limits(max_batch=max_batch, batch_wait_ms=0)) as u:
        results, threads = _burst(u, 5)
        for t in threads:
            t.join(120)
        assert [r.status_code for r in results] == [200] * 5
    assert len(rec.threads) >= 2 and len(set(rec.threads)) == 1, rec.threads  # warm-up + passes, one thread
    assert rec.threads[0].startswith("pixelseg-infer")


def test_serve_loads_the_model_on_the_torch_thread(monkeypatch, tmp_path):
    """`serve` builds the Engine on the thread that will run it, before anything listens."""
    import pixelseg.inference.server as server
    seen = {}

    class Stop(Exception):
        pass

    def fake_engine(source, **kw):
        seen["load"] = threading.current_thread().name
        return engine_obj
    engine_obj = Engine(fake_checkpoint(tmp_path / "model.pt"))

    def fake_run(app, **kw):
        seen["pool"] = app.state.scheduler.infer_pool
        raise Stop
    monkeypatch.setattr(server, "Engine", fake_engine)
    import uvicorn
    monkeypatch.setattr(uvicorn, "run", fake_run)
    with pytest.raises(Stop):
        server.serve(tmp_path / "model.pt")
    assert seen["load"].startswith("pixelseg-infer")
    assert seen["pool"].submit(lambda: threading.current_thread().name).result() == seen["load"]


def test_serve_sets_the_openmp_spin_count_before_torch_loads():
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: `pixelseg serve` sets it first (in a fresh
    process, where torch is not loaded yet), and leaves a wait policy the user chose alone."""
    import os
    import subprocess
    import sys

    from pixelseg import cli
    env = {}
    assert cli.serve_openmp_env(env) is None  # torch is loaded in this test process: too late, so hands off
    code = ("import os, sys, pixelseg.cli as c; orig = c.serve_openmp_env; seen = []\n"
            "c.serve_openmp_env = lambda: seen.append('torch' in sys.modules) or orig()\n"
            "rc = c.main(['serve', sys.argv[1]]); print(seen, os.environ.get('GOMP_SPINCOUNT'), rc)")
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    missing = "/nonexistent/run"
    out = subprocess.run([sys.executable, "-c", code, missing], env=base, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["[False]", cli.SERVE_GOMP_SPINCOUNT, "2"], out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-c", code, missing], env={**base, "OMP_WAIT_POLICY": "PASSIVE"},
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["[False]", "None", "2"], out.stdout + out.stderr
