"""Train one model from a preset: `python -m workbench.train --model vit-6x96 --dataset fashion-mnist --out runs/a`.

One plain loop, top to bottom (nanoGPT style): data -> model -> AdamW with
linear warmup + cosine decay -> steps (CE with label smoothing + the model's
auxiliary losses: V-MoE balancing losses, the Mobile V-MoE super-class loss)
-> each epoch: evaluate on the test split, write a checkpoint and the resume
state. `torchrun --nproc_per_node=N -m workbench.train ...` runs the same loop
data-parallel (DDP; gloo on CPU, nccl on GPU); `--batch-size` is the global
batch, split across processes.

The run directory (`--out`) is itself a checkpoint (`model.safetensors` +
`card.json`, see checkpoint.py) plus:
- `train_state.safetensors`  model, AdamW moments, step and options for `--resume`
- `metrics.jsonl`            one JSON object per line, flushed as it happens:
                             {"type": "train" | "eval" | "done" | "error", ...}
- `status.json`              state (running/finished/failed/stopped), pid, progress,
                             last metrics, error; rewritten atomically for the app

Resume is exact: every random choice is a pure function of (seed, step):
the epoch's shuffle is seeded by (seed, epoch), the augmentation and router
noise of a step by (seed, step, rank). A resumed run skips the batches its
epoch already did and continues with the same numbers an uninterrupted run
would have seen, so no RNG state needs saving.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

DEFAULT_MODEL = "vit-6x96"
DEFAULT_DATASET = "fashion-mnist"


class TrainingError(RuntimeError):
    """Training stopped for a reason the user should read (non-finite loss, bad resume)."""


# ----------------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m workbench.train",
        description="Train a dense ViT, V-MoE or Mobile V-MoE from a preset. "
                    "Data-parallel: torchrun --nproc_per_node=N -m workbench.train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model and data")
    m.add_argument("--model", default=DEFAULT_MODEL, metavar="PRESET",
                   help="vit-<L>x<D>, mvmoe-<L>x<D>-e<E>k<K> (per image) or vmoe-<L>x<D>-e<E>k<K> (per token)")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model option override, VALUE as JSON or a string (repeatable), e.g. router_input=cls")
    m.add_argument("--dataset", default=DEFAULT_DATASET, metavar="NAME",
                   help="fashion-mnist, cifar10, cifar100, imagefolder:PATH or synthetic")
    m.add_argument("--data-root", default=None, metavar="DIR", help="where the dataset files are")
    m.add_argument("--superclasses", default=None, metavar="FILE",
                   help="super-class map JSON for the Mobile V-MoE router loss (E must equal its group "
                        "count), or 'reference' for the dataset's own hierarchy")
    m.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                   help="train on the training split minus this held-out fraction (workbench.data.heldout_split)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None,
                   help="passes over the training set (default 10, or as many as --max-steps needs)")
    o.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps in all (with --epochs: whichever ends first)")
    o.add_argument("--batch-size", type=int, default=128, help="global batch size (split across DDP processes)")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    o.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    o.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms, biases, "
                                                                    "position embedding, class token)")
    o.add_argument("--warmup-epochs", type=float, default=None, help="linear warmup length in epochs")
    o.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup length in steps (default: 5%% of all steps)")
    o.add_argument("--label-smoothing", type=float, default=0.1)
    o.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    o.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/<model>-<dataset>-<time>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved state")
    r.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: all cores / processes)")
    r.add_argument("--eval-every", type=int, default=1, metavar="EPOCHS", help="evaluate every N epochs")
    r.add_argument("--eval-batch-size", type=int, default=256)
    r.add_argument("--log-every", type=int, default=10, metavar="STEPS", help="metrics.jsonl train record interval")
    r.add_argument("--save-every-steps", type=int, default=0, metavar="STEPS",
                   help="also save the resume state every N steps (0: only at epoch ends)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def parse_overrides(items: Sequence[str]) -> dict:
    """['router_input=cls', 'moe_layers=[4,5]'] -> {'router_input': 'cls', 'moe_layers': [4, 5]}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _command(argv: Optional[Sequence[str]], args: argparse.Namespace) -> str:
    """The command line of this run: the real argv, or one rebuilt from the options."""
    if argv is None:
        parser, argv = build_parser(), []
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            value, flag = getattr(args, action.dest, action.default), action.option_strings[-1]
            if value == action.default:
                continue
            if isinstance(action, argparse._StoreTrueAction):
                argv.append(flag)
            elif isinstance(value, list):
                for v in value:
                    argv += [flag, str(v)]
            else:
                argv += [flag, str(value)]
    prefix = "torchrun --nproc_per_node={} -m workbench.train".format(os.environ["WORLD_SIZE"]) \
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python -m workbench.train"
    return " ".join([prefix, shlex.join([str(a) for a in argv])]).strip()


# ----------------------------------------------------------------------------- pieces of the loop
def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 dot products.
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10", "AMX", "ALL")


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively (oneDNN), so autocast pays off.

    NOTE: the probes read CPUID, so a oneDNN capped below bf16 (ONEDNN_MAX_CPU_ISA=AVX2, e.g.
    to reproduce an AVX2-only machine) is checked apart: bf16 is emulated there, many times slower.
    """
    import torch

    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap and not cap.startswith(ONEDNN_BF16_ISAS):
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:
            pass
    return False


def resolve_precision(precision: str, device) -> Optional["torch.dtype"]:
    """-> the autocast dtype (torch.bfloat16) or None for plain fp32."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device, amp_dtype):
    import contextlib

    import torch

    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr`, per optimizer step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


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
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch, 0x5EED)))


def load_superclasses(spec: str, dataset) -> dict:
    """--superclasses FILE|reference -> {"assignment", "names", "method", "file"} (the card's form)."""
    if spec == "reference":
        if dataset.reference_groups is None:
            raise ValueError(f"dataset {dataset.name!r} has no reference hierarchy; pass a super-class map file")
        a = [int(g) for g in dataset.reference_groups]
        names = list(dataset.reference_group_names or [f"group {g}" for g in range(max(a) + 1)])
        return {"assignment": a, "names": names, "method": f"reference:{dataset.reference_source}", "file": None}
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--superclasses {spec}: no such file")
    from analysis.superclasses import load_superclass_map

    a = load_superclass_map(path, dataset.classes)  # checks classes and groups, with clear messages
    data = json.loads(path.read_text())
    if data.get("dataset") not in (None, dataset.name):
        print(f"note: super-class map {path} was made for {data['dataset']!r}, used with {dataset.name!r}",
              file=sys.stderr)
    names = data.get("groups") or [f"group {g}" for g in range(max(a) + 1)]
    return {"assignment": a, "names": [str(n) for n in names], "method": str(data.get("method", "file")),
            "file": str(path)}


def _batch(dataset, idx, device, generator=None):
    """uint8 images at `idx` -> normalised (and, with a generator, augmented) float batch."""
    from .data import augment, normalize

    x = normalize(dataset.images[idx], dataset.mean, dataset.std)
    if generator is not None:
        x = augment(x, dataset.hflip, generator)
    return x.to(device, non_blocking=True), dataset.labels[idx].to(device, non_blocking=True)


def eval_stats(model, dataset, batch_size: int = 256, device=None, amp_dtype=None, shard=(0, 1)) -> dict:
    """Accuracy, loss and expert load on `dataset` (or the `shard=(rank, world)` slice of it).

    Returns sums so that DDP ranks can add them: correct, total, loss_sum, and
    `load`: (MoE layers, E + 2) counts [kept assignments per expert..., dropped, all].
    """
    import torch
    import torch.nn.functional as F

    device = device or next(model.parameters()).device
    cfg = model.cfg
    layers = cfg.moe_block_indices()
    load = torch.zeros(len(layers), cfg.num_experts + 2, dtype=torch.float64)
    correct = total = 0
    loss_sum = 0.0
    rank, world = shard
    idx_all = torch.arange(rank, len(dataset), world)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(idx_all), batch_size):
            x, y = _batch(dataset, idx_all[i:i + batch_size], device)
            with autocast(device, amp_dtype):
                out = model(x, return_routing=True)
            logits = out.logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
            for row, rec in enumerate(out.routing):
                kept = rec.experts[rec.kept].reshape(-1).cpu()
                load[row, :cfg.num_experts] += torch.bincount(kept, minlength=cfg.num_experts).double()
                load[row, -2] += rec.kept.numel() - kept.numel()
                load[row, -1] += rec.kept.numel()
    model.train(was_training)
    return {"correct": correct, "total": total, "loss_sum": loss_sum, "load": load, "layers": layers,
            "kinds": ["token" if cfg.family == "vmoe" else "image"] * len(layers)}


def expert_load_summary(stats: dict) -> list:
    """Per MoE layer: share of kept (image or token) assignments per expert, and the dropped share."""
    out = []
    for row, layer in enumerate(stats["layers"]):
        counts = stats["load"][row]
        kept = counts[:-2]
        out.append({
            "layer": int(layer), "kind": stats["kinds"][row],
            "fraction": [round(float(c / max(1.0, float(kept.sum()))), 4) for c in kept],
            "dropped": round(float(counts[-2] / max(1.0, float(counts[-1]))), 4),
        })
    return out


def evaluate(model, dataset, batch_size: int = 256, device=None, precision: str = "fp32") -> float:
    """Top-1 accuracy (a fraction) of `model` on `dataset`."""
    device = device or next(model.parameters()).device
    s = eval_stats(model, dataset, batch_size, device, resolve_precision(precision, device))
    return s["correct"] / max(1, s["total"])


class Progress:
    """A one-line progress bar on stderr (a plain line per update when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last_draw = 0.0

    def update(self, step: int, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.time()
        if self.tty:
            if not force and now - self.last_draw < 0.1:
                return
            frac = step / max(1, self.total)
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            self.stream.write(f"\r[{bar}] {step}/{self.total} {text}\033[K")
        elif force:
            self.stream.write(f"step {step}/{self.total} {text}\n")
        self.stream.flush()
        self.last_draw = now

    def line(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class RunLog:
    """metrics.jsonl (append, flush per record) and status.json (atomic rewrite) of a run directory."""

    def __init__(self, run_dir: Path, enabled: bool, base_status: dict):
        self.run_dir, self.enabled = run_dir, enabled
        self.status = dict(base_status)
        self.f = open(run_dir / "metrics.jsonl", "a", buffering=1) if enabled else None

    def write(self, record: dict) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def set_status(self, **fields) -> None:
        if not self.enabled:
            return
        from .checkpoint import atomic_write_json

        self.status.update(fields, updated=_now())
        atomic_write_json(self.run_dir / "status.json", self.status)

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records from after the saved step (they will be logged again)."""
    if not path.exists():
        return
    from .checkpoint import atomic_write_bytes

    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("type") in ("done", "error") or rec.get("step", 0) > step:
            continue
        keep.append(line)
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def param_sha256(model) -> str:
    """Hash of all parameters and buffers: equal across DDP ranks when they are in sync."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the loop
_RESUME_MUST_MATCH = ("model", "overrides", "dataset", "holdout", "superclasses", "seed", "batch_size")


def train(args: Union[argparse.Namespace, Sequence[str], dict, None] = None, argv: Optional[Sequence[str]] = None) -> dict:
    """Run training; returns a summary dict (run_dir, test_accuracy, steps, history, card).

    `args` is a parsed Namespace, a list of command-line arguments, or a dict of
    option names (`{"model": "vit-2x64", "epochs": 1, "out": "runs/x"}`).
    Raises TrainingError on a non-finite loss (the last good checkpoint stays),
    ValueError for bad options.
    """
    if args is None or isinstance(args, (list, tuple)):
        argv = list(args or [])
        args = parse_args(argv)
    elif isinstance(args, dict):
        ns = parse_args([])
        unknown = sorted(set(args) - set(vars(ns)))
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}")
        vars(ns).update(args)
        args = ns
    command = _command(argv, args)

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from . import __version__
    from .checkpoint import (TRAIN_STATE, load_train_state, read_card, read_train_info, save_checkpoint,
                             save_train_state)
    from .data import heldout_split, load_dataset
    from .flops import count_macs
    from .models import create_model

    # ---- processes and devices
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    ddp = world > 1
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads or max(1, cores // local_world))
    amp_dtype = resolve_precision(args.precision, device)

    # ---- validate options
    for name in ("epochs", "max_steps", "batch_size", "eval_every", "log_every", "eval_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.holdout < 1.0:
        raise ValueError(f"--holdout must be a fraction in [0, 1), got {args.holdout}")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    overrides = parse_overrides(args.overrides)

    # ---- data
    train_set = load_dataset(args.dataset, "train", root=args.data_root)
    test_set = load_dataset(args.dataset, "test", root=args.data_root)
    if args.holdout > 0:
        train_idx, _ = heldout_split(len(train_set), args.holdout)
        train_set = train_set.subset(train_idx)
    C, H, W = train_set.image_shape
    if H != W:
        raise ValueError(f"square images only, {args.dataset} has {H}x{W}")
    batch_size = args.batch_size
    if len(train_set) < batch_size:
        batch_size = len(train_set) // world * world
        if batch_size < world:
            raise ValueError(f"{args.dataset}: {len(train_set)} training images are too few for {world} processes")
        print(f"note: --batch-size lowered to {batch_size}, the size of the training set", file=sys.stderr)
    steps_per_epoch = len(train_set) // batch_size   # drop the last partial batch
    if args.max_steps is None:
        total_steps = (args.epochs or 10) * steps_per_epoch
    else:
        total_steps = min(args.max_steps, args.epochs * steps_per_epoch) if args.epochs else args.max_steps
    epochs = math.ceil(total_steps / steps_per_epoch)
    if args.warmup_steps is not None:
        warmup = args.warmup_steps
    elif args.warmup_epochs is not None:
        warmup = round(args.warmup_epochs * steps_per_epoch)
    else:
        warmup = round(0.05 * total_steps)
    warmup = max(0, min(warmup, total_steps - 1))

    # ---- model
    superclasses = None
    if args.superclasses:
        if "superclasses" in overrides:
            raise ValueError("give the super-class map either with --superclasses or --set superclasses=, not both")
        superclasses = load_superclasses(args.superclasses, train_set)
        groups = max(superclasses["assignment"]) + 1
        experts = overrides.get("num_experts") or _preset_experts(args.model)
        if experts and experts != groups:
            raise ValueError(f"the super-class map has {groups} groups but {args.model} has {experts} experts; "
                             f"E must equal the number of super-classes (e.g. a -e{groups}k1 preset)")
        overrides["superclasses"] = superclasses["assignment"]
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = create_model(args.model, num_classes=train_set.num_classes, img_size=H, in_chans=C, **overrides)
    model.to(device)
    raw = model
    macs = count_macs(raw, (C, H, W))
    optimizer = torch.optim.AdamW(param_groups(raw, args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                  fused=device.type == "cuda" or None)

    # ---- run directory and resume
    run_dir = Path(args.out or f"runs/{args.model}-{args.dataset.replace(':', '_').replace('/', '_')}-"
                              f"{time.strftime('%Y%m%d-%H%M%S')}")
    run_spec = {"model": args.model, "overrides": {k: v for k, v in overrides.items() if k != "superclasses"},
                "dataset": args.dataset, "holdout": args.holdout,
                "superclasses": superclasses["assignment"] if superclasses else None,
                "seed": args.seed, "batch_size": batch_size}
    step, history, wall_before, epoch_sums = 0, [], 0.0, {}
    last_eval: dict = {}
    if args.resume:
        if not (run_dir / TRAIN_STATE).is_file():
            raise ValueError(f"--resume: {run_dir} has no {TRAIN_STATE} to continue from")
        saved = read_train_info(run_dir)["spec"]
        changed = [k for k in _RESUME_MUST_MATCH if saved.get(k) != json.loads(json.dumps(run_spec[k]))]
        if changed:
            raise ValueError(f"--resume: {run_dir} was trained with different {changed}: "
                             + ", ".join(f"{k}={saved.get(k)!r}" for k in changed))
        info = load_train_state(run_dir, raw, optimizer)
        step, history, wall_before = info["step"], info["history"], info["wall_time_s"]
        epoch_sums, last_eval = info.get("epoch_sums", {}), info.get("last_eval", {})
        if step >= total_steps:
            raise ValueError(f"--resume: the run is already at step {step} of {total_steps}; "
                             "raise --epochs or --max-steps to train further")
    elif (run_dir / TRAIN_STATE).exists() or (run_dir / "card.json").exists():
        raise ValueError(f"{run_dir} already holds a run; add --resume to continue it or choose another --out")
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.resume:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
    if ddp:
        dist.barrier()
        # 1-channel patch-embedding grads have equivalent but differently written strides: harmless
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=raw.cfg.is_moe,  # experts no image chose get no gradient
        )

    t_start = time.time()
    log = RunLog(run_dir, master, {
        "state": "running", "pid": os.getpid(), "run_dir": str(run_dir), "started": _now(), "command": command,
        "model": args.model, "dataset": args.dataset, "world_size": world, "total_steps": total_steps,
        "epochs": epochs, "steps_per_epoch": steps_per_epoch, "resumed_from_step": step if args.resume else None,
        "error": None,
    })
    log.set_status(step=step, epoch=step // steps_per_epoch)
    progress = Progress(total_steps, enabled=master and not args.quiet)
    if master and not args.quiet:
        amp = "bf16 autocast" if amp_dtype is not None else "fp32"
        progress.line(f"{args.model} on {args.dataset}: {len(train_set)} train / {len(test_set)} test images, "
                      f"{macs['params_total'] / 1e6:.2f}M params, {macs['active'] / 1e6:.1f}M MACs/img, "
                      f"{amp}, {device}, {torch.get_num_threads()} threads x {world} process(es) -> {run_dir}")

    def card_for(metrics: dict) -> dict:
        return {
            "preset": args.model, "dataset": args.dataset, "classes": list(train_set.classes),
            "superclasses": ({k: superclasses[k] for k in ("assignment", "names", "method")}
                             if superclasses else None),
            "metrics": metrics, "macs": macs,
            "params": {"total": macs["params_total"], "active": macs["params_active"]},
            "confusion": None, "history": history, "command": command,
            "wall_time_s": round(wall_before + time.time() - t_start, 1), "version": __version__,
            "training": {"epochs": epochs, "steps": step, "batch_size": batch_size, "lr": args.lr,
                         "min_lr": args.min_lr, "weight_decay": args.weight_decay, "warmup_steps": warmup,
                         "label_smoothing": args.label_smoothing, "seed": args.seed, "holdout": args.holdout,
                         "precision": "bf16" if amp_dtype is not None else "fp32", "world_size": world},
        }

    def save_state() -> None:
        if master:
            save_train_state(run_dir, raw, optimizer, {
                "spec": run_spec, "step": step, "history": history, "epoch_sums": epoch_sums,
                "last_eval": last_eval, "wall_time_s": round(wall_before + time.time() - t_start, 3),
                "command": command,
            })

    def run_eval(epoch: int) -> dict:
        s = eval_stats(raw, test_set, args.eval_batch_size, device, amp_dtype, shard=(rank, world))
        if ddp:
            packed = torch.cat([torch.tensor([s["correct"], s["total"], s["loss_sum"]], dtype=torch.float64),
                                s["load"].flatten()])
            dist.all_reduce(packed)
            s.update(correct=packed[0].item(), total=packed[1].item(), loss_sum=packed[2].item(),
                     load=packed[3:].view_as(s["load"]))
        return {"epoch": epoch, "step": step, "test_accuracy": round(s["correct"] / max(1, s["total"]), 5),
                "test_loss": round(s["loss_sum"] / max(1, s["total"]), 5),
                **({"expert_load": expert_load_summary(s)} if raw.cfg.is_moe else {})}

    # ---- train
    t_log, seen_log, n_log = time.time(), 0, 0
    sums = {"loss": 0.0, "ce": 0.0, "aux": {}, "correct": 0}
    start_step = step
    model.train()
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch            # 0-based; logs say epoch + 1
            order = epoch_order(len(train_set), args.seed, epoch)
            if not epoch_sums or epoch_sums.get("epoch") != epoch:
                epoch_sums = {"epoch": epoch, "loss": 0.0, "correct": 0, "seen": 0}
            for i in range(step - epoch * steps_per_epoch, steps_per_epoch):
                if step >= total_steps:
                    break
                idx = order[i * batch_size:(i + 1) * batch_size][rank::world]
                x, y = _batch(train_set, idx, device, torch.Generator().manual_seed(_seed(args.seed, step, rank, 1)))
                torch.manual_seed(_seed(args.seed, step, rank, 2))  # router noise
                lr = lr_at(step, total_steps, warmup, args.lr, args.min_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                with autocast(device, amp_dtype):
                    out = model(x, return_routing=True, labels=y)
                ce = F.cross_entropy(out.logits.float(), y, label_smoothing=args.label_smoothing)
                loss = ce + out.total_aux_loss.float()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()   # NOTE: backward before the finiteness check, so DDP ranks never hang
                gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.clip_grad if args.clip_grad > 0 else
                                                       float("inf"))
                loss_value = loss.item()
                bad = torch.tensor(float(not (math.isfinite(loss_value) and torch.isfinite(gnorm))))
                if ddp:
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                if bad.item():
                    raise TrainingError(
                        f"loss is {loss_value} (gradient norm {float(gnorm):.3g}) at step {step + 1}, "
                        f"epoch {epoch + 1}: training diverged; lower --lr (now {args.lr:g}) or check the data. "
                        f"The last good checkpoint in {run_dir} is kept.")
                optimizer.step()
                step += 1

                # ---- bookkeeping (rank 0 logs; throughput counts all processes)
                correct = int((out.logits.argmax(-1) == y).sum())
                sums["loss"] += loss_value
                sums["ce"] += ce.item()
                sums["correct"] += correct
                for k, v in out.aux_loss.items():
                    sums["aux"][k] = sums["aux"].get(k, 0.0) + float(v.detach())
                n_log += 1
                seen_log += len(y) * world
                epoch_sums["loss"] += loss_value * len(y)
                epoch_sums["correct"] += correct
                epoch_sums["seen"] += len(y)
                done_here = step - start_step
                eta = (time.time() - t_start) / done_here * (total_steps - step)
                if master and (step % args.log_every == 0 or step == total_steps or step == start_step + 1):
                    now = time.time()
                    rec = {"type": "train", "step": step, "epoch": epoch + 1, "loss": round(sums["loss"] / n_log, 5),
                           "ce": round(sums["ce"] / n_log, 5),
                           "aux": {k: round(v / n_log, 6) for k, v in sums["aux"].items()},
                           "train_accuracy": round(sums["correct"] / (n_log * len(y)), 4),
                           "lr": lr, "grad_norm": round(float(gnorm), 4),
                           "img_per_s": round(seen_log / max(1e-9, now - t_log), 1), "eta_s": round(eta, 1),
                           "time": round(wall_before + now - t_start, 2)}
                    log.write(rec)
                    log.set_status(step=step, epoch=epoch + 1, eta_s=round(eta, 1), last_train=rec)
                    progress.update(step, f"ep {epoch + 1}/{epochs} loss {rec['loss']:.4f} "
                                          f"acc {100 * rec['train_accuracy']:.1f}% {rec['img_per_s']:.0f} img/s "
                                          f"ETA {_fmt_time(eta)}", force=True)
                    t_log, seen_log, n_log = now, 0, 0
                    sums = {"loss": 0.0, "ce": 0.0, "aux": {}, "correct": 0}
                elif master:
                    progress.update(step, f"ep {epoch + 1}/{epochs} loss {loss_value:.4f} ETA {_fmt_time(eta)}")
                # (an epoch's end saves below, after evaluating)
                if args.save_every_steps and step % args.save_every_steps == 0 and step % steps_per_epoch:
                    save_state()

            # ---- end of an epoch (or of the run): evaluate, checkpoint, resume state
            epoch_done = step % steps_per_epoch == 0
            if not epoch_done and step < total_steps:
                continue
            n_epoch = epoch + 1
            if n_epoch % args.eval_every == 0 or step >= total_steps:
                last_eval = run_eval(n_epoch)
                if master:
                    log.write({"type": "eval", **last_eval})
            entry = {"epoch": n_epoch, "step": step, "lr": lr,
                     "train_loss": round(epoch_sums["loss"] / max(1, epoch_sums["seen"]), 5),
                     "train_accuracy": round(epoch_sums["correct"] / max(1, epoch_sums["seen"]), 5),
                     "wall_time_s": round(wall_before + time.time() - t_start, 1)}
            if last_eval.get("epoch") == n_epoch:
                entry.update({k: v for k, v in last_eval.items() if k not in ("epoch", "step")})
            history = [h for h in history if h["epoch"] != n_epoch] + [entry]
            if master:
                save_state()
                metrics = {"test_accuracy": last_eval.get("test_accuracy"), "test_loss": last_eval.get("test_loss"),
                           "evaluated_at_epoch": last_eval.get("epoch"), "epoch": n_epoch, "step": step,
                           "train_loss": entry["train_loss"], "train_accuracy": entry["train_accuracy"]}
                if "expert_load" in last_eval:
                    metrics["expert_load"] = last_eval["expert_load"]
                save_checkpoint(run_dir, raw, card_for(metrics))
                log.set_status(step=step, epoch=n_epoch, last_eval=last_eval)
                progress.line(f"epoch {n_epoch}/{epochs}: train loss {entry['train_loss']:.4f}, "
                              f"test accuracy {100 * (last_eval.get('test_accuracy') or 0):.2f}% "
                              f"({_fmt_time(time.time() - t_start)} elapsed)")
    except BaseException as e:
        if master:
            state = "stopped" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
            msg = str(e) or type(e).__name__
            log.write({"type": "error", "step": step, "state": state, "message": msg})
            log.set_status(state=state, step=step, error=msg)
            progress.line(f"{state}: {msg}")
        log.close()
        raise

    wall = round(wall_before + time.time() - t_start, 1)
    if ddp:
        from .checkpoint import atomic_write_json

        (run_dir / "ddp").mkdir(exist_ok=True)
        atomic_write_json(run_dir / "ddp" / f"rank{rank}.json", {"rank": rank, "step": step,
                                                                  "param_sha256": param_sha256(raw)})
        dist.barrier()
    summary = {"run_dir": str(run_dir), "test_accuracy": last_eval.get("test_accuracy"), "steps": step,
               "epochs": epochs, "history": history, "wall_time_s": wall, "command": command}
    if master:
        log.write({"type": "done", "step": step, "epoch": epochs, "test_accuracy": summary["test_accuracy"],
                   "wall_time_s": wall})
        log.set_status(state="finished", step=step, last_eval=last_eval, wall_time_s=wall)
        summary["card"] = read_card(run_dir)
    log.close()
    return summary


def _preset_experts(preset: str) -> Optional[int]:
    from .models import parse_preset

    return parse_preset(preset).get("num_experts")


def _stop_on_sigterm(signum, frame):
    # the app stops runs with SIGTERM: record it as "stopped", not as a crash
    raise KeyboardInterrupt("stopped by SIGTERM")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    code = 0
    try:
        summary = train(args, argv=argv)
        if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
            acc = summary["test_accuracy"]
            print(f"done: test accuracy {100 * acc:.2f}% after {summary['steps']} steps; checkpoint in "
                  f"{summary['run_dir']}", file=sys.stderr)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt as e:
        print(f"stopped: {e}", file=sys.stderr)
        code = 130
    except ValueError as e:  # bad options, datasets, maps, resume mismatches (CheckpointError/DatasetError too)
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
