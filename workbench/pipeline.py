"""The Mobile V-MoE procedure end to end (Daxberger et al. 2023, §2.2 and §3).

    python -m workbench.pipeline --dataset synthetic --out runs/pipeline-synthetic
    python -m workbench.pipeline --config runs/NAME/pipeline_config.json   (a run the app started)

1. dense/            train the dense baseline on the training split minus a held-out part
2. confusion.json    its confusion matrix on the held-out part
3. superclasses.json cluster the confusion graph into exactly E super-classes
   clustering.json   every method's quality (within-group confusion, balance, ARI/NMI)
   hierarchy-template.json  the same grouping as an image folder's reference hierarchy, to edit
                     and copy beside the class folders as hierarchy.json (workbench/hierarchy_file.py)
4. moe/              train the per-image MoE whose router predicts the super-class
5. evaluation.json   every model on the test split (accuracy, MACs, params, router accuracy,
                     accuracy with a perfect router) and on trained-on images (fit accuracy);
                     reused for the same weights and EVALUATION_VERSION
6. report.md/.json   and one row per model appended to the results CSV

Each stage writes its artefact in the run directory and is skipped when the
artefact exists, so a killed pipeline resumes where it stopped (an unfinished
training stage resumes from its last saved state).
`--grid samples` runs this once per (size, seed) of the sample-checkpoint grid (workbench/grid.py).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .checkpoint import CARD, ROUTER_METRICS, WEIGHTS, read_card, router_score
from .pipeline_config import (RECIPE_FIELDS, ModelRun, PipelineConfig, continued_dense,  # noqa: F401
                              default_num_groups, from_args, parse_extra, run_overrides)
from . import snapshots
from .runs import SUPERCLASS_FILE, atomic_copy, atomic_write_bytes, atomic_write_json, is_finished, read_json


def clustering_methods() -> list[str]:
    """'auto' (the router-aware choice) and every clustering method of analysis.superclasses."""
    from analysis.superclass_choice import AUTO
    from analysis.superclasses import METHODS

    return [AUTO, *METHODS]


def build_parser() -> argparse.ArgumentParser:
    """The CLI edge of PipelineConfig: flag `--x-y` is field `x_y` (plus `--dense` and `--config`)."""
    p = argparse.ArgumentParser(prog="python -m workbench.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a PipelineConfig JSON file (pipeline_config.json of a run folder started from the app); "
                        "combine only with --quiet")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist, cifar10, cifar100, tiny-imagenet, imagefolder:PATH, synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (stages already there are skipped)")
    p.add_argument("--dense", default=None, metavar="PRESET",
                   help="dense baseline vit-<L>x<D>, the same as --depth L --width D (default vit-6x96; "
                        "vit-4x64 on synthetic); the MoE has the same depth and width")
    p.add_argument("--depth", type=int, default=None, metavar="L", help="blocks of the dense baseline and the MoE")
    p.add_argument("--width", type=int, default=None, metavar="D", help="width of the dense baseline and the MoE")
    p.add_argument("--num-groups", "-E", type=int, default=None,
                   help="super-classes = experts (default ceil(sqrt(classes)) in 2..10)")
    p.add_argument("--top-k", type=int, default=1, help="experts per image")
    p.add_argument("--method", default="auto",
                   help="super-class discovery: 'auto' (router-aware: every clustering scored by a linear probe on "
                        "the dense model's features at the router's input, analysis/superclass_choice.py) or one "
                        "method of analysis.superclasses.METHODS, e.g. 'spectral' (the paper's single clustering)")
    p.add_argument("--superclass-loss-weight", "--router-weight", dest="superclass_loss_weight", type=float,
                   default=None, metavar="LAMBDA", help="lambda in L = L_cls + lambda * L_router (default: "
                   "ModelConfig's); --router-weight is a deprecated alias")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of the training split held out for the confusion matrix")
    p.add_argument("--epochs", type=int, default=None, help="epochs for each model (default 10; 12 on synthetic)")
    p.add_argument("--batch-size", type=int, default=None, help="default: workbench.train's (128)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: workbench.train's, 1e-3)")
    p.add_argument("--label-smoothing", type=float, default=None, help="default: workbench.train's (0.1)")
    p.add_argument("--augmentation", choices=("crop-flip", "flip", "none"), default=None,
                   help="training augmentation (default: workbench.train's, crop-flip)")
    p.add_argument("--mixup-alpha", type=float, default=None, metavar="ALPHA",
                   help="mixup's Beta(ALPHA, ALPHA) for every model (default: workbench.train's, off)")
    p.add_argument("--mlp-dropout", type=float, default=None, metavar="P",
                   help="dropout in every MLP and expert (V-MoE's expert dropout; default 0)")
    p.add_argument("--moe-init", choices=("scratch", "upcycle"), default="scratch",
                   help="scratch: the MoE starts from its dense twin's initial weights; upcycle: from the "
                        "trained dense baseline (sparse upcycling), trained --epochs beside the dense "
                        "continued as long (the fair baseline at equal total training)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for training (default: all cores); two pipelines side by side on a "
                        "small CPU each take half")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", action="append", default=[], metavar="PRESET[:MODE...]",
                   help="also train this preset with the same recipe (e.g. vmoe-6x96-e8k2; "
                        "mvmoe-6x96-e4k1:e2e for an end-to-end router without super-classes; "
                        "mvmoe-6x96-e4k1:lambda=0.1 for a super-class router with its own lambda; "
                        "mvmoe-6x96-e2k1 for a map at E = 2; mvmoe-6x96-e4k1:method=kernighan-lin for a "
                        "balanced map; vit-6x96:continue=10 and mvmoe-6x96-e4k1:upcycle=10 to continue / "
                        "upcycle the dense baseline for 10 epochs)")
    p.add_argument("--results", default=None, metavar="CSV",
                   help="results CSV for this run's rows; a rerun replaces its own (default OUT/results.csv)")
    p.add_argument("--grid", choices=("samples", "regularised", "screen"), default=None,
                   help="run a grid of workbench/grid.py into OUT/<size>/seed-<s>/: 'samples' (the sample "
                        "checkpoints), 'regularised' (Tiny ImageNet: the regularised recipe, then 10 more epochs "
                        "as dense and as the upcycled MoE) or 'screen' (its 15-epoch screen)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="copy every finished checkpoint (weights + card) and the run's reports into DIR, "
                        "named like the shipped samples (e.g. DIR/fmnist-vit-6x64)")
    p.add_argument("--quiet", action="store_true")
    return p


def _say(cfg: PipelineConfig, msg: str) -> None:
    if not cfg.quiet:
        print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


def _train_stage(cfg: PipelineConfig, out: Path, m: ModelRun) -> dict:
    """Train one model into OUT/<its name>, resuming an unfinished run; skip a finished one. A guided
    model reads its super-class map (`map_path`), with its own lambda (`--extra PRESET:lambda=X`) or
    the run's; a continued or upcycled one starts from OUT/dense."""
    from .checkpoint import TRAIN_STATE
    from .train import train
    from .train_config import TrainConfig, model_from_preset

    run_dir, superclasses = out / m.name, map_path(cfg, out, m) if m.guided else None
    if is_finished(run_dir):
        _say(cfg, f"{run_dir.name}: finished earlier, skipped")
        return read_card(run_dir)
    weight = m.superclass_loss_weight if m.superclass_loss_weight is not None else cfg.superclass_loss_weight
    overrides = {} if superclasses is None or weight is None else {"superclass_loss_weight": weight}
    resume = (run_dir / TRAIN_STATE).exists()
    recipe = {k: getattr(cfg, k) for k in RECIPE_FIELDS if getattr(cfg, k) is not None}
    recipe["epochs"] = m.epochs or cfg.epochs
    recipe["lr"] = m.lr or recipe.get("lr")
    recipe = {k: v for k, v in recipe.items() if v is not None}
    model = model_from_preset(m.preset, {**overrides, **cfg.model_overrides(), **run_overrides(m)})
    stage = TrainConfig(model=model, dataset=cfg.dataset, data_root=cfg.data_root,
                        superclasses=str(superclasses) if superclasses else None, holdout=cfg.holdout,
                        seed=cfg.seed, precision=cfg.precision, out=str(run_dir), resume=resume, quiet=cfg.quiet,
                        init_from=str(out / "dense") if m.init != "scratch" else None,
                        router_warmup_epochs=m.router_warmup_epochs, **recipe).validate()
    _say(cfg, f"{run_dir.name}: {'resuming' if resume else 'training'} {m.preset} for {recipe['epochs']} epochs"
              + (f", {m.init}d from dense" if m.init != "scratch" else ""))
    return train(stage)["card"]


def map_path(cfg: PipelineConfig, out: Path, m: ModelRun) -> Path:
    """The super-class map a guided model trains on: the run's superclasses.json, or, for a model
    asking for another E or clustering method, superclasses-e<E>-<method>.json from the same
    held-out confusion graph (stage 3 writes them all)."""
    E, method = m.num_groups or cfg.num_groups, m.method or cfg.method
    if E == cfg.num_groups and method == cfg.method:
        return out / SUPERCLASS_FILE
    return out / f"superclasses-e{E}-{method}.json"


def _patch_card(run_dir: Path, **fields) -> None:
    """Add pipeline artefacts (held-out confusion, discovered super-classes) to a checkpoint card."""
    from .checkpoint import update_card

    update_card(run_dir, **fields)


FIT_SAMPLE = 10_000   # trained-on images the fit accuracy is measured on
# Bump when evaluate_checkpoint's numbers change: every finished model is then evaluated again
# (2: fit_accuracy; end-to-end routers scored by purity).
EVALUATION_VERSION = 2


def evaluate_all(out: Path, runs: dict, test_set, superclasses: dict, fit_set) -> dict:
    """Stage 5, evaluation.json: each model's `evaluate_checkpoint`, reused when the same weights
    (the card's sha256) were evaluated by this EVALUATION_VERSION, since a resumed grid passes
    every finished seed again and two workers would otherwise both re-evaluate it. `superclasses`:
    name -> the map its router is scored against (its own)."""
    earlier = read_json(out / "evaluation.json") or {}
    evaluation = {}
    for name in runs:
        sha = (read_card(out / name).get("weights") or {}).get("sha256")
        old = earlier.get(name)
        if isinstance(old, dict) and sha and old.get("weights_sha256") == sha \
                and old.get("evaluation_version") == EVALUATION_VERSION:
            evaluation[name] = old
            continue
        evaluation[name] = {**evaluate_checkpoint(out / name, test_set, superclasses[name], fit_set),
                            "weights_sha256": sha, "evaluation_version": EVALUATION_VERSION}
    kept = {k: v for k, v in earlier.items() if k not in evaluation}   # models this run did not ask for
    atomic_write_json(out / "evaluation.json", {**kept, **evaluation})
    return evaluation


def trained_on_sample(cfg, train_set):
    """FIT_SAMPLE of the images every model of the run trained on (the training split minus the
    held-out part; a fixed draw, the same for every model and seed), for `fit_accuracy`."""
    import numpy as np

    from .data import heldout_split

    fit, _ = heldout_split(len(train_set), cfg.holdout)
    if len(fit) > FIT_SAMPLE:
        fit = np.sort(np.random.default_rng(0).choice(fit.numpy(), FIT_SAMPLE, replace=False))
    return train_set.subset(fit)


def evaluate_checkpoint(run_dir: Path, test_set, superclasses: Optional[list], fit_set=None) -> dict:
    """Test accuracy, MACs/params, `fit_accuracy` on trained-on images (fp32, eval mode, no
    augmentation: how well a model fits what it learnt from, the check that tells underfitting
    from overfitting) and, for per-image routers, how they route against the super-classes:
    a router trained on the map is scored by accuracy (expert g is super-class g's) and by the
    accuracy a perfect router would give; an end-to-end router numbers its experts freely, so it
    is scored by purity (each expert read as the super-class it sees most)."""
    from analysis.ablation import oracle_routing
    from analysis.collect import collect_routing
    from analysis.routing import router_superclass_accuracy

    from .checkpoint import load_checkpoint
    from .flops import count_macs

    model, card = load_checkpoint(run_dir)
    summary = collect_routing(model, test_set.images, test_set.labels, test_set.mean, test_set.std,
                              batch_size=512, superclasses=superclasses)
    macs = count_macs(model, test_set.image_shape, routing=summary.to_records() if model.cfg.family == "vmoe" else None)
    row = {"test_accuracy": float(summary.accuracy), "macs_active": macs["active"], "macs_dense": macs["dense"],
           "params_active": macs["params_active"], "params_total": macs["params_total"],
           "fit_accuracy": None if fit_set is None else float(collect_routing(
               model, fit_set.images, fit_set.labels, fit_set.mean, fit_set.std, batch_size=512).accuracy),
           **dict.fromkeys(ROUTER_METRICS)}
    guided = model.cfg.superclasses is not None
    if model.cfg.family == "mvmoe" and superclasses is not None:
        first = router_superclass_accuracy(summary, superclasses).iloc[0]
        row["router_superclass_accuracy" if guided else "router_superclass_purity"] = \
            float(first["accuracy" if guided else "purity"])
    if model.cfg.family == "mvmoe" and guided:
        # what a perfect router would give: separates router mistakes from expert quality
        oracle = oracle_routing(model, test_set.images, test_set.labels, test_set.mean, test_set.std,
                                batch_size=512, summary=summary)
        row["oracle_routing_accuracy"] = oracle["oracle_accuracy"]
    _card_evaluation(run_dir, model, card, test_set, row)
    return row


def _card_evaluation(run_dir: Path, model, card: dict, test_set, row: dict) -> None:
    """What the card-level views need from the test split: the router's accuracies in `metrics`, and
    `routing_tables` for cards trained before training wrote them."""
    from .evaluate import eval_stats, routing_tables

    if not model.cfg.is_moe:
        return
    kept = {k: v for k, v in (card.get("metrics") or {}).items() if k not in ROUTER_METRICS}   # replaced below
    metrics = {**kept, **{k: _round(row[k]) for k in ROUTER_METRICS if row[k] is not None}}
    tables = card.get("routing_tables") or routing_tables(eval_stats(model, test_set, 512))
    _patch_card(run_dir, metrics=metrics, routing_tables=tables)


def run(cfg: PipelineConfig) -> dict:
    """Run (or resume) every stage into cfg.out; returns the report dict."""
    from .data import load_dataset

    t0 = time.time()
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_set = load_dataset(cfg.dataset, "train", root=cfg.data_root)
    test_set = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    classes = list(train_set.classes)
    cfg = cfg.resolved(len(classes))                   # E, shape and epochs for this dataset
    E, dense, moe = cfg.num_groups, cfg.dense_preset, cfg.moe_preset
    _say(cfg, f"{cfg.dataset}: {len(classes)} classes, dense {dense}, MoE {moe}, {cfg.method} clustering -> {out}")

    runs = _models_to_train(cfg, dense, moe)
    _train_stage(cfg, out, runs["dense"])                              # 1. dense baseline
    confusion = heldout_confusion(cfg, out, train_set)                 # 2. held-out confusion
    _say(cfg, f"held-out accuracy of the dense baseline: {100 * confusion['accuracy']:.2f}%")
    assignment, names, clustering = discover_superclasses(cfg, out, train_set, confusion, E)   # 3.
    maps = {name: superclass_card(cfg, out, train_set, confusion, m) for name, m in runs.items() if m.guided}
    for name, m in runs.items():                                       # 4. MoE (+ extras)
        _train_stage(cfg, out, m)
        _patch_card(out / name, confusion={"split": "heldout", "model": "dense", "matrix": confusion["matrix"],
                                           "holdout": cfg.holdout},
                    **({} if read_card(out / name).get("superclasses") else
                       {"superclasses": maps.get(name) or {"assignment": assignment, "names": names,
                                                           "method": clustering["method"]}}))
    evaluation = evaluate_all(out, runs, test_set, {n: (maps.get(n) or {"assignment": assignment})["assignment"]
                                                    for n in runs}, trained_on_sample(cfg, train_set))   # 5.
    return write_report(cfg, out, runs, evaluation, confusion, clustering, classes, E,   # 6.
                        {"assignment": assignment, "names": names}, t0)


def superclass_card(cfg, out: Path, train_set, confusion: dict, m: ModelRun) -> dict:
    """The map a guided model trains on, as its card holds it (assignment, names, method): the run's,
    or one at the model's own E or method, made here from the same held-out confusion graph."""
    import numpy as np

    from analysis.superclass_choice import choose_superclasses
    from analysis.superclasses import group_names, superclass_map

    from .superclass_map import load_superclass_map, save_superclass_map

    classes, path = list(train_set.classes), map_path(cfg, out, m)
    E, method = m.num_groups or cfg.num_groups, m.method or cfg.method
    if not path.exists():
        probe = router_probe(dataclasses.replace(cfg, num_groups=E, method=method), out, train_set)
        choice = choose_superclasses(np.asarray(confusion["matrix"]), E, **probe, method=method,
                                     reference=train_set.reference_groups, class_names=classes, seed=cfg.seed)
        save_superclass_map(path, superclass_map(choice.assignment, classes, cfg.dataset, choice.method))
        _say(cfg, f"{path.name}: {E} super-classes by {choice.method}")
    assignment = load_superclass_map(path, classes)
    method_used = json.loads(path.read_text()).get("method", method)
    return {"assignment": assignment, "names": group_names(np.asarray(assignment), classes), "method": method_used}


def dense_on_heldout(cfg, out: Path, train_set):
    """-> (dense model, its card, the held-out part of the training split), for stages 2 and 3."""
    from .checkpoint import load_checkpoint
    from .data import heldout_split

    model, card = load_checkpoint(out / "dense")
    # NOTE: the same split as workbench.train --holdout (split seed 0, whatever --seed is),
    # so the dense model never trained on these images.
    _, held = heldout_split(len(train_set), cfg.holdout)
    return model, card, train_set.subset(held)


def heldout_confusion(cfg, out: Path, train_set) -> dict:
    """confusion.json: the dense baseline's confusion matrix on the held-out part of the training split."""
    import numpy as np

    from analysis.confusion import confusion_matrix, predict

    path = out / "confusion.json"
    if not path.exists():
        model, _, held_set = dense_on_heldout(cfg, out, train_set)
        preds, _ = predict(model, held_set.images, held_set.mean, held_set.std)
        cm = confusion_matrix(held_set.labels.numpy(), preds.numpy(), len(train_set.classes))
        atomic_write_json(path, {"split": "heldout", "holdout": cfg.holdout, "split_seed": 0,
                                 "classes": list(train_set.classes), "matrix": cm.tolist(),
                                 "accuracy": float(np.trace(cm) / cm.sum())})
    return json.loads(path.read_text())


def discover_superclasses(cfg, out: Path, train_set, confusion: dict, E: int):
    """superclasses.json + clustering.json: exactly E groups from the confusion graph; -> (assignment, names, clustering)."""
    import numpy as np

    from analysis.superclass_choice import choose_superclasses
    from analysis.superclasses import clustering_quality, compare_methods, group_names, superclass_map

    from .hierarchy_file import TEMPLATE_FILE, hierarchy_template, write_hierarchy
    from .superclass_map import load_superclass_map, save_superclass_map

    cm, classes = np.asarray(confusion["matrix"]), list(train_set.classes)
    map_path, reference = out / SUPERCLASS_FILE, train_set.reference_groups
    if not map_path.exists():
        choice = choose_superclasses(cm, E, **router_probe(cfg, out, train_set), method=cfg.method,
                                     reference=reference, class_names=classes, seed=cfg.seed)
        assignment = choice.assignment
        table = compare_methods(cm, E, reference=reference, seed=cfg.seed)
        chosen = clustering_quality(cm, assignment, reference=reference)
        atomic_write_json(out / "clustering.json", {
            "method": choice.method, "num_groups": E, "quality": _jsonable(chosen),
            "reference_source": train_set.reference_source,
            "methods": _jsonable(table.drop(columns=["assignment"], errors="ignore").to_dict(orient="records")),
            "choice": _jsonable(choice.to_json()),
        })
        save_superclass_map(map_path, superclass_map(assignment, classes, cfg.dataset, choice.method))
    assignment = load_superclass_map(map_path, classes)
    names = group_names(np.asarray(assignment), classes)
    if not (out / TEMPLATE_FILE).exists():   # the grouping as an editable reference hierarchy (image folders)
        write_hierarchy(out / TEMPLATE_FILE, hierarchy_template(classes, assignment, names))
    for g, name in enumerate(names):
        _say(cfg, f"super-class {g}: {name}")
    return assignment, names, json.loads((out / "clustering.json").read_text())


def router_probe(cfg: PipelineConfig, out: Path, train_set) -> dict:
    """features/labels for the router-aware choice: the dense model's summary at the MoE router's input
    position on the held-out images (what the router will read); {} when a named method is asked for.
    `cfg` is resolved (its E and shape are this run's)."""
    from analysis.superclass_choice import AUTO, router_input_features

    if cfg.method != AUTO:
        return {}
    model, _, held_set = dense_on_heldout(cfg, out, train_set)           # the confusion's images
    return {"features": router_input_features(model, held_set, cfg.moe_preset), "labels": held_set.labels.numpy()}


def _models_to_train(cfg, dense: str, moe: str) -> dict:
    """name -> ModelRun: dense, moe and the --extra models, each upcycled model after the continued
    dense model it is paired with (added when not asked for)."""
    runs = {"dense": ModelRun("dense", dense, False)}
    if cfg.moe_init == "upcycle":
        runs["moe"] = ModelRun("moe", moe, True, init="upcycle", baseline=continued_dense(dense, cfg.epochs).name)
    else:
        runs["moe"] = ModelRun("moe", moe, True)
    for m in [runs["moe"], *map(parse_extra, cfg.extra)]:
        if m.baseline not in runs:
            runs[m.baseline] = continued_dense(dense, m.epochs or cfg.epochs, m.lr)
        runs[m.name] = m
    if cfg.moe_init == "upcycle":   # (the continued dense model goes before the MoE it is paired with)
        runs = {"dense": runs.pop("dense"), runs["moe"].baseline: runs.pop(runs["moe"].baseline), **runs}
    return runs


def _result_row(cfg, out: Path, m: ModelRun, ev: dict, quality: dict, method: str) -> dict:
    from .models.config import router_kind

    card = read_card(out / m.name)
    model, training = card["config"], card.get("training") or {}
    return {
        "dataset": cfg.dataset, "model": m.name, "preset": m.preset, "family": model["family"],
        "E": model["num_experts"] or "", "k": model["top_k"] if model["num_experts"] else "",
        "router": router_kind(model), "init": m.init, "recipe": recipe_label(training), "baseline": m.baseline,
        "test_accuracy": round(ev["test_accuracy"], 5), "fit_accuracy": _round(ev.get("fit_accuracy"), 5),
        "macs_active": int(ev["macs_active"]),
        "params_active": ev["params_active"], "params_total": ev["params_total"],
        **{k: _round(ev.get(k)) for k in ROUTER_METRICS},
        "train_wall_time_s": card.get("wall_time_s"), "epochs": training.get("epochs", cfg.epochs),
        "clustering": (card.get("superclasses") or {}).get("method", method) if m.guided else method,
        "ari": _round(quality.get("ari")), "nmi": _round(quality.get("nmi")),
        "run_dir": str((out / m.name).resolve()),   # the key a resumed run replaces its rows by
    }


def recipe_label(training: dict) -> str:
    """A card's training recipe in a few words: 'regularised' (mixup or MLP dropout) or 'plain', the
    epochs and the augmentation, e.g. 'regularised: 40 ep, crop-flip, mixup 0.2, dropout 0.1'."""
    mixup, dropout = training.get("mixup_alpha") or 0, training.get("mlp_dropout") or 0
    parts = [f"{training.get('epochs')} ep", training.get("augmentation") or "?"]
    parts += [f"mixup {mixup:g}"] if mixup else []
    parts += [f"dropout {dropout:g}"] if dropout else []
    return f"{'regularised' if mixup or dropout else 'plain'}: {', '.join(parts)}"


def write_report(cfg, out: Path, runs: dict, evaluation: dict, confusion: dict, clustering: dict,
                 classes: list, E: int, superclasses: dict, t0: float) -> dict:
    """results.csv rows, report.json and report.md."""
    quality = clustering["quality"]
    rows = [_result_row(cfg, out, m, evaluation[name], quality, clustering["method"]) for name, m in runs.items()]
    _upsert_rows(Path(cfg.results) if cfg.results else out / "results.csv", rows)
    wall = round(time.time() - t0, 1)
    report = {
        "dataset": cfg.dataset, "classes": classes, "num_groups": E, "method": clustering["method"],
        "superclasses": superclasses, "heldout_accuracy_dense": confusion["accuracy"], "clustering": clustering,
        "ari": quality.get("ari"), "nmi": quality.get("nmi"), "rows": rows, "pipeline_wall_time_s": wall,
        "command": cfg.command(), "seed": cfg.seed,
        "recipe": read_card(out / "dense").get("training"),   # what every model of this run trained with
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", _markdown(report).encode("utf-8"))
    _say(cfg, f"done in {wall:.0f} s: " + ", ".join(f"{r['model']} {100 * r['test_accuracy']:.2f}%" for r in rows))
    return report


def router_column(row: dict) -> tuple:
    """(key, prefix) of the router column: accuracy vs the super-classes for a router trained on
    them, "purity …" for an end-to-end one (whose expert numbers mean nothing by themselves)."""
    key = router_score(row)
    return key, "purity " if key == "router_superclass_purity" else ""


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}%"


def _round(x, n: int = 4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), n)


def _jsonable(obj):
    """numpy scalars/arrays and NaN -> plain JSON values."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _upsert_rows(path: Path, rows: list) -> None:
    """Add this run's rows to a results CSV, replacing the rows an earlier pass of the same run
    wrote (same run_dir), so resuming a pipeline N times leaves one row per model, not N. Rows of
    other runs sharing the CSV (--results) stay."""
    def same(run_dir) -> str:          # the same run whether --out was given relative or absolute
        return str(Path(run_dir).resolve()) if run_dir else ""

    ours = {same(r["run_dir"]) for r in rows}
    kept, fields = [], list(rows[0])
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields += [c for c in reader.fieldnames or () if c not in fields]
            kept = [r for r in reader if same(r.get("run_dir")) not in ours]
    write_csv(path, kept + rows, fields)


def write_csv(path: Path, rows: list, fields: list) -> None:
    """The results CSVs, written whole and atomically (missing cells empty)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.getvalue().encode("utf-8"))


def _markdown(r: dict) -> str:
    q = r["clustering"]["quality"]
    lines = [
        f"# Pipeline report: {r['dataset']}", "",
        f"Dense baseline held-out accuracy: {100 * r['heldout_accuracy_dense']:.2f}%  ",
        f"Super-classes: E = {r['num_groups']} by `{r['method']}` clustering of the held-out confusion graph  ",
        f"Within-group share of confusion: {100 * q['within_share']:.1f}% (counts), balance {q['balance']:.2f}, "
        f"modularity {q['modularity'] if q['modularity'] is None else round(q['modularity'], 3)}"
        + (f", ARI {r['ari']:.3f}, NMI {r['nmi']:.3f} vs {r['clustering'].get('reference_source')}"
           if r.get("ari") is not None else ""), "",
        "| super-class | classes |", "|---|---|",
    ]
    for g, name in enumerate(r["superclasses"]["names"]):
        members = [c for c, a in zip(r["classes"], r["superclasses"]["assignment"]) if a == g]
        lines.append(f"| {g} | {', '.join(members)} |")
    choice = r["clustering"].get("choice")
    if choice:
        score = choice["settings"]["score"]
        lines += ["", f"Why this grouping ({choice['criterion']}): {choice['reason']}", "",
                  f"| candidate | {score.replace('_', ' ')} | min group share | within share | chosen |",
                  "|---|---:|---:|---:|:---:|"]
        for c in choice["candidates"]:
            lines.append(f"| {c['candidate']} | {_pct(c.get(score))} | {_pct(c.get('min_share'))} | "
                         f"{_pct(c.get('within_share'))} | {'✓' if c.get('chosen') else ''} |")
    lines += ["", "| model | preset | test accuracy | accuracy on trained-on images | MACs/img | active / total params "
              "| router acc. vs super-class | accuracy with a perfect router |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        router, prefix = router_column(row)
        lines.append(f"| {row['model']} | {row['preset']} | {100 * row['test_accuracy']:.2f}% | "
                     f"{_pct(row.get('fit_accuracy'))} | "
                     f"{row['macs_active'] / 1e6:.1f} M | {row['params_active'] / 1e6:.2f} M / "
                     f"{row['params_total'] / 1e6:.2f} M | {prefix}{_pct(row[router])} | "
                     f"{_pct(row.get('oracle_routing_accuracy'))} |")
    lines += ["", "Clustering methods on the same graph:", "",
              "| method | within share | balance | modularity | ARI | NMI |", "|---|---:|---:|---:|---:|---:|"]
    for m in r["clustering"]["methods"]:
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {m.get('method')} | {fmt(m.get('within_share'))} | {fmt(m.get('balance'))} | "
                     f"{fmt(m.get('modularity'))} | {fmt(m.get('ari'))} | {fmt(m.get('nmi'))} |")
    lines += ["", f"Wall time of the last pass: {r['pipeline_wall_time_s']:.0f} s (finished stages are skipped and "
              "evaluations reused; each model's training time is in its card)", ""]
    return "\n".join(lines)


SHORT_NAMES = {"fashion-mnist": "fmnist", "tiny-imagenet": "tin"}
REPORT_FILES = ("report.md", "report.json", "clustering.json", "confusion.json", SUPERCLASS_FILE,
                "hierarchy-template.json")


def export(run_dir: Path, dest: Path, report: dict, seeds: Optional[dict] = None) -> list:
    """Copy each model of a finished pipeline run to dest/<dataset>-<model> (weights + card) and its
    reports to dest/pipeline-<dataset>-<dense shape>/; returns the checkpoint folders written.

    `seeds` ({model name: per-seed rows}) goes into each exported card as `seeds`, so a shipped
    checkpoint (the median seed) carries the spread of its cell. Every file is copied
    atomically, so an interrupted export leaves no half file."""
    dataset = report["dataset"]
    short = SHORT_NAMES.get(dataset, dataset)
    written = []
    for r in report["rows"]:
        target = dest / f"{short}-{r['preset'] if r['model'] in ('dense', 'moe') else r['model']}"
        atomic_copy(Path(r["run_dir"]) / WEIGHTS, target / WEIGHTS)
        card = read_card(Path(r["run_dir"]))
        if seeds and r["model"] in seeds:
            card["seeds"] = seeds[r["model"]]
        atomic_write_json(target / CARD, card)
        old = target / snapshots.FOLDER
        for stale in sorted(old.glob("epoch-*.npz")) if old.is_dir() else []:
            stale.unlink()                                          # a previous seed's snapshots
        for snap in sorted((Path(r["run_dir"]) / snapshots.FOLDER).glob("epoch-*.npz")):  # routing over training
            atomic_copy(snap, target / snapshots.FOLDER / snap.name)
        written.append(target)
    dense = next(r["preset"] for r in report["rows"] if r["model"] == "dense")
    reports = dest / f"pipeline-{dataset}-{dense.split('-', 1)[1]}"
    for name in REPORT_FILES:
        if (run_dir / name).exists():
            atomic_copy(run_dir / name, reports / name)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)   # (argparse's own errors exit with 2 and its usage line)
    try:
        cfg = from_args(ns)
        if cfg.grid:
            from .grid import run_grid   # (the grid builds on this module)
            run_grid(cfg)
        else:
            report = run(cfg)
            if cfg.export:
                export(Path(cfg.out), Path(cfg.export), report)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
