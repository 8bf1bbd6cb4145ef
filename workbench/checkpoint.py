"""Checkpoints: a directory with `model.safetensors` + `card.json`, written atomically, read without pickle.

Why this shape:
- safetensors and JSON cannot run code when loaded, so a checkpoint downloaded
  from anywhere is safe to open in the app (`torch.load` of a pickle is not).
- The card carries the full `ModelConfig`, so the model is rebuilt exactly,
  and everything the app shows (classes, super-classes, accuracy, MACs) is
  readable without touching the weights.
- Every file is written to a temporary name in the same directory, fsynced and
  renamed over the old one, so a reader never sees half a file. Weights are
  written before the card, and the card stores the weights' sha256. A kill
  between the two renames would pair a new weights file with the old card, so
  the weights that the old card describes are first kept as
  `model.safetensors.prev`; the loader falls back to them. Whenever the process
  dies, the directory holds the last complete checkpoint.

Training state for `--resume` (model, AdamW moments, step, epoch, options) is
one more file, `train_state.safetensors`: tensors plus a JSON header in the
safetensors metadata, written in one atomic rename so it is always
self-consistent.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

WEIGHTS = "model.safetensors"
CARD = "card.json"
PREV_WEIGHTS = "model.safetensors.prev"   # the weights the current card describes, during a save
TRAIN_STATE = "train_state.safetensors"

# Keys every card has (SPEC §5 and docs/CONTRACTS.md); save_checkpoint fills the missing ones.
CARD_KEYS = ("preset", "config", "dataset", "classes", "superclasses", "metrics", "macs", "params",
             "confusion", "history", "command", "wall_time_s", "version", "created")
REQUIRED_CARD_KEYS = ("preset", "config", "dataset", "classes", "superclasses", "metrics", "macs", "params")
# how a MoE routes, in a card's metrics and per seed: accuracy and perfect-router accuracy for a
# router trained on the super-classes, purity for an end-to-end one (its expert numbers are its own)
ROUTER_METRICS = ("router_superclass_accuracy", "router_superclass_purity", "oracle_routing_accuracy")
# what a grid card's `seeds` may carry per seed, each a fraction: test accuracy, accuracy on trained-on
# images (the pipeline's fit_accuracy) and the router's scores
SEED_METRICS = ("test_accuracy", "fit_accuracy") + ROUTER_METRICS


def router_score(metrics: dict) -> str:
    """The key of the router's score in `metrics` (a card's, a seed's or a results row):
    purity for an end-to-end router, else accuracy against the super-classes."""
    return "router_superclass_purity" if metrics.get("router_superclass_purity") is not None \
        else "router_superclass_accuracy"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt, or does not match its card."""


# ----------------------------------------------------------------------------- atomic files
from .runs import atomic_write_bytes, atomic_write_json, fsync_dir as _fsync_dir  # noqa: E402  (one helper)


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_bytes(tensors: dict, metadata: Optional[dict] = None) -> bytes:
    """safetensors bytes of `tensors` (contiguous CPU copies; tied tensors are stored twice)."""
    from safetensors.torch import save

    flat, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        if v.data_ptr() in seen:  # safetensors refuses tensors sharing storage
            v = v.clone()
        seen.add(v.data_ptr())
        flat[k] = v
    return save(flat, metadata=metadata)


def _load_tensors(path: Path, device: str = "cpu") -> tuple[dict, dict]:
    """safetensors file -> (tensors, metadata); any damage is a CheckpointError naming the file."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return tensors, meta


# ----------------------------------------------------------------------------- cards
MAX_CARD_BYTES = 16 << 20   # a card with a 1000-class confusion matrix is ~5 MB


def read_card(directory: PathLike) -> dict:
    """The checkpoint's card.json: bounded in size and depth, and checked by `validate_card`."""
    from .safejson import read

    path = Path(directory) / CARD
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing (a checkpoint needs {WEIGHTS} and {CARD})")
    try:
        card = read(path, max_bytes=MAX_CARD_BYTES)
    except ValueError as e:  # JSONLimitError: malformed, too large or too deeply nested
        raise CheckpointError(str(e)) from None
    validate_card(card, path)
    return card


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(ok: bool, path, message: str) -> None:
    if not ok:
        raise CheckpointError(f"{path}: {message}")


def validate_card(card, path: PathLike = CARD) -> None:
    """Refuse a card whose fields the app or the loader could not use (CheckpointError naming the rule).

    The config itself is checked by `ModelConfig` when the checkpoint is
    loaded; here: the keys every card has, their types, and that classes,
    super-classes and confusion agree with the config's class count.
    """
    _check(isinstance(card, dict), path, f"expected a JSON object, got {type(card).__name__}")
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    _check(not missing, path, f"missing card key(s) {missing}")
    cfg = card["config"]
    _check(isinstance(cfg, dict), path, "'config' must be an object of ModelConfig fields")
    n = cfg.get("num_classes")
    _check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, path,
           f"config.num_classes must be a positive integer, got {n!r}")
    for key in ("preset", "dataset"):
        _check(card[key] is None or (isinstance(card[key], str) and len(card[key]) <= 4096), path,
               f"'{key}' must be a string (at most 4096 characters)")
    classes = card["classes"]
    _check(isinstance(classes, list) and len(classes) == n and all(isinstance(c, (str, int)) for c in classes),
           path, f"'classes' must list the {n} class names of config.num_classes")
    _check(cfg.get("superclasses") is None or cfg.get("family") == "mvmoe", path,
           f"config.superclasses is set on a {cfg.get('family')!r} model; a super-class map only guides "
           "the per-image (mvmoe) router")
    _check_superclasses(card["superclasses"], n, cfg, path)
    numbers = {"metrics": ("test_accuracy",), "macs": ("active", "dense", "params_total", "params_active"),
               "params": ("total", "active")}   # the entries the app shows
    for key, fields in numbers.items():
        v = card[key]
        _check(v is None or isinstance(v, dict), path, f"'{key}' must be an object or null")
        bad = [f for f in fields if (v or {}).get(f) is not None and not _is_number(v[f])]
        _check(not bad, path, f"{key}.{', '.join(bad)} must be a number")
    acc = (card["metrics"] or {}).get("test_accuracy")
    _check(acc is None or (_is_number(acc) and 0 <= acc <= 1), path,
           f"metrics.test_accuracy must be a fraction in [0, 1], got {acc!r}")
    conf = card.get("confusion")
    matrix = conf.get("matrix") if isinstance(conf, dict) else None
    _check(conf is None or (isinstance(matrix, list) and len(matrix) == n and all(
        isinstance(r, list) and len(r) == n and all(_is_number(x) and x >= 0 for x in r) for r in matrix)),
        path, f"'confusion' must be null or hold a {n}x{n} 'matrix' of counts")
    history = card.get("history")
    _check(history is None or (isinstance(history, list) and all(isinstance(h, dict) for h in history)), path,
           "'history' must be a list of per-epoch objects")
    _check_seeds(card.get("seeds"), path)
    _check_routing_tables(card.get("routing_tables"), n, cfg, path)


def _check_routing_tables(tables, n: int, cfg: dict, path) -> None:
    """`routing_tables` (MoE cards, written by workbench.evaluate.routing_tables): per MoE block,
    an n x E table of kept assignment counts by true class, on the split it names."""
    if tables is None:
        return
    E, depth = cfg.get("num_experts"), cfg.get("depth")
    _check(isinstance(tables, dict) and isinstance(tables.get("layers"), list) and isinstance(E, int) and E >= 1,
           path, "'routing_tables' must be null or an object with 'layers' (and the config an MoE's)")
    _check(tables.get("unit") in ("image", "token") and isinstance(tables.get("split"), str), path,
           "routing_tables: 'unit' must be 'image' or 'token' and 'split' a string")
    seen = set()
    for t in tables["layers"]:
        layer, counts = (t.get("layer"), t.get("counts")) if isinstance(t, dict) else (None, None)
        _check(isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < (depth or 0)
               and layer not in seen, path, f"routing_tables: bad or repeated block index {layer!r}")
        seen.add(layer)
        _check(isinstance(counts, list) and len(counts) == n and all(
            isinstance(r, list) and len(r) == E and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                        for x in r) for r in counts), path,
            f"routing_tables: block {layer} needs an {n}x{E} table of non-negative integer counts")


def _check_seeds(seeds, path) -> None:
    """`seeds` (grid cards): one object per seed of the same recipe, with fractions in [0, 1]."""
    if seeds is None:
        return
    _check(isinstance(seeds, list) and len(seeds) <= 1000 and all(isinstance(s, dict) for s in seeds), path,
           "'seeds' must be a list of per-seed objects")
    for s in seeds:
        _check(isinstance(s.get("seed"), int) and not isinstance(s.get("seed"), bool), path,
               f"seeds: every entry needs an integer 'seed', got {s.get('seed')!r}")
        for key in SEED_METRICS:
            v = s.get(key)
            _check(v is None or (_is_number(v) and 0 <= v <= 1), path,
                   f"seeds: {key} of seed {s['seed']} must be a fraction in [0, 1], got {v!r}")
        for key in ("delta_vs_dense", "fit_delta_vs_dense"):
            d = s.get(key)
            _check(d is None or (_is_number(d) and -1 <= d <= 1), path,
                   f"seeds: {key} of seed {s['seed']} must be in [-1, 1], got {d!r}")


def _check_superclasses(sc, n: int, cfg: dict, path) -> None:
    """null, or {"assignment": [group per class], "names": [...]} that agrees with the router's map."""
    if sc is None:
        return
    a = sc.get("assignment") if isinstance(sc, dict) else None
    _check(isinstance(a, list) and len(a) == n and all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < n
                                                       for g in a), path,
           f"'superclasses' must be null or hold an 'assignment' of {n} group indices in 0..{n - 1}")
    names = sc.get("names")
    _check(names is None or (isinstance(names, list) and len(names) > max(a) and all(isinstance(x, str) for x in names)),
           path, f"superclasses.names must name each of the {max(a) + 1} groups")
    router_map = cfg.get("superclasses")
    _check(router_map is None or router_map == a, path,
           "'superclasses' differs from the map the router was trained on (config.superclasses)")


def list_checkpoints(*roots: PathLike) -> list[Path]:
    """Directories under `roots` (or the roots themselves) holding model.safetensors + card.json, sorted."""
    found = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if WEIGHTS in filenames and CARD in filenames:
                found.add(Path(dirpath))
    return sorted(found)


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(directory: PathLike, model: nn.Module, card: dict, store_dtype: Optional[str] = None) -> dict:
    """Write model weights and card atomically; returns the card as written.

    `card` may omit keys: `config` comes from `model.cfg`, `version`/`created`
    are filled in, and other card keys default to null. `store_dtype="bfloat16"`
    halves the file (for shipped samples); loading casts back to float32.
    """
    from . import __version__
    from .paths import card_data_ref

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if store_dtype is not None:
        dtype = getattr(torch, store_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"store_dtype must be a floating torch dtype name like 'bfloat16', got {store_dtype!r}")
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    data = _tensor_bytes(state)

    card = dict(card)
    card["config"] = model.cfg.to_dict()
    card["dataset"] = card_data_ref(card.get("dataset"))  # relative to its data root: data can move
    for key in CARD_KEYS:
        card.setdefault(key, None)
    card["version"] = card["version"] or __version__
    card["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    card["weights"] = {"file": WEIGHTS, "sha256": hashlib.sha256(data).hexdigest(),
                       "dtype": store_dtype or "float32", "bytes": len(data)}

    weights, prev = directory / WEIGHTS, directory / PREV_WEIGHTS
    _keep_described_weights(directory)
    atomic_write_bytes(weights, data)        # (old card, new weights): the loader uses .prev
    atomic_write_json(directory / CARD, card)  # (new card, new weights): complete
    if prev.exists():
        prev.unlink()
    return card


def update_card(directory: PathLike, **fields) -> dict:
    """The one way to change a saved card: add or replace top-level `fields`, validate the result
    (CheckpointError naming the rule, nothing written) and write it atomically; returns the card."""
    directory = Path(directory)
    card = {**read_card(directory), **fields}
    validate_card(card, directory / CARD)
    atomic_write_json(directory / CARD, card)
    return card


def _keep_described_weights(directory: Path) -> None:
    """Before replacing the weights, make PREV_WEIGHTS the file the current card describes."""
    weights, prev, card_path = directory / WEIGHTS, directory / PREV_WEIGHTS, directory / CARD
    try:
        want = json.loads(card_path.read_text())["weights"]["sha256"]
    except Exception:
        want = None  # no complete checkpoint here yet: nothing to protect
    if want and prev.exists() and sha256_file(prev) == want:
        return       # an earlier save died after its weights rename; prev is still the good one
    if prev.exists():
        prev.unlink()
    if want and weights.exists() and sha256_file(weights) == want:
        try:
            os.link(weights, prev)  # a second name for the same bytes; the rename below keeps them
        except OSError:             # a filesystem without hard links
            atomic_write_bytes(prev, weights.read_bytes())
        _fsync_dir(directory)


def _weights_header(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the safetensors header, without reading any tensor."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing (a checkpoint needs {WEIGHTS} and {CARD})")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def _config_model(card: dict, directory: Path, header: dict, device: str):
    """The card's model built on `device`; "meta" allocates nothing, so a hostile config costs no memory."""
    from .models import ModelConfig, build_model

    try:
        cfg = ModelConfig.from_dict(card["config"])
        if cfg.depth > len(header):  # every block has weights; this also bounds the modules built below
            raise ValueError(f"depth {cfg.depth} needs more tensors than the {len(header)} in {WEIGHTS}")
        with torch.device(device):
            return build_model(cfg)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{directory / CARD}: 'config' does not describe a valid model: {e}") from None


def check_weights_header(directory: PathLike, card: dict, weights: Optional[Path] = None) -> None:
    """Compare the card's config with the weights' header (names, shapes) before anything is allocated."""
    directory = Path(directory)
    weights = weights or directory / WEIGHTS
    header = _weights_header(weights)
    expected = {k: tuple(v.shape) for k, v in _config_model(card, directory, header, "meta").state_dict().items()}
    missing = [k for k in expected if k not in header]
    unexpected = [k for k in header if k not in expected]
    wrong = [f"{k} {header[k]} != {v}" for k, v in expected.items() if k in header and header[k] != v]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise CheckpointError(f"{weights}: weights do not match the config in {CARD}: " + "; ".join(parts))


def inspect_checkpoint(directory: PathLike) -> dict:
    """The card, after checking it and its config against the weights' header (no tensor is read)."""
    card = read_card(directory)
    check_weights_header(directory, card)
    return card


def load_checkpoint(directory: PathLike, map_location: Union[str, torch.device] = "cpu"):
    """-> (model in eval mode, card). Never unpickles; every problem is a CheckpointError.

    Order: card (bounded, validated) -> weights hash -> config vs the weights'
    header on the meta device -> only then the real model and the tensors.
    """
    directory = Path(directory)
    card = read_card(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: file is missing (a checkpoint needs {WEIGHTS} and {CARD})")
    want = (card.get("weights") or {}).get("sha256") if isinstance(card.get("weights"), dict) else None
    if want and sha256_file(weights) != want:
        prev = directory / PREV_WEIGHTS
        if prev.is_file() and sha256_file(prev) == want:
            warnings.warn(f"{directory}: a save was interrupted; loading the previous complete weights ({prev.name})")
            weights = prev
        else:
            raise CheckpointError(
                f"{weights}: sha256 does not match {CARD} (the file is corrupt, truncated, or from another save)"
            )
    check_weights_header(directory, card, weights)
    model = _config_model(card, directory, _weights_header(weights), "cpu")
    state, _ = _load_tensors(weights, "cpu")
    expected = model.state_dict()
    try:
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    except (RuntimeError, KeyError, TypeError) as e:  # the header check makes this unlikely
        raise CheckpointError(f"{weights}: weights do not match the config in {CARD}: {e}") from None
    return model.to(map_location).eval(), card


# ----------------------------------------------------------------------------- training state
def save_train_state(directory: PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, info: dict) -> None:
    """Everything `--resume` needs, in one atomically written file.

    Tensors: `model.<name>` and `optim.<param index>.<key>`; the safetensors
    metadata holds JSON: `info` (step, epoch, options, ...) and the optimizer's
    param groups.
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    meta = {"format": "workbench-train-state/1", "info": json.dumps(info),
            "param_groups": json.dumps(opt["param_groups"]), "optim_scalars": json.dumps(scalars),
            "sha256": _tensors_sha256(tensors)}  # like the card's weights hash: damage is caught on load
    atomic_write_bytes(Path(directory) / TRAIN_STATE, _tensor_bytes(tensors, meta))


def _tensors_sha256(tensors: dict) -> str:
    """sha256 over names and raw bytes of `tensors`, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").reshape(-1).contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_train_info(directory: PathLike) -> dict:
    """The `info` saved with the training state (step, options, ...), without reading the tensors."""
    from safetensors import safe_open

    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["info"])
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable training state (truncated or corrupt?): {e}") from None


def load_train_state(directory: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Restore model (and optimizer) from `train_state.safetensors`; returns the saved `info`."""
    path = Path(directory) / TRAIN_STATE
    tensors, meta = _load_tensors(path)
    if meta.get("format") != "workbench-train-state/1":
        raise CheckpointError(f"{path}: not a workbench training state (format {meta.get('format')!r})")
    if "sha256" in meta and _tensors_sha256(tensors) != meta["sha256"]:  # (states saved before it have none)
        raise CheckpointError(f"{path}: sha256 of the tensors does not match the one saved with them (the file is "
                              "damaged); resume from an intact copy or start the run again")
    try:
        info = json.loads(meta["info"])
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta.get("optim_scalars", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged metadata: {e}") from None
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: model weights do not match this model: {e}") from None
    if optimizer is not None:
        opt_state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = v
        for k, v in scalars.items():
            idx, key = k.split(".", 1)
            opt_state.setdefault(int(idx), {})[key] = v
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        try:
            optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not match this model: {e}") from None
    return info


__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_card", "update_card", "validate_card",
           "inspect_checkpoint",
           "check_weights_header", "list_checkpoints",
           "save_train_state", "load_train_state", "read_train_info", "atomic_write_bytes", "atomic_write_json", "sha256_file",
           "CARD_KEYS", "ROUTER_METRICS", "router_score", "WEIGHTS", "CARD", "TRAIN_STATE"]
