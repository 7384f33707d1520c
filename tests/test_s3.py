"""Shards in S3-compatible object storage, against a real S3 server (moto's server mode) on 127.0.0.1.

The server runs in a thread of the test process; training reads it over HTTP as it would AWS or MinIO
(endpoint and keys from the standard AWS_* variables). A small HTTP front in between answers the first
requests with 503 or 403 to check the retry policy: transient errors retried, auth errors not.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

s3fs = pytest.importorskip("s3fs", reason="s3fs not installed (pip install 'pixelseg[s3]')")
moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed: no S3 server to test against")

from pixelseg.core.checkpoint import load_checkpoint  # noqa: E402
from pixelseg.cli import main  # noqa: E402
from pixelseg.data.shards_write import write_shards  # noqa: E402
from pixelseg.data.synthetic import write_folder  # noqa: E402
from pixelseg.training.train import train  # noqa: E402
from _fakes import write_id_folder  # noqa: E402
from _s3server import fault_front, moto_s3  # noqa: E402
from conftest import tiny_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUN = {"image_size": 16, "batch_size": 4, "epochs": 1, "weights": "none", "device": "cpu", "figure_samples": 0,
       "precision": "fp32", "workers": 2, "seed": 0, "deterministic": True}
TRAIN = ["train", *tiny_run(dataset="shards", limit=None, image_size=16, batch_size=4, epochs=1, device="cpu",
                            figure_samples=0, workers=0)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with bucket `pixelseg-test` and the AWS_* environment pointing at it."""
    try:
        server = moto_s3("pixelseg-test")
        env = server.__enter__()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"moto S3 server did not start on 127.0.0.1: {exc}")
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"])
    root = tmp_path_factory.mktemp("folder")
    write_folder(root, 22, (24, 24), seed=4)
    local = tmp_path_factory.mktemp("local-shards")
    for split in ("train", "val"):
        write_shards("folder", root, split, local, maxcount=4, progress=False)
    yield {"fs": fs, "root": root, "local": local, "endpoint": env["AWS_ENDPOINT_URL"]}
    server.__exit__(None, None, None)


def _write(s3, prefix: str):
    for split in ("train", "val"):
        assert main(["shards", "--dataset", "folder", "--data-root", str(s3["root"]), "--split", split,
                     "--out", prefix, "--maxcount", "4"]) == 0
    return prefix


def test_train_from_s3_equals_training_from_local_shards(s3, tmp_path, capsys):
    url = _write(s3, "s3://pixelseg-test/folder/")
    assert "to s3://pixelseg-test/folder/" in capsys.readouterr().out
    names = sorted(p.rsplit("/", 1)[1] for p in s3["fs"].ls("pixelseg-test/folder"))
    assert names == sorted(p.name for p in s3["local"].iterdir())  # the same shards and indexes
    a = train({**RUN, "dataset": "shards", "data_root": str(s3["local"]), "run_dir": str(tmp_path / "local")})
    b = train({**RUN, "dataset": "shards", "data_root": url, "run_dir": str(tmp_path / "s3")})
    ca, cb = load_checkpoint(tmp_path / "local" / "last.pt"), load_checkpoint(tmp_path / "s3" / "last.pt")
    assert ca["global_step"] == cb["global_step"] == 5  # 18 training samples in batches of 4
    assert cb["config"]["data_root"] == url  # a URL is recorded as given, not made a local path
    assert [h["train_loss"] for h in ca["history"]] == [h["train_loss"] for h in cb["history"]]
    assert [h["val_miou"] for h in ca["history"]] == [h["val_miou"] for h in cb["history"]]
    assert a["skipped_files"] == b["skipped_files"] == []
    assert main(["evaluate", str(tmp_path / "s3")]) == 0  # reads the recorded s3:// root back


def test_two_ranks_read_every_s3_sample_once(s3, tmp_path):
    from test_shards import _RANK  # the exactly-once check of local shards, here over S3
    url = "s3://pixelseg-test/ids/"
    root = write_id_folder(tmp_path / "ids", 14)
    write_shards("folder", root, "train", url, maxcount=3, progress=False)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(r), url, str(tmp_path / f"r{r}.json")],
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    res = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    assert sorted(res[0]["ids"] + res[1]["ids"]) == list(range(14))
    assert len(res[0]["sizes"]) == len(res[1]["sizes"]) == res[0]["planned"]


def test_damaged_and_missing_shards_are_named_and_skipped(s3, tmp_path):
    url = _write(s3, "s3://pixelseg-test/damaged/")
    fs = s3["fs"]
    data = fs.cat_file("pixelseg-test/damaged/train-000001.tar")
    fs.pipe_file("pixelseg-test/damaged/train-000001.tar", data[: len(data) // 2])
    fs.rm_file("pixelseg-test/damaged/train-000003.tar")
    summary = train({**RUN, "dataset": "shards", "data_root": url, "run_dir": str(tmp_path / "run")})
    skipped = summary["skipped_files"]
    assert url + "train-000003.tar" in skipped and url + "train-000001.tar" in skipped
    assert all(s.startswith((url + "train-000001.tar", url + "train-000003.tar")) for s in skipped)
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"{url}train-000003.tar: cannot open the shard (not found); its samples are skipped" in log
    assert f"{url}train-000001.tar: shard is truncated or corrupt" in log
    assert load_checkpoint(tmp_path / "run" / "last.pt")["global_step"] == 5  # the planned steps still run


def test_empty_prefix_and_missing_bucket_are_one_line_errors(s3, tmp_path, capsys):
    s3["fs"].pipe_file("pixelseg-test/stray/readme.txt", b"not shards")
    for root, expect in [("s3://pixelseg-test/nothing-here/", "s3://pixelseg-test/nothing-here/: no shards; write "
                                                               "shards there with `pixelseg shards --out"),
                         ("s3://pixelseg-test/stray/", "s3://pixelseg-test/stray/: no shards"),
                         ("s3://no-such-bucket-x/ds/", "s3://no-such-bucket-x/ds/train.json: bucket does not exist")]:
        assert main([*TRAIN, "--data-root", root, "--run-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert expect in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_unreachable_endpoint_is_one_line_naming_the_url(s3, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert main([*TRAIN, "--data-root", "s3://pixelseg-test/folder/", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("pixelseg train: error: s3://pixelseg-test/folder/train.json: cannot reach the endpoint "
                          "http://127.0.0.1:")
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.pt"))


@pytest.fixture
def front(s3, monkeypatch):
    """The S3 server behind a FaultFront (tests/_s3server.py); AWS_ENDPOINT_URL points at the front."""
    with fault_front(s3["endpoint"]) as (handler, url):
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        yield handler


def test_transient_errors_are_retried_with_backoff(s3, front):
    from pixelseg.data.shards import read_index
    _write(s3, "s3://pixelseg-test/retry/")
    front.seen = 0
    read_index("s3://pixelseg-test/retry/", "train")
    clean = front.seen  # s3fs: HEAD then GET
    front.fail, front.status, front.seen = 2, 503, 0
    index, urls, counts = read_index("s3://pixelseg-test/retry/", "train")
    # two 503 SlowDown, then the answers: the two failed requests again, nothing more
    assert front.seen == clean + 2 and sum(counts) == index["count"] == 18


def test_a_run_through_a_503_succeeds_with_one_extra_request(s3, front, tmp_path, capsys):
    url = _write(s3, "s3://pixelseg-test/retry-run/")
    front.fail, front.seen = 0, 0
    assert main([*TRAIN, "--data-root", url, "--run-dir", str(tmp_path / "clean")]) == 0
    clean = front.seen
    front.fail, front.status, front.seen = 1, 503, 0  # the run's first request answered 503 SlowDown
    assert main([*TRAIN, "--data-root", url, "--run-dir", str(tmp_path / "retried")]) == 0
    assert front.seen == clean + 1  # that one request again, nothing else repeated
    a, b = load_checkpoint(tmp_path / "clean" / "last.pt"), load_checkpoint(tmp_path / "retried" / "last.pt")
    assert a["global_step"] == b["global_step"] == 5
    assert "error" not in capsys.readouterr().err


def test_a_503_that_persists_ends_after_the_attempts_budget(s3, front, tmp_path, capsys, monkeypatch):
    url = _write(s3, "s3://pixelseg-test/down/")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    front.fail, front.status, front.seen = 10**6, 503, 0
    assert main([*TRAIN, "--data-root", url, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"pixelseg train: error: {url}train.json: the endpoint stayed unavailable ("), err
    assert "through 3 attempts with backoff; try again later, or raise AWS_MAX_ATTEMPTS" in err
    assert front.seen == 3  # AWS_MAX_ATTEMPTS requests in all, then the error


def test_wrong_credentials_fail_at_once_without_a_retry_storm(s3, front, tmp_path, capsys):
    _write(s3, "s3://pixelseg-test/auth/")
    front.fail, front.status, front.seen = 10**6, 403, 0
    assert main([*TRAIN, "--data-root", "s3://pixelseg-test/auth/", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    # s3fs asks with HEAD first, and a 403 answer to HEAD has no body (as from AWS): the status is the cause
    assert "s3://pixelseg-test/auth/train.json: access denied (Forbidden); check AWS_ACCESS_KEY_ID" in err
    assert "testing" not in err  # the key itself is never printed
    assert front.seen <= 2  # one request (s3fs may ask twice: HEAD then GET), never the retry budget


def test_another_datasets_shards_are_refused_naming_the_shard(s3, tmp_path, capsys):
    url = _write(s3, "s3://pixelseg-test/mixed/")
    # writing another dataset's classes into the prefix is refused up front
    assert main(["shards", "--dataset", "synthetic", "--limit", "4", "--out", url]) == 2
    err = capsys.readouterr().err
    assert "--out s3://pixelseg-test/mixed/" in err and "holds shards of folder with other classes" in err
    # a shard copied in by hand under a listed name is refused when read, naming it
    other = tmp_path / "other"
    write_shards("synthetic", None, "train", other, limit=4, progress=False)
    s3["fs"].put_file(str(other / "train-000000.tar"), "pixelseg-test/mixed/train-000002.tar")
    assert main([*TRAIN, "--data-root", url, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("pixelseg train: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err  # refused when read (a worker), one line
    assert f"{url}train-000002.tar: a shard of synthetic with other classes (background, object, edge)" in errors[0]


def test_s3fs_is_imported_only_for_s3_urls(s3):
    code = ("import sys; from pixelseg.data import load_split; "
            f"ds = load_split('shards', {str(s3['local'])!r}, 'train', 8); next(iter(ds.iter_samples())); "
            "assert 's3fs' not in sys.modules and 'botocore' not in sys.modules, 'imported eagerly'")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_missing_s3fs_says_how_to_install(monkeypatch):
    from pixelseg.data import remote
    from pixelseg.core.errors import PixelsegError
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed
    with pytest.raises(PixelsegError, match=r"s3:// URLs need s3fs: pip install 'pixelseg\[s3\]'"):
        remote.read_bytes("s3://pixelseg-test/folder/train.json")
