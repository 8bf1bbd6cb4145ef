"""The analytic MAC count agrees with torch's FlopCounterMode and with the paper's conventions."""
import pytest
import torch

from workbench.flops import count_macs, measure_macs
from workbench.models import create_model


@pytest.mark.parametrize("name, overrides", [
    ("vit-3x64", {}),
    ("mvmoe-3x64-e4k1", {}),
    ("mvmoe-3x96-e4k2", {"per_layer_routers": True}),
    ("vmoe-4x64-e4k2", {}),
    ("vmoe-4x64-e4k2", {"eval_capacity_ratio": 0.3}),  # tokens dropped
])
def test_analytic_macs_match_flop_counter_within_2_percent(name, overrides):
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.inference_mode():
        routing = model(x, return_routing=True).routing
        measured = measure_macs(model, x)
    analytic = count_macs(model, x.shape, routing=routing)["active"]
    assert abs(analytic - measured) / measured < 0.02
    if overrides.get("eval_capacity_ratio") == 0.3:
        assert sum(r.dropped_assignments for r in routing) > 0


def test_attention_is_counted():
    parts = count_macs(create_model("vit-12x192"), (1, 28, 28))["breakdown"]
    T, D = 50, 192
    assert parts["attention"] == 12 * (4 * T * D * D + 2 * T * T * D)


def test_per_image_moe_k1_costs_the_dense_model_plus_the_router():
    dense = count_macs(create_model("vit-12x192"), (1, 28, 28))["active"]
    moe = count_macs(create_model("mvmoe-12x192-e10k1"), (1, 28, 28))
    assert moe["active"] == pytest.approx(dense, rel=0.01)
    assert moe["active"] - dense == 192 * 10  # one router on the image summary
    assert moe["dense"] == dense


def test_active_parameters_count_only_the_chosen_experts_per_image():
    moe = count_macs(create_model("mvmoe-6x96-e4k1"), (1, 28, 28))
    expert = 2 * 96 * 384 + 384 + 96
    assert moe["params_total"] - moe["params_active"] == 2 * 3 * expert  # 2 MoE layers x 3 idle experts


def test_per_token_routing_touches_more_parameters_than_per_image():
    tok = count_macs(create_model("vmoe-6x96-e4k1"), (1, 28, 28))
    img = count_macs(create_model("mvmoe-6x96-e4k1"), (1, 28, 28))
    assert tok["params_active"] > img["params_active"]


def test_lower_k_costs_less():
    model = create_model("mvmoe-6x96-e4k2")
    k2 = count_macs(model, (1, 28, 28))["active"]
    model.set_routing(top_k=1)
    assert count_macs(model, (1, 28, 28))["active"] < k2


def test_wrong_input_shape_is_rejected():
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(create_model("vit-2x64"), (3, 28, 28))
