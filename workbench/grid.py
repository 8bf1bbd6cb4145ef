"""The sample-checkpoint grid: the pipeline once per (size, seed), and what the seeds say together.

    python -m workbench.pipeline --grid samples --dataset fashion-mnist --out runs/samples25 --export sample_checkpoints
    python -m workbench.grid --dataset fashion-mnist --out runs/samples25 --export sample_checkpoints   (tables only)

A difference between two models is only worth reporting over seeds with the same recipe, so a
grid cell is one (size, model) trained at several seeds, each seed a whole pipeline in
OUT/<size>/seed-<s>/ (dense, MoE and the extras share that seed's data order, so the difference
to dense is paired per seed). Cells fill in over many sessions and by several workers at once:
a seed another trainer holds is skipped, and the tables (`grid.md`, `grid-results.csv`, mean ±
std with the count of seeds so far) are rewritten from every finished report after each pipeline.
With --export the median dense seed of each size is shipped, with its MoEs, and every seed's
numbers go into the shipped cards.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import safejson
from .checkpoint import SEED_METRICS, read_card, update_card
from .pipeline import SHORT_NAMES, export, router_column, run, write_csv
from .pipeline_config import PipelineConfig, dense_shape, parse_extra
from .runs import RunBusy, atomic_write_bytes, is_finished

SAMPLE_GRID = {
    # size: (dense preset, seeds, extra models at this size)
    # at 6x64 the paper's routing strategies, and a smaller dose of the super-class loss (λ 0.1 beside
    # the default 0.3 and the end-to-end router's 0): does the loss cost the shared blocks accuracy?
    # (in this order: the λ series first, the slower per-token model last)
    "6x64": ("vit-6x64", 3, ["mvmoe-6x64-e4k1:e2e", "mvmoe-6x64-e4k1:lambda=0.1", "vmoe-6x64-e8k2"]),
    "6x96": ("vit-6x96", 2, []),
    "9x64": ("vit-9x64", 2, []),
}
# The one recipe every grid model trains with (sample_checkpoints/README.md says how it was chosen).
GRID_RECIPE = {"epochs": 25, "lr": 3e-3, "batch_size": 128, "label_smoothing": 0.1, "augmentation": "none"}
# Tiny ImageNet (the paper's setting in miniature): E = 10 super-classes of 200 classes; the per-token
# V-MoE at the same E and k, so the two routings cost the same MACs. Natural images: flips only.
# Issue 32 adds, at this recipe: data per expert (E = 2 and E = 4, each with the pipeline's own map at that E,
# and a balanced map at E = 10), and the per-token V-MoE on the per-image model's MoE blocks (4, 5), so both
# routings differ only in how they route. The cells of issue 17 come last.
TINY_IMAGENET_GRID = {"6x64": ("vit-6x64", 3, ["mvmoe-6x64-e2k1", "mvmoe-6x64-e4k1",
                                               "mvmoe-6x64-e10k1:method=kernighan-lin", "vmoe-6x64-e10k1:blocks=4,5",
                                               "mvmoe-6x64-e10k1:e2e", "vmoe-6x64-e10k1"])}
TINY_IMAGENET_RECIPE = {"epochs": 15, "lr": 3e-3, "batch_size": 128, "label_smoothing": 0.1, "augmentation": "flip",
                        "num_groups": 10}
# When does per-image routing pay off (issue 32)? One recipe for dense and MoE alike against the per-image
# experts' overfitting: mixup, random crop + flip, dropout in every MLP and expert (V-MoE's from-scratch
# ImageNet recipe has mixup and expert dropout) and a longer schedule. Then, from each seed's dense model,
# 10 more epochs as dense and as the upcycled super-class MoE (equal total training).
# (lr 1e-3 for the 10 more epochs: a trained model restarted at the first peak forgets part of what it learnt)
TINY_IMAGENET_REGULARISED_GRID = {"6x64": ("vit-6x64", 3, ["vit-6x64:continue=10:lr=1e-3",
                                                           "mvmoe-6x64-e10k1:upcycle=10:lr=1e-3"])}
TINY_IMAGENET_REGULARISED_RECIPE = {"epochs": 40, "lr": 3e-3, "batch_size": 128, "label_smoothing": 0.1,
                                    "augmentation": "crop-flip", "mixup_alpha": 0.2, "mlp_dropout": 0.1,
                                    "num_groups": 10}
# Its screen: the same recipe for 15 epochs, seed 0 (does the MoE's train - val gap close?). The MoE of the
# screen trained on seed 0's map of the plain recipe (sample_checkpoints/pipeline-tiny-imagenet-6x64), beside
# its dense twin rather than after it; the pipeline then evaluated both.
TINY_IMAGENET_SCREEN_GRID = {"6x64": ("vit-6x64", 1, [])}
GRIDS = {   # (--grid, dataset) -> (cells, recipe); a dataset without its own grid takes Fashion-MNIST's
    ("samples", "tiny-imagenet"): (TINY_IMAGENET_GRID, TINY_IMAGENET_RECIPE),
    ("regularised", "tiny-imagenet"): (TINY_IMAGENET_REGULARISED_GRID, TINY_IMAGENET_REGULARISED_RECIPE),
    ("screen", "tiny-imagenet"): (TINY_IMAGENET_SCREEN_GRID, {**TINY_IMAGENET_REGULARISED_RECIPE, "epochs": 15}),
}


def sample_grid(dataset: str, name: str = "samples") -> tuple[dict, dict]:
    """(grid, recipe) of `--grid NAME` for a dataset: its own where it has one, else the Fashion-MNIST one."""
    if (name, dataset) in GRIDS:
        return GRIDS[(name, dataset)]
    if name != "samples":
        raise ValueError(f"--grid {name}: defined for {sorted(d for n, d in GRIDS if n == name)} only")
    return SAMPLE_GRID, GRID_RECIPE


# ----------------------------------------------------------------------------- the tables

def _mean_std(values: list) -> tuple:
    """(mean, sample std (ddof 1; 0 for one value), n) of the non-missing values."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None, 0
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)


def _pm(values: list, scale: float = 100, digits: int = 2, sign: bool = False, count: bool = True) -> str:
    """"mean ± std (n)" in points; one value: just the value, with (n = 1). count=False leaves out
    the (n) where the row already says how many seeds it has."""
    mean, std, n = _mean_std(values)
    if n == 0:
        return ""
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = f"{fmt.format(scale * mean)} ± {scale * std:.{digits}f}" if n > 1 else fmt.format(scale * mean)
    return f"{text} (n={n})" if count else text


def grid_rows(reports: dict) -> list:
    """One row per (size, seed, model) from {(size, seed): report}; each row also carries the
    paired difference to its baseline of the same size and seed (same data order, same initial
    weights for every shared tensor): the dense model, or for an upcycled MoE the dense model
    continued as long."""
    rows = []
    for (size, seed), report in sorted(reports.items()):
        by_name = {r["model"]: r for r in report["rows"]}
        for r in report["rows"]:
            base = by_name.get(r.get("baseline") or "dense")
            rows.append({"size": size, "seed": seed, **r, "delta_vs_dense": _paired(r, base, "test_accuracy"),
                         "fit_delta_vs_dense": _paired(r, base, "fit_accuracy")})
    return rows


def _paired(row: dict, base: Optional[dict], key: str) -> Optional[float]:
    """row[key] - base[key] for a model paired with its seed's baseline; None for a baseline itself or a gap."""
    if base is None or row is base or row.get(key) is None or base.get(key) is None:
        return None
    return round(row[key] - base[key], 5)


def _interval(values: list) -> str:
    """A paired difference as every table states it: mean ± std, 95 % t-interval, seeds > 0, n."""
    from analysis.paired import paired_difference

    return paired_difference(values).text()


def _gap(row: dict) -> Optional[float]:
    """fit − test: accuracy on trained-on images minus test accuracy (overfitting shows here)."""
    if row.get("fit_accuracy") is None or row.get("test_accuracy") is None:
        return None
    return row["fit_accuracy"] - row["test_accuracy"]


def cell_key(row: dict) -> tuple:
    """A grid cell: one (size, model, recipe, init) trained at several seeds."""
    return row["size"], row["model"], row.get("recipe") or "", row.get("init") or "scratch"


def grid_table(rows: list) -> str:
    """Markdown: per cell (size, model, recipe, init), mean ± std over the seeds done so far (n =
    seeds); the paired difference to the cell's baseline with its 95 % t-interval and how many
    seeds were above it; the accuracy on trained-on images (fit), fit − test (the overfitting
    gap) and the fit's paired difference; MACs, params and training time; on the dense row, how
    well the super-classes found from its confusion match the dataset's reference grouping."""
    cells: dict = {}
    for r in rows:
        cells.setdefault(cell_key(r), []).append(r)
    lines = ["| size | model | router | init | recipe | seeds | test acc (%) | Δ vs baseline, paired (points): "
             "mean ± std, 95 % CI, seeds > 0 | per-seed Δ | fit acc, trained-on images (%) | fit − test (points) | "
             "fit Δ vs baseline, paired (points) | router acc vs super-classes (%) | perfect-router acc (%) | "
             "MACs/img | params active / total | train wall time (min) | super-classes vs reference: ARI / NMI |",
             "|---|---|---|---|---|---:|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (size, model, recipe, init), rs in cells.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        first = rs[0]
        router, prefix = router_column(first)
        per_seed = ", ".join(f"s{r['seed']}: {100 * r['delta_vs_dense']:+.2f}" for r in rs
                             if r["delta_vs_dense"] is not None)
        baseline = first.get("baseline") or "dense"
        lines.append(
            f"| {size} | {model if model not in ('dense', 'moe') else first['preset']} | "
            f"{first['router'] or 'dense'} | {init} | {recipe} | {len(rs)} | {_pm([r['test_accuracy'] for r in rs])} | "
            f"{_interval([r['delta_vs_dense'] for r in rs]) + (f' vs {baseline}' if baseline != 'dense' else '')} | "
            f"{per_seed} | {_pm([r.get('fit_accuracy') for r in rs])} | "
            f"{_pm([_gap(r) for r in rs], count=False)} | {_interval([r.get('fit_delta_vs_dense') for r in rs])} | "
            f"{prefix}{_pm([r.get(router) for r in rs])} | "
            f"{_pm([r.get('oracle_routing_accuracy') for r in rs])} | {float(first['macs_active']) / 1e6:.2f} M | "
            f"{float(first['params_active']) / 1e6:.2f} M / {float(first['params_total']) / 1e6:.2f} M | "
            f"{_pm([r.get('train_wall_time_s') for r in rs], scale=1 / 60, digits=0, count=False)} | "
            f"{_agreement(rs) if model == 'dense' else ''} |")
    return "\n".join(lines) + "\n"


def _agreement(rows: list) -> str:
    """"ARI / NMI" (mean ± std over seeds) of each seed's super-classes vs the reference grouping;
    empty where the dataset has none."""
    if all(r.get("ari") is None for r in rows):
        return ""
    return " / ".join(_pm([r.get(k) for r in rows], scale=1, digits=3, count=False) for k in ("ari", "nmi"))


def median_seed(rows: list) -> int:
    """The seed whose test accuracy is the median of the cell's (the lower middle one for an even count)."""
    ranked = sorted(rows, key=lambda r: (r["test_accuracy"], r["seed"]))
    return ranked[(len(ranked) - 1) // 2]["seed"]


def write_grid(cfg: PipelineConfig, base: Path, reports: dict, ship: bool = True) -> None:
    """grid-results.csv and grid.md from every finished (size, seed) so far; with --export, the
    median-seed checkpoint of each (size, model) with every seed's metrics in its card, and the
    dataset's shipped tables, which also keep the rows of its other grids (other folders)."""
    rows = grid_rows(reports)
    if not rows:
        return
    results = Path(cfg.results or base / "grid-results.csv")
    write_csv(results, rows, list(rows[0]))
    atomic_write_bytes(base / "grid.md", grid_table(rows).encode("utf-8"))
    if not cfg.export:
        return
    if ship:       # (a screen adds its rows to the shipped tables and ships no checkpoint)
        _export_checkpoints(cfg, base, reports, rows)
    short = SHORT_NAMES.get(cfg.dataset, cfg.dataset)      # one folder can hold several datasets' grids
    shipped = Path(cfg.export) / f"{short}-grid-results.csv"
    others = [r for r in read_rows(shipped, cfg.dataset) if not _under(r.get("run_dir"), base)]
    every = others + rows
    write_shipped_csv(shipped, every)
    atomic_write_bytes(Path(cfg.export) / f"{short}-grid.md", grid_table(every).encode("utf-8"))


def write_shipped_csv(path: Path, rows: list) -> None:
    """A shipped results CSV: `run_dir` relative to the file's folder, so the file names no machine."""
    import os

    def relative(run_dir):
        return os.path.relpath(Path(run_dir).resolve(), path.parent.resolve()) if run_dir else run_dir

    rows = [{**r, "run_dir": relative(r.get("run_dir"))} for r in rows]
    write_csv(path, rows, list(dict.fromkeys(k for r in rows for k in r)))


def _under(run_dir, base: Path) -> bool:
    return bool(run_dir) and Path(run_dir).resolve().is_relative_to(base.resolve())


def read_rows(path: Path, dataset: str) -> list:
    """A shipped grid CSV as rows (numbers as numbers, empty cells None). Rows written before the
    init and recipe columns existed trained from scratch, each MoE from its own draw of the shared
    weights (before the dense-twin pairing), with the dataset's sample-grid recipe."""
    import csv

    from .pipeline import recipe_label

    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    recipe = {k: v for k, v in sample_grid(dataset)[1].items() if k != "num_groups"}
    rows = []
    for r in raw:
        row = {k: _number(v) for k, v in r.items()}
        row["seed"] = int(row["seed"])
        if row.get("run_dir") and not Path(row["run_dir"]).is_absolute():   # stored relative to the file
            row["run_dir"] = str((path.parent / row["run_dir"]).resolve())
        row.setdefault("init", "scratch, unshared init" if row.get("family") != "vit" else "scratch")
        row.setdefault("recipe", recipe_label({**recipe, "epochs": row.get("epochs")}))
        row.setdefault("baseline", "dense")
        rows.append(row)
    return rows


def dataset_of_results(path: Path) -> str:
    """The dataset of a shipped `<short>-grid-results.csv` (its rows say it too)."""
    short = path.name.removesuffix("-grid-results.csv")
    return {v: k for k, v in SHORT_NAMES.items()}.get(short, short)


def _number(text):
    if text in ("", None):
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def rewrite_shipped(dest: Path, dataset: str) -> str:
    """Rewrite a dataset's shipped table from its shipped CSV, and the paired summary (n, mean, std,
    95 % t-interval, seeds > 0) of every shipped card with seeds, from the seeds it carries; the
    table's text is returned. What `--export` writes, for a grid whose run folders are gone."""
    short = SHORT_NAMES.get(dataset, dataset)
    rows = read_rows(dest / f"{short}-grid-results.csv", dataset)
    if not rows:
        raise ValueError(f"{dest / f'{short}-grid-results.csv'}: no rows")
    write_shipped_csv(dest / f"{short}-grid-results.csv", rows)
    table = grid_table(rows)
    atomic_write_bytes(dest / f"{short}-grid.md", table.encode("utf-8"))
    for card_path in sorted(dest.glob(f"{short}-*/card.json")):
        summary = _paired_summary(read_card(card_path.parent).get("seeds") or [])
        if summary:                                             # (a dense card pairs with nothing)
            update_card(card_path.parent, paired=summary)
    return table


def _paired_summary(seeds: list) -> dict:
    from analysis.paired import card_paired_summary

    return card_paired_summary(seeds)


def _export_checkpoints(cfg: PipelineConfig, base: Path, reports: dict, rows: list) -> None:
    dest = Path(cfg.export)
    for size in dict.fromkeys(r["size"] for r in rows):
        by_model: dict = {}
        for r in rows:
            if r["size"] == size:
                by_model.setdefault(r["model"], []).append(r)
        seeds = {m: [{"seed": r["seed"], "baseline": r.get("baseline") or "dense",
                      **{k: r.get(k) for k in SEED_METRICS + ("delta_vs_dense", "fit_delta_vs_dense")}}
                     for r in sorted(rs, key=lambda r: r["seed"])] for m, rs in by_model.items()}
        # one seed is shipped per size: the dense model's median seed, and the MoEs of that seed
        # (paired with it: same data order); every seed's numbers are in the cards and the CSV
        chosen = median_seed(by_model["dense"])
        for target in export(seed_dir(base, size, chosen), dest, reports[(size, chosen)], seeds):
            summary = _paired_summary(read_card(target).get("seeds") or [])
            if summary:
                update_card(target, paired=summary)


# ----------------------------------------------------------------------------- running it

def run_grid(cfg: PipelineConfig) -> None:
    """The sample-checkpoint grid into OUT/<size>/seed-<s>/, one whole pipeline per (size, seed).

    First the dense + super-class MoE pair of every (size, seed), then the extra models one at a
    time, each at every seed before the next, so an interrupted grid has the headline pairs first
    and each extra cell fills across seeds (and has a table row) before the next one starts. After
    each pipeline the table, the CSV and (with --export) the shipped checkpoints are rewritten from
    everything finished so far, so a grid resumed over many sessions always shows how many seeds
    each cell has."""
    base = Path(cfg.out)
    grid, grid_recipe = sample_grid(cfg.dataset, cfg.grid)
    recipe = {k: getattr(cfg, k) if getattr(cfg, k) is not None else v for k, v in grid_recipe.items()}
    for depth in range(1 + max(len(extras) for _, _, extras in grid.values())):   # extras trained so far
        for size, (dense, n_seeds, extras) in grid.items():
            if depth > len(extras):
                continue
            for seed in range(n_seeds):
                folder = seed_dir(base, size, seed)
                # the first `depth` extras, and any later one trained earlier (so it stays in the report)
                now = [e for i, e in enumerate(extras) if i < depth or is_finished(folder / parse_extra(e).name)]
                sub = dataclasses.replace(cfg, **recipe, **dense_shape(dense), out=str(folder), seed=seed, grid=None,
                                          export=None, extra=list(cfg.extra) + now, results=str(folder / "results.csv"))
                try:
                    run(sub)
                except RunBusy as e:   # another worker trains this seed now: go on with the next one
                    if not cfg.quiet:
                        print(f"[grid] {size} seed {seed} skipped: {e}", file=sys.stderr, flush=True)
                    continue
                write_grid(cfg, base, finished_reports(base, grid))
    print(grid_table(grid_rows(finished_reports(base, grid))))


def seed_dir(base: Path, size: str, seed: int) -> Path:
    """Where the grid runs the whole pipeline of one (size, seed): OUT/<size>/seed-<s>/."""
    return base / size / f"seed-{seed}"


def finished_reports(base: Path, grid: dict) -> dict:
    """{(size, seed): report} of every pipeline of the grid that has written its report, whichever
    worker ran it: two workers sharing a grid then never write a table that lacks the other's seeds."""
    reports = {}
    for size, (_, n_seeds, _) in grid.items():
        for seed in range(n_seeds):
            path = seed_dir(base, size, seed) / "report.json"
            if not path.exists():                  # not finished yet
                continue
            try:                                   # the card bound: a 1000-class report passes runs' 1 MB
                report = safejson.read(path)
            except (OSError, ValueError) as e:     # say so: a seed silently missing from the table misleads
                print(f"[grid] {path} left out of the table: {e}", file=sys.stderr)
                continue
            if isinstance(report, dict):
                reports[(size, seed)] = report
    return reports


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Rewrite a grid's tables (and with --export its shipped checkpoints) from the pipelines
    finished so far, training nothing: what to run after copying a finished seed in by hand."""
    p = argparse.ArgumentParser(prog="python -m workbench.grid", description=main.__doc__)
    p.add_argument("--dataset", default="fashion-mnist", help="whose grid: fashion-mnist or tiny-imagenet")
    p.add_argument("--out", default=None, metavar="DIR", help="the grid's folder (--out of --grid samples)")
    p.add_argument("--shipped", default=None, metavar="DIR",
                   help="instead: rewrite the dataset's shipped table and its cards' paired summaries in DIR from "
                        "the shipped CSV and the cards' seeds (the run folders are not needed)")
    p.add_argument("--grid", default="samples", choices=("samples", "regularised", "screen"),
                   help="which grid of the dataset")
    p.add_argument("--tables-only", action="store_true",
                   help="with --export: add this grid's rows to the shipped tables, ship no checkpoint")
    p.add_argument("--export", default=None, metavar="DIR", help="ship the median seeds and the tables here")
    ns = p.parse_args(argv)
    if ns.shipped:
        print(rewrite_shipped(Path(ns.shipped), ns.dataset))
        return 0
    if ns.out is None:
        p.error("give --out DIR (or --shipped DIR)")
    base = Path(ns.out)
    if not base.is_dir():
        print(f"error: {base} is not a folder", file=sys.stderr)
        return 2
    grid, _ = sample_grid(ns.dataset, ns.grid)
    reports = finished_reports(base, grid)
    if not reports:
        print(f"error: no finished pipeline under {base} (looked for <size>/seed-<s>/report.json)", file=sys.stderr)
        return 2
    write_grid(PipelineConfig(dataset=ns.dataset, out=str(base), export=ns.export, grid=ns.grid), base, reports,
               ship=not ns.tables_only)
    print(grid_table(grid_rows(reports)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
