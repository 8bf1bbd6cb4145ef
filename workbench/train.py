"""Train one model: `python -m workbench.train --model vit-6x96 --dataset fashion-mnist --out runs/a`.

One plain loop, top to bottom (nanoGPT style): set up processes -> data ->
model and AdamW (linear warmup + cosine decay) -> resume -> steps (CE with label
smoothing + the model's auxiliary losses: V-MoE balancing losses, the Mobile
V-MoE super-class loss) -> at each epoch's end: evaluate, checkpoint, resume
state. `torchrun --nproc_per_node=N -m workbench.train ...` runs the same loop
data-parallel (DDP; gloo on CPU, nccl on GPU); the batch size is global.

Everything a run is comes in one `TrainConfig` (workbench/train_config.py); the
run folder is a checkpoint (workbench/checkpoint.py) plus the files of
workbench/runs.py (metrics.jsonl, status.json), written through `RunLog`.

Resume is exact: every random choice is a pure function of (seed, step): the
epoch's shuffle is seeded by (seed, epoch), the augmentation and router noise
of a step by (seed, step, rank). A resumed run skips the batches its epoch
already did and sees the numbers an uninterrupted run would have seen.
Nothing non-finite is ever saved: the last good state survives a divergence.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # help without waiting for torch
    from workbench.train_config import build_parser

    build_parser().parse_args(["--help"])

import hashlib
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import __version__, snapshots, superclass_map
from .checkpoint import (CARD, TRAIN_STATE, load_checkpoint, load_train_state, read_card, read_train_info, save_checkpoint,
                         save_train_state)
from .data import heldout_split, load_dataset, normalize
from .device import autocast, cpu_has_native_bf16, resolve_device, resolve_precision, usable_cores  # noqa: F401 (public)
from .evaluate import eval_record, evaluate, to_batch  # noqa: F401 (evaluate is public here)
from .flops import count_macs
from .models.upcycle import paired_model, upcycle
from .progress import Progress, fmt_time
from .runs import RunBusy, RunLog, atomic_write_json, clean_temp_files, now_iso, training_pid, truncate_metrics
from .train_config import TrainConfig, fit_to_dataset, from_args, parse_args, parse_overrides  # noqa: F401

LOG_POINTS = 100   # train records a short run aims for (a long one logs every --log-every steps)
_RESUME_MUST_MATCH = ("model", "dataset", "holdout", "seed", "batch_size", "parent_sha256")


class TrainingError(RuntimeError):
    """Training stopped for a reason the user should read (non-finite loss, bad resume)."""


# ----------------------------------------------------------------------------- small pieces
def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr`, per optimizer step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def mixup(x, y, num_classes: int, alpha: float, seed: int) -> tuple:
    """Mixup (Zhang et al., 2018): (blended images, targets). Each image is blended with the image
    a seeded shuffle puts beside it, lam * x + (1 - lam) * x[perm], lam ~ Beta(alpha, alpha) once per
    batch; the targets are the same blend of the two one-hot labels. alpha 0: (x, y) unchanged.
    The draw is a function of `seed` alone, so a resumed run blends exactly as before."""
    if alpha <= 0:
        return x, y
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(x.device)
    onehot = F.one_hot(y, num_classes).float()
    return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm]


def param_groups(model, weight_decay: float) -> list:
    """AdamW groups: no weight decay on norms, biases, position embedding and class token."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith("bias") or name in ("pos_embed", "cls_token") or ".norm" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, purpose) that stays stable across runs."""
    h = 1469598103934665603
    for x in parts:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def epoch_order(n: int, seed: int, epoch: int):
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch, 0x5EED)))


def param_sha256(model) -> str:
    """Hash of all parameters and buffers: equal across DDP ranks when they are in sync."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def healthy(model, optimizer, probe, amp_dtype=None) -> bool:
    """Are weights and AdamW moments finite, and do they give finite logits on a probe batch?

    Weights blown up to 1e30 are finite yet useless (the next step's loss is inf), so a
    finite-weights check alone would let a diverged state overwrite the last good one.
    """
    tensors = list(model.parameters())
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        return False
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast(probe.device, amp_dtype):
        ok = bool(torch.isfinite(model(probe).float()).all())
    model.train(was_training)
    return ok


# ----------------------------------------------------------------------------- the run's parts
@dataclass
class Processes:
    """Where this process runs: DDP rank and world size, device, autocast dtype."""
    world: int
    rank: int
    device: torch.device
    amp_dtype: Optional[torch.dtype]

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


@dataclass
class Plan:
    """The data and the schedule: splits, batch size, steps, warmup, the fitted model config."""
    train_set: object
    test_set: object
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup: int
    model_cfg: object
    superclasses: Optional[dict]  # the card's form, or None
    router_warmup_steps: int = 0  # steps at the start in which only the routers learn
    log_every: int = 10           # steps between train records: --log-every, or less in a short run


@dataclass
class State:
    """What a resume restores (saved in train_state's info)."""
    step: int = 0
    history: list = field(default_factory=list)
    epoch_sums: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    wall_before: float = 0.0


@dataclass
class Run:
    """Everything the loop's steps share."""
    cfg: TrainConfig
    procs: Processes
    plan: Plan
    model: torch.nn.Module          # what forward runs (DDP-wrapped or not)
    raw: torch.nn.Module            # the model itself
    optimizer: torch.optim.Optimizer
    run_dir: Path
    spec: dict
    state: State
    command: str
    macs: dict
    log: Optional[RunLog] = None
    progress: Optional[Progress] = None
    t_start: float = field(default_factory=time.time)
    start_step: int = 0
    window: dict = field(default_factory=dict)   # sums since the last train record
    routing_tables: Optional[dict] = None        # of the last evaluation in this process (for the card)
    parent: Optional[dict] = None                # the --init-from checkpoint (for the card)

    def wall(self) -> float:
        return self.state.wall_before + time.time() - self.t_start


# ----------------------------------------------------------------------------- the steps
def setup_processes(cfg: TrainConfig) -> Processes:
    """DDP from torchrun's environment, the device, CPU threads and the autocast dtype."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    torch.set_num_threads(cfg.threads or max(1, usable_cores() // local_world))
    return Processes(world, rank, device, resolve_precision(cfg.precision, device))


def build_data(cfg: TrainConfig, procs: Processes) -> Plan:
    """The splits (minus the held-out part), the schedule, and the model config fitted to the data."""
    train_set = load_dataset(cfg.dataset, "train", root=cfg.data_root)
    test_set = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    superclasses = superclass_map.for_training(cfg.superclasses, train_set)
    model_cfg = fit_to_dataset(cfg.model, train_set, superclasses["assignment"] if superclasses else None)
    if cfg.holdout > 0:
        train_set = train_set.subset(heldout_split(len(train_set), cfg.holdout)[0])
    batch_size, world = cfg.batch_size, procs.world
    if len(train_set) < batch_size:
        batch_size = len(train_set) // world * world
        if batch_size < world:
            raise ValueError(f"{cfg.dataset}: {len(train_set)} training images are too few for {world} processes")
        print(f"note: --batch-size lowered to {batch_size}, the size of the training set", file=sys.stderr)
    steps_per_epoch = len(train_set) // batch_size   # drop the last partial batch
    if cfg.max_steps is None:
        total_steps = (cfg.epochs or 10) * steps_per_epoch
    else:
        total_steps = min(cfg.max_steps, cfg.epochs * steps_per_epoch) if cfg.epochs else cfg.max_steps
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    elif cfg.warmup_epochs is not None:
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
    else:
        warmup = round(0.05 * total_steps)
    return Plan(train_set, test_set, batch_size, steps_per_epoch, total_steps,
                math.ceil(total_steps / steps_per_epoch), max(0, min(warmup, total_steps - 1)), model_cfg, superclasses,
                min(total_steps, cfg.router_warmup_epochs * steps_per_epoch),
                # a short run logs more often, so its live curves have about 100 points, not 5
                min(cfg.log_every, max(1, total_steps // LOG_POINTS)))


def build_model_and_optimizer(cfg: TrainConfig, plan: Plan, procs: Processes):
    """The model (same initial weights on every rank) and AdamW; -> (model, optimizer, macs, parent).

    A MoE starts from its dense twin's initial weights for every shared tensor (real pairing), or,
    with --init-from, from a trained dense parent (sparse upcycling; a dense model continues it).
    `parent` is what the card records of that parent (None without --init-from)."""
    if cfg.init_from:
        dense, parent = load_parent(cfg.init_from)
        model = upcycle(dense, plan.model_cfg, cfg.seed)
    else:
        model, parent = paired_model(plan.model_cfg, cfg.seed), None
    model = model.to(procs.device)
    macs = count_macs(model, plan.train_set.image_shape)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999),
                                  fused=procs.device.type == "cuda" or None)
    return model, optimizer, macs, parent


def load_parent(path) -> tuple:
    """The dense checkpoint of --init-from and what the card says of it: path, weights sha256, epochs."""
    try:
        dense, card = load_checkpoint(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--init-from {path}: {e}") from None
    training = card.get("training") or {}
    return dense, {"path": str(Path(path).resolve()), "sha256": (card.get("weights") or {}).get("sha256"),
                   "preset": card.get("preset"), "epochs": training.get("epochs"),
                   "test_accuracy": (card.get("metrics") or {}).get("test_accuracy")}


def run_folder(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.preset}-{cfg.dataset.replace(':', '_').replace('/', '_')}-{stamp}"


def run_spec(cfg: TrainConfig, plan: Plan, parent: Optional[dict] = None) -> dict:
    """What a resume must match: the model (as fitted to the data), data, split, seed, batch, and
    the weights of an --init-from parent."""
    return json.loads(json.dumps({"model": plan.model_cfg.to_dict(), "dataset": cfg.dataset,
                                  "holdout": cfg.holdout, "seed": cfg.seed, "batch_size": plan.batch_size,
                                  "parent_sha256": parent and parent["sha256"]}))


def _comparable(saved: dict, spec: dict) -> dict:
    """A saved spec in today's form; a run saved before TrainConfig stored a preset + overrides."""
    if isinstance(saved.get("model"), str):
        from .models.config import parse_preset

        fields = {**parse_preset(saved["model"]), **(saved.get("overrides") or {}),
                  "superclasses": saved.get("superclasses")}
        saved = {**saved, "model": {k: fields.get(k, v) if k in fields else v for k, v in spec["model"].items()}}
    return saved


def resume_or_start(cfg: TrainConfig, plan: Plan, raw, optimizer, run_dir: Path, spec: dict) -> State:
    """Restore the saved state (--resume), or check that the folder holds no other run."""
    busy = training_pid(run_dir)
    if busy is not None:
        raise RunBusy(f"{run_dir} is being trained by process {busy} right now; wait for it to end or stop "
                         "it before training into this folder")
    if not cfg.resume:
        if (run_dir / TRAIN_STATE).exists() or (run_dir / CARD).exists():
            raise ValueError(f"{run_dir} already holds a run; add --resume to continue it or choose another --out")
        return State()
    if not (run_dir / TRAIN_STATE).is_file():
        raise ValueError(f"--resume: {run_dir} has no {TRAIN_STATE} to continue from (nothing was saved yet: "
                         "run again without --resume)")
    saved = _comparable(read_train_info(run_dir)["spec"], spec)
    changed = [k for k in _RESUME_MUST_MATCH if saved.get(k) != spec[k]]
    if changed:
        raise ValueError(f"--resume: {run_dir} was trained with different {changed}: "
                         + ", ".join(f"{k}={saved.get(k)!r}" for k in changed))
    info = load_train_state(run_dir, raw, optimizer)
    state = State(info["step"], info["history"], info.get("epoch_sums", {}), info.get("last_eval", {}),
                  info["wall_time_s"])
    if state.step >= plan.total_steps:
        raise ValueError(f"--resume: the run is already at step {state.step} of {plan.total_steps}; "
                         "raise --epochs or --max-steps to train further")
    return state


def prepare_folder(run: Run) -> None:
    """Create the folder; remove a killed writer's temp files and metrics past the saved step."""
    if not run.procs.master:
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    clean_temp_files(run.run_dir)
    damaged = truncate_metrics(run.run_dir, run.state.step)   # a fresh start keeps nothing
    if damaged:
        print(f"note: dropped {damaged} damaged line(s) of {run.run_dir / 'metrics.jsonl'}", file=sys.stderr)


def wrap_ddp(model, procs: Processes):
    if not procs.ddp:
        return model
    dist.barrier()
    # 1-channel patch-embedding grads have equivalent but differently written strides: harmless
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None,
        find_unused_parameters=model.cfg.is_moe)  # experts no image chose get no gradient


def open_log(run: Run) -> None:
    cfg, plan, procs = run.cfg, run.plan, run.procs
    run.log = RunLog(run.run_dir, procs.master, {
        "state": "running", "pid": os.getpid(), "run_dir": str(run.run_dir), "started": now_iso(),
        "command": run.command, "model": cfg.preset, "dataset": cfg.dataset, "world_size": procs.world,
        "total_steps": plan.total_steps, "epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch,
        "resumed_from_step": run.state.step if cfg.resume else None, "error": None,
    }, resumed_step=run.state.step if cfg.resume else None)
    run.log.set_status(step=run.state.step, epoch=run.state.step // plan.steps_per_epoch)
    run.progress = Progress(plan.total_steps, enabled=procs.master and not cfg.quiet)
    amp = "bf16 autocast" if procs.amp_dtype is not None else "fp32"
    run.progress.line(f"{cfg.preset} on {cfg.dataset}: {len(plan.train_set)} train / {len(plan.test_set)} test "
                      f"images, {run.macs['params_total'] / 1e6:.2f}M params, {run.macs['active'] / 1e6:.1f}M "
                      f"MACs/img, {amp}, {procs.device}, {torch.get_num_threads()} threads x {procs.world} "
                      f"process(es) -> {run.run_dir}")


def train_step(run: Run, order, i: int, epoch: int) -> dict:
    """One optimizer step on batch `i` of the epoch's order; -> what the log needs."""
    cfg, procs, plan, step = run.cfg, run.procs, run.plan, run.state.step
    idx = order[i * plan.batch_size:(i + 1) * plan.batch_size][procs.rank::procs.world]
    x, y = to_batch(plan.train_set, idx, procs.device,
                    torch.Generator().manual_seed(_seed(cfg.seed, step, procs.rank, 1)), cfg.augmentation)
    x, targets = mixup(x, y, plan.model_cfg.num_classes, cfg.mixup_alpha, _seed(cfg.seed, step, procs.rank, 3))
    torch.manual_seed(_seed(cfg.seed, step, procs.rank, 2))  # router noise
    lr = lr_at(step, plan.total_steps, plan.warmup, cfg.lr, cfg.min_lr)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    with autocast(procs.device, procs.amp_dtype):
        out = run.model(x, return_routing=True, labels=targets)
    ce = F.cross_entropy(out.logits.float(), targets, label_smoothing=cfg.label_smoothing)
    loss = ce + out.total_aux_loss.float()
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()   # NOTE: backward before the finiteness check, so DDP ranks never hang
    gnorm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else math.inf)
    loss_value = loss.item()
    bad = torch.tensor(float(not (math.isfinite(loss_value) and torch.isfinite(gnorm))))
    if procs.ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise TrainingError(f"loss is {loss_value} (gradient norm {float(gnorm):.3g}) at step {step + 1}, epoch "
                            f"{epoch + 1}: training diverged; lower --lr (now {cfg.lr:g}) or check the data. "
                            + _kept_message(run))
    if step < plan.router_warmup_steps:   # only the routers learn: the others skip this step (grad None)
        for name, p in run.raw.named_parameters():
            if not _is_router(name):
                p.grad = None
    run.optimizer.step()
    run.state.step += 1
    return {"loss": loss_value, "ce": ce.item(), "aux": {k: float(v.detach()) for k, v in out.aux_loss.items()},
            "correct": int((out.logits.argmax(-1) == y).sum()), "n": len(y), "lr": lr, "gnorm": float(gnorm)}


def _is_router(name: str) -> bool:
    """A router's own parameters (the per-image ImageRouter and its norm, or a token MoE's router)."""
    return name.startswith("routers.") or ".mlp.router." in name


def _kept_message(run: Run) -> str:
    if (run.run_dir / TRAIN_STATE).exists() or (run.run_dir / CARD).exists():
        return f"The last good checkpoint in {run.run_dir} is kept."
    return "No checkpoint was saved before it diverged."


def log_step(run: Run, epoch: int, r: dict) -> None:
    """Sums for the epoch and the log window; a train record every log_every steps."""
    state, w, step = run.state, run.window, run.state.step
    for key in ("loss", "ce", "correct", "n"):
        w[key] = w.get(key, 0) + r[key]
    w["aux"] = {k: w.get("aux", {}).get(k, 0.0) + v for k, v in r["aux"].items()}
    w["steps"], w["seen"] = w.get("steps", 0) + 1, w.get("seen", 0) + r["n"] * run.procs.world
    state.epoch_sums["loss"] += r["loss"] * r["n"]
    state.epoch_sums["correct"] += r["correct"]
    state.epoch_sums["seen"] += r["n"]
    eta = (time.time() - run.t_start) / (step - run.start_step) * (run.plan.total_steps - step)
    head = f"ep {epoch + 1}/{run.plan.epochs}"
    if not (step % run.plan.log_every == 0 or step == run.plan.total_steps or step == run.start_step + 1):
        run.progress.update(step, f"{head} loss {r['loss']:.4f} ETA {fmt_time(eta)}")
        return
    now, n = time.time(), w["steps"]
    rec = {"type": "train", "step": step, "epoch": epoch + 1, "loss": round(w["loss"] / n, 5),
           "ce": round(w["ce"] / n, 5), "aux": {k: round(v / n, 6) for k, v in w["aux"].items()},
           "train_accuracy": round(w["correct"] / w["n"], 4), "lr": r["lr"], "grad_norm": round(r["gnorm"], 4),
           "img_per_s": round(w["seen"] / max(1e-9, now - w.get("t", run.t_start)), 1), "eta_s": round(eta, 1),
           "time": round(run.wall(), 2)}
    run.log.write(rec)
    run.log.set_status(step=step, epoch=epoch + 1, eta_s=round(eta, 1), last_train=rec)
    run.progress.update(step, f"{head} loss {rec['loss']:.4f} acc {100 * rec['train_accuracy']:.1f}% "
                              f"{rec['img_per_s']:.0f} img/s ETA {fmt_time(eta)}", force=True)
    run.window = {"t": now}


def save_state(run: Run) -> None:
    """The resume state; refused (TrainingError) when anything is non-finite, so the last good one stays."""
    probe = to_batch(run.plan.train_set, torch.arange(min(32, len(run.plan.train_set))), run.procs.device)[0]
    if not healthy(run.raw, run.optimizer, probe, run.procs.amp_dtype):  # same weights on all ranks: all raise
        raise TrainingError(f"the model's outputs became non-finite at step {run.state.step}: training diverged; "
                            f"lower --lr (now {run.cfg.lr:g}) or check the data. This state was not saved. "
                            + _kept_message(run))
    if run.procs.master:
        s = run.state
        save_train_state(run.run_dir, run.raw, run.optimizer, {
            "spec": run.spec, "step": s.step, "history": s.history, "epoch_sums": s.epoch_sums,
            "last_eval": s.last_eval, "wall_time_s": round(run.wall(), 3), "command": run.command})


def card_for(run: Run, metrics: dict) -> dict:
    cfg, plan, sc = run.cfg, run.plan, run.plan.superclasses
    return {
        "preset": cfg.preset, "dataset": cfg.dataset, "classes": list(plan.train_set.classes),
        "superclasses": {k: sc[k] for k in ("assignment", "names", "method")} if sc else None,
        "metrics": metrics, "macs": run.macs,
        "params": {"total": run.macs["params_total"], "active": run.macs["params_active"]},
        "confusion": None, "history": run.state.history, "command": run.command,
        "wall_time_s": round(run.wall(), 1), "version": __version__,
        **({"routing_tables": run.routing_tables} if run.routing_tables else {}),
        **({"parent": run.parent} if run.parent else {}),
        "training": {"epochs": plan.epochs, "steps": run.state.step, "batch_size": plan.batch_size, "lr": cfg.lr,
                     "min_lr": cfg.min_lr, "weight_decay": cfg.weight_decay, "warmup_steps": plan.warmup,
                     "label_smoothing": cfg.label_smoothing, "augmentation": cfg.augmentation,
                     "mixup_alpha": cfg.mixup_alpha, "mlp_dropout": plan.model_cfg.mlp_dropout,
                     "router_warmup_epochs": cfg.router_warmup_epochs,
                     "init": "upcycled" if run.parent else ("dense twin" if plan.model_cfg.is_moe else "seed"),
                     "seed": cfg.seed, "holdout": cfg.holdout,
                     "precision": "bf16" if run.procs.amp_dtype is not None else "fp32",
                     "world_size": run.procs.world},
    }


def end_of_epoch(run: Run, n_epoch: int, lr: float) -> None:
    """Evaluate (every eval_every epochs and at the end), then checkpoint and save the resume state."""
    cfg, plan, procs, state = run.cfg, run.plan, run.procs, run.state
    if n_epoch % cfg.eval_every == 0 or state.step >= plan.total_steps:
        state.last_eval = eval_record(run.raw, plan.test_set, cfg.eval_batch_size, procs.device, procs.amp_dtype,
                                      procs.rank, procs.world, n_epoch, state.step)
        run.routing_tables = state.last_eval.pop("routing_tables", None)   # the card's, too big for the log
        run.log.write({"type": "eval", **state.last_eval})
    sums = state.epoch_sums
    entry = {"epoch": n_epoch, "step": state.step, "lr": lr,
             "train_loss": round(sums["loss"] / max(1, sums["seen"]), 5),
             "train_accuracy": round(sums["correct"] / max(1, sums["seen"]), 5), "wall_time_s": round(run.wall(), 1)}
    if state.last_eval.get("epoch") == n_epoch:
        entry.update({k: v for k, v in state.last_eval.items() if k not in ("epoch", "step")})
    state.history = [h for h in state.history if h["epoch"] != n_epoch] + [entry]
    save_state(run)
    if procs.master:
        ev = state.last_eval
        metrics = {"test_accuracy": ev.get("test_accuracy"), "test_loss": ev.get("test_loss"),
                   "evaluated_at_epoch": ev.get("epoch"), "epoch": n_epoch, "step": state.step,
                   "train_loss": entry["train_loss"], "train_accuracy": entry["train_accuracy"],
                   **({"expert_load": ev["expert_load"]} if "expert_load" in ev else {})}
        save_checkpoint(run.run_dir, run.raw, card_for(run, metrics))
        snapshot_routing(run, n_epoch)
        run.log.set_status(step=state.step, epoch=n_epoch, last_eval=ev)
    run.progress.line(f"epoch {n_epoch}/{plan.epochs}: train loss {entry['train_loss']:.4f}, test accuracy "
                      f"{100 * (state.last_eval.get('test_accuracy') or 0):.2f}% "
                      f"({fmt_time(time.time() - run.t_start)} elapsed)")


def snapshot_routing(run: Run, n_epoch: int) -> None:
    """Where a fixed probe of test images goes this epoch (workbench/snapshots.py), and its summary record."""
    if not run.raw.cfg.is_moe:
        return
    test = run.plan.test_set
    probe = snapshots.probe_indices(len(test))
    x = normalize(test.images[probe], test.mean, test.std).to(run.procs.device)
    layers = snapshots.routing_snapshot(run.raw, x)
    labels = test.labels[probe].numpy()
    previous = snapshots.load_epoch(run.run_dir, n_epoch - 1)
    snapshots.save_snapshot(run.run_dir, n_epoch, probe, labels, layers)
    run.log.write({"type": "routing", "step": run.state.step, "epoch": n_epoch,
                   **snapshots.epoch_summary(layers, labels, run.raw.cfg.superclasses, previous)})


def record_failure(run: Run, e: BaseException) -> None:
    """status.json and metrics.jsonl say how the run ended: cancelled (SIGTERM, Ctrl-C) or failed."""
    state = "cancelled" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
    msg = str(e) or type(e).__name__
    run.log.write({"type": "error", "step": run.state.step, "state": state, "message": msg})
    run.log.set_status(state=state, step=run.state.step, error=msg)
    run.progress.line(f"{state}: {msg}")
    run.log.close()


def finish(run: Run) -> dict:
    """The last records, the DDP consistency check, and the summary returned by train()."""
    procs, state, wall = run.procs, run.state, round(run.wall(), 1)
    if procs.ddp:
        (run.run_dir / "ddp").mkdir(exist_ok=True)
        atomic_write_json(run.run_dir / "ddp" / f"rank{procs.rank}.json",
                          {"rank": procs.rank, "step": state.step, "param_sha256": param_sha256(run.raw)})
        dist.barrier()
    summary = {"run_dir": str(run.run_dir), "test_accuracy": state.last_eval.get("test_accuracy"),
               "steps": state.step, "epochs": run.plan.epochs, "history": state.history, "wall_time_s": wall,
               "command": run.command}
    run.log.write({"type": "done", "step": state.step, "epoch": run.plan.epochs,
                   "test_accuracy": summary["test_accuracy"], "wall_time_s": wall})
    run.log.set_status(state="finished", step=state.step, last_eval=state.last_eval, wall_time_s=wall)
    if procs.master:
        summary["card"] = read_card(run.run_dir)
    run.log.close()
    return summary


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig) -> dict:
    """Run training; returns a summary dict (run_dir, test_accuracy, steps, history, card).

    Raises TrainingError on a non-finite loss or weights (the last good checkpoint
    stays), ValueError for bad options, data, maps or resume mismatches.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig (workbench.train_config), got {type(cfg).__name__}")
    cfg.validate()
    procs = setup_processes(cfg)
    plan = build_data(cfg, procs)
    raw, optimizer, macs, parent = build_model_and_optimizer(cfg, plan, procs)
    run_dir = run_folder(cfg)
    spec = run_spec(cfg, plan, parent)
    state = resume_or_start(cfg, plan, raw, optimizer, run_dir, spec)
    run = Run(cfg, procs, plan, raw, raw, optimizer, run_dir, spec, state, cfg.command(procs.world), macs,
              start_step=state.step, parent=parent)
    prepare_folder(run)
    run.model = wrap_ddp(raw, procs)
    open_log(run)
    run.model.train()
    try:
        while state.step < plan.total_steps:
            epoch = state.step // plan.steps_per_epoch            # 0-based; logs say epoch + 1
            order = epoch_order(len(plan.train_set), cfg.seed, epoch)
            if state.epoch_sums.get("epoch") != epoch:
                state.epoch_sums = {"epoch": epoch, "loss": 0.0, "correct": 0, "seen": 0}
            lr = cfg.lr
            for i in range(state.step - epoch * plan.steps_per_epoch, plan.steps_per_epoch):
                if state.step >= plan.total_steps:
                    break
                r = train_step(run, order, i, epoch)
                lr = r["lr"]
                log_step(run, epoch, r)
                if cfg.save_every_steps and state.step % cfg.save_every_steps == 0 \
                        and state.step % plan.steps_per_epoch:   # (an epoch's end saves after evaluating)
                    save_state(run)
            if state.step % plan.steps_per_epoch == 0 or state.step >= plan.total_steps:
                end_of_epoch(run, epoch + 1, lr)
    except BaseException as e:
        record_failure(run, e)
        raise
    return finish(run)


# ----------------------------------------------------------------------------- the CLI
def _stop_on_sigterm(signum, frame):
    # the app stops runs with SIGTERM: record it as "cancelled", not as a crash
    raise KeyboardInterrupt("stopped by SIGTERM")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    code = 0
    try:
        cfg = from_args(parse_args(argv))
        summary = train(cfg)
        if not cfg.quiet and int(os.environ.get("RANK", "0")) == 0:
            print(f"done: test accuracy {100 * summary['test_accuracy']:.2f}% after {summary['steps']} steps; "
                  f"checkpoint in {summary['run_dir']}", file=sys.stderr)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt as e:
        print(f"stopped: {e}", file=sys.stderr)
        code = 130
    except (ValueError, OSError) as e:  # bad options, data, maps, resume mismatches, unwritable folders
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
