"""Export never destroys a checkpoint: every output is checked before any work, and written whole or not at all."""
from __future__ import annotations

import pytest
import torch

from workbench import export
from workbench.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from workbench.models import create_model

pytest.importorskip("onnxruntime")


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit-2x32", num_classes=6, img_size=16, in_chans=1, patch_size=4).eval()
    save_checkpoint(tmp_path / "ckpt", model, {"preset": "vit-2x32", "dataset": "synthetic",
                                               "classes": list("abcdef"), "metrics": {"test_accuracy": 0.5}})
    return tmp_path / "ckpt"


def _refused(argv, capsys, message):
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err       # one clear line


@pytest.mark.parametrize("target, message", [
    ("model.safetensors", "give a .onnx file"),
    ("model.onnx", "lies inside the checkpoint or run folder"),
])
def test_an_output_inside_the_checkpoint_is_refused_and_the_weights_survive(ckpt, capsys, target, message):
    before = sha256_file(ckpt / "model.safetensors")
    _refused([str(ckpt), "--out", str(ckpt / target), "--no-check"], capsys, message)
    assert sha256_file(ckpt / "model.safetensors") == before and not (ckpt / "model.onnx").exists()
    load_checkpoint(ckpt)


def test_an_hf_dir_that_is_another_checkpoint_or_the_source_is_refused(ckpt, tmp_path, capsys):
    other = tmp_path / "other"
    save_checkpoint(other, create_model("vit-2x32", num_classes=6, img_size=16, in_chans=1, patch_size=4),
                    {"preset": "vit-2x32", "dataset": "synthetic", "classes": list("abcdef")})
    before = sha256_file(other / "model.safetensors")
    out = str(tmp_path / "m.onnx")
    _refused([str(ckpt), "--out", out, "--hf-dir", str(other), "--no-check"], capsys, "not an earlier export")
    _refused([str(ckpt), "--out", out, "--hf-dir", str(ckpt), "--no-check"], capsys, "is the checkpoint being exported")
    assert sha256_file(other / "model.safetensors") == before and not (tmp_path / "m.onnx").exists()


def test_an_earlier_export_is_replaced_only_when_asked(ckpt, tmp_path, capsys):
    argv = [str(ckpt), "--out", str(tmp_path / "m.onnx"), "--hf-dir", str(tmp_path / "hf"), "--no-check"]
    assert export.main(argv) == 0
    assert (tmp_path / "hf" / "model.onnx").exists() and export.is_earlier_export(tmp_path / "hf")
    capsys.readouterr()
    _refused(argv, capsys, "already exists; add --replace")
    assert export.main(argv + ["--replace"]) == 0


def test_a_failed_export_leaves_no_half_file(ckpt, tmp_path, capsys, monkeypatch):
    def broken(model, path, shape):
        path.write_bytes(b"half an onnx graph")
        raise export.ExportError("torch.onnx.export failed: simulated")

    monkeypatch.setattr(export, "export_onnx", broken)
    _refused([str(ckpt), "--out", str(tmp_path / "m.onnx"), "--no-check"], capsys, "simulated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("n", ["0", "-5", "many"])
def test_the_number_of_check_images_must_be_positive(ckpt, tmp_path, capsys, n):
    with pytest.raises(SystemExit) as e:
        export.main([str(ckpt), "--out", str(tmp_path / "m.onnx"), "--check-images", n])
    assert e.value.code == 2 and "must be a whole number >= 1" in capsys.readouterr().err
