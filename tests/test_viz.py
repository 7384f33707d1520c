"""Figures: which validation images the epoch figure shows, legends, epoch ticks."""
import numpy as np
from PIL import Image

from pixelseg.core import viz


def test_samples_cover_the_classes_and_spread_across_the_split():
    # 100 images: every one shows class 0; class 1 only in images 40-44, class 2 only in image 90
    masks = [np.zeros((8, 8), np.uint8) for _ in range(100)]
    for i in range(40, 45):
        masks[i][:2] = 1
    masks[90][-1] = 2
    idx = viz.pick_samples(masks, 3, 3)
    assert len(idx) == 3 and 90 in idx and any(40 <= i < 45 for i in idx)
    # with nothing to tell images apart, the picks lie far apart instead of being the first three
    same = [np.zeros((8, 8), np.uint8) for _ in range(300)]
    idx = viz.pick_samples(same, 3, 3)
    assert len(set(idx)) == 3 and min(np.diff(idx)) >= 60
    assert viz.pick_samples(same[:2], 5, 3) == [0, 1] and viz.pick_samples([], 3, 3) == []


def test_overlay_legend_names_the_classes_present(tmp_path):
    img = np.full((60, 200, 3), 120, np.uint8)
    mask = np.zeros((60, 200), np.uint8)
    mask[:, 100:] = 2
    out = viz.with_legend(img, mask, [(0, 0, 0), (0, 255, 0), (255, 255, 255)], ["bg", "grass", "snow"])
    assert out.shape[1] == 200 and out.shape[0] > 60 and np.array_equal(out[:60], img)
    strip = out[60:]
    colours = {tuple(c) for c in strip.reshape(-1, 3)}
    assert (255, 255, 255) in colours and (0, 255, 0) not in colours   # snow drawn, grass absent
    assert (64, 64, 64) in colours          # swatch outlines: the white class is visible on the strip


def test_figures_have_legend_for_ignored_pixels_and_integer_epochs(tmp_path):
    imgs = np.zeros((2, 16, 16, 3), np.uint8)
    true = np.zeros((2, 16, 16), np.uint8)
    true[:, :4] = 255
    viz.prediction_grid(imgs, true, true.clip(0, 1), [(0, 0, 0), (255, 255, 255)], tmp_path / "g.png", "t",
                        ["background", "foreground"])
    with Image.open(tmp_path / "g.png") as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert ((px == viz.IGNORE_COLOR).all(1)).sum() > 0  # ignored pixels drawn in the grid ...
    handles = viz.legend_handles(["background", "foreground"], [(0, 0, 0), (255, 255, 255)], with_ignore=True)
    assert [h.get_label() for h in handles][-1] == viz.IGNORE_LABEL  # ... and named in the legend
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_miou": 0.1 * e, "val_miou": 0.1 * e}
               for e in (1, 2)]
    import matplotlib.pyplot as plt
    captured = {}
    real_close = plt.close
    plt.close = lambda fig=None: captured.setdefault("fig", fig) or real_close(fig)
    try:
        viz.training_curves(history, tmp_path / "c.png")
    finally:
        plt.close = real_close
    ticks = [t for t in captured["fig"].axes[0].get_xticks() if 1 <= t <= 2]
    assert ticks and all(float(t).is_integer() for t in ticks)
    real_close(captured["fig"])


def test_grey_png_is_read_back_exactly_by_pil_as_an_l_image():
    import io
    rng = np.random.default_rng(0)
    mask = np.zeros((375, 500), np.uint8)
    mask[100:300, 50:400] = 1
    mask[200:220] = 2
    for arr in (mask, rng.integers(0, 256, (1, 1), dtype=np.uint8), rng.integers(0, 256, (7, 3), dtype=np.uint8),
                rng.integers(0, 256, (2, 1001), dtype=np.uint8)):
        for level in (1, 6):
            data = viz.png_bytes(arr, compress_level=level)
            img = Image.open(io.BytesIO(data))
            img.load()  # checks every CRC and the zlib stream
            assert img.mode == "L" and img.size == arr.shape[::-1]
            assert np.array_equal(np.asarray(img), arr)
    # palette and RGB PNGs are still PIL's
    assert Image.open(io.BytesIO(viz.png_bytes(mask, [(0, 0, 0), (255, 0, 0), (0, 255, 0)]))).mode == "P"
    assert Image.open(io.BytesIO(viz.png_bytes(np.zeros((4, 5, 3), np.uint8)))).mode == "RGB"
