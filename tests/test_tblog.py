"""TensorBoard mirror: metrics.jsonl records become scalars that TensorBoard's own reader reads back."""
from __future__ import annotations

from workbench.tblog import TensorBoardMirror, scalars_of


def _read_scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_eval_and_routing_records_are_readable_by_tensorboard(tmp_path):
    log = TensorBoardMirror(tmp_path)
    log.write({"type": "train", "step": 10, "loss": 2.5, "ce": 2.4, "aux": {"superclass": 0.1},
               "train_accuracy": 0.3, "lr": 1e-3, "grad_norm": 1.2, "img_per_s": 900.0})
    log.write({"type": "eval", "step": 20, "test_accuracy": 0.71, "test_loss": 0.9,
               "expert_load": [{"layer": 4, "kind": "image", "fraction": [0.25, 0.75], "dropped": 0.0}]})
    log.write({"type": "routing", "step": 20, "router_accuracy": 0.8, "churn": 0.1})
    log.write({"type": "done", "step": 20})
    log.close()
    s = _read_scalars(tmp_path)
    assert s["train/loss"] == [(10, 2.5)]
    assert abs(s["train/aux/superclass"][0][1] - 0.1) < 1e-6
    assert s["eval/test_accuracy"][0][0] == 20 and abs(s["eval/test_accuracy"][0][1] - 0.71) < 1e-6
    assert abs(s["load/block4/expert1"][0][1] - 0.75) < 1e-6 and "load/block4/dropped" in s
    assert abs(s["routing/router_accuracy"][0][1] - 0.8) < 1e-6


def test_records_without_numbers_give_no_scalars():
    assert scalars_of({"type": "error", "step": 3, "message": "x"}) == {}
    assert scalars_of({"type": "train", "step": 1, "loss": None, "lr": True}) == {}
