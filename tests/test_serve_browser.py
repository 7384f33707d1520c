"""The `pixelseg serve` page in a real browser: Debian's chromium driven by Playwright uploads a real
pet photo to a small model trained on real pets, and the overlay must show the model's mask in the
classes' colours. Skips, saying why, without chromium, Playwright or the pets sample."""
import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="pixelseg[serve] extra not installed")
pytest.importorskip("playwright", reason="playwright (python) not installed: pip install playwright")
import httpx  # noqa: E402

from pixelseg.cli import main  # noqa: E402
from pixelseg.inference.serving import Engine  # noqa: E402

from test_serve import running  # noqa: E402
from conftest import tiny_run

# Debian's package; Playwright's own browser download cannot work offline
CHROMIUM = os.environ.get("PIXELSEG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--headless"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install chromium (or set PIXELSEG_CHROMIUM) "
                    "to run the browser test")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def pets_run(pets_root, tmp_path_factory):
    """A small but real model: U-Net/MobileNetV2 trained briefly on real pets (it marks pets, roughly)."""
    run = tmp_path_factory.mktemp("browser") / "pets"
    assert main(["train", *tiny_run(dataset=None, data_root=pets_root, limit=48, epochs=3, image_size=64,
                                    batch_size=16, lr=3e-3, run_dir=run)]) == 0
    return run


def open_and_segment(browser, url, photo: Path, screenshot: Path | None = None):
    """Open the page, upload `photo`, wait for the overlay; returns (page, overlay RGB array)."""
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    page.goto(url + "/")
    page.wait_for_function("document.body.dataset.state === 'ready'", timeout=60_000)
    page.set_input_files("#file", str(photo))
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=120_000)
    assert page.evaluate("document.body.dataset.state") == "done", page.inner_text("#status")
    data_url = page.evaluate("document.getElementById('overlay').toDataURL('image/png')")
    overlay = np.array(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))
    if screenshot:
        page.screenshot(path=str(screenshot))
    return page, overlay


def test_page_shows_the_mask_over_a_real_pet_photo(browser, pets_run, pets_root, tmp_path):
    photo = sorted((pets_root / "images").glob("*.jpg"))[0]
    engine = Engine(pets_run)
    with running(engine) as url:
        expected = np.array(Image.open(io.BytesIO(httpx.post(url + "/v1/predict", content=photo.read_bytes()).content)))
        page, overlay = open_and_segment(browser, url, photo, tmp_path / "page.png")
        w, h = Image.open(photo).size
        assert overlay.shape == (h, w, 3) == (*expected.shape, 3)  # drawn at the photo's own resolution
        palette = np.array(engine.info.palette, np.uint8)
        pet = expected == engine.info.class_names.index("pet")
        assert 0.01 < pet.mean() < 0.99  # the model marks a pet, not nothing and not everything
        # where the model puts the pet the canvas has the pet colour; everywhere it has the class colours
        assert (overlay[pet] == palette[0]).all()
        np.testing.assert_array_equal(overlay, palette[expected])
        # and the pet colour sits on the pet: overlap with the photo's true pet pixels (trimap value 1);
        # this small model reaches IoU 0.3-0.7 on the first photos, a blind one ~0.1
        trimap = np.array(Image.open(pets_root / "annotations" / "trimaps" / f"{photo.stem}.png"))
        shown = (overlay == palette[0]).all(-1)
        true_pet = trimap == 1
        assert (shown & true_pet).sum() / (shown | true_pet).sum() > 0.2
        legend = page.locator("#legend li")
        assert legend.count() == 3
        names = [legend.nth(i).locator(".name").inner_text() for i in range(3)]
        assert names == ["pet", "background", "border"]
        pct = legend.nth(0).locator(".pct").inner_text()
        assert pct == f"{100 * pet.mean():.1f}%"
        assert "round trip" in page.inner_text("#latency")
        page.fill("#opacity", "20")
        page.dispatch_event("#opacity", "input")
        assert page.evaluate("getComputedStyle(document.getElementById('overlay')).opacity") == "0.2"
        assert page.locator("#uncertainty-box").is_hidden()  # no dropout in a U-Net: no toggle
        error_photo = tmp_path / "notes.jpg"
        error_photo.write_bytes(b"not a photo at all")
        page.set_input_files("#file", str(error_photo))
        page.wait_for_function("document.body.dataset.state === 'error'", timeout=60_000)
        assert "not an image format" in page.inner_text("#status")
        page.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_uncertainty_toggle_for_a_bayesian_segnet(browser, pets_root, tmp_path):
    """MC-dropout models get a toggle that swaps the mask for the entropy heatmap (random weights
    suffice: this checks the page, not the model)."""
    from _fakes import fake_checkpoint
    ckpt = fake_checkpoint(tmp_path / "bayes.pt", "bayesian_segnet", "mobilenet_v2", upsample="nearest")
    photo = sorted((pets_root / "images").glob("*.jpg"))[1]
    with running(Engine(ckpt)) as url:
        page, _ = open_and_segment(browser, url, photo)
        assert page.locator("#uncertainty-box").is_visible()
        assert page.locator("#uncertainty-layer").is_hidden() and page.locator("#overlay").is_visible()
        page.check("#uncertainty")  # re-segments the same photo with uncertainty=true
        page.wait_for_function("document.body.dataset.state === 'done' && "
                               "getComputedStyle(document.getElementById('uncertainty-layer')).display === 'block'",
                               timeout=120_000)
        assert page.locator("#overlay").is_hidden()
        assert "mean entropy" in page.inner_text("#status")
        data_url = page.evaluate("document.getElementById('uncertainty-layer').toDataURL('image/png')")
        heat = np.array(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))
        w, h = Image.open(photo).size
        assert heat.shape == (h, w, 3) and heat.std() > 0  # a heatmap at the photo's size, not a blank canvas
        page.close()


def test_a_phone_photo_is_drawn_upright_under_its_mask(browser, pets_root, tmp_path):
    """A JPEG stored landscape with EXIF Orientation 6 (a phone held upright): the page draws it upright
    and the overlay, at the upright size, is the server's mask for the upright photo."""
    from _fakes import fake_checkpoint
    from test_serve_exif import UPRIGHT, with_orientation
    ckpt = fake_checkpoint(tmp_path / "model.pt")
    stored = np.array(Image.open(sorted((pets_root / "images").glob("*.jpg"))[0]).convert("RGB"))
    phone = tmp_path / "phone.jpg"
    phone.write_bytes(with_orientation(stored, 6))
    engine = Engine(ckpt)
    with running(engine) as url:
        expected = np.array(Image.open(io.BytesIO(httpx.post(url + "/v1/predict", content=phone.read_bytes()).content)))
        page, overlay = open_and_segment(browser, url, phone)
        h, w = stored.shape[:2]
        assert expected.shape == (w, h) and overlay.shape == (w, h, 3)  # portrait: as the phone showed it
        np.testing.assert_array_equal(overlay, np.array(engine.info.palette, np.uint8)[expected])
        data_url = page.evaluate("document.getElementById('photo').toDataURL('image/png')")
        drawn = np.array(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))
        upright = np.array(Image.open(phone).convert("RGB").transpose(UPRIGHT[6]))
        assert np.abs(drawn.astype(int) - upright).mean() < 3  # the browser's JPEG decoder may round differently
        page.close()
