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
GRIDS = ("samples",)
RECIPE_FIELDS = ("epochs", "batch_size", "lr", "label_smoothing", "augmentation", "threads")  # TrainConfig's fields


def default_num_groups(num_classes: int) -> int:
    """E = ceil(sqrt(classes)) clamped to 2..10: 4 for 10-16 classes, 10 for 100+ (the paper's best E)."""
    return int(min(10, max(2, math.ceil(math.sqrt(num_classes)))))


def clustering_methods() -> list[str]:
    """Valid `method`s: 'auto' (router-aware choice) and every clustering of analysis.superclasses."""
    from .pipeline import clustering_methods as methods   # (the pipeline is the module that may ask analysis/)

    return methods()


@dataclass(frozen=True)
class ModelRun:
    """One model a pipeline trains: its folder under OUT, its preset, whether the super-classes guide
    its router, and its own lambda (None: the run's --superclass-loss-weight, else ModelConfig's)."""

    name: str
    preset: str
    guided: bool
    superclass_loss_weight: Optional[float] = None


def parse_extra(spec: str) -> ModelRun:
    """`--extra PRESET[:e2e | :lambda=X]` -> the ModelRun it names.

    PRESET alone: trained like the main MoE (a per-image preset is guided by the super-classes);
    `:e2e`: a per-image router with no super-class loss, folder PRESET-e2e; `:lambda=X`: guided
    with lambda = X, folder PRESET-lambdaX, a dose of the super-class loss between the two
    (lambda = 0 *is* the end-to-end router, so it is asked for as `:e2e`)."""
    if not isinstance(spec, str):
        raise ValueError("--extra must be a list of presets")
    preset, _, mode = spec.partition(":")
    per_image = preset.startswith("mvmoe")
    if mode == "":
        run = ModelRun(preset, preset, per_image)
    elif mode == "e2e":
        run = ModelRun(preset + "-e2e", preset, False)
    elif mode.startswith("lambda="):
        if not per_image:
            raise ValueError(f"--extra {spec!r}: lambda weighs the super-class loss of a per-image MoE (mvmoe-...)")
        try:
            weight = float(mode[len("lambda="):])
        except ValueError:
            raise ValueError(f"--extra {spec!r}: lambda must be a number") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"--extra {spec!r}: lambda must be a finite number > 0 "
                             f"(lambda = 0 is the end-to-end router: {preset}:e2e)")
        run = ModelRun(f"{preset}-lambda{weight:g}", preset, True, weight)
    else:
        raise ValueError(f"--extra {spec!r}: the modes are ':e2e' and ':lambda=X'")
    model_from_preset(run.preset, {} if run.superclass_loss_weight is None else
                      {"superclass_loss_weight": run.superclass_loss_weight})   # an unknown preset fails now
    return run


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
    precision: str = "auto"                 # auto | fp32 | bf16
    threads: Optional[int] = None           # torch CPU threads for training (None: all cores)
    seed: int = 0
    extra: list = field(default_factory=list)   # further presets trained with the same recipe, PRESET[:e2e|:lambda=X]
    out: Optional[str] = None               # the run directory (stages already there are skipped)
    results: Optional[str] = None           # results CSV this run's rows go to (None: OUT/results.csv)
    grid: Optional[str] = None              # "samples": the sample-checkpoint grid into OUT/<size>/
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
        return model_from_preset(self.moe_preset, overrides)

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

