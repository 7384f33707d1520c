"""`pixelseg serve RUN --label-studio`: Label Studio's ML backend protocol on the same FastAPI app as the
web page and /v1/predict (one process, one copy of the model, one torch thread, the same limits).

Why not the `label-studio-ml` SDK: it is a Flask app of its own (a second web framework beside FastAPI), and it
requires `label-studio-sdk` from a git URL (not a released version; it pins pydantic, lxml, nltk, ...), which
would make `pip install pixelseg[serve]` fight the versions the rest of pixelseg uses. The protocol is five
small JSON endpoints (pixelseg/inference/lsml.py lists them), so they are written here, against Label Studio's own
client (`ml/api_connector.py`) and tested against a real Label Studio (tests/test_ls_backend_e2e.py).

The loop. Label Studio posts every annotation to /webhook (it creates that webhook when the backend is
connected). After --retrain-after newly submitted annotations (or Label Studio's "Start training"), a background
process (`python -m pixelseg.inference.lsml ROUND`) fetches the annotated tasks' images, fine-tunes from the model being
served (`train --weights CURRENT --time-budget`) on all but a held-out part of the tasks (by a hash of the task
id, so they stay held out), and scores old and new on the held-out tasks. The new model is served (version
v<round>-<sha256[:12]>, in every prediction's model_version) only if it scores no worse; meanwhile, and after
any failure (a crash, no improvement, past the time limit: one log line each), the old one keeps serving.
State lives in --ls-dir (default RUN/label-studio): annotations.json, state.json (the version served, so a
restart serves it again), rounds/NNN/ (job, data, run, retrain.log, result.json).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..core.errors import PixelsegError
from ..core.files import atomic_write_text
from ..core.logs import logger as log
from .lsml import BadRequest, LabelConfig, fetch, image_ref, parse_config, prediction, segment
from .server import read_body
from .serving import HTTPProblem, decode_upload

PATHS = {"/health", "/setup", "/predict", "/webhook", "/train", "/versions", "/v1/label-studio"}
TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_EVENTS = ("ANNOTATION_DELETED", "ANNOTATIONS_DELETED")


@dataclass
class LSOptions:
    work_dir: Path | None = None  # --ls-dir
    retrain_after: int = 10  # --retrain-after (0: only when Label Studio asks)
    retrain_budget_s: float = 300.0  # --retrain-budget
    holdout: float = 0.2  # --holdout
    url: str | None = None  # --label-studio-url / $LABEL_STUDIO_URL: where task images are fetched
    token: str | None = None  # $LABEL_STUDIO_API_KEY
    min_area: int = 16  # polygons: smaller parts are dropped (labels/write.py)
    retrain_timeout_s: float | None = None  # hard limit on the retrain process; default budget * 1.5 + 120 s
    train_device: str = "auto"
    poll_s: float = 0.5

    def check(self) -> LSOptions:
        if self.retrain_after < 0:
            raise PixelsegError(
                f"--retrain-after {self.retrain_after}: must be >= 0 (0: only on Label Studio's 'Start training')"
            )
        if not 0 < self.holdout < 1:
            raise PixelsegError(f"--holdout {self.holdout}: must be between 0 and 1")
        if not self.retrain_budget_s or self.retrain_budget_s <= 0:
            raise PixelsegError("--retrain-budget: must be a positive duration, e.g. 5m")
        return self

    def limit_s(self) -> float:
        return self.retrain_timeout_s or self.retrain_budget_s * 1.5 + 120

    def checkpoint_to_serve(self, source):
        return checkpoint_to_serve(source, self)

    def attach(self, app, source, engine_kwargs: dict | None = None) -> Backend:
        return attach(app, self, source, engine_kwargs)


def work_dir(source, options: LSOptions) -> Path:
    if options.work_dir:
        return Path(options.work_dir)
    src = Path(source)
    return (src if src.is_dir() else src.parent) / "label-studio"


def checkpoint_to_serve(source, options: LSOptions):
    """The checkpoint a restarted backend serves: the last accepted version recorded in state.json, if its file
    is still there, else `source`."""
    state = work_dir(source, options) / "state.json"
    try:
        ckpt = Path(json.loads(state.read_text())["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return source
    return ckpt if ckpt.is_file() else source


class Backend:
    """The Label Studio side of one server: label configs, annotations, versions and the retrain process."""

    def __init__(self, options: LSOptions, source, engine, engine_kwargs: dict | None = None):
        self.o = options.check()
        self.work = work_dir(source, options)
        self.work.mkdir(parents=True, exist_ok=True)
        self.engine_kwargs = engine_kwargs or {}
        saved = self._read("state.json", {})
        self.round = int(saved.get("round", 0))
        same = saved.get("checkpoint") and Path(saved["checkpoint"]) == Path(engine.path)
        self.version = saved["version"] if same and saved.get("version") else f"v0-{engine.sha256[:12]}"
        self.checkpoint = str(engine.path)
        self.versions = saved.get("versions") if same and saved.get("versions") else [self.version]
        self.rounds = saved.get("rounds", [])
        self.annotations: dict[str, dict] = self._read("annotations.json", {})
        self.new_since = int(saved.get("new_since", 0))
        self.hosts: dict[str, tuple] = {}
        self._configs: dict[str, LabelConfig] = {}
        self.proc: subprocess.Popen | None = None
        self.watcher: asyncio.Task | None = None
        self.retrain_command = [sys.executable, "-m", "pixelseg.inference.lsml"]  # + ROUND_DIR; tests swap in a stub
        atexit.register(self.close)

    # ---- persistence
    def _read(self, name: str, default):
        try:
            return json.loads((self.work / name).read_text())
        except (OSError, ValueError):
            return default

    def _save_state(self) -> None:
        atomic_write_text(
            self.work / "state.json",
            json.dumps(
                {
                    "version": self.version,
                    "checkpoint": self.checkpoint,
                    "round": self.round,
                    "new_since": self.new_since,
                    "versions": self.versions,
                    "rounds": self.rounds[-50:],
                },
                indent=1,
            ),
        )

    def _save_annotations(self) -> None:
        atomic_write_text(self.work / "annotations.json", json.dumps(self.annotations))

    # ---- label configs
    def config(self, text, class_names) -> LabelConfig:
        key = text if isinstance(text, str) else ""
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = parse_config(text, class_names)
            if len(self._configs) > 64:
                self._configs.clear()
            self._configs[key] = cfg
            (log.warning if cfg.unknown or cfg.unlisted else log.info)("label studio config: %s", cfg.report())
        return cfg

    def host(self, project) -> tuple[str | None, str | None]:
        pid = str(project or "").split(".", 1)[0]
        host, token = self.hosts.get(pid) or (next(iter(self.hosts.values())) if self.hosts else (None, None))
        return self.o.url or host, self.o.token or token

    # ---- annotations
    def remember(self, task: dict, annotation: dict, cfg: LabelConfig, project=None) -> bool:
        """Keep a task's latest annotation; False for a cancelled (skipped) one, which forgets the task."""
        tid = str(task["id"])
        if annotation.get("was_cancelled"):
            self.annotations.pop(tid, None)
            return False
        self.annotations[tid] = {
            "task_id": task["id"],
            "annotation_id": annotation.get("id"),
            "data": task["data"],
            "image_key": cfg.image_key,
            "result": annotation.get("result") or [],
            "project": project,
        }
        return True

    def forget(self, annotation_ids) -> int:
        ids = set(annotation_ids)
        gone = [k for k, r in self.annotations.items() if r.get("annotation_id") in ids]
        for k in gone:
            del self.annotations[k]
        return len(gone)

    # ---- retraining
    def status(self) -> dict:
        return {
            "model_version": self.version,
            "checkpoint": self.checkpoint,
            "versions": self.versions,
            "annotated_tasks": len(self.annotations),
            "new_annotations": self.new_since,
            "retrain_after": self.o.retrain_after,
            "retraining": self.proc is not None,
            "round": self.round,
            "rounds": self.rounds[-10:],
        }

    def maybe_retrain(self, app, force: bool = False) -> str:
        """Start a retrain round if one is due (or `force`d) and none runs; returns what happened, in words."""
        if self.proc is not None:
            return f"round {self.round} is running; {self.new_since} new annotation(s) wait for the next"
        if not force and (self.o.retrain_after == 0 or self.new_since < self.o.retrain_after):
            return f"{self.new_since} of {self.o.retrain_after} new annotations before the next retrain"
        if len(self.annotations) < 2:
            msg = (
                f"{len(self.annotations)} annotated task(s): a retrain needs at least 2 (one to train on, one "
                "held out to judge the new model)"
            )
            if force:
                raise HTTPProblem(422, msg)
            return msg
        engine = app.state.engine
        if engine.model is None:
            msg = f"{engine.id} is an exported graph ({engine.backend}); retraining needs a checkpoint: serve the run"
            if force:
                raise HTTPProblem(422, msg)
            return msg
        self.round += 1
        round_dir = self.work / "rounds" / f"{self.round:03d}"
        round_dir.mkdir(parents=True, exist_ok=True)
        limits = app.state.limits
        job = {
            "checkpoint": self.checkpoint,
            "class_names": list(engine.info.class_names),
            "palette": [list(c) for c in engine.info.palette],
            "image_size": list(engine.size),
            "holdout": self.o.holdout,
            "time_budget": self.o.retrain_budget_s,
            "device": self.o.train_device,
            "max_bytes": limits.max_upload_bytes,
            "max_pixels": limits.max_pixels,
            "tasks": list(self.annotations.values()),
            "base_version": self.version,
        }
        atomic_write_text(round_dir / "job.json", json.dumps(job))
        host, token = self.host(None)
        env = {**os.environ, "PIXELSEG_LS_URL": host or "", "PIXELSEG_LS_TOKEN": token or ""}
        with open(round_dir / "retrain.log", "wb") as out:
            self.proc = subprocess.Popen(
                [*self.retrain_command, str(round_dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        taken, self.new_since = self.new_since, 0
        self._save_state()
        log.info(
            "label studio: retrain round %d started on %d annotated task(s) (%d new), from %s, budget %g s (log: %s)",
            self.round,
            len(job["tasks"]),
            taken,
            self.version,
            self.o.retrain_budget_s,
            round_dir / "retrain.log",
        )
        self.watcher = asyncio.get_running_loop().create_task(self._watch(app, self.proc, round_dir, self.round))
        return f"round {self.round} started on {len(job['tasks'])} annotated task(s)"

    async def _watch(self, app, proc, round_dir: Path, rnd: int) -> None:
        started, limit = time.monotonic(), self.o.limit_s()
        record = {"round": rnd, "base": self.version}
        try:
            while proc.poll() is None:
                if time.monotonic() - started > limit:
                    _kill(proc)
                    record.update(outcome="timeout")
                    log.warning(
                        "label studio: retrain round %d ran out of time (stopped after %.0f s; "
                        "--retrain-budget %g s); still serving %s",
                        rnd,
                        limit,
                        self.o.retrain_budget_s,
                        self.version,
                    )
                    return
                await asyncio.sleep(self.o.poll_s)
            if proc.returncode != 0:
                record.update(outcome="failed", error=_last_line(round_dir / "retrain.log"))
                log.warning(
                    "label studio: retrain round %d failed (exit %d: %s); still serving %s (log: %s)",
                    rnd,
                    proc.returncode,
                    record["error"],
                    self.version,
                    round_dir / "retrain.log",
                )
                return
            try:
                result = json.loads((round_dir / "result.json").read_text())
                old, new, ckpt = float(result["old_miou"]), float(result["new_miou"]), Path(result["checkpoint"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                record.update(outcome="failed", error=f"no readable result.json ({exc})")
                log.warning(
                    "label studio: retrain round %d left no readable result (%s); still serving %s",
                    rnd,
                    exc,
                    self.version,
                )
                return
            record.update(old_miou=old, new_miou=new, holdout_tasks=result.get("holdout_tasks"))
            if not result.get("accepted") or new < old:
                record.update(outcome="rejected")
                log.warning(
                    "label studio: retrain round %d scored held-out mIoU %.4f < %.4f of %s on %s task(s); "
                    "still serving %s",
                    rnd,
                    new,
                    old,
                    self.version,
                    result.get("holdout_tasks"),
                    self.version,
                )
                return
            await self._swap(app, ckpt, rnd, record)
        except Exception as exc:  # a bug must not take the server down: one line, the old model keeps serving
            record.update(outcome="failed", error=f"{type(exc).__name__}: {exc}")
            log.warning(
                "label studio: retrain round %d failed in the server (%s: %s); still serving %s",
                rnd,
                type(exc).__name__,
                exc,
                self.version,
            )
        finally:
            record.setdefault("outcome", "failed")
            record["wall_s"] = round(time.monotonic() - started, 1)
            self.rounds.append(record)
            if self.proc is proc:
                self.proc = None
            self._save_state()
            if self.o.retrain_after and self.new_since >= self.o.retrain_after:
                self.maybe_retrain(app)

    async def _swap(self, app, ckpt: Path, rnd: int, record: dict) -> None:
        from .serving import Engine

        state = app.state
        loop = asyncio.get_running_loop()
        try:  # loaded and warmed up on the torch thread, between forward passes
            engine = await loop.run_in_executor(state.scheduler.infer_pool, _load_engine, ckpt, self.engine_kwargs)
        except (PixelsegError, OSError, RuntimeError) as exc:
            record.update(outcome="failed", error=f"could not load {ckpt}: {exc}")
            log.warning(
                "label studio: retrain round %d: could not load %s (%s); still serving %s", rnd, ckpt, exc, self.version
            )
            return
        assert isinstance(engine, Engine)
        old = self.version
        # one step of the event loop: every request from here on sees the new engine and its version together
        state.engine = state.scheduler.engine = engine
        self.version, self.checkpoint = f"v{rnd}-{engine.sha256[:12]}", str(ckpt)
        self.versions.append(self.version)
        record.update(outcome="accepted", version=self.version)
        log.info(
            "label studio: retrain round %d: held-out mIoU %.4f >= %.4f; now serving %s (was %s)",
            rnd,
            record["new_miou"],
            record["old_miou"],
            self.version,
            old,
        )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill(self.proc)


def _load_engine(path, kwargs):
    from .serving import Engine

    engine = Engine(path, **kwargs)
    engine.warm_up()
    return engine


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the trainer and anything it started
    proc.wait()


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][-300:] if lines else "no output"


# ---- HTTP -------------------------------------------------------------------------------------------------
router = APIRouter()


def _backend(request: Request) -> Backend:
    return request.app.state.ls


async def _json(request: Request) -> dict:
    body = await read_body(request, request.app.state.limits)
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise HTTPProblem(400, f"request body is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise HTTPProblem(422, f"request body is a JSON {type(doc).__name__}, not an object")
    return doc


def _problem(exc: BadRequest) -> HTTPProblem:
    return HTTPProblem(exc.status, exc.message)


@router.get("/health")
async def ls_health(request: Request):
    """Label Studio's health check."""
    return {"status": "UP", "model_class": "pixelseg", "model_version": _backend(request).version}


@router.post("/setup")
async def ls_setup(request: Request):
    """Label Studio connects a project: its labelling config is checked and mapped; its address and token are
    kept to fetch the project's task images."""
    ls, doc = _backend(request), await _json(request)
    try:
        cfg = ls.config(doc.get("schema"), request.app.state.engine.info.class_names)
    except BadRequest as exc:
        raise _problem(exc) from None
    pid = str(doc.get("project") or "").split(".", 1)[0]
    if isinstance(doc.get("hostname"), str) and doc["hostname"]:
        ls.hosts[pid] = (doc["hostname"], doc.get("access_token") if isinstance(doc.get("access_token"), str) else None)
    return {
        "model_version": ls.version,
        "labels": cfg.report(),
        "unknown_labels": cfg.unknown,
        "unlisted_classes": cfg.unlisted,
    }


@router.get("/versions")
async def ls_versions(request: Request):
    ls = _backend(request)
    return {"versions": ls.versions, "model_version": ls.version}


@router.get("/v1/label-studio")
async def ls_status(request: Request):
    """The backend's state: version served, annotations kept, retrain rounds and their outcomes."""
    return _backend(request).status()


@router.post("/predict")
async def ls_predict(request: Request):
    """One prediction per task, in the task order, in the config's brushlabels or polygonlabels. A task whose
    image cannot be fetched or decoded gets {"error": ...} (Label Studio stores no prediction for it; one log
    line); if every task fails, the first failure's 4xx."""
    state, ls, doc = request.app.state, _backend(request), await _json(request)
    tasks = doc.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise HTTPProblem(422, "predict needs 'tasks': a non-empty list of Label Studio tasks")
    if not state.ready.is_set():
        raise HTTPProblem(503, "model is still warming up", {"Retry-After": "1"})
    engine, version = state.engine, ls.version  # one consistent pair, whatever a swap does meanwhile
    try:
        cfg = ls.config(doc.get("label_config"), engine.info.class_names)
    except BadRequest as exc:
        raise _problem(exc) from None
    host, token = ls.host(doc.get("project"))
    sched, limits = state.scheduler, state.limits
    loop = asyncio.get_running_loop()
    results, failures = [], []
    for task in tasks:
        tid = task.get("id") if isinstance(task, dict) else None
        sched.admit()
        try:
            ref = image_ref(task, cfg.image_key)
            raw = await sched.run_io(fetch, ref, host, token, limits.max_upload_bytes)
            image = await sched.run_io(decode_upload, raw, limits.max_pixels, f"task {tid}'s image {ref[:120]}")
            mask, top, entropy = await loop.run_in_executor(sched.infer_pool, segment, engine, image)
            results.append(
                await sched.run_io(
                    prediction, mask, top, entropy, list(engine.info.class_names), cfg, version, ls.o.min_area
                )
            )
        except (BadRequest, HTTPProblem) as exc:
            msg = exc.message if exc.message.startswith("task ") else f"task {tid}: {exc.message}"
            log.warning("label studio predict: %s", msg)
            failures.append(HTTPProblem(exc.status, msg))
            results.append({"error": msg, "model_version": version})
        finally:
            sched.release()
    if len(failures) == len(tasks):
        raise failures[0]
    return {"results": results, "model_version": version}


@router.post("/webhook")
async def ls_webhook(request: Request):
    """Label Studio's events: annotations kept (created/updated) or forgotten (deleted); START_TRAINING starts a
    round now; every other event is acknowledged and ignored."""
    ls, doc = _backend(request), await _json(request)
    action = doc.get("action")
    if not isinstance(action, str):
        raise HTTPProblem(422, "webhook payload has no 'action' (expected e.g. ANNOTATION_CREATED)")
    if action in TRAIN_EVENTS:
        task, ann, project = doc.get("task"), doc.get("annotation"), doc.get("project")
        if (
            not isinstance(ann, dict)
            or not isinstance(task, dict)
            or "id" not in task
            or not isinstance(task.get("data"), dict)
        ):
            raise HTTPProblem(
                422,
                f"{action} payload needs 'annotation' and 'task' objects (the task with its id "
                "and data); send the webhook with its payload",
            )
        label_config = project.get("label_config") if isinstance(project, dict) else None
        try:
            cfg = ls.config(label_config, request.app.state.engine.info.class_names)
        except BadRequest as exc:
            raise _problem(exc) from None
        if not isinstance(ann.get("result", []), list):
            raise HTTPProblem(422, f"{action}: annotation.result is not a list")
        kept = ls.remember(task, ann, cfg, project.get("id") if isinstance(project, dict) else None)
        if kept:
            ls.new_since += 1
        ls._save_annotations()
        status = ls.maybe_retrain(request.app)
        ls._save_state()
        return JSONResponse({"status": "ok", "retrain": status, "model_version": ls.version}, 201)
    if action in DELETE_EVENTS:
        anns = doc.get("annotation")
        anns = anns if isinstance(anns, list) else [anns]
        n = ls.forget([a.get("id") for a in anns if isinstance(a, dict)])
        ls._save_annotations()
        return JSONResponse({"status": "ok", "forgotten": n}, 201)
    if action == "START_TRAINING":
        return JSONResponse({"status": "ok", "retrain": ls.maybe_retrain(request.app, force=True)}, 201)
    return {"status": "ignored", "action": action}


@router.post("/train")
async def ls_train(request: Request):
    """The older training call: every annotated task of the project in the body; they replace what is kept."""
    ls, doc = _backend(request), await _json(request)
    tasks = doc.get("annotations")
    if not isinstance(tasks, list):
        raise HTTPProblem(422, "train payload needs 'annotations': the list of annotated tasks")
    try:
        cfg = ls.config(doc.get("label_config"), request.app.state.engine.info.class_names)
    except BadRequest as exc:
        raise _problem(exc) from None
    for t in tasks:
        anns = (
            [a for a in (t.get("annotations") or []) if isinstance(a, dict) and not a.get("was_cancelled")]
            if isinstance(t, dict) and "id" in t and isinstance(t.get("data"), dict)
            else []
        )
        if anns:
            ls.remember(t, anns[-1], cfg)
    ls._save_annotations()
    return JSONResponse({"status": "ok", "retrain": ls.maybe_retrain(request.app, force=True)}, 201)


def attach(app, options: LSOptions, source, engine_kwargs: dict | None = None) -> Backend:
    """Add the Label Studio endpoints to a `server.create_app` app; the backend goes on app.state.ls."""
    app.state.ls = Backend(options, source, app.state.engine, engine_kwargs)
    app.include_router(router)
    app.state.endpoints.update(PATHS)  # counted by name in /metrics
    return app.state.ls
