"""pixelseg audit: confident learning on held-out fold predictions (pixelseg.inference.audit).

The scoring core is tested on probability maps of a known "good model" (the clean masks, blurred and noised)
against labels with known corruptions, which must rank first with the right kinds; the review export must
read back through each format's reader; one tiny `--folds 2` run checks the command end to end and its
bad input.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_run  # noqa: E402

from pixelseg.inference import suspects as sp  # noqa: E402
from pixelseg.cli import main  # noqa: E402
from pixelseg.labels import coco, cvat, labelstudio  # noqa: E402
from pixelseg.labels import write as pre  # noqa: E402
from pixelseg.labels.rle import coco_rle_decode, coco_rle_encode  # noqa: E402

cv2 = pytest.importorskip("cv2")
CLASSES = ["background", "dent", "scratch"]
PALETTE = [(0, 0, 0), (200, 60, 60), (60, 60, 200)]
H = W = 64
N = 24
# image -> the corruption its label gets, and the kind the audit must call it
CORRUPT = {3: ("drop", "missing_label"), 8: ("swap", "wrong_class"), 13: ("spurious", "spurious_label"),
           18: ("dilate", "boundary")}


def clean_mask(i: int) -> np.ndarray:
    """A disc (dent) on the left half and a box (scratch) on the right, at seeded places and sizes."""
    rng = np.random.default_rng(i)
    m = np.zeros((H, W), np.uint8)
    cv2.circle(m, (int(rng.integers(12, 20)), int(rng.integers(14, 50))), int(rng.integers(7, 11)), 1, -1)
    x, y = int(rng.integers(36, 44)), int(rng.integers(4, 40))
    m[y:y + int(rng.integers(10, 18)), x:x + int(rng.integers(10, 16))] = 2
    return m


def corrupt(m: np.ndarray, how: str) -> np.ndarray:
    m = m.copy()
    if how == "drop":
        m[m == 1] = 0
    elif how == "swap":
        m[m == 2] = 1
    elif how == "spurious":   # a scratch drawn where there is nothing: bottom right is always background
        m[52:62, 44:60] = 2
    elif how == "dilate":     # the dent's contour drawn 3 px outside
        m[(cv2.dilate((m == 1).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0) & (m == 0)] = 1
    return m


def model_probs(clean: np.ndarray, seed: int) -> np.ndarray:
    """What a good held-out model says: the true classes, blurred at the edges, with noise."""
    rng = np.random.default_rng(100 + seed)
    onehot = np.eye(len(CLASSES), dtype=np.float32)[clean].transpose(2, 0, 1)
    blurred = np.stack([cv2.GaussianBlur(c, (0, 0), 1.2) for c in onehot])
    logits = 5.0 * (blurred + rng.normal(0, 0.12, blurred.shape).astype(np.float32))
    e = np.exp(logits - logits.max(0))
    return e / e.sum(0)


@pytest.fixture(scope="module")
def audited():
    """(labels, probs, thresholds, suspects, scores) of the synthetic set, corruptions in."""
    cleans = [clean_mask(i) for i in range(N)]
    labels = [corrupt(m, CORRUPT[i][0]) if i in CORRUPT else m for i, m in enumerate(cleans)]
    probs = [model_probs(m, i) for i, m in enumerate(cleans)]
    th = sp.Thresholds(len(CLASSES))
    for p, lab in zip(probs, labels):
        th.add(p, lab)
    t = th.values()
    bg = sp.background_ids(CLASSES)
    sus = [sp.find_suspects(p, lab, t, bg) for p, lab in zip(probs, labels)]
    scores = [sp.label_quality(s, lab.size) for s, lab in zip(sus, labels)]
    return labels, probs, t, sus, scores


def test_thresholds_are_mean_self_confidence_and_confident_class_uses_them():
    probs = np.array([[[0.9, 0.6]], [[0.1, 0.4]]], np.float32)     # 2 classes, 1×2 image
    label = np.array([[0, 1]], np.uint8)
    th = sp.Thresholds(2)
    th.add(probs, label)
    th.add(probs, np.array([[0, 255]], np.uint8))                    # ignore_index is left out
    np.testing.assert_allclose(th.values(), [0.9, 0.4])
    # pixel 0: p0 0.9 >= 0.9 -> class 0; pixel 1: p0 0.6 < 0.9 but p1 0.4 >= 0.4 -> class 1 (not the argmax)
    np.testing.assert_array_equal(sp.confident_class(probs, th.values()), [[0, 1]])
    assert np.isinf(sp.Thresholds(3).values()).all()                # no labelled pixels: never confident


def test_corrupted_labels_rank_first(audited):
    _, _, _, _, scores = audited
    order = [int(i) for i in np.argsort(scores, kind="stable")]
    assert set(order[:len(CORRUPT)]) == set(CORRUPT), (order[:6], [round(scores[i], 3) for i in order[:6]])
    assert min(scores[i] for i in range(N) if i not in CORRUPT) > max(scores[i] for i in CORRUPT) + 0.01


def test_each_corruption_gets_its_kind_and_place(audited):
    labels, _, _, sus, _ = audited
    for i, (how, kind) in CORRUPT.items():
        top = sus[i][0]                                              # the heaviest suspect region
        assert top.kind == kind, (i, how, [(s.kind, s.area) for s in sus[i]])
        changed = labels[i] != clean_mask(i)
        region = top.mask(H, W)
        iou = (region & changed).sum() / (region | changed).sum()
        assert iou > (0.4 if kind == "boundary" else 0.7), (i, iou)
    assert CLASSES[sus[8][0].given] == "dent" and CLASSES[sus[8][0].suggested] == "scratch"
    clean_kinds = {s.kind for i in range(N) if i not in CORRUPT for s in sus[i]}
    assert clean_kinds <= {"boundary"}, clean_kinds                 # a clean image has at most edge fuzz


@pytest.mark.parametrize("fmt", ["coco", "cvat", "labelstudio"])
def test_review_export_reads_back_through_the_format_reader(tmp_path, audited, fmt):
    _, _, _, sus, scores = audited
    (tmp_path / "images").mkdir()
    bg = sp.background_ids(CLASSES)
    items, want = [], {}
    for i in CORRUPT:
        path = tmp_path / "images" / f"img{i}.png"
        cv2.imwrite(str(path), np.full((H, W, 3), 128, np.uint8))
        regions = sp.suspect_regions(CLASSES, sus[i], bg, H, W)
        items.append(pre.ImageRegions(path, H, W, regions, scores[i], 1 - scores[i]))
        want[f"img{i}"] = regions
    files = pre.write(fmt, items, CLASSES, PALETTE, tmp_path, model_version="pixelseg-audit",
                      attributes={"kind": list(sp.KINDS), "given": CLASSES[1:], "suggested": CLASSES})
    if fmt == "labelstudio":   # what the tool exports once a reviewer accepts the suggestions
        tasks = json.loads(files[0].read_text())
        assert tasks[0]["predictions"][0]["result"][0]["meta"]["text"][0].startswith("kind: ")
        for t in tasks:
            t["annotations"] = [{"result": t.pop("predictions")[0]["result"]}]
        exported = tmp_path / "export"
        exported.mkdir()
        (exported / "project.json").write_text(json.dumps(tasks))
        shutil.copy(files[1], exported / "config.xml")
        shutil.copytree(tmp_path / "images", exported / "images")
        back = labelstudio.read(exported)
    else:
        back = {"coco": coco.read, "cvat": cvat.read}[fmt](files[0])
    if fmt == "coco":
        anns = json.loads(files[0].read_text())["annotations"]
        assert {a["attributes"]["kind"] for a in anns} == {k for _, k in CORRUPT.values()}
    if fmt == "cvat":
        assert "<values>missing_label" in files[0].read_text() and 'name="kind">' in files[0].read_text()
    got = {it.name: it for it in back.items}
    assert set(got) == set(want)
    for name, regions in want.items():
        it = got[name]
        assert len(it.shapes) == len(regions)
        for shape, r in zip(sorted(it.shapes, key=lambda s: -_area(s.rle)), sorted(regions, key=lambda r: -_area(r.rle))):
            assert back.class_names[shape.class_id] == r.label
            a = coco_rle_decode(shape.rle, H, W)
            b = coco_rle_decode(r.rle, H, W)
            assert (a & b).sum() / (a | b).sum() > 0.85


def _area(rle) -> int:
    return int(coco_rle_decode(rle, rle["size"][0], rle["size"][1]).sum())


# ---- end to end: a tiny --folds 2 run on a COCO export ------------------------------------------------
def _coco_dataset(root: Path, n: int = 12, swap_class: bool = False) -> None:
    """n 48×48 images with a dent and a scratch, as a one-file COCO export (_annotations.coco.json)."""
    root.mkdir(parents=True)
    items = []
    for i in range(n):
        m = cv2.resize(clean_mask(i), (48, 48), interpolation=cv2.INTER_NEAREST)
        img = np.array(PALETTE, np.uint8)[m] + np.random.default_rng(i).integers(0, 40, (48, 48, 3), dtype=np.uint8)
        path = root / f"img{i:02d}.png"
        cv2.imwrite(str(path), img)
        regions = []
        for k in (1, 2):
            if (m == k).any():
                regions.append(pre.Region(CLASSES[k], coco_rle_encode(m == k), 1.0))
        items.append(pre.ImageRegions(path, 48, 48, regions, 1.0, 0.0))
    names = ["background", "dent", "crack"] if swap_class else CLASSES
    if swap_class:
        for it in items:
            for r in it.regions:
                r.label = names[CLASSES.index(r.label)]
    pre.write("coco", items, names, PALETTE, root, shapes="mask")
    (root / "annotations.coco.json").rename(root / "_annotations.coco.json")


@pytest.fixture(scope="module")
def folds_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("audit_e2e")
    _coco_dataset(base / "data")
    run = base / "run"
    assert main(["train", *tiny_run(dataset="coco", data_root=base / "data", limit=None, epochs=1, folds=2,
                                    run_dir=run)]) == 0
    return base, run


def test_audit_command_end_to_end(folds_run, capsys):
    base, run = folds_run
    assert main(["audit", str(run), "--top", "3"]) == 0
    out = run / "audit"
    report = json.loads((out / "audit.json").read_text())
    assert report["held_out"] is True and report["images"] == 12
    folds = {r["name"]: r["fold"] for r in report["ranking"]}
    csv_folds = dict(line.split(",")[1:] for line in (run / "folds.csv").read_text().split("\n")[1:] if line)
    assert {n: str(f) for n, f in folds.items()} == {n: f for n, f in csv_folds.items()}   # the held-out fold scored it
    scores = [r["score"] for r in report["ranking"]]
    assert scores == sorted(scores) and all(0 <= s <= 1 for s in scores)
    lines = (out / "audit.csv").read_text().splitlines()
    assert lines[0].startswith("rank,image,split,name,fold,score,regions,n_missing_label") and len(lines) == 13
    assert sorted(p.name[:4] for p in (out / "overlays").iterdir()) == ["001_", "002_", "003_"]
    assert not (out / "overlays.partial").exists()
    review = out / "review" / "annotations.coco.json"          # a COCO dataset's own format
    beside = base / "data" / "review.json"                      # read where the tool has the images
    shutil.copy(review, beside)
    try:
        back = coco.read(beside)
    finally:
        beside.unlink()
    flagged = {r["name"] for r in report["ranking"] if r["regions"]}
    assert {it.name for it in back.items} == flagged
    assert "audited 12 images of coco (each by the fold model that held it out)" in capsys.readouterr().out


def test_plain_run_warns_and_still_audits(folds_run, tmp_path, caplog):
    _, run = folds_run
    with caplog.at_level("WARNING", logger="pixelseg"):
        assert main(["audit", str(run / "fold_0"), "--out", str(tmp_path / "a"), "--top", "1", "--format", "none"]) == 0
    assert "is not a `train --folds K` run" in caplog.text and "its one model trained on" in caplog.text
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert report["held_out"] is False and report["images"] > 0 and not (tmp_path / "a" / "review").exists()


def test_bad_input_is_one_line_and_exit_2(folds_run, tmp_path, capsys):
    base, run = folds_run
    _coco_dataset(tmp_path / "other", swap_class=True)
    assert main(["audit", str(run), "--data-root", str(tmp_path / "other"), "--out", str(tmp_path / "o1")]) == 2
    err = _error(capsys)
    assert "classes (background, dent, scratch) differ" in err
    _coco_dataset(tmp_path / "fewer", n=8)
    assert main(["audit", str(run), "--data-root", str(tmp_path / "fewer"), "--out", str(tmp_path / "o2")]) == 2
    err = _error(capsys)
    assert "folds.csv: " in err and "of its 12 images are not in dataset" in err
    (base / "data").rename(base / "moved")
    try:
        assert main(["audit", str(run), "--out", str(tmp_path / "o3")]) == 2
        err = _error(capsys)
        assert "the data has moved" in err and "--data-root" in err
    finally:
        (base / "moved").rename(base / "data")
    assert main(["audit", str(run), "--top", "-1", "--out", str(tmp_path / "o4")]) == 2
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3", "o4"))   # nothing written


def _error(capsys) -> str:
    """The one error line (stderr also carries the log's info lines, e.g. the reader's report)."""
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("pixelseg audit: error: ")]
    assert len(errors) == 1, errors
    return errors[0]
