"""Checkpoints: round trips, atomic writes, and clear errors for every damaged file."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from workbench import checkpoint as ckpt
from workbench.checkpoint import (CARD_KEYS, CheckpointError, list_checkpoints, load_checkpoint, load_train_state,
                                  read_card, save_checkpoint, save_train_state)
from workbench.models import create_model

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _model(preset="mvmoe-2x64-e4k1", seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(preset, num_classes=10, **kw).eval()


def _logits(model):
    with torch.no_grad():
        return model.eval()(X)


def _card(**extra):
    return {"preset": "mvmoe-2x64-e4k1", "dataset": "synthetic", "classes": [f"c{i}" for i in range(10)],
            "metrics": {"test_accuracy": 0.5}, **extra}


@pytest.mark.parametrize("preset", ["vit-2x64", "mvmoe-2x64-e4k1", "vmoe-4x64-e4k2"])
def test_round_trip_gives_the_same_logits(tmp_path, preset):
    model = _model(preset)
    save_checkpoint(tmp_path, model, _card(preset=preset))
    loaded, card = load_checkpoint(tmp_path)
    assert not loaded.training
    assert torch.equal(_logits(loaded), _logits(model))
    assert card["config"] == model.cfg.to_dict()


def test_saved_card_has_every_contract_key(tmp_path):
    save_checkpoint(tmp_path, _model(), _card())
    card = read_card(tmp_path)
    assert set(CARD_KEYS) <= set(card)
    assert card["metrics"]["test_accuracy"] == 0.5
    assert card["version"] and card["created"]
    assert card["weights"]["sha256"] == ckpt.sha256_file(tmp_path / "model.safetensors")


def test_files_are_safetensors_and_json_and_loading_never_unpickles(tmp_path, monkeypatch):
    model = _model()
    save_checkpoint(tmp_path, model, _card())
    opt = torch.optim.AdamW(model.parameters())
    model.train()
    model(X).sum().backward()
    opt.step()
    save_train_state(tmp_path, model, opt, {"step": 1})
    for name in ("model.safetensors", "train_state.safetensors"):
        raw = (tmp_path / name).read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        json.loads(raw[8:8 + header_len])            # a safetensors header, not a pickle
    json.loads((tmp_path / "card.json").read_text())

    def no_pickle(*a, **k):
        raise AssertionError("a checkpoint load used pickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    load_checkpoint(tmp_path)
    load_train_state(tmp_path, _model(), torch.optim.AdamW(_model().parameters()))


def test_bfloat16_storage_halves_the_file_and_loads_as_float32(tmp_path):
    model = _model("vit-2x64")
    save_checkpoint(tmp_path / "fp32", model, _card())
    save_checkpoint(tmp_path / "bf16", model, _card(), store_dtype="bfloat16")
    full = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    half = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    assert half < 0.55 * full
    loaded, card = load_checkpoint(tmp_path / "bf16")
    assert card["weights"]["dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0.05, rtol=0.05)


def test_train_state_restores_model_and_optimizer(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    model(X).sum().backward()
    opt.step()
    save_train_state(tmp_path, model, opt, {"step": 7, "history": [{"epoch": 1}]})
    other = _model(seed=1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1.0)
    info = load_train_state(tmp_path, other, other_opt)
    assert info == {"step": 7, "history": [{"epoch": 1}]}
    assert torch.equal(_logits(other), _logits(model))
    a, b = opt.state_dict(), other_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])


# ----------------------------------------------------------------------------- atomicity
def _crash_on(monkeypatch, filename):
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == filename:
            raise OSError(f"simulated crash while writing {filename}")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("crash_file", ["model.safetensors", "card.json"])
def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, crash_file):
    old, new = _model(seed=0), _model(seed=1)
    save_checkpoint(tmp_path, old, _card(metrics={"test_accuracy": 0.1}))
    with monkeypatch.context() as m:
        _crash_on(m, crash_file)
        with pytest.raises(OSError, match="simulated crash"):
            save_checkpoint(tmp_path, new, _card(metrics={"test_accuracy": 0.9}))
    with pytest.warns(UserWarning, match="interrupted") if crash_file == "card.json" else _nothing():
        loaded, card = load_checkpoint(tmp_path)
    assert card["metrics"]["test_accuracy"] == 0.1
    assert torch.equal(_logits(loaded), _logits(old))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]   # no temp files left behind


def test_repeated_crashes_still_keep_the_last_complete_checkpoint(tmp_path, monkeypatch):
    old = _model(seed=0)
    save_checkpoint(tmp_path, old, _card())
    with monkeypatch.context() as m:
        _crash_on(m, "card.json")
        for seed in (1, 2):  # the second save must not make the half-written weights the backup
            with pytest.raises(OSError):
                save_checkpoint(tmp_path, _model(seed=seed), _card())
    with pytest.warns(UserWarning):
        loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(_logits(loaded), _logits(old))
    newest = _model(seed=3)
    save_checkpoint(tmp_path, newest, _card())
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(_logits(loaded), _logits(newest))
    assert sorted(os.listdir(tmp_path)) == ["card.json", "model.safetensors"]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- clear errors
@pytest.fixture
def saved(tmp_path):
    save_checkpoint(tmp_path, _model(), _card())
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("name", ["model.safetensors", "card.json"])
def test_missing_file_is_named(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name}: file is missing"):
        load_checkpoint(saved)


def test_truncated_weights_are_detected_by_the_card_hash(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 does not match card.json"):
        load_checkpoint(saved)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_weights_without_a_hash_name_the_file(saved, damage):
    card = json.loads((saved / "card.json").read_text())
    del card["weights"]                                   # a hand-written card: no hash to compare
    (saved / "card.json").write_text(json.dumps(card))
    path = saved / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2] if damage == "truncate" else b"\x00" * 8 + raw[8:])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(saved)


def test_malformed_card_json(saved):
    (saved / "card.json").write_text('{"preset": "vit-2x64", ')
    with pytest.raises(CheckpointError, match="card.json: not valid JSON"):
        load_checkpoint(saved)


def test_missing_card_keys_are_named(saved):
    card = json.loads((saved / "card.json").read_text())
    del card["classes"], card["macs"]
    (saved / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"card.json: missing card key\(s\) \['classes', 'macs'\]"):
        read_card(saved)


@pytest.mark.parametrize("seeds, rule", [
    ({"seed": 0}, "'seeds' must be a list"),
    ([{"seed": "0", "test_accuracy": 0.9}], "integer 'seed'"),
    ([{"seed": 0, "test_accuracy": 90.1}], "test_accuracy of seed 0 must be a fraction"),
    ([{"seed": 1, "test_accuracy": 0.9, "delta_vs_dense": "big"}], "delta_vs_dense of seed 1"),
])
def test_bad_per_seed_numbers_in_a_card_are_named(saved, seeds, rule):
    card = json.loads((saved / "card.json").read_text())
    card["seeds"] = seeds
    (saved / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=rule):
        read_card(saved)


def test_invalid_config_in_card(saved):
    card = json.loads((saved / "card.json").read_text())
    card["config"]["top_k"] = 9
    (saved / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="'config' does not describe a valid model: num_experts >= top_k"):
        load_checkpoint(saved)


def test_weights_that_do_not_match_the_config_name_the_keys(saved):
    card = json.loads((saved / "card.json").read_text())
    card["config"]["depth"] = 3                           # one more (dense) block than the weights have
    card["config"]["moe_layers"] = [0, 1]
    (saved / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"model.safetensors: weights do not match.*missing: blocks\.2\."):
        load_checkpoint(saved)
    card["config"].update(depth=2, moe_layers="last-2", width=128)
    (saved / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"shape mismatch: cls_token \(1, 1, 64\) != \(1, 1, 128\)"):
        load_checkpoint(saved)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_list_checkpoints_finds_complete_directories_sorted(tmp_path):
    for name in ("b", "a/nested", "c"):
        save_checkpoint(tmp_path / name, _model("vit-2x64"), _card())
    (tmp_path / "c" / "card.json").unlink()                # incomplete: not listed
    (tmp_path / "empty").mkdir()
    assert list_checkpoints(tmp_path, tmp_path / "missing") == [tmp_path / "a" / "nested", tmp_path / "b"]
    assert list_checkpoints(tmp_path / "b") == [tmp_path / "b"]
