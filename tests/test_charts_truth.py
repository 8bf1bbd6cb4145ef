"""Charts tell the truth at a glance: rates start at 0, equal costs read as equal, every marker is
visible, tick labels are distinct, and a warning fires only on something unexpected."""
import numpy as np
import pandas as pd

from analysis.routing import imbalance_flag
from pages.figures import dodge_equal, heatmap_figure, percent_axis, tradeoff_figure


def test_a_rate_heatmap_starts_at_zero_so_no_drops_reads_as_empty():
    zero = pd.DataFrame(np.zeros((4, 2)), index=pd.Index(range(4), name="expert"), columns=[0, 1])
    fig = heatmap_figure(zero, colorbar="drop rate")
    assert fig.data[0].zmin == 0 and fig.data[0].zmax == 1      # all zero: the bottom of the scale
    agreement = pd.DataFrame([[1.0, 0.45], [0.45, 1.0]])
    assert heatmap_figure(agreement).data[0].zmin == 0           # not the smallest value (0.45)


def test_percent_axes_label_every_tick_differently():
    churn = [0.0, 0.004, 0.012, 0.03]
    fmt = percent_axis(churn)["tickformat"]
    ticks = np.arange(0, 0.0301, 0.005)                          # plotly's step for this range
    labels = [f"{100 * t:.{int(fmt[1])}f}%" for t in ticks]
    assert len(set(labels)) == len(labels) and percent_axis(churn)["rangemode"] == "tozero"


def _table(macs, routing, names):
    n = len(macs)
    return pd.DataFrame({"name": names, "preset": names, "routing": routing, "macs_active": macs,
                         "accuracy": np.linspace(0.26, 0.28, n), "top_k": 1, "params_total": 1, "params_active": 1,
                         "source": "card", "dataset": "tiny-imagenet", "depth": 6, "width": 64, "router": routing})


def test_models_of_equal_cost_read_as_equal_and_none_hides_another():
    df = _table([22.62e6, 22.62e6, 22.51e6, 22.62e6], ["dense", "per-image", "per-token", "per-image"],
                ["dense", "moe", "token", "e2e"])
    fig = tradeoff_figure(df)
    axis = fig.layout.xaxis
    assert axis.type == "linear" and axis.rangemode == "tozero"   # a 0.5 % cost range is not stretched
    xs = [x for t in fig.data if t.mode == "markers" and t.yaxis in (None, "y") for x in t.x]
    assert len(set(np.round(xs, -3))) == 4                        # four markers, four places
    assert max(xs) / min(xs) < 1.08                               # and still side by side


def test_costs_a_decade_apart_get_a_log_axis():
    assert tradeoff_figure(_table([1e6, 30e6], ["dense", "dense"], ["a", "b"])).layout.xaxis.type == "log"
    x = dodge_equal(pd.Series([16.72e6] * 3 + [36.1e6]), log_x=False)
    assert x.iloc[3] == 36.1e6 and len(set(x.iloc[:3])) == 3 and abs(x.iloc[:3].mean() - 16.72e6) < 1


def test_a_super_class_router_is_judged_against_its_super_classes_sizes():
    shares = np.array([0.526, 0.2, 0.174, 0.1])                   # expert 0's group holds half the images
    assert imbalance_flag(shares)[0] == "imbalanced"              # against 1/E: flagged
    assert imbalance_flag(shares, expected=[0.5, 0.2, 0.2, 0.1]) == ("ok", "")
    flag, reason = imbalance_flag(shares, expected=[0.25, 0.25, 0.25, 0.25])
    assert flag == "imbalanced" and "expert 0 takes 52.6%, its super-class 25.0% of the images" in reason


def test_spreading_equal_costs_keeps_the_cheaper_model_left():
    x = dodge_equal(pd.Series([22.62e6, 22.62e6, 22.51e6, 22.62e6], index=[4, 7, 9, 12]), log_x=False)
    assert x[9] == x.min() and x[4] < x[7] < x[12]


def test_an_attribution_map_is_not_scaled_by_its_hottest_pixel_and_zero_is_transparent():
    from pages.figures import overlay_figure

    a = np.full((1, 32, 32), 0.1)
    a[0, 0, 0] = 50.0                                              # one outlier pixel
    layer = overlay_figure(np.zeros((1, 32, 32)), a).data[1]
    assert layer.zmax < 1                                          # the scale follows the bulk, not the outlier
    middle = [c for pos, c in layer.colorscale if pos == 0.5][0]
    assert middle.endswith(",0)")                                  # no attribution: the image shows through


def test_expert_map_colours_are_the_legends_colours():
    """Opaque markers in each expert's colour (a translucent tint over a dark image did not match)."""
    from pages.figures import spatial_map_figure

    grid = np.array([[0, 1], [-1, 2]])
    fig = spatial_map_figure(np.zeros((1, 8, 8)), grid, 3)
    experts = {t.name: t for t in fig.data if t.type == "scatter"}
    assert set(experts) == {"expert 0", "expert 1", "expert 2", "dropped"}
    colours = [experts[f"expert {e}"].marker.color for e in range(3)]
    assert len(set(colours)) == 3 and all(t.opacity in (None, 1) for t in experts.values())


def test_a_dense_runs_loss_chart_has_no_empty_right_axis_and_curves_use_peoples_labels():
    from pages.figures import history_figure, loss_figure

    dense = pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.5, 2.0], "ce": [3.0, 2.5, 2.0]})
    assert "yaxis2" not in loss_figure(dense).layout.to_plotly_json()
    moe = dense.assign(aux_superclass=[0.5, 0.4, 0.3])
    assert loss_figure(moe).layout.yaxis2.overlaying == "y" and loss_figure(moe).layout.yaxis2.rangemode == "tozero"
    hist = pd.DataFrame({"epoch": [1, 2], "train_loss": [2.0, 1.5], "test_loss": [2.1, 1.7]})
    fig = history_figure(hist, "epoch", ["train_loss", "test_loss"], "loss")
    assert [t.name for t in fig.data] == ["train loss", "test loss"]
    assert fig.layout.yaxis.title.text == "loss" and fig.layout.legend.title.text == ""


def test_a_short_run_logs_about_a_hundred_points(tmp_path):
    from workbench.train import LOG_POINTS, train
    from workbench.train_config import TrainConfig, model_from_preset

    cfg = TrainConfig(model=model_from_preset("vit-2x32", {}), dataset="synthetic", max_steps=60, batch_size=16,
                      precision="fp32", threads=1, quiet=True, out=str(tmp_path / "r"))
    train(cfg)
    import json

    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert len(steps) == 60 >= LOG_POINTS * 0.5                  # every step of a 60-step run, not 7 records


def test_the_confusion_matrix_colours_only_the_confusions():
    from analysis.confusion import off_diagonal

    m = off_diagonal([[0.95, 0.05], [0.12, 0.88]])
    assert np.isnan(np.diag(m)).all() and np.nanmax(m) == 0.12


def test_shipped_results_name_no_machine(tmp_path):
    from workbench.grid import read_rows, write_shipped_csv

    path = tmp_path / "ship" / "tin-grid-results.csv"
    path.parent.mkdir()
    run = tmp_path / "runs" / "6x64" / "seed-0" / "dense"
    write_shipped_csv(path, [{"size": "6x64", "seed": 0, "model": "dense", "run_dir": str(run)}])
    assert str(tmp_path) not in path.read_text() and "../runs/6x64/seed-0/dense" in path.read_text()
    assert read_rows(path, "tiny-imagenet")[0]["run_dir"] == str(run.resolve())   # and reads back whole
