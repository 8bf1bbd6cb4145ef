"""Export: ONNX keeps every expert and matches PyTorch in onnxruntime; the Hugging Face-style folder loads back."""
from __future__ import annotations

import json

import pytest
import torch

from workbench.export import (ExportError, check_all_experts_in_graph, export_onnx, onnx_parity, verify_export,
                              write_hf_folder)
from workbench.models import create_model
from workbench.models.experts import Experts

pytest.importorskip("onnxruntime")
SHAPE = (1, 16, 16)


def _model(preset: str, **kw):
    torch.manual_seed(0)
    return create_model(preset, num_classes=6, img_size=16, in_chans=1, patch_size=4, **kw).eval()


def _inputs_for_every_expert(model, n: int = 256) -> torch.Tensor:
    x = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1)) * 3
    with torch.inference_mode():
        first = model(x, return_routing=True).routing[0].experts[:, 0]
    used = sorted(set(first.tolist()))
    assert used == list(range(model.cfg.num_experts)), f"random inputs reach only experts {used}"
    return x


@pytest.mark.parametrize("shape", [(5, 7, 8), (9, 8)])
def test_the_gathered_dispatch_equals_the_sorted_one(shape):
    torch.manual_seed(0)
    ex = Experts(4, 8, 16)
    x = torch.randn(*shape)
    experts = torch.randint(0, 4, (shape[0], 2))
    weights, kept = torch.rand(shape[0], 2), torch.rand(shape[0], 2) > 0.3
    torch.testing.assert_close(ex.forward_gathered(x, experts, weights, kept), ex(x, experts, weights, kept))


def test_a_per_image_moe_exports_with_every_expert_and_matches_on_images_routed_to_each(tmp_path):
    model = _model("mvmoe-2x32-e4k1")
    path = export_onnx(model, tmp_path / "m.onnx", SHAPE)
    assert check_all_experts_in_graph(model, path) == 2               # both MoE blocks, all 4 experts each
    x = _inputs_for_every_expert(model)
    r = onnx_parity(model, path, x)
    assert r["agreement"] == 1.0 and r["max_abs_diff"] <= 1e-4


def test_a_graph_specialised_to_one_expert_is_caught(tmp_path):
    """The known trap: a graph that runs one expert for every image agrees on some images, never on all."""
    import copy

    model = _model("mvmoe-2x32-e4k1")
    one_expert = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in one_expert.named_parameters():
            if ".experts." in name:
                p.copy_(p[:1].expand_as(p))           # every expert computes what expert 0 computes
    path = export_onnx(one_expert, tmp_path / "one.onnx", SHAPE)
    with pytest.raises(ExportError, match="disagrees"):
        verify_export(model, path, torch.randn(8, *SHAPE), SHAPE)


def test_a_dense_model_exports_and_matches(tmp_path):
    model = _model("vit-2x32")
    path = export_onnx(model, tmp_path / "d.onnx", SHAPE)
    r = onnx_parity(model, path, torch.randn(64, *SHAPE))
    assert r["agreement"] == 1.0 and r["max_abs_diff"] <= 1e-4


def test_the_hf_folder_is_a_checkpoint_with_a_model_card(tmp_path):
    from workbench.checkpoint import load_checkpoint, save_checkpoint
    from workbench.flops import count_macs

    model = _model("mvmoe-2x32-e4k1")
    macs = count_macs(model, SHAPE)
    save_checkpoint(tmp_path / "ckpt", model, {"preset": "mvmoe-2x32-e4k1", "dataset": "synthetic",
                                               "classes": list("abcdef"), "metrics": {"test_accuracy": 0.5},
                                               "macs": macs})
    out = write_hf_folder(tmp_path / "ckpt", tmp_path / "hf", {"images": 10, "agreement": 1.0, "max_abs_diff": 0.0})
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "mvmoe" and config["id2label"]["0"] == "a"
    readme = (out / "README.md").read_text()
    assert "50.00 %" in readme and "load_checkpoint" in readme and "ONNX" in readme
    loaded, _ = load_checkpoint(out)
    x = torch.randn(3, *SHAPE)
    torch.testing.assert_close(loaded(x), model(x))


def test_a_per_token_moe_exports_and_matches_with_capacity_drops(tmp_path):
    model = _model("vmoe-2x32-e4k2", moe_layers=[1])
    model.set_routing(eval_capacity_ratio=0.5)          # tight buffers: some tokens are dropped
    x = torch.randn(16, *SHAPE)
    with torch.inference_mode():
        assert model(x, return_routing=True).routing[0].dropped_assignments > 0
    path = export_onnx(model, tmp_path / "t.onnx", SHAPE)
    assert check_all_experts_in_graph(model, path) == 1
    r = onnx_parity(model, path, x)
    assert r["agreement"] == 1.0 and r["max_abs_diff"] <= 1e-4
