"""Run by tests/test_openvino.py in a child process (see there why). OpenVINO backend: export (fp32 and NNCF int8) behind the parity gate on a real split, predict parity,
a model that fails the gate is refused with nothing written, and the ONNX Runtime fallback when
OpenVINO cannot compile. The split is the synthetic dataset's val split (ground-truth masks included)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

openvino = pytest.importorskip("openvino", reason="openvino not installed: pip install 'pixelseg[openvino]'")

from pixelseg.cli import main  # noqa: E402
from pixelseg.core.errors import PixelsegError  # noqa: E402
from pixelseg.inference.openvino import OpenVinoModel, compile_failure, export_openvino  # noqa: E402

from _fakes import fake_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fake_checkpoint(tmp_path_factory.mktemp("ov") / "model.pt", size=32)


@pytest.fixture(scope="module")
def fp32(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ov_fp32") / "model.xml"
    return export_openvino(ckpt, out, check_limit=8)


def test_fp32_export_passes_the_gate_and_predict_matches_pytorch(ckpt, fp32, tmp_path):
    out = fp32["out"]
    for suffix in (".xml", ".bin", ".onnx"):  # the IR, its weights, and the fp32 ONNX fallback
        assert Path(out).with_suffix(suffix).is_file(), suffix
    assert fp32["agreement"] >= 0.995 and fp32["worst_image_agreement"] >= 0.98 and fp32["images"] == 8
    assert abs(fp32["miou_change"]) <= 0.005
    # fp32 as exported, also where OpenVINO's CPU default would be bf16 (AMX / AVX-512-BF16 machines)
    assert OpenVinoModel(out).compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (41, 57, 3), dtype=np.uint8)).save(photo)
    assert main(["predict", out, str(photo), "--out", str(tmp_path / "ov")]) == 0  # auto: .xml is openvino
    assert main(["predict", str(ckpt), str(photo), "--out", str(tmp_path / "pt"), "--precision", "fp32"]) == 0
    ov_mask = np.array(Image.open(tmp_path / "ov" / "photo.png"))
    pt_mask = np.array(Image.open(tmp_path / "pt" / "photo.png"))
    assert ov_mask.shape == (41, 57) and (ov_mask == pt_mask).mean() >= 0.999


def test_int8_export_is_compared_with_fp32_on_the_split(ckpt, tmp_path):
    out = tmp_path / "int8.xml"
    r = export_openvino(ckpt, out, int8=True, calibration_split="train", calibration_images=8, check_limit=8,
                        thresholds={"min_agreement": 0.9, "min_image_agreement": 0.8, "max_miou_drop": 0.05})
    assert out.is_file() and r["precision"] == "int8" and r["calibration_images"] == 8
    # measured, not assumed: int8 masks against fp32 PyTorch on every image of the split
    assert 0.9 <= r["agreement"] <= 1.0 and r["images"] == 8 and "miou" in r
    ops = {op.get_type_name() for op in openvino.Core().read_model(str(out)).get_ordered_ops()}
    assert "FakeQuantize" in ops or "FakeConvert" in ops  # really quantized
    # smaller weights than the fp32 export's
    assert out.with_suffix(".bin").stat().st_size < 0.5 * out.with_suffix(".onnx").stat().st_size


def test_an_export_that_fails_the_gate_is_refused_and_nothing_is_written(ckpt, tmp_path):
    out = tmp_path / "refused.xml"
    with pytest.raises(PixelsegError, match="fails the gate") as e:
        export_openvino(ckpt, out, int8=True, calibration_images=4, check_limit=4,
                        thresholds={"min_agreement": 1.01})  # unattainable: forces the refusal
    msg = str(e.value)
    assert "nothing written" in msg and "--int8-ignore" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .xml, .bin, .onnx, nor the temporary folder


def test_the_suggested_ignored_scope_names_the_stem_and_the_layer_that_makes_the_logits(fp32):
    from pixelseg.inference.openvino import CONV_TYPES, sensitive_layers
    model = openvino.Core().read_model(fp32["out"])
    names = sensitive_layers(model)
    by_name = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    assert len(names) == 2 and all(by_name[n].get_type_name() in CONV_TYPES for n in names)
    # U-Net's head is a transposed conv: nothing conv-like lies between it and the output
    assert by_name[names[1]].get_type_name() == "ConvolutionBackpropData"
    seen, todo = set(), [op for op in model.get_ordered_ops() if op.get_friendly_name() == names[1]]
    while todo:
        node = todo.pop()
        for out in node.outputs():
            for target in out.get_target_inputs():
                nxt = target.get_node()
                assert nxt.get_type_name() not in CONV_TYPES, nxt.get_friendly_name()
                if nxt.get_friendly_name() not in seen:
                    seen.add(nxt.get_friendly_name())
                    todo.append(nxt)


def test_int8_ignore_groups_name_the_ends_and_the_encoder(fp32):
    from pixelseg.inference.openvino import CONV_TYPES, resolve_ignored, sensitive_layers
    model = openvino.Core().read_model(fp32["out"])
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in CONV_TYPES]
    ends = resolve_ignored(model, ["ends"])
    assert ends == sensitive_layers(model)
    enc = resolve_ignored(model, ["encoder", "extra_name"])
    encoder_convs = [n for n in convs if n.startswith("/encoder/")]
    assert encoder_convs and set(encoder_convs) <= set(enc) and set(ends) <= set(enc) and "extra_name" in enc
    decoder_convs = [n for n in convs if n not in encoder_convs and n not in ends]
    assert decoder_convs and not set(decoder_convs) & set(enc)  # the decoder stays int8


def test_a_failed_compile_falls_back_to_onnxruntime_in_one_line(fp32, capsys):
    model = OpenVinoModel(fp32["out"], probe=lambda path: "the compile probe ended with signal 11")
    err = capsys.readouterr().err.strip()
    assert model.backend == "onnxruntime (fallback)" and err.count("\n") == 0
    assert "falling back to ONNX Runtime" in err and "signal 11" in err
    x = torch.rand(2, 3, 32, 32)
    direct = OpenVinoModel(fp32["out"])
    assert direct.backend == "openvino"
    assert (model(x).argmax(1) == direct(x).argmax(1)).float().mean() >= 0.999


def test_the_compile_probe_survives_a_crashing_child(fp32, monkeypatch):
    """A compile that kills its process (as on some virtualised AMD CPUs) is reported, not fatal."""
    from pixelseg.inference import openvino as openvino_backend
    monkeypatch.setattr(openvino_backend, "PROBE", "import os; os.abort()")
    monkeypatch.setattr(openvino_backend, "_probed", {})
    reason = compile_failure(fp32["out"])
    assert reason is not None and "signal" in reason


def test_evaluate_scores_the_openvino_export_like_the_checkpoint(ckpt, fp32, tmp_path):
    from pixelseg.inference.evaluate import evaluate
    ov = evaluate(ckpt, limit=8, backend="openvino", exported=fp32["out"], out_dir=tmp_path / "ov", progress=False,
                  precision="fp32")
    pt = evaluate(ckpt, limit=8, out_dir=tmp_path / "pt", progress=False, precision="fp32")
    assert ov["images"] == pt["images"] == 8
    assert abs(ov["miou"] - pt["miou"]) <= 0.005 and abs(ov["pixel_acc"] - pt["pixel_acc"]) <= 0.005
    with pytest.raises(PixelsegError, match="--exported"):
        evaluate(ckpt, limit=8, backend="openvino", out_dir=tmp_path / "x", progress=False)
