"""Phone photos upright: `predict` and `serve` segment a photo as its EXIF Orientation shows it (the
mask is for the image as people see it), and keep the stored pixel grid only when asked."""
import io

import numpy as np
import pytest
from PIL import Image

from pixelseg.cli import main
from pixelseg.data.io import read_image

from _fakes import fake_checkpoint

# EXIF Orientation -> the PIL transpose that shows the stored pixels upright (EXIF 2.3, table of tag 274)
UPRIGHT = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90,
           5: Image.Transpose.TRANSPOSE}


def stored_photo(h=30, w=52) -> np.ndarray:
    """Not symmetric under any turn or flip: a gradient plus a bright block in one corner."""
    yy, xx = np.mgrid[:h, :w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], -1).astype(np.uint8)
    arr[:8, :12] = 255
    return arr


def with_orientation(arr, orientation, fmt="JPEG") -> bytes:
    """Image bytes whose EXIF says `orientation` (what a phone held upright writes: 6)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt,orientation", [("JPEG", 6), ("JPEG", 3), ("PNG", 8), ("PNG", 5)])
def test_read_image_turns_photos_upright_only_when_asked(tmp_path, fmt, orientation):
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(with_orientation(stored_photo(), orientation, fmt))
    stored = read_image(path)  # datasets: the grid their masks label
    upright = read_image(path, exif_transpose=True)
    expected = np.array(Image.fromarray(stored).transpose(UPRIGHT[orientation]))
    np.testing.assert_array_equal(upright, expected)
    assert stored.shape == (30, 52, 3)
    assert upright.shape == ((52, 30, 3) if orientation in (5, 6, 8) else (30, 52, 3))
    assert not np.array_equal(upright, stored) or orientation == 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fake_checkpoint(tmp_path_factory.mktemp("exif") / "model.pt")


def _predict_mask(ckpt, image, out, *flags) -> np.ndarray:
    assert main(["predict", str(ckpt), str(image), "--out", str(out), "--precision", "fp32", *flags]) == 0
    return np.array(Image.open(out / f"{image.stem}.png"))


def test_predict_segments_the_photo_as_people_see_it(ckpt, tmp_path):
    rotated = tmp_path / "phone.jpg"
    rotated.write_bytes(with_orientation(stored_photo(), 6))
    stored = read_image(rotated)
    upright_file = tmp_path / "upright.png"  # the same pixels, turned and saved without EXIF
    Image.fromarray(stored).transpose(UPRIGHT[6]).save(upright_file)
    plain_file = tmp_path / "plain.png"
    Image.fromarray(stored).save(plain_file)

    mask = _predict_mask(ckpt, rotated, tmp_path / "default")
    assert mask.shape == (52, 30)  # portrait, as the phone showed it
    np.testing.assert_array_equal(mask, _predict_mask(ckpt, upright_file, tmp_path / "ref"))
    overlay = Image.open(tmp_path / "default" / "phone_overlay.png")
    assert overlay.size[0] >= 30 and overlay.size[1] >= 52  # the overlay (with its legend) is upright too

    kept = _predict_mask(ckpt, rotated, tmp_path / "kept", "--keep-exif-grid")
    assert kept.shape == (30, 52)
    np.testing.assert_array_equal(kept, _predict_mask(ckpt, plain_file, tmp_path / "ref2"))


def test_serve_turns_uploads_upright_by_default(ckpt, tmp_path):
    pytest.importorskip("fastapi", reason="pixelseg[serve] extra not installed")
    import httpx
    from test_serve import running
    from pixelseg.inference.serving import Engine
    data = with_orientation(stored_photo(), 6)
    stored = read_image(io.BytesIO(data), name="upload")
    upright_png, plain_png = io.BytesIO(), io.BytesIO()
    Image.fromarray(stored).transpose(UPRIGHT[6]).save(upright_png, "PNG")
    Image.fromarray(stored).save(plain_png, "PNG")
    engine = Engine(ckpt, precision="fp32")

    def mask(u, body, query=""):
        r = httpx.post(u + "/v1/predict" + query, content=body, timeout=120)  # a loaded machine is slow, not wrong
        assert r.status_code == 200, r.text
        return np.array(Image.open(io.BytesIO(r.content)))

    with running(engine) as u:
        got = mask(u, data)
        assert got.shape == (52, 30)
        np.testing.assert_array_equal(got, mask(u, upright_png.getvalue()))
        body = httpx.post(u + "/v1/predict?format=json", content=data, timeout=120).json()
        assert body["exif_transposed"] is True and (body["width"], body["height"]) == (30, 52)
        kept = mask(u, data, "?keep_exif_grid=true")
        assert kept.shape == (30, 52)
        np.testing.assert_array_equal(kept, mask(u, plain_png.getvalue()))
        assert httpx.get(u + "/v1/model").json()["exif_transpose"] is True

    with running(engine, keep_exif_grid=True) as u:  # the server option: stored grid unless a request asks
        assert mask(u, data).shape == (30, 52)
        assert httpx.post(u + "/v1/predict?format=json", content=data, timeout=120).json()["exif_transposed"] is False
        assert mask(u, data, "?keep_exif_grid=false").shape == (52, 30)
