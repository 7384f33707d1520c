"""Downloads and extraction against a local HTTP server (with Range support); no real network."""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelseg.data.download import (
    PETS_URLS,
    data_home,
    download_file,
    ensure_oxford_pet,
    extract_archive,
)
from pixelseg.core.errors import PixelsegError

NAMES = ["Abyssinian_1", "Bengal_2", "american_bulldog_3"]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pets_archives() -> dict[str, bytes]:
    """Tiny images.tar.gz / annotations.tar.gz in the official layout (3 images)."""
    rng = np.random.default_rng(0)
    images, annotations = {}, {}
    lines = []
    for i, name in enumerate(NAMES):
        rgb = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        images[f"images/{name}.jpg"] = _encode(rgb, "JPEG")
        trimap = np.full((12, 16), 2, dtype=np.uint8)  # 1 pet, 2 background, 3 border
        trimap[3:9, 4:12] = 3
        trimap[4:8, 5:11] = 1
        annotations[f"annotations/trimaps/{name}.png"] = _encode(trimap, "PNG")
        lines.append(f"{name} {i + 1} {1 + (i == 2)} {i + 1}")
    annotations["annotations/list.txt"] = ("\n".join(lines) + "\n").encode()
    annotations["annotations/trainval.txt"] = ("\n".join(lines[:2]) + "\n").encode()
    annotations["annotations/test.txt"] = (lines[2] + "\n").encode()
    # Big enough that "half of it" is a real partial download of the gzip stream.
    images["images/padding.bin"] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return {"images.tar.gz": _tar_gz(images), "annotations.tar.gz": _tar_gz(annotations)}


class _Server:
    """Serves ``files`` over HTTP; records each request's path and Range header."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range = False
        self.truncate = False  # send half the body, then hang up
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[name]
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if match and not outer.ignore_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.truncate:
                    body = body[: len(body) // 2]
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def server(pets_archives):
    srv = _Server()
    srv.files.update(pets_archives)
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """A proxy set in the environment must not intercept the localhost server."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def pets_urls(server, pets_archives):
    return [(server.url(n), _md5(pets_archives[n]))
            for n in ("images.tar.gz", "annotations.tar.gz")]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pets_urls_match_torchvision():
    datasets = pytest.importorskip("torchvision.datasets")
    assert [tuple(r) for r in PETS_URLS] == [tuple(r) for r in
                                             datasets.OxfordIIITPet._RESOURCES]


def test_data_home_respects_env_and_defaults_to_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELSEG_DATA", str(tmp_path / "custom" / "place"))
    assert data_home() == tmp_path / "custom" / "place"
    assert (tmp_path / "custom" / "place").is_dir()

    monkeypatch.delenv("PIXELSEG_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_home() == tmp_path / "home" / ".cache" / "pixelseg"
    assert data_home().is_dir()


def test_ensure_oxford_pet_downloads_extracts_then_reuses(tmp_path, monkeypatch, server,
                                                          pets_urls):
    monkeypatch.setenv("PIXELSEG_DATA", str(tmp_path))
    root = ensure_oxford_pet(urls=pets_urls, progress=False)

    assert root == tmp_path / "oxford-iiit-pet"
    assert sorted(p.stem for p in (root / "images").glob("*.jpg")) == sorted(NAMES)
    for name in NAMES:
        with Image.open(root / "annotations" / "trimaps" / f"{name}.png") as trimap:
            assert set(np.unique(np.array(trimap))) == {1, 2, 3}
        with Image.open(root / "images" / f"{name}.jpg") as image:
            assert image.size == (16, 12)
    assert (root / "annotations" / "trainval.txt").read_text().split()[0] == NAMES[0]
    # archives kept, no .part or temporary extraction folders left behind
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == [
        "annotations.tar.gz", "images.tar.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "oxford-iiit-pet"]
    assert [r[1] for r in server.requests] == [None, None]

    seen = len(server.requests)
    assert ensure_oxford_pet(urls=pets_urls, progress=False) == root
    assert len(server.requests) == seen  # complete layout: no network at all


def test_download_file_present_with_right_md5_needs_no_network(tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"payload")
    url = f"http://127.0.0.1:{_closed_port()}/file.bin"  # would fail if contacted
    assert download_file(url, dest, md5=_md5(b"payload"), progress=False) == dest
    assert download_file(url, dest, progress=False) == dest


def test_download_file_redownloads_when_present_file_is_wrong(tmp_path, server,
                                                              pets_archives):
    data = pets_archives["images.tar.gz"]
    dest = tmp_path / "images.tar.gz"
    dest.write_bytes(b"stale")
    download_file(server.url("images.tar.gz"), dest, md5=_md5(data), progress=False)
    assert dest.read_bytes() == data


def test_resume_sends_range_and_result_is_identical(tmp_path, server, pets_archives):
    data = pets_archives["images.tar.gz"]
    half = len(data) // 2
    dest = tmp_path / "images.tar.gz"
    part = tmp_path / "images.tar.gz.part"
    part.write_bytes(data[:half])

    download_file(server.url("images.tar.gz"), dest, md5=_md5(data), progress=False)

    assert server.requests == [("images.tar.gz", f"bytes={half}-")]
    assert dest.read_bytes() == data
    assert not part.exists()


def test_restarts_cleanly_when_server_ignores_range(tmp_path, server, pets_archives):
    data = pets_archives["images.tar.gz"]
    server.ignore_range = True
    dest = tmp_path / "images.tar.gz"
    (tmp_path / "images.tar.gz.part").write_bytes(b"x" * (len(data) // 2))  # not a prefix

    download_file(server.url("images.tar.gz"), dest, md5=_md5(data), progress=False)

    assert server.requests[0][1] is not None  # it did ask to resume...
    assert dest.read_bytes() == data  # ...but took the 200 body from byte 0


def test_complete_part_file_is_finished_after_416(tmp_path, server, pets_archives):
    data = pets_archives["annotations.tar.gz"]
    dest = tmp_path / "annotations.tar.gz"
    (tmp_path / "annotations.tar.gz.part").write_bytes(data)
    download_file(server.url("annotations.tar.gz"), dest, md5=_md5(data), progress=False)
    assert dest.read_bytes() == data
    assert server.requests == [("annotations.tar.gz", f"bytes={len(data)}-")]  # no re-fetch


def test_interrupted_download_keeps_part_and_next_call_resumes(tmp_path, server,
                                                               pets_archives):
    data = pets_archives["images.tar.gz"]
    dest = tmp_path / "images.tar.gz"
    part = tmp_path / "images.tar.gz.part"
    server.truncate = True
    with pytest.raises(PixelsegError, match="could not download .*images.tar.gz"):
        download_file(server.url("images.tar.gz"), dest, md5=_md5(data), progress=False)
    assert not dest.exists()
    assert part.read_bytes() == data[: len(data) // 2]

    server.truncate = False
    download_file(server.url("images.tar.gz"), dest, md5=_md5(data), progress=False)
    assert server.requests[-1][1] == f"bytes={len(data) // 2}-"
    assert dest.read_bytes() == data


def test_md5_mismatch_names_both_and_leaves_nothing(tmp_path, server, pets_archives):
    data = pets_archives["images.tar.gz"]
    url = server.url("images.tar.gz")
    dest = tmp_path / "images.tar.gz"
    wrong = "0" * 32
    with pytest.raises(PixelsegError) as info:
        download_file(url, dest, md5=wrong, progress=False)
    message = str(info.value)
    assert url in message and wrong in message and _md5(data) in message
    assert list(tmp_path.iterdir()) == []


def test_offline_fails_with_pixelseg_error_naming_target(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELSEG_DATA", str(tmp_path))
    url = f"http://127.0.0.1:{_closed_port()}/images.tar.gz"
    with pytest.raises(PixelsegError) as info:
        ensure_oxford_pet(urls=[(url, None)], timeout=2, progress=False)
    message = str(info.value)
    assert message.startswith(f"could not download {url} (")
    assert str(tmp_path / "oxford-iiit-pet") in message
    assert "--data-root" in message
    assert not (tmp_path / "oxford-iiit-pet").exists()


def test_unresponsive_server_times_out_into_pixelseg_error(tmp_path):
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/f.bin"
        with pytest.raises(PixelsegError, match="timed out"):
            download_file(url, tmp_path / "f.bin", timeout=0.3, progress=False)
    assert not (tmp_path / "f.bin").exists()


def test_download_false_does_not_touch_network(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXELSEG_DATA", str(tmp_path))
    with pytest.raises(PixelsegError, match="not found in .*oxford-iiit-pet"):
        ensure_oxford_pet(download=False)


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_archive_leaves_no_partial_extraction(tmp_path, pets_archives, kind):
    data = pets_archives["images.tar.gz"]
    archive = tmp_path / "images.tar.gz"
    archive.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"not an archive" * 9)
    out = tmp_path / "out"
    with pytest.raises(PixelsegError, match=re.escape(str(archive))) as info:
        extract_archive(archive, out)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.tar.gz"]


def test_corrupt_archive_via_ensure_creates_no_dataset_dir(tmp_path, monkeypatch, server,
                                                           pets_archives):
    monkeypatch.setenv("PIXELSEG_DATA", str(tmp_path))
    server.files["images.tar.gz"] = pets_archives["images.tar.gz"][:300]
    urls = [(server.url("images.tar.gz"), None)]
    with pytest.raises(PixelsegError, match="cannot extract"):
        ensure_oxford_pet(urls=urls, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads"]


def test_unsafe_tar_member_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(_tar_gz({"../escaped.txt": b"boom"}))
    with pytest.raises(PixelsegError, match="cannot extract"):
        extract_archive(archive, tmp_path / "sub" / "out")
    assert not (tmp_path / "sub" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_extract_merges_into_existing_dir_and_handles_zip(tmp_path):
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / "a").mkdir()
    (out / "a" / "old.txt").write_text("old")
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/new.txt", "new")
    assert extract_archive(archive, out) == out
    assert (out / "keep").is_dir()  # other entries kept
    assert (out / "a" / "new.txt").read_text() == "new"
    assert not (out / "a" / "old.txt").exists()  # same-named entry replaced, not mixed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "out"]


def test_given_incomplete_root_is_reported_and_left_untouched(tmp_path, server, pets_urls):
    (tmp_path / "images").mkdir()
    with pytest.raises(PixelsegError) as info:
        ensure_oxford_pet(tmp_path, urls=pets_urls, progress=False)
    message = str(info.value)
    assert str(tmp_path) in message and "annotations/trimaps/" in message
    assert "images/ and" not in message.split("lacks")[1].split(":")[0]  # images/ is there
    assert [p.name for p in tmp_path.iterdir()] == ["images"]
    assert server.requests == []

    with pytest.raises(PixelsegError, match="does not exist"):
        ensure_oxford_pet(tmp_path / "nope", urls=pets_urls)


def test_given_parent_of_dataset_gets_a_hint(tmp_path):
    (tmp_path / "pets" / "images").mkdir(parents=True)
    (tmp_path / "pets" / "annotations" / "trimaps").mkdir(parents=True)
    hint = f"did you mean --data-root {tmp_path / 'pets'}"
    with pytest.raises(PixelsegError, match=re.escape(hint)):
        ensure_oxford_pet(tmp_path)
    assert ensure_oxford_pet(str(tmp_path / "pets")) == tmp_path / "pets"


def test_given_root_real_sample_is_accepted():
    sample = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford-iiit-pet-sample"
    if not sample.is_dir():
        pytest.skip(f"real Oxford-IIIT Pet sample not found at {sample}")
    assert ensure_oxford_pet(sample, download=False) == sample
