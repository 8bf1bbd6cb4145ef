"""The paper's procedure end to end on the synthetic dataset (designed super-classes)."""
import csv
import json
import re
from pathlib import Path

import pytest
import torch

from workbench import grid, pipeline
from workbench.checkpoint import read_card


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    code = pipeline.main(["--dataset", "synthetic", "--out", str(out), "--epochs", "3", "--quiet"])
    assert code == 0
    return out


def test_every_stage_leaves_its_artefact(run_dir):
    for name in ("dense/card.json", "moe/card.json", "confusion.json", "superclasses.json",
                 "clustering.json", "evaluation.json", "report.md", "report.json", "results.csv",
                 "hierarchy-template.json"):
        assert (run_dir / name).exists(), name


def test_pipeline_recovers_the_designed_groups(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_groups"] == 4
    assert report["ari"] >= 0.8 and report["nmi"] >= 0.8


def test_moe_is_trained_with_the_discovered_superclasses(run_dir):
    card = read_card(run_dir / "moe")
    mapping = json.loads((run_dir / "superclasses.json").read_text())
    assert card["config"]["superclasses"] == [mapping["classes"][c] for c in card["classes"]]
    assert card["confusion"]["split"] == "heldout"
    rows = list(csv.DictReader(open(run_dir / "results.csv")))
    moe = next(r for r in rows if r["model"] == "moe")
    assert float(moe["router_superclass_accuracy"]) > 0.5
    dense = next(r for r in rows if r["model"] == "dense")
    # per-image k=1: the MoE costs the dense MACs plus one router
    assert abs(int(moe["macs_active"]) - int(dense["macs_active"])) / int(dense["macs_active"]) < 0.01


def test_a_rerun_skips_finished_stages(run_dir):
    before = (run_dir / "dense" / "model.safetensors").stat().st_mtime_ns
    assert pipeline.main(["--dataset", "synthetic", "--out", str(run_dir), "--epochs", "3", "--quiet"]) == 0
    assert (run_dir / "dense" / "model.safetensors").stat().st_mtime_ns == before
    rows = list(csv.DictReader(open(run_dir / "results.csv")))
    assert sorted(r["model"] for r in rows) == ["dense", "moe"]  # a resumed run replaces its rows


def test_runs_sharing_a_results_csv_keep_each_others_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shared = tmp_path / "all.csv"
    row = lambda run, acc: {"model": "dense", "test_accuracy": acc, "run_dir": run}  # noqa: E731
    pipeline._upsert_rows(shared, [row("a", 0.5)])
    pipeline._upsert_rows(shared, [row("b", 0.6)])
    pipeline._upsert_rows(shared, [row(str(tmp_path / "a"), 0.7)])   # run a again, --out given absolute
    rows = list(csv.DictReader(open(shared)))
    assert {(Path(r["run_dir"]).name, r["test_accuracy"]) for r in rows} == {("a", "0.7"), ("b", "0.6")}


def test_the_hierarchy_template_reads_back_as_an_image_folders_reference_hierarchy(run_dir, tmp_path):
    from PIL import Image

    from workbench.data import load_dataset

    mapping = json.loads((run_dir / "superclasses.json").read_text())
    classes = sorted(mapping["classes"])
    for c in classes:                        # an image folder with the same classes
        for i in range(2):
            (tmp_path / "imgs" / c).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 10 * i).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "hierarchy.json").write_bytes((run_dir / "hierarchy-template.json").read_bytes())
    ds = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", "train")
    assert ds.reference_source.startswith("hierarchy.json")
    same_group = lambda groups: {(a, b) for a in range(len(classes)) for b in range(len(classes))  # noqa: E731
                                 if groups[a] == groups[b]}
    assert same_group(ds.reference_groups) == same_group([mapping["classes"][c] for c in classes])
    assert set(ds.reference_group_names) == set(mapping["groups"])


def test_invalid_group_count_is_a_clear_error(tmp_path, capsys):
    assert pipeline.main(["--dataset", "synthetic", "--out", str(tmp_path), "--num-groups", "40", "--quiet"]) == 2
    assert "--num-groups must be in 2..16" in capsys.readouterr().err


def test_default_group_count_follows_class_count():
    assert [pipeline.default_num_groups(c) for c in (10, 16, 100, 1000)] == [4, 4, 10, 10]


# ---------------------------------------------------------------- the seed grid
MINI_GRID = {"2x32": ("vit-2x32", 2, ["mvmoe-2x32-e4k1:e2e", "mvmoe-2x32-e4k1:lambda=0.1"])}


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    """A two-seed grid in miniature: one size, dense + super-class MoE, an end-to-end extra and
    a super-class MoE with its own lambda."""
    base = tmp_path_factory.mktemp("grid")
    mp = pytest.MonkeyPatch()
    mp.setattr(grid, "SAMPLE_GRID", MINI_GRID)
    args = ["--grid", "samples", "--dataset", "synthetic", "--out", str(base / "runs"), "--epochs", "1",
            "--holdout", "0.9", "--batch-size", "512", "--method", "spectral", "--precision", "fp32",
            "--export", str(base / "shipped"), "--quiet"]
    try:
        assert pipeline.main(args) == 0
    finally:
        mp.undo()
    return base, args


def test_grid_reports_every_seed_and_the_spread(grid_dir):
    base, _ = grid_dir
    rows = list(csv.DictReader(open(base / "runs" / "grid-results.csv")))
    assert sorted((r["seed"], r["model"]) for r in rows) == sorted(
        (s, m) for s in "01" for m in ("dense", "moe", "mvmoe-2x32-e4k1-e2e", "mvmoe-2x32-e4k1-lambda0.1"))
    for r in rows:   # the paired differences are against the dense model of the same seed
        dense = next(d for d in rows if d["seed"] == r["seed"] and d["model"] == "dense")
        assert 0 < float(r["fit_accuracy"]) <= 1                       # every model, on trained-on images
        if r["model"] != "dense":
            for key in ("test_accuracy", "fit_accuracy"):
                delta = r["delta_vs_dense" if key == "test_accuracy" else "fit_delta_vs_dense"]
                assert float(delta) == pytest.approx(float(r[key]) - float(dense[key]), abs=1e-4)
    table = (base / "runs" / "grid.md").read_text()
    assert table.count("(n=2)") >= 3 and "± " in table
    # the end-to-end router numbers its experts freely: it is scored by purity, never by accuracy
    e2e = [r for r in rows if r["model"] == "mvmoe-2x32-e4k1-e2e"]
    assert all(r["router_superclass_accuracy"] == "" and 0 < float(r["router_superclass_purity"]) <= 1 for r in e2e)
    moe = [r for r in rows if r["model"] == "moe"]
    assert all(r["router_superclass_purity"] == "" and float(r["router_superclass_accuracy"]) > 0 for r in moe)
    e2e_row = next(line for line in table.splitlines() if "| mvmoe-2x32-e4k1-e2e |" in line)
    assert "| purity " in e2e_row
    card = read_card(base / "runs" / "2x32" / "seed-0" / "mvmoe-2x32-e4k1-e2e")
    assert "router_superclass_accuracy" not in card["metrics"] and "router_superclass_purity" in card["metrics"]
    # a dose of the super-class loss is its own cell: guided (scored by accuracy), trained with its lambda
    dose = [r for r in rows if r["model"] == "mvmoe-2x32-e4k1-lambda0.1"]
    assert all(r["router"] == "superclass, λ = 0.1" and float(r["router_superclass_accuracy"]) > 0 for r in dose)
    assert {r["router"] for r in moe} == {"superclass"}
    dose_card = read_card(base / "runs" / "2x32" / "seed-0" / "mvmoe-2x32-e4k1-lambda0.1")
    assert dose_card["config"]["superclass_loss_weight"] == 0.1 and dose_card["config"]["superclasses"]
    assert read_card(base / "runs" / "2x32" / "seed-0" / "moe")["config"]["superclass_loss_weight"] == 0.3
    assert "| mvmoe-2x32-e4k1-lambda0.1 | superclass, λ = 0.1 | scratch | plain: 1 ep, none | 2 |" in table
    # every paired difference carries its 95 % t-interval and how many seeds were above the baseline
    moe_row = next(line for line in table.splitlines() if "| mvmoe-2x32-e4k1 |" in line)
    assert "95 % CI [" in moe_row and "seeds > 0 (n = 2)" in moe_row
    # synthetic has designed groups: the dense row says how well each seed's super-classes recover them
    dense_row = next(line for line in table.splitlines() if "| vit-2x32 |" in line).strip("|").split("|")
    ari, nmi = (float(v.split("±")[0]) for v in dense_row[-1].split("/"))
    ari_seeds = [float(r["ari"]) for r in rows if r["model"] == "dense"]
    assert ari == pytest.approx(sum(ari_seeds) / 2, abs=1e-3) and 0 < nmi <= 1


def test_grid_ships_the_median_seed_with_every_seeds_numbers(grid_dir):
    from analysis.tradeoff import checkpoint_table, moe_gains
    from workbench.checkpoint import load_checkpoint

    base, _ = grid_dir
    shipped = base / "shipped"
    moe = shipped / "synthetic-mvmoe-2x32-e4k1"
    _, card = load_checkpoint(moe)                                   # the card validates
    assert [s["seed"] for s in card["seeds"]] == [0, 1]
    assert all(0 < s["fit_accuracy"] <= 1 and s["fit_delta_vs_dense"] is not None for s in card["seeds"])
    dense_seeds = read_card(shipped / "synthetic-vit-2x32")["seeds"]
    chosen = grid.median_seed([{"seed": s["seed"], "test_accuracy": s["test_accuracy"]} for s in dense_seeds])
    assert card["training"]["seed"] == chosen == read_card(shipped / "synthetic-vit-2x32")["training"]["seed"]
    table = checkpoint_table([shipped / "synthetic-vit-2x32", moe])
    assert list(table["n_seeds"]) == [2, 2] and table["accuracy_std"].notna().all()
    gains = moe_gains(table)
    assert gains["n"].tolist() == [2]
    assert gains["gain"].iloc[0] == pytest.approx(sum(s["delta_vs_dense"] for s in card["seeds"]) / 2)
    assert (shipped / "synthetic-grid-results.csv").exists() and (shipped / "synthetic-grid.md").exists()
    assert read_card(shipped / "synthetic-mvmoe-2x32-e4k1-lambda0.1")["config"]["superclass_loss_weight"] == 0.1


def test_a_resumed_grid_trains_and_evaluates_nothing_again(grid_dir, monkeypatch):
    base, args = grid_dir
    weights = base / "runs" / "2x32" / "seed-1" / "moe" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    rows = (base / "runs" / "grid-results.csv").read_bytes()
    monkeypatch.setattr(grid, "SAMPLE_GRID", MINI_GRID)

    def no_evaluation(*_):
        raise AssertionError("evaluated again")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "evaluate_checkpoint", no_evaluation)
        assert pipeline.main(args) == 0
    assert weights.stat().st_mtime_ns == before
    assert (base / "runs" / "grid-results.csv").read_bytes() == rows
    # a change to the evaluation (its version) evaluates every model again, with the same numbers
    calls = []
    real = pipeline.evaluate_checkpoint
    monkeypatch.setattr(pipeline, "EVALUATION_VERSION", pipeline.EVALUATION_VERSION + 1)
    monkeypatch.setattr(pipeline, "evaluate_checkpoint", lambda *a: calls.append(a[0]) or real(*a))
    assert pipeline.main(args) == 0
    assert len(calls) == 8                                          # 2 seeds x 4 models
    assert (base / "runs" / "grid-results.csv").read_bytes() == rows


def test_a_worker_that_finds_a_seed_busy_still_tables_that_seeds_finished_runs(grid_dir, monkeypatch):
    """Two workers share a grid: the one that skips a seed the other is training must not rewrite
    the table and the shipped cards without that seed's results."""
    from workbench.runs import RunBusy

    base, args = grid_dir
    real_run = pipeline.run

    def run_unless_seed_1(cfg):
        if cfg.seed == 1:
            raise RunBusy("another worker trains it")
        return real_run(cfg)

    monkeypatch.setattr(grid, "SAMPLE_GRID", MINI_GRID)
    monkeypatch.setattr(pipeline, "run", run_unless_seed_1)
    (base / "runs" / "grid.md").unlink()
    assert pipeline.main(args) == 0
    assert (base / "runs" / "grid.md").read_text().count("(n=2)") >= 3
    assert [s["seed"] for s in read_card(base / "shipped" / "synthetic-vit-2x32")["seeds"]] == [0, 1]


def test_the_tables_alone_are_rewritten_from_the_finished_reports(grid_dir, monkeypatch, tmp_path, capsys):
    base, _ = grid_dir
    table = (base / "runs" / "grid.md").read_bytes()
    monkeypatch.setattr(grid, "SAMPLE_GRID", MINI_GRID)
    (base / "runs" / "grid.md").unlink()
    assert grid.main(["--dataset", "synthetic", "--out", str(base / "runs")]) == 0
    assert (base / "runs" / "grid.md").read_bytes() == table           # the same table, nothing trained
    assert grid.main(["--dataset", "synthetic", "--out", str(tmp_path)]) == 2    # an empty folder
    assert "no finished pipeline" in capsys.readouterr().err


def test_the_fit_accuracy_reads_only_images_the_models_trained_on():
    from workbench.data import ImageDataset, heldout_split
    from workbench.pipeline_config import PipelineConfig

    n = 12_000
    index = torch.arange(n)
    images = torch.stack([index % 256, index // 256], 1).to(torch.uint8).view(n, 1, 1, 2)   # image i says i
    train = ImageDataset("indexed", "train", images, torch.zeros(n, dtype=torch.int64), ["x"], (0.5,), (0.5,))
    cfg = PipelineConfig(dataset="synthetic", holdout=0.1)
    sample = pipeline.trained_on_sample(cfg, train)
    drawn = (sample.images[:, 0, 0, 0].long() + 256 * sample.images[:, 0, 0, 1].long()).tolist()
    _, held = heldout_split(n, 0.1)                                 # the split every model trained with
    assert len(drawn) == len(set(drawn)) == pipeline.FIT_SAMPLE     # 10,800 trained on, 10,000 drawn
    assert not set(drawn) & set(held.tolist())
    assert torch.equal(sample.images, pipeline.trained_on_sample(cfg, train).images)   # the same draw every time


def test_the_grid_trains_each_extra_at_every_seed_before_the_next(tmp_path, monkeypatch):
    from workbench.runs import RunBusy

    calls = []

    def record(cfg):
        calls.append((cfg.seed, cfg.extra))
        raise RunBusy("recorded only")

    monkeypatch.setattr(grid, "SAMPLE_GRID", MINI_GRID)
    monkeypatch.setattr(grid, "run", record)
    assert pipeline.main(["--grid", "samples", "--dataset", "synthetic", "--out", str(tmp_path), "--quiet"]) == 0
    e2e, dose = MINI_GRID["2x32"][2]
    assert calls == [(0, []), (1, []), (0, [e2e]), (1, [e2e]), (0, [e2e, dose]), (1, [e2e, dose])]


def test_median_seed_is_the_lower_middle():
    rows = [{"seed": s, "test_accuracy": a} for s, a in ((0, 0.90), (1, 0.80), (2, 0.85), (3, 0.95))]
    assert grid.median_seed(rows[:3]) == 2 and grid.median_seed(rows) == 2


@pytest.mark.parametrize("name, dataset", [("samples", "fashion-mnist"), *sorted(grid.GRIDS)])
def test_each_grid_names_real_models_and_a_valid_recipe(name, dataset):
    from workbench.pipeline_config import PipelineConfig, parse_extra
    from workbench.train_config import model_from_preset

    cells, recipe = grid.sample_grid(dataset, name)
    for dense, n_seeds, extras in cells.values():
        assert n_seeds >= 2 or name == "screen"               # a single seed is never a headline
        model_from_preset(dense, {})
        for spec in extras:
            parse_extra(spec)                                 # the preset and its mode
    PipelineConfig(dataset=dataset, out="x", **recipe).validate()


@pytest.mark.parametrize("spec, error", [
    ("mvmoe-6x64-e4k1:lambda=0", "end-to-end router: mvmoe-6x64-e4k1:e2e"),
    ("mvmoe-6x64-e4k1:lambda=-1", "finite number > 0"),
    ("mvmoe-6x64-e4k1:lambda=nan", "finite number > 0"),
    ("mvmoe-6x64-e4k1:lambda=much", "must be a number"),
    ("vmoe-6x64-e8k2:lambda=0.1", "per-image MoE"),
    ("mvmoe-6x64-e4k1:fast", "the modes are"),
    ("mvmoe-6x64-e4k9", "top_k"),
    ("moe-6x64", "unknown preset"),
])
def test_a_bad_extra_fails_before_anything_trains(spec, error, tmp_path):
    from workbench.pipeline_config import PipelineConfig

    with pytest.raises(ValueError, match=re.escape(error)):
        PipelineConfig(dataset="synthetic", out=str(tmp_path / "run"), extra=[spec]).validate()
    assert not (tmp_path / "run").exists()
    assert pipeline.main(["--dataset", "synthetic", "--out", str(tmp_path / "run"), "--extra", spec, "--quiet"]) == 2
    assert not (tmp_path / "run").exists()


def test_the_grid_table_reads_large_reports_and_names_a_damaged_one(tmp_path, capsys):
    cells = {"2x32": ("vit-2x32", 2, [])}
    big = {"rows": [], "classes": [f"class {i:04d} " + "x" * 1200 for i in range(1000)]}   # > 1 MB
    for seed, text in ((0, json.dumps(big)), (1, '{"rows": [')):
        folder = grid.seed_dir(tmp_path, "2x32", seed)
        folder.mkdir(parents=True)
        (folder / "report.json").write_text(text)
    assert list(grid.finished_reports(tmp_path, cells)) == [("2x32", 0)]
    assert "seed-1" in capsys.readouterr().err


def test_upcycling_and_maps_of_other_sizes_extend_a_finished_run(run_dir, tmp_path):
    """From the trained dense baseline: 1 more epoch as dense and as the upcycled MoE (paired with
    that continued dense model, equal total training), and a MoE with its own map at E = 2."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    extras = ["--extra", "mvmoe-4x64-e4k1:upcycle=1:lr=5e-4", "--extra", "mvmoe-4x64-e2k1"]
    assert pipeline.main(["--dataset", "synthetic", "--out", str(out), "--epochs", "3", "--quiet", *extras]) == 0
    rows = {r["model"]: r for r in csv.DictReader(open(out / "results.csv"))}
    up, cont = rows["mvmoe-4x64-e4k1-upcycle1-lr0.0005"], rows["vit-4x64-continue1-lr0.0005"]
    assert (up["init"], up["baseline"], cont["init"], cont["baseline"]) == \
        ("upcycle", "vit-4x64-continue1-lr0.0005", "continue", "dense")
    dense_sha = read_card(out / "dense")["weights"]["sha256"]
    for name in (up["model"], cont["model"]):
        card = read_card(out / name)
        assert card["parent"]["sha256"] == dense_sha and card["training"]["epochs"] == 1
        assert card["training"]["lr"] == 5e-4
    assert read_card(out / up["model"])["config"]["renormalize_gates"] is True
    # its own map at E = 2, from the same held-out confusion graph
    e2 = json.loads((out / "superclasses-e2-auto.json").read_text())
    assert sorted(set(e2["classes"].values())) == [0, 1]
    assert read_card(out / "mvmoe-4x64-e2k1")["config"]["superclasses"] == [e2["classes"][c] for c in
                                                                             read_card(out / "dense")["classes"]]
    table = grid.grid_table(grid.grid_rows({("4x64", 0): json.loads((out / "report.json").read_text())}))
    assert "vs vit-4x64-continue1-lr0.0005" in table     # the upcycled row is paired with the continued dense
