"""One training run, as one typed config: `TrainConfig` (a `ModelConfig` + optimisation and run fields).

Three edges build one, each parsing its own input once:
- the CLI (`python -m workbench.train --model mvmoe-6x96-e4k1 ...`): `from_args(parse_args(argv))`;
  the preset string is parsed here, and only here, into a `ModelConfig`;
- the app's Train form: builds `ModelConfig(...)` from its widgets and hands the config to
  the job as `train_config.json` in the run folder (`python -m workbench.train --config FILE`);
- the pipeline: builds one per stage and calls `train(cfg)` directly.

Each rule is checked where it lives: ranges of run fields in `TrainConfig.validate`,
architecture rules (k <= E, E == number of super-classes, lambda >= 0) in `ModelConfig`.
The fields `num_classes`, `img_size` and `in_chans` of the model are set from the dataset
(`fit_to_dataset`), which is also where a super-class map becomes `model.superclasses`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from .models.config import ModelConfig

DEFAULT_MODEL = "vit-6x96"
DEFAULT_DATASET = "fashion-mnist"
PRECISIONS = ("auto", "fp32", "bf16")
AUGMENTATIONS = ("crop-flip", "flip", "none")
DATA_FIELDS = ("num_classes", "img_size", "in_chans")  # ModelConfig fields the dataset decides
MAX_THREADS = 1024
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _models():
    """workbench.models.config, imported when first needed: importing the models package imports
    torch, which `python -m workbench.train --help` should not wait for."""
    from .models import config

    return config


def _default_model() -> "ModelConfig":
    return model_from_preset(DEFAULT_MODEL, {})


@dataclass
class TrainConfig:
    """Every choice of a training run. Field `x_y` is the CLI flag `--x-y`."""

    model: ModelConfig = field(default_factory=_default_model)  # architecture and routing (k, E, lambda, ...)
    # --- data
    dataset: str = DEFAULT_DATASET          # fashion-mnist | cifar10 | cifar100 | imagefolder:PATH | synthetic
    data_root: Optional[str] = None         # where the dataset files are (None: the usual places)
    superclasses: Optional[str] = None      # super-class map file, or "reference" (the dataset's hierarchy)
    holdout: float = 0.0                    # train on the training split minus this held-out fraction
    # --- optimisation
    epochs: Optional[int] = None            # passes over the training set (None: 10, or what max_steps needs)
    max_steps: Optional[int] = None         # optimizer steps in all (with epochs: whichever ends first)
    batch_size: int = 128                   # global batch, split across DDP processes
    lr: float = 1e-3                        # peak learning rate (AdamW)
    min_lr: float = 1e-5                    # learning rate at the end of the cosine decay
    weight_decay: float = 0.05              # AdamW decay (not on norms, biases, position embedding, class token)
    warmup_epochs: Optional[float] = None   # linear warmup length in epochs
    warmup_steps: Optional[int] = None      # linear warmup length in steps (None: 5% of all steps)
    label_smoothing: float = 0.1            # cross-entropy label smoothing, in [0, 1)
    augmentation: str = "crop-flip"         # crop-flip | flip | none (training batches only)
    mixup_alpha: float = 0.0                # mixup: blend each batch with a shuffle of itself, weight ~ Beta(a, a)
    #                                         (0: off; around 0.2 in the regularised recipe)
    clip_grad: float = 1.0                  # max gradient norm (0: off)
    seed: int = 0                           # weights, shuffles, augmentation and router noise
    init_from: Optional[str] = None         # a trained dense checkpoint to start from: a MoE is upcycled
    #                                         (every expert a copy of its block's MLP), a dense model continues
    router_warmup_epochs: int = 0           # train only the routers for the first N epochs, everything else
    #                                         frozen (an upcycled MoE's new router learns before its experts move)
    # --- run
    out: Optional[str] = None               # run folder (None: runs/<model>-<dataset>-<time>)
    resume: bool = False                    # continue the run in `out` from its last saved state
    precision: str = "auto"                 # auto (bf16 where native) | fp32 | bf16
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None           # torch CPU threads per process (None: cores / processes)
    eval_every: int = 1                     # evaluate every N epochs
    eval_batch_size: int = 256
    log_every: int = 10                     # steps between metrics.jsonl train records (at most; a short run
    #                                         logs more often, ~100 records)
    save_every_steps: int = 0               # also save the resume state every N steps (0: at epoch ends)
    quiet: bool = False                     # no progress bar

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = model_config(self.model)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        """Range-check every run field; ValueError naming the flag and the rule. Returns self."""
        if not isinstance(self.model, _models().ModelConfig):
            raise ValueError("model must be a ModelConfig")
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ValueError("--dataset: choose a dataset")
        _number("holdout", self.holdout, 0.0, 1.0, hi_open=True)
        for name in ("epochs", "max_steps"):
            if getattr(self, name) is not None:
                _whole(name, getattr(self, name), 1)
        for name in ("batch_size", "eval_every", "eval_batch_size", "log_every"):
            _whole(name, getattr(self, name), 1)
        _whole("save_every_steps", self.save_every_steps, 0)
        _whole("router_warmup_epochs", self.router_warmup_epochs, 0)
        if self.router_warmup_epochs and not self.model.is_moe:
            raise ValueError("--router-warmup-epochs trains the routers of a MoE; a dense model has none")
        _whole("seed", self.seed, 0, 2**63 - 1)
        _number("lr", self.lr, 0.0, math.inf, lo_open=True)
        _number("min_lr", self.min_lr, 0.0, self.lr)
        _number("weight_decay", self.weight_decay, 0.0, math.inf)
        _number("label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        _number("clip_grad", self.clip_grad, 0.0, math.inf)
        _number("mixup_alpha", self.mixup_alpha, 0.0, math.inf)
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise ValueError("--init-from must be the folder of a dense checkpoint")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"--augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}")
        if self.warmup_epochs is not None:
            _number("warmup_epochs", self.warmup_epochs, 0.0, math.inf)
        if self.warmup_steps is not None:
            _whole("warmup_steps", self.warmup_steps, 0)
        if self.threads is not None:
            _whole("threads", self.threads, 1, MAX_THREADS)
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.superclasses is not None and not isinstance(self.superclasses, str):
            raise ValueError("--superclasses must be a map file or 'reference'")
        if self.superclasses is not None and self.model.superclasses is not None:
            raise ValueError("give the super-class map once: --superclasses FILE or the model's superclasses")
        if self.out is not None:
            check_writable_folder(self.out, "--out")
        return self

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        _models().check_fields(cls, d, "training config")
        return cls(**{**d, "model": model_config(d.get("model", {}))})

    def save(self, path) -> None:
        from .runs import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_bytes())
        except OSError as e:
            raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
        except (ValueError, RecursionError) as e:
            raise ValueError(f"--config {path}: not valid JSON: {e}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ derived
    @property
    def preset(self) -> str:
        m = self.model
        return _models().preset_name(m.family, m.depth, m.width, m.num_experts, m.top_k)

    def to_argv(self) -> list[str]:
        """The `python -m workbench.train` flags that rebuild this config (defaults left out)."""
        argv = ["--model", self.preset]
        base = _preset_defaults(self.preset)   # not a ModelConfig: a preset's defaults alone may be invalid
        #                                        (vmoe-2x32: 'last-2' needs two odd blocks; --set moe_layers=[1])
        for key, value in self.model.to_dict().items():
            if key in DATA_FIELDS or key == "superclasses" or value == base[key]:
                continue
            if key == "superclass_loss_weight":
                argv += ["--superclass-loss-weight", repr(float(value))]
            else:
                argv += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
        defaults = TrainConfig()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "model" or value == getattr(defaults, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            argv += [flag] if isinstance(value, bool) else [flag, str(value)]
        return argv

    def command(self, world_size: int = 1) -> str:
        prefix = (f"torchrun --nproc_per_node={world_size} -m workbench.train" if world_size > 1
                  else "python -m workbench.train")
        return f"{prefix} {shlex.join(self.to_argv())}"


def _preset_defaults(preset: str) -> dict:
    """Every ModelConfig field as the preset alone sets it (the field defaults plus the preset's shape)."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(_models().ModelConfig)}
    return json.loads(json.dumps({**defaults, **_models().parse_preset(preset)}))


def model_config(fields: dict) -> ModelConfig:
    """A ModelConfig from a dict (a config file); errors as ValueError naming the field."""
    if not isinstance(fields, dict):
        raise ValueError("model must be an object of ModelConfig fields")
    try:
        return _models().ModelConfig.from_dict(fields)
    except TypeError as e:
        raise ValueError(f"invalid model options: {e}") from None


def fit_to_dataset(model: ModelConfig, dataset, superclasses: Optional[Sequence[int]] = None) -> ModelConfig:
    """The model config for `dataset`: its classes, image size and channels, and the super-class
    assignment (ModelConfig re-validates: k <= E, E == number of super-classes)."""
    c, h, w = dataset.image_shape
    if h != w:
        raise ValueError(f"square images only, {dataset.name} has {h}x{w}")
    changes = {"num_classes": dataset.num_classes, "img_size": h, "in_chans": c}
    if superclasses is not None:
        changes["superclasses"] = list(superclasses)
    return dataclasses.replace(model, **changes)


def check_writable_folder(path, flag: str) -> None:
    """`path` is a folder we can create or write in; ValueError saying why not."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a folder")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {path}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {probe} is not writable")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _whole(name: str, value, lo: int, hi: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_flag(name)} must be a whole number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rule = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ValueError(f"{_flag(name)} must be {rule}, got {value}")


def _number(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{_flag(name)} must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{_flag(name)} must be in {left}{lo:g}, {hi:g}{right}, got {value:g}")


# ----------------------------------------------------------------------------- the CLI edge
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m workbench.train",
        description="Train a dense ViT, V-MoE or Mobile V-MoE from a preset. "
                    "Data-parallel: torchrun --nproc_per_node=N -m workbench.train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name != "model"})
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a TrainConfig JSON file (train_config.json of a run folder); combine only with "
                        "--resume and --quiet")
    m = p.add_argument_group("model and data")
    m.add_argument("--model", default=DEFAULT_MODEL, metavar="PRESET",
                   help="vit-<L>x<D>, mvmoe-<L>x<D>-e<E>k<K> (per image) or vmoe-<L>x<D>-e<E>k<K> (per token)")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model option override, VALUE as JSON or a string (repeatable), e.g. router_input=cls")
    m.add_argument("--superclass-loss-weight", "--router-weight", dest="superclass_loss_weight", type=float,
                   default=None, metavar="LAMBDA",
                   help="lambda in L = L_cls + lambda * L_router (default: ModelConfig.superclass_loss_weight); "
                        "--router-weight is a deprecated alias")
    m.add_argument("--dataset", default=d.dataset, metavar="NAME",
                   help="fashion-mnist, cifar10, cifar100, imagefolder:PATH or synthetic")
    m.add_argument("--data-root", default=None, metavar="DIR", help="where the dataset files are")
    m.add_argument("--superclasses", default=None, metavar="FILE",
                   help="super-class map JSON for the Mobile V-MoE router loss (E must equal its group "
                        "count), or 'reference' for the dataset's own hierarchy")
    m.add_argument("--holdout", type=float, default=d.holdout, metavar="FRACTION",
                   help="train on the training split minus this held-out fraction (workbench.data.heldout_split)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None,
                   help="passes over the training set (default 10, or as many as --max-steps needs)")
    o.add_argument("--max-steps", type=int, default=None, help="optimizer steps in all (with --epochs: whichever "
                                                                "ends first)")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (split across DDP processes)")
    o.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    o.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine decay")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (not on norms, biases, position embedding, class token)")
    o.add_argument("--warmup-epochs", type=float, default=None, help="linear warmup length in epochs")
    o.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup length in steps (default: 5%% of all steps)")
    o.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="in [0, 1)")
    o.add_argument("--augmentation", choices=AUGMENTATIONS, default=d.augmentation,
                   help="training-batch augmentation: random crop (pad 2) + flip, the flip alone, or none "
                        "(the flip only where the dataset allows it)")
    o.add_argument("--mixup-alpha", type=float, default=d.mixup_alpha, metavar="ALPHA",
                   help="mixup: blend each batch with a shuffle of itself, weight drawn from Beta(ALPHA, ALPHA) "
                        "(0: off)")
    o.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from a trained dense checkpoint of the same shape: a MoE is upcycled (sparse "
                        "upcycling: shared tensors copied, every expert a copy of its block's MLP, new router), "
                        "a dense model continues from it with a fresh schedule")
    o.add_argument("--router-warmup-epochs", type=int, default=d.router_warmup_epochs, metavar="N",
                   help="train only the routers for the first N epochs, backbone and experts frozen (part of "
                        "--epochs; for an upcycled MoE, whose router is the only new part)")
    o.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (0: off)")
    o.add_argument("--seed", type=int, default=d.seed)
    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/<model>-<dataset>-<time>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved state")
    r.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX)")
    r.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: all cores / "
                                                            "processes)")
    r.add_argument("--eval-every", type=int, default=d.eval_every, metavar="EPOCHS", help="evaluate every N epochs")
    r.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    r.add_argument("--log-every", type=int, default=d.log_every, metavar="STEPS",
                   help="metrics.jsonl train record interval")
    r.add_argument("--save-every-steps", type=int, default=d.save_every_steps, metavar="STEPS",
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
        except (ValueError, RecursionError):
            out[key.strip()] = value
    return out


def model_from_preset(preset: str, overrides: dict) -> ModelConfig:
    """The one place a preset string becomes a ModelConfig (plus `--set` overrides)."""
    return model_from_fields(_models().parse_preset(preset), overrides, f"preset {preset!r}")


def model_from_fields(fields: dict, overrides: dict, source: str) -> ModelConfig:
    """A ModelConfig from shape fields (a preset's, or the Train form's widgets) + option overrides."""
    ModelConfig = _models().ModelConfig
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid options: {sorted(known)}")
    fixed = sorted(k for k in overrides if k in DATA_FIELDS)
    if fixed:
        raise ValueError(f"{fixed} are set from the dataset, not by --set")
    if "superclasses" in overrides:
        raise ValueError("a super-class map is given with --superclasses FILE (or --superclasses reference), "
                         "not with --set superclasses=")
    clash = sorted(k for k in fields if k in overrides and overrides[k] != fields[k])
    if clash:
        raise ValueError(f"{clash} contradict {source}; change the shape there instead")
    try:
        return ModelConfig(**{**fields, **overrides})
    except TypeError as e:
        raise ValueError(f"invalid model options: {e}") from None


def from_args(ns: argparse.Namespace) -> TrainConfig:
    """Parsed CLI flags -> a validated TrainConfig."""
    if ns.config:
        defaults = vars(parse_args([]))
        extra = sorted(k for k, v in vars(ns).items() if k not in ("config", "resume", "quiet") and v != defaults[k])
        if extra:
            raise ValueError(f"--config cannot be combined with {[_flag(k) for k in extra]}: edit the file instead")
        cfg = TrainConfig.load(ns.config)
        cfg.resume, cfg.quiet = cfg.resume or ns.resume, cfg.quiet or ns.quiet
        return cfg.validate()
    overrides = parse_overrides(ns.overrides)
    if ns.superclass_loss_weight is not None:
        if "superclass_loss_weight" in overrides:
            raise ValueError("give lambda once: --superclass-loss-weight or --set superclass_loss_weight=")
        overrides["superclass_loss_weight"] = ns.superclass_loss_weight
    model = model_from_preset(ns.model, overrides)
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    return TrainConfig(model=model, **{k: getattr(ns, k) for k in names}).validate()
