"""The next-to-label list (pixelseg.inference.label_next, `pixelseg audit --unlabelled`): audit suspects and unlabelled
images merged into one ranking, written in each tool's format and read back through that format's reader.

Synthetic: the suspects are those of test_audit's corrupted masks (a known good model's probabilities); the
unlabelled images are probability maps of that model, sharp (an easy photo) or mixed with the uniform
distribution (a photo the model is unsure of).
"""
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_audit import CLASSES, CORRUPT, PALETTE, H, W, N, audited, folds_run, model_probs, clean_mask  # noqa: E402,F401

from pixelseg.inference import label_next as nx  # noqa: E402
from pixelseg.cli import main  # noqa: E402
from pixelseg.labels import coco, cvat, labelstudio  # noqa: E402
from pixelseg.labels.rle import coco_rle_decode  # noqa: E402

cv2 = pytest.importorskip("cv2")
UNSURE = {"new_unsure_a": 0.8, "new_unsure_b": 0.5, "new_sure": 0.0}   # share of uniform mixed in


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((H, W, 3), 128, np.uint8))
    return path


@pytest.fixture()
def next_items(tmp_path, audited):
    """(suspect items, unlabelled items) with image files under tmp_path/images."""
    labels, _, _, sus, scores = audited
    suspects = []
    for i in range(N):
        item = nx.suspect_item(_image(tmp_path / "images" / f"img{i}.png"), H, W, scores[i], sus[i], CLASSES,
                               labels[i]) if sus[i] else None
        if item is not None:
            suspects.append(item)
    unlabelled = []
    for k, (name, mix) in enumerate(UNSURE.items()):
        p = model_probs(clean_mask(50 + k), 50 + k) ** 4          # sharper than the auditing model: a good photo
        p = (1 - mix) * p / p.sum(0) + mix / len(CLASSES)
        unlabelled.append(nx.unlabelled_item(_image(tmp_path / "images" / f"{name}.png"), p, CLASSES))
    return suspects, unlabelled


def test_merged_list_ranks_both_kinds_by_one_scale(next_items):
    suspects, unlabelled = next_items
    names = {Path(s.name).stem for s in suspects}
    assert {f"img{i}" for i in CORRUPT} <= names          # every corrupted label is on the list ...
    assert len(names) <= len(CORRUPT) + 2                 # ... and hardly any clean one
    merged = nx.merge(suspects, unlabelled)
    prio = [n.priority for n in merged]
    assert prio == sorted(prio, reverse=True)
    assert {n.source for n in merged} == {"suspect", "unlabelled"} and len(merged) == len(suspects) + 3
    order = [Path(n.name).stem for n in merged]
    # the model's doubt orders the new images; a wrong label outranks a photo the model segments well
    assert order.index("new_unsure_a") < order.index("new_unsure_b") < order.index("new_sure")
    assert order.index("img3") < order.index("new_sure") and order.index("img8") < order.index("new_sure")
    # same order as predict's uncertainty ranking among the new images
    new = [n for n in merged if n.source == "unlabelled"]
    assert [n.uncertainty for n in new] == sorted((n.uncertainty for n in new), reverse=True)
    sure = next(n for n in new if n.name.endswith("new_sure.png"))
    assert 0 < sure.priority < 0.1 and len(sure.item.regions) == 2   # the dent and the scratch, pre-annotated
    assert all(r.attributes == {"kind": "prediction"} for r in sure.item.regions)
    assert [n.name for n in nx.merge(suspects, unlabelled, top=3)] == [n.name for n in merged[:3]]


@pytest.mark.parametrize("fmt", ["coco", "cvat", "labelstudio"])
def test_next_list_reads_back_through_each_format_reader(tmp_path, audited, next_items, fmt):
    labels = audited[0]
    merged = nx.merge(*next_items)
    out = tmp_path          # beside images/, where the readers look for them
    files = nx.write_next(merged, fmt, CLASSES, PALETTE, out)
    rows = list(csv.DictReader(open(out / "next.csv")))
    assert [r["image"] for r in rows] == [n.name for n in merged] and rows[0]["rank"] == "1"
    assert json.loads((out / "next.json").read_text())[0]["source"] == merged[0].source
    if fmt == "labelstudio":   # what Label Studio exports once a person accepts the regions shown
        tasks = json.loads(files[2].read_text())
        assert [t["data"]["next_rank"] for t in tasks] == list(range(1, len(merged) + 1))
        assert [t["data"]["next_source"] for t in tasks] == [n.source for n in merged]
        suspect = next(t for t in tasks if t["data"]["next_source"] == "suspect")   # the label as it is, to fix
        assert suspect["annotations"][0]["result"] and "annotations" not in tasks[[n.source for n in merged].index("unlabelled")]
        current = tmp_path / "current"
        current.mkdir()
        (current / "project.json").write_text(json.dumps([suspect]))
        shutil.copy(files[3], current / "config.xml")
        shutil.copytree(tmp_path / "images", current / "images")
        i = int(Path(suspect["data"]["image"]).stem[3:])
        have = labelstudio.read(current).items[0]
        for k in (1, 2):
            a = np.zeros((H, W), bool)
            for s in have.shapes:
                if s.class_id == k:
                    a |= coco_rle_decode(s.rle, H, W)
            assert (a ^ (labels[i] == k)).sum() < 0.02 * H * W
        for t in tasks:
            t["annotations"] = [{"result": t.pop("predictions")[0]["result"]}]
        exported = tmp_path / "export"
        exported.mkdir()
        (exported / "project.json").write_text(json.dumps(tasks))
        shutil.copy(files[3], exported / "config.xml")
        shutil.copytree(tmp_path / "images", exported / "images")
        back = labelstudio.read(exported)
    else:
        doc = files[2].read_text()
        if fmt == "coco":
            images = json.loads(doc)["images"]
            assert [im["next_source"] for im in images] == [n.source for n in merged]
            kinds = {a["attributes"]["kind"] for a in json.loads(doc)["annotations"]}
            assert "prediction" in kinds and "missing_label" in kinds
        else:
            assert "<values>missing_label" in doc and "prediction</values>" in doc
            assert doc.index('name="new_unsure_a.png"') < doc.index('name="new_sure.png"')
        back = {"coco": coco.read, "cvat": cvat.read}[fmt](files[2])
    got = {it.name: it for it in back.items}
    assert set(got) == {Path(n.name).stem for n in merged}
    for n in merged:
        it = got[Path(n.name).stem]
        assert len(it.shapes) == len(n.item.regions)
        want = np.zeros((H, W), bool)
        for r in n.item.regions:
            want |= coco_rle_decode(r.rle, H, W)
        have = np.zeros((H, W), bool)
        for s in it.shapes:
            have |= coco_rle_decode(s.rle, H, W)
        assert (want & have).sum() / (want | have).sum() > 0.85


def test_audit_unlabelled_end_to_end(folds_run, tmp_path, capsys):
    base, run = folds_run
    new = tmp_path / "new"
    for i in range(3):   # new photos: what the data looks like, not in the dataset
        m = cv2.resize(clean_mask(60 + i), (48, 48), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(_image(new / f"new{i}.png")), np.array(PALETTE, np.uint8)[m])
    out = tmp_path / "a"   # with a labelled image named too: audited, not listed twice
    assert main(["audit", str(run), "--out", str(out), "--top", "1", "--format", "cvat", "--unlabelled", str(new),
                 "--unlabelled", str(base / "data" / "img00.png")]) == 0
    rows = list(csv.DictReader(open(out / "next" / "next.csv")))
    report = json.loads((out / "audit.json").read_text())
    flagged = sum(r["regions"] > 0 for r in report["ranking"])
    assert sorted(Path(r["image"]).name for r in rows if r["source"] == "unlabelled") == [f"new{i}.png" for i in range(3)]
    assert sum(r["source"] == "suspect" for r in rows) <= flagged
    prio = [float(r["priority"]) for r in rows]
    assert prio == sorted(prio, reverse=True)
    tool = tmp_path / "tool"   # the CVAT task: the listed images, and the list imported beside them
    (tool / "images").mkdir(parents=True)
    for r in rows:
        shutil.copy(r["image"], tool / "images")
    shutil.copy(out / "next" / "annotations.xml", tool)
    back = cvat.read(tool / "annotations.xml")
    assert len(back.items) == len(rows)
    assert "next to label: " in capsys.readouterr().out
    # the dataset's own images, named as unlabelled: one line, exit 2, nothing written
    assert main(["audit", str(run), "--out", str(tmp_path / "b"), "--unlabelled", str(base / "data")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("pixelseg audit: error: ")]
    assert len(err) == 1 and "are labelled images of the run's dataset" in err[0]
    # COCO names images by file name: a new image named like a labelled one cannot share the list
    shutil.copy(base / "data" / "img00.png", new / "img00.png")
    assert main(["audit", str(run), "--out", str(tmp_path / "c"), "--format", "coco", "--unlabelled", str(new)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("pixelseg audit: error: ")]
    assert len(err) == 1 and "share the file name img00.png" in err[0]
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_label_quality_counts_the_heaviest_region_whole_and_the_rest_at_a_quarter():
    from pixelseg.inference import suspects as sp
    one = [sp.Suspect("missing_label", 0, 1, 1000, [0, 0, 1, 1], 0.95, 0.9)]                 # a pet left out
    many = [sp.Suspect("boundary", 1, 0, 200, [0, 0, 1, 1], 0.7, 0.6) for _ in range(10)]   # blur along edges
    assert sp.label_quality(one, 10_000) == pytest.approx(1 - 900 / 10_000)
    assert sp.label_quality(many, 10_000) == pytest.approx(1 - (120 + 0.25 * 9 * 120) / 10_000)
    assert sp.label_quality(one, 10_000) < sp.label_quality(many, 10_000)   # a plain sum (1200 > 900) would not say so
    assert sp.label_quality([], 10_000) == 1.0 and sp.label_quality(one, 0) == 1.0
