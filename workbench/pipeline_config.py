"""One pipeline run, as one typed config: `PipelineConfig` (what `python -m workbench.pipeline` accepts).

Two edges build one, each parsing its own input once (the same pattern as `TrainConfig`):
- the CLI (`python -m workbench.pipeline --dataset synthetic --out DIR ...`): `from_args(ns)`;
  `--dense vit-<L>x<D>` is parsed here, and only here, into `depth` and `width`;
- the app's Train page: builds `PipelineConfig(...)` from its widgets; the jobs API checks it
  against the dataset (`jobs.check_pipeline`), writes it to the run folder as
  `pipeline_config.json` and starts `python -m workbench.pipeline --config FILE`.

Each rule is checked where it lives: run-field ranges in `PipelineConfig.validate`, the clustering
method in `analysis.superclass_choice` (asked through the pipeline), and the architecture rules
(k <= E, lambda >= 0, width divisible by the heads) in `ModelConfig`, which `resolved` builds once
the number of classes is known (E in 2..classes is checked there too).
"""
from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass, field
from typing import Optional

from .train_config import PRECISIONS, TrainConfig, _number, _whole, model_from_preset

DEFAULT_SHAPE = {"synthetic": (4, 64)}   # dense (depth, width) by dataset; others (6, 96)
DEFAULT_EPOCHS = {"synthetic": 12}       # epochs per model by dataset; others 10
OUTPUT_FIELDS = ("out", "results", "export")   # where a run writes (the jobs API sets only `out`)
GRIDS = ("samples", "regularised", "screen")   # workbench/grid.py defines them per dataset
RECIPE_FIELDS = ("epochs", "batch_size", "lr", "label_smoothing", "augmentation", "mixup_alpha",
                 "threads")  # TrainConfig's fields


def default_num_groups(num_classes: int) -> int:
    """E = ceil(sqrt(classes)) clamped to 2..10: 4 for 10-16 classes, 10 for 100+ (the paper's best E)."""
    return int(min(10, max(2, math.ceil(math.sqrt(num_classes)))))


def clustering_methods() -> list[str]:
    """Valid `method`s: 'auto' (router-aware choice) and every clustering of analysis.superclasses."""
    from .pipeline import clustering_methods as methods   # (the pipeline is the module that may ask analysis/)

    return methods()


INITS = ("scratch", "continue", "upcycle")   # how a ModelRun starts: its seed's init, or from OUT/dense


@dataclass(frozen=True)
class ModelRun:
    """One model a pipeline trains: its folder under OUT, its preset, whether the super-classes guide
    its router, its own lambda (None: the run's --superclass-loss-weight, else ModelConfig's), how it
    starts (`init`: from its seed, or from the trained OUT/dense: continued if dense, upcycled if a
    MoE), its epochs (None: the run's), its own super-class map (`num_groups`, `method`; None: the
    run's), and the model its paired difference is taken against (`baseline`)."""

    name: str
    preset: str
    guided: bool
    superclass_loss_weight: Optional[float] = None
    init: str = "scratch"
    epochs: Optional[int] = None
    method: Optional[str] = None
    baseline: str = "dense"
    lr: Optional[float] = None
    softmax_gate: bool = False          # an upcycled MoE keeps its router's softmax gate (not renormalised)
    router_warmup_epochs: int = 0       # its first N epochs train only the router
    moe_layers: Optional[tuple] = None  # its own MoE blocks (None: the preset's)

    @property
    def num_groups(self) -> Optional[int]:
        """E of a per-image MoE (its map has E groups), None otherwise."""
        from .models.config import parse_preset

        return parse_preset(self.preset).get("num_experts") if self.preset.startswith("mvmoe") else None


def continued_dense(preset: str, epochs: int, lr: Optional[float] = None) -> ModelRun:
    """The dense model continued from OUT/dense for `epochs` (at `lr`): an upcycled MoE's fair
    baseline (equal total training, same schedule and seed)."""
    return ModelRun(f"{preset}-continue{epochs}" + (f"-lr{lr:g}" if lr else ""), preset, False, init="continue",
                    epochs=epochs, lr=lr)


def parse_extra(spec: str) -> ModelRun:
    """`--extra PRESET[:MODE[:MODE...]]` -> the ModelRun it names.

    PRESET alone: trained like the main MoE (a per-image preset is guided by the super-classes; one
    whose E differs from the run's gets its own map at that E, from the same confusion graph).
    Modes, each adding to the folder name:
    `e2e`: a per-image router with no super-class loss (folder PRESET-e2e);
    `lambda=X`: guided with lambda = X (PRESET-lambdaX), a dose between e2e (lambda 0) and the run's;
    `method=M`: its own map by clustering method M, e.g. kernighan-lin for near-equal groups;
    `continue=N`: a dense preset continued from OUT/dense for N epochs (PRESET-continueN);
    `upcycle=N`: a MoE upcycled from OUT/dense and trained N epochs, its gates renormalised (k = 1:
    gate 1, so it starts exactly at dense), paired with the dense continued N epochs;
    `softmax-gate` (with upcycle): keep the router's softmax gate instead;
    `lr=X` (with continue or upcycle): its own peak learning rate (a trained model restarts lower);
    `router-warmup=N` (MoE): its first N epochs train only the router, everything else frozen;
    `blocks=I,J` (MoE): its MoE blocks, e.g. a per-token model on the per-image model's blocks."""
    if not isinstance(spec, str):
        raise ValueError("--extra must be a list of presets")
    preset, *modes = spec.split(":")
    per_image = preset.startswith("mvmoe")
    fields: dict = {"name": preset, "preset": preset, "guided": per_image}
    overrides: dict = {}
    for mode in modes:
        key, _, value = mode.partition("=")
        if mode == "e2e" and per_image:
            fields.update(name=fields["name"] + "-e2e", guided=False)
        elif key == "lambda":
            if not per_image:
                raise ValueError(f"--extra {spec!r}: lambda weighs the super-class loss of a per-image MoE (mvmoe-...)")
            weight = _extra_number(spec, value, float)
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"--extra {spec!r}: lambda must be a finite number > 0 "
                                 f"(lambda = 0 is the end-to-end router: {preset}:e2e)")
            fields.update(name=f"{fields['name']}-lambda{weight:g}", superclass_loss_weight=weight)
            overrides["superclass_loss_weight"] = weight
        elif key == "method" and per_image and value:
            fields.update(name=f"{fields['name']}-{value}", method=value)
        elif key in ("continue", "upcycle") and (key == "continue") == preset.startswith("vit"):
            epochs = _extra_number(spec, value, int)
            if epochs < 1:
                raise ValueError(f"--extra {spec!r}: {key} needs a number of epochs >= 1")
            fields.update(name=f"{fields['name']}-{key}{epochs}", init=key, epochs=epochs)
            if key == "upcycle":
                fields["baseline"] = "continue"      # named below, once its lr is known
        elif mode == "softmax-gate" and "upcycle" in (m.partition("=")[0] for m in modes):
            fields.update(name=fields["name"] + "-softmax-gate", softmax_gate=True)
        elif key == "router-warmup" and preset.startswith(("mvmoe", "vmoe")):
            warm = _extra_number(spec, value, int)
            if warm < 1:
                raise ValueError(f"--extra {spec!r}: router-warmup needs a number of epochs >= 1")
            fields.update(name=f"{fields['name']}-warmup{warm}", router_warmup_epochs=warm)
        elif key == "blocks" and preset.startswith(("mvmoe", "vmoe")):
            try:
                blocks = tuple(sorted({int(b) for b in value.split(",")}))
            except ValueError:
                raise ValueError(f"--extra {spec!r}: blocks must be block indices like 4,5") from None
            fields.update(name=f"{fields['name']}-blocks{'-'.join(map(str, blocks))}", moe_layers=blocks)
            overrides["moe_layers"] = list(blocks)
        elif key == "lr" and {"upcycle", "continue"} & {m.partition("=")[0] for m in modes}:
            lr = _extra_number(spec, value, float)
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"--extra {spec!r}: lr must be a finite number > 0")
            fields.update(name=f"{fields['name']}-lr{lr:g}", lr=lr)
        else:
            raise ValueError(f"--extra {spec!r}: the modes are ':e2e', ':lambda=X', ':method=M' (per-image MoE), "
                             "':continue=N' (dense), ':upcycle=N', ':softmax-gate', ':router-warmup=N', ':lr=X' and "
                             "':blocks=I,J' (MoE)")
    if fields.get("baseline") == "continue":
        fields["baseline"] = continued_dense(_dense_of(preset), fields["epochs"], fields.get("lr")).name
    run = ModelRun(**fields)
    model_from_preset(run.preset, overrides)   # an unknown preset fails now
    return run


def upcycle_overrides(m: ModelRun) -> dict:
    """Model options an upcycled run adds: gates renormalised unless it asked for the softmax gate."""
    return {"renormalize_gates": True} if m.init == "upcycle" and not m.softmax_gate else {}


def run_overrides(m: ModelRun) -> dict:
    """Model options a ModelRun sets itself: its MoE blocks, an upcycled model's gate."""
    return {**({"moe_layers": list(m.moe_layers)} if m.moe_layers else {}), **upcycle_overrides(m)}


def _dense_of(preset: str) -> str:
    from .models.config import parse_preset, preset_name

    shape = parse_preset(preset)
    return preset_name("vit", shape["depth"], shape["width"])


def _extra_number(spec: str, value: str, kind):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"--extra {spec!r}: {value!r} must be a number") from None


@dataclass
class PipelineConfig:
    """Every choice of one pipeline run. Field `x_y` is the CLI flag `--x-y`; None means the dataset's default."""

    dataset: str = "fashion-mnist"          # fashion-mnist | cifar10 | cifar100 | tiny-imagenet
    #                                         | imagefolder:PATH | synthetic
    data_root: Optional[str] = None         # where the dataset files are (None: the usual places)
    depth: Optional[int] = None             # blocks L of the dense baseline and the MoE (None: 6; 4 on synthetic)
    width: Optional[int] = None             # width D (None: 96; 64 on synthetic)
    num_groups: Optional[int] = None        # E = super-classes = experts (None: ceil(sqrt(classes)) in 2..10)
    top_k: int = 1                          # experts per image
    method: str = "auto"                    # super-class discovery: auto (router-aware) or one clustering
    superclass_loss_weight: Optional[float] = None  # lambda in L = L_cls + lambda * L_router (None: ModelConfig's)
    holdout: float = 0.1                    # fraction of the training split held out for the confusion matrix
    epochs: Optional[int] = None            # per model (None: 10; 12 on synthetic)
    batch_size: Optional[int] = None        # the training recipe of every model; None: TrainConfig's default
    lr: Optional[float] = None
    label_smoothing: Optional[float] = None
    augmentation: Optional[str] = None      # crop-flip | flip | none
    mixup_alpha: Optional[float] = None     # mixup's Beta(a, a) (None: TrainConfig's, off)
    mlp_dropout: Optional[float] = None     # dropout in every MLP and expert (None: ModelConfig's, off)
    moe_init: str = "scratch"               # the MoE starts from its seed (its dense twin's initial weights) or
    #                                         "upcycle": from the trained dense baseline, beside the dense
    #                                         continued as long (equal total training)
    precision: str = "auto"                 # auto | fp32 | bf16
    threads: Optional[int] = None           # torch CPU threads for training (None: all cores)
    seed: int = 0
    extra: list = field(default_factory=list)   # further presets trained with the same recipe, PRESET[:e2e|:lambda=X]
    out: Optional[str] = None               # the run directory (stages already there are skipped)
    results: Optional[str] = None           # results CSV this run's rows go to (None: OUT/results.csv)
    grid: Optional[str] = None              # "samples" (the sample-checkpoint grid) or "regularised" (Tiny ImageNet's
    #                                         regularised recipe + upcycling) into OUT/<size>/
    export: Optional[str] = None            # copy finished checkpoints and reports into this folder
    quiet: bool = False                     # no progress lines

    # ------------------------------------------------------------------ validation
    def validate(self) -> "PipelineConfig":
        """Range-check every field that needs no data; ValueError naming the flag and the rule. Returns self."""
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ValueError("--dataset: choose a dataset")
        for name in ("depth", "width", "epochs"):
            if getattr(self, name) is not None:
                _whole(name, getattr(self, name), 1)
        if self.num_groups is not None:
            _whole("num_groups", self.num_groups, 2)
        _whole("top_k", self.top_k, 1)
        _whole("seed", self.seed, 0, 2**63 - 1)
        _number("holdout", self.holdout, 0.0, 1.0, lo_open=True, hi_open=True)  # the confusion needs images
        recipe = {k: getattr(self, k) for k in RECIPE_FIELDS if getattr(self, k) is not None}
        TrainConfig(**recipe).validate()    # the recipe's rules are TrainConfig's
        if self.mlp_dropout is not None:
            self.model_overrides()      # the dropout's range is ModelConfig's rule
        if self.moe_init not in ("scratch", "upcycle"):
            raise ValueError(f"--moe-init must be 'scratch' or 'upcycle', got {self.moe_init!r}")
        if self.superclass_loss_weight is not None:
            _number("superclass_loss_weight", self.superclass_loss_weight, -math.inf, math.inf)  # >= 0: ModelConfig
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.grid is not None and self.grid not in GRIDS:
            raise ValueError(f"--grid must be one of {GRIDS}, got {self.grid!r}")
        for name in ("data_root", *OUTPUT_FIELDS):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"--{name.replace('_', '-')} must be a path")
        if not isinstance(self.extra, list):
            raise ValueError("--extra must be a list of presets")
        for spec in self.extra:
            parse_extra(spec)
        methods = clustering_methods()
        if self.method not in methods:
            raise ValueError(f"--method must be one of {methods}, got {self.method!r}")
        if self.num_groups is not None:
            self.moe_model()   # k <= E and lambda >= 0 fail here already when E is given
        return self

    def resolved(self, num_classes: int) -> "PipelineConfig":
        """This config with every default the dataset decides filled in (shape, E, epochs), checked:
        E in 2..classes, and the MoE's ModelConfig rules (k <= E, lambda >= 0, width vs heads)."""
        depth, width = DEFAULT_SHAPE.get(self.dataset, (6, 96))
        E = self.num_groups or default_num_groups(num_classes)
        if not 2 <= E <= num_classes:
            raise ValueError(f"--num-groups must be in 2..{num_classes} for {num_classes} classes, got {E}")
        cfg = dataclasses.replace(self, depth=self.depth or depth, width=self.width or width, num_groups=E,
                                  epochs=self.epochs or DEFAULT_EPOCHS.get(self.dataset, 10))
        cfg.moe_model()
        return cfg

    # ------------------------------------------------------------------ derived
    @property
    def dense_preset(self) -> str:
        from .models.config import preset_name

        return preset_name("vit", *self._shape())

    @property
    def moe_preset(self) -> str:
        from .models.config import preset_name

        if self.num_groups is None:
            raise ValueError("the MoE preset needs E: call resolved(num_classes) first")
        return preset_name("mvmoe", *self._shape(), self.num_groups, self.top_k)

    def moe_model(self):
        """The per-image MoE's ModelConfig (validated by ModelConfig itself)."""
        overrides = {} if self.superclass_loss_weight is None else \
            {"superclass_loss_weight": float(self.superclass_loss_weight)}
        return model_from_preset(self.moe_preset, {**overrides, **self.model_overrides()})

    def model_overrides(self) -> dict:
        """Model options every model of the run shares (the recipe's MLP dropout), checked by ModelConfig."""
        if self.mlp_dropout is None:
            return {}
        from .models.config import ModelConfig

        ModelConfig(mlp_dropout=self.mlp_dropout)
        return {"mlp_dropout": self.mlp_dropout}

    def _shape(self) -> tuple[int, int]:
        depth, width = DEFAULT_SHAPE.get(self.dataset, (6, 96))
        return self.depth or depth, self.width or width

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        from .models.config import check_fields

        check_fields(cls, d, "pipeline config")
        return cls(**d)

    def save(self, path) -> None:
        from .runs import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "PipelineConfig":
        from .safejson import read

        try:
            return cls.from_dict(read(path, max_bytes=1 << 20))
        except OSError as e:
            raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None

    def to_argv(self) -> list[str]:
        """The `python -m workbench.pipeline` flags that rebuild this config (defaults left out)."""
        argv, defaults = [], PipelineConfig()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == getattr(defaults, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag)
            elif isinstance(value, list):
                argv += [a for v in value for a in (flag, str(v))]
            else:
                argv += [flag, str(value)]
        return argv

    def command(self) -> str:
        return f"python -m workbench.pipeline {shlex.join(self.to_argv())}"


def from_args(ns) -> PipelineConfig:
    """Parsed CLI flags (workbench.pipeline.build_parser) -> a validated PipelineConfig."""
    if ns.config:
        from .pipeline import build_parser

        defaults = vars(build_parser().parse_args([]))
        given = sorted(k for k, v in vars(ns).items() if k not in ("config", "quiet") and v != defaults.get(k))
        if given:
            raise ValueError(f"--config cannot be combined with {['--' + k.replace('_', '-') for k in given]}: "
                             "edit the file instead")
        cfg = PipelineConfig.load(ns.config)
        cfg.quiet = cfg.quiet or ns.quiet
    else:
        names = {f.name for f in dataclasses.fields(PipelineConfig)}
        fields = {k: v for k, v in vars(ns).items() if k in names}
        if ns.dense is not None:
            if ns.depth is not None or ns.width is not None:
                raise ValueError("--dense sets the depth and width: give --dense or --depth/--width, not both")
            fields.update(dense_shape(ns.dense))
        cfg = PipelineConfig(**fields)
    if not cfg.out:
        raise ValueError("--out DIR is required (the run directory)")
    return cfg.validate()


def dense_shape(preset: str) -> dict:
    """`--dense vit-<L>x<D>` -> {"depth": L, "width": D} (the one place the pipeline parses a preset)."""
    from .models.config import parse_preset

    shape = parse_preset(preset)
    if shape["family"] != "vit":
        raise ValueError(f"--dense must be a dense preset (vit-<L>x<D>), got {preset!r}")
    return {"depth": shape["depth"], "width": shape["width"]}

