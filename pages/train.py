"""Train: start a short training run in the background and follow it live.

The run is a separate process (`workbench.jobs`), so this page stays
responsive and the run survives a reload; everything below is read back from
the run folder (status.json, metrics.jsonl, log.txt).
"""

import streamlit as st

from pages import common
from pages.figures import accuracy_figure, loss_figure, metrics_frames, training_load_figure
from workbench import jobs, paths, runs
from workbench.models.config import ModelConfig, default_moe_blocks, preset_name
from workbench.pipeline_config import PipelineConfig
from workbench.train_config import PRECISIONS, TrainConfig, model_from_fields, parse_overrides

FAMILIES = {
    "mvmoe": "Per-image MoE (Mobile V-MoE)",
    "vmoe": "Per-token MoE (V-MoE)",
    "vit": "Dense ViT (baseline)",
}
DATASET_HELP = {
    "synthetic": "generated in code, small, offline: a run takes seconds",
    "fashion-mnist": "10 classes of 28×28 clothing images (Debian package dataset-fashion-mnist)",
    "cifar10": "10 classes, 32×32 RGB (the python-pickle files in a local folder)",
    "cifar100": "100 classes, 32×32 RGB, with 20 official coarse classes",
    "tiny-imagenet": "200 WordNet classes, 64×64 RGB (python -m workbench.data download tiny-imagenet)",
    "imagefolder": "your own images: one sub-folder per class, inside a data folder",
}
STAGE_ICONS = {"done": ":material/check_circle:", "running": ":material/progress_activity:",  # (Streamlit's icon
               "waiting": ":material/radio_button_unchecked:", "stopped": ":material/stop_circle:",  # font: no
               "failed": ":material/error:", "cancelled": ":material/stop_circle:"}                 # emoji needed)
SC_NONE, SC_PAGE, SC_FILE, SC_REF = ("None: the router learns end to end (V-MoE balancing losses)",
                                     "The map from the Super-classes page", "Upload a map file (JSON)",
                                     "The dataset's reference hierarchy")

st.title("Train")
st.caption("Start a short training run; it runs in the background, survives a page reload, and its checkpoint "
           "appears in the sidebar checkpoint picker when an epoch ends.")
common.checkpoint_picker()


# ----------------------------------------------------------------------------- the forms
def dataset_choice(container, key: str, folder_key: str) -> str:
    """The dataset widgets both forms share -> the name typed so far (`imagefolder:TEXT` for a folder)."""
    kind = container.selectbox("Dataset", list(DATASET_HELP), key=key,
                               help="synthetic needs no download and trains in seconds.")
    container.caption(DATASET_HELP[kind])
    if kind != "imagefolder":
        return kind
    folder = container.text_input(
        "Image folder", key=folder_key, placeholder="flowers, or /path/to/data/flowers",
        help="A folder of class sub-folders (and an optional hierarchy.json) inside a data folder: "
             + ", ".join(map(str, paths.data_roots())) + ". Relative names are looked up in them.")
    return f"{paths.IMAGEFOLDER}{folder.strip()}"


def dataset_name(chosen: str) -> str:
    """The dataset to start with: an image folder resolved inside the data folders (ValueError if not)."""
    if not chosen.startswith(paths.IMAGEFOLDER):
        return chosen
    folder = chosen[len(paths.IMAGEFOLDER):]
    if not folder:
        raise ValueError("enter the image folder (one sub-folder of images per class)")
    return f"{paths.IMAGEFOLDER}{paths.data_folder(folder)}"


def superclass_choice(family: str, dataset: str):
    """The super-class map widgets (per-image models only) -> (map | "reference" | None, its group count)."""
    if family != "mvmoe":
        return None, None
    page_map = st.session_state.get(common.SUPERCLASS_MAP_KEY)
    options = [SC_NONE] + ([SC_PAGE] if isinstance(page_map, dict) else []) + [SC_FILE, SC_REF]
    choice = st.radio("Router targets (super-classes)", options, key="tr_sc",
                      help="Mobile V-MoE trains the router to predict each image's super-class "
                           "(found by clustering a dense model's confusion graph); E equals the number of groups.")
    if choice == SC_PAGE:
        groups = page_map.get("num_groups") or len(set(page_map.get("classes", {}).values()))
        st.caption(f"Map from the Super-classes page: {groups} groups for {page_map.get('dataset', '?')} "
                   f"({page_map.get('method', '?')}).")
        return page_map, groups
    if choice == SC_FILE:
        up = st.file_uploader("Super-class map (JSON)", type=["json"], key="tr_sc_file",
                              help='Format: {"classes": {class name: group index}, "num_groups": E, ...}; '
                                   "download one on the Super-classes page.")
        if up is None:
            return "missing", None
        try:
            mapping = jobs.read_superclass_file(up.getvalue())
        except ValueError as e:
            st.warning(str(e))
            return "invalid", None
        return mapping, mapping.get("num_groups") or len(set(mapping["classes"].values()))
    if choice == SC_REF:
        return "reference", None
    return None, None


def shape_fields(family: str, depth: int, width: int, num_experts: int, top_k: int) -> dict:
    """The architecture the widgets chose (the preset's fields), as ModelConfig fields."""
    fields = {"family": family, "depth": int(depth), "width": int(width)}
    if family != "vit":
        fields.update(num_experts=int(num_experts), top_k=int(top_k))
    return fields


with st.container(border=True):
    st.subheader("New run")
    c1, c2 = st.columns(2)
    dataset = dataset_choice(c1, "tr_dataset", "tr_folder")
    family = c2.selectbox("Model family", list(FAMILIES), format_func=FAMILIES.get, key="tr_family")
    d1, d2 = c2.columns(2)
    depth = d1.number_input("Depth L (blocks)", 1, 24, 4, key="tr_depth")
    width = d2.selectbox("Width D", [64, 96, 192, 384], key="tr_width")

    with c1:
        sc_map, sc_groups = superclass_choice(family, dataset)
    e_col, k_col = c2.columns(2)
    num_experts, top_k = 0, 1
    if family != "vit":
        if sc_groups:
            st.session_state["tr_experts"] = int(sc_groups)  # E must equal the number of super-classes
        st.session_state.setdefault("tr_experts", 4)
        num_experts = e_col.number_input("Experts E", 1, 64, key="tr_experts", disabled=bool(sc_groups),
                                         help="Fixed to the map's group count when a super-class map is used.")
        top_k = k_col.number_input("k (experts per image/token)", 1, 64, 1 if family == "mvmoe" else 2, key="tr_k")
    shape = shape_fields(family, depth, width, num_experts, top_k)
    moe_blocks = None
    if family != "vit":   # only blocks this depth has, so every choice the form offers is valid
        moe_blocks = c2.multiselect("MoE blocks", list(range(int(depth))),
                                    default=default_moe_blocks(family, int(depth)), key=f"tr_moe_blocks_{depth}",
                                    help="Blocks whose MLP is replaced by experts. Default: the last two (per "
                                         "token: the last two odd blocks, V-MoE's placement), or what the depth allows.")

    t1, t2, t3, t4 = st.columns(4)
    epochs = t1.number_input("Epochs", 1, jobs.MAX_EPOCHS, 1, key="tr_epochs")
    max_steps = t2.number_input("Max steps (0 = all)", 0, jobs.MAX_STEPS, 0, key="tr_max_steps",
                                help="Stop after this many optimizer steps, whichever comes first with epochs.")
    batch = t3.number_input("Batch size", 1, jobs.MAX_BATCH, 128, key="tr_batch")
    precision = t4.selectbox("Precision", list(PRECISIONS), key="tr_precision",
                             help="auto: bf16 autocast where the CPU/GPU runs it natively, else fp32.")
    with st.expander("Advanced"):
        a2, a3 = st.columns(2)
        lr = a2.number_input("Peak learning rate", 1e-6, 1.0, 1e-3, format="%.5f", key="tr_lr")
        seed = a3.number_input("Seed", 0, 2**31 - 1, 0, key="tr_seed")
        r1, r2 = st.columns(2)
        mixup_alpha = r1.number_input("Mixup α (0 = off)", 0.0, 10.0, 0.0, step=0.1, key="tr_mixup",
                                      help="Blend each batch with a shuffle of itself, weight ~ Beta(α, α); "
                                           "around 0.2 regularises a MoE whose experts overfit.")
        mlp_dropout = r2.number_input("MLP / expert dropout", 0.0, 0.9, 0.0, step=0.05, key="tr_dropout",
                                      help="Dropout in every MLP and expert (V-MoE's expert dropout).")
        dense_parents = [p for p, _ in common.available_checkpoints()
                         if common.load_card(p)["config"].get("family") == "vit"]
        init_from = st.selectbox("Start from a trained dense checkpoint", [None] + dense_parents, key="tr_init",
                                 format_func=lambda p: "no: from the seed (a MoE shares its dense twin's initial "
                                                       "weights)" if p is None else common.ckpt_ref(p),
                                 help="Sparse upcycling (Komatsuzaki et al., 2022): every expert starts as its "
                                      "block's dense MLP, the router is new. A dense model continues from it. "
                                      "Depth, width and classes must match. With k = 1 add "
                                      "renormalize_gates=true below so the MoE starts exactly at the dense model.")
        raw_overrides = st.text_area("Model options (one KEY=VALUE per line)", key="tr_overrides",
                                     placeholder="router_input=cls\ncapacity_ratio=1.25",
                                     help=f"Any ModelConfig field except the shape above: "
                                          f"{', '.join(ModelConfig.__dataclass_fields__)}")
        name = st.text_input("Run name (optional)", key="tr_name", max_chars=64,
                             help="Letters, digits, '-', '_' and '.'; other characters become '-'.")
    st.caption(f"Model: `{preset_name(**shape)}` · runs are saved under `{paths.runs_dir()}` · "
               f"at most {jobs.max_jobs()} run(s) at a time")

    start = st.button("Start training", type="primary", key="tr_start")

if start:
    try:
        if sc_map == "missing":
            raise ValueError("upload a super-class map file, or choose another router target")
        if sc_map == "invalid":
            raise ValueError("the uploaded super-class map is not valid (see the message above)")
        overrides = parse_overrides([line.strip() for line in raw_overrides.splitlines() if line.strip()])
        if mlp_dropout:
            overrides.setdefault("mlp_dropout", float(mlp_dropout))
        if moe_blocks is not None:
            if not moe_blocks:
                raise ValueError("choose at least one MoE block")
            overrides.setdefault("moe_layers", sorted(int(b) for b in moe_blocks))
        cfg = TrainConfig(
            mixup_alpha=float(mixup_alpha), init_from=str(init_from) if init_from else None,
            model=model_from_fields(shape, overrides, "the shape chosen above"), dataset=dataset_name(dataset),
            superclasses="reference" if sc_map == "reference" else None, epochs=int(epochs),
            max_steps=int(max_steps) or None, batch_size=int(batch), precision=precision, lr=float(lr),
            seed=int(seed))
        with st.spinner("Starting…"):
            run_dir = jobs.start_training(cfg, name=name.strip() or None,
                                          superclasses=sc_map if isinstance(sc_map, dict) else None)
    except ValueError as e:  # JobError and every validation error are ValueErrors with a plain message
        st.error(f"Not started: {e}")
    else:
        st.session_state["tr_selected"] = run_dir.name
        st.success(f"Started **{run_dir.name}**. Follow it below.")


def pipeline_form() -> None:
    """Every choice of `python -m workbench.pipeline` a user sets, as one PipelineConfig for the jobs API."""
    from workbench.pipeline import clustering_methods

    st.caption("Trains a dense baseline, clusters its held-out confusion graph into E super-classes and trains a "
               "Mobile V-MoE of the same depth and width whose router predicts them; both checkpoints appear in "
               "the picker with the pipeline's report.")
    q1, q2 = st.columns(2)
    p_dataset = dataset_choice(q1, "tr_pipe_ds", "tr_pipe_folder")
    d1, d2 = q2.columns(2)
    p_depth = d1.number_input("Depth L (0 = default)", 0, 24, 0, key="tr_pipe_depth",
                              help="Blocks of both models. Default: 6, or 4 on synthetic.")
    p_width = d2.selectbox("Width D", ["default", 64, 96, 192, 384], key="tr_pipe_width",
                           help="Default: 96, or 64 on synthetic.")
    e1, e2 = q2.columns(2)
    p_groups = e1.number_input("Super-classes E (0 = default)", 0, 64, 0, key="tr_pipe_E",
                               help="Super-classes = experts. Default: ceil(√classes) clamped to 2..10; "
                                    "at most the number of classes.")
    p_k = e2.number_input("k (experts per image)", 1, 64, 1, key="tr_pipe_k")
    methods = clustering_methods()
    p_method = q2.selectbox("Super-class discovery", methods, key="tr_pipe_method",
                            format_func=lambda m: "auto (router-aware)" if m == "auto" else m,
                            help="auto scores every clustering by a linear probe on the dense model's features at "
                                 "the router's input and keeps the grouping the router can learn best; 'spectral' "
                                 "is the paper's single clustering of the confusion graph.")
    r1, r2, r3 = st.columns(3)
    p_lambda = r1.number_input("λ (super-class loss weight)", 0.0, 100.0,
                               float(ModelConfig.__dataclass_fields__["superclass_loss_weight"].default),
                               step=0.1, key="tr_pipe_lambda", help="L = L_cls + λ · L_router")
    p_epochs = r2.number_input("Epochs per model (0 = default)", 0, jobs.MAX_EPOCHS, 0, key="tr_pipe_epochs",
                               help="Default: 10, or 12 on synthetic.")
    p_seed = r3.number_input("Seed", 0, 2**31 - 1, 0, key="tr_pipe_seed")
    g1, g2, g3 = st.columns(3)
    p_init = g1.selectbox("MoE starts from", ["scratch", "upcycle"], key="tr_pipe_init",
                          format_func={"scratch": "its seed (dense twin's initial weights)",
                                       "upcycle": "the trained dense baseline (upcycled)"}.get,
                          help="upcycle: every expert starts as its block's dense MLP and trains the same epochs "
                               "as the dense baseline continued beside it (the fair comparison).")
    p_mixup = g2.number_input("Mixup α (0 = off)", 0.0, 10.0, 0.0, step=0.1, key="tr_pipe_mixup")
    p_dropout = g3.number_input("MLP / expert dropout", 0.0, 0.9, 0.0, step=0.05, key="tr_pipe_dropout")
    p_name = st.text_input("Pipeline run name (optional)", key="tr_pipe_name", max_chars=64)
    if not st.button("Start pipeline", key="tr_pipe_start"):
        return
    try:
        cfg = PipelineConfig(dataset=dataset_name(p_dataset), depth=int(p_depth) or None,
                             width=None if p_width == "default" else int(p_width), num_groups=int(p_groups) or None,
                             top_k=int(p_k), method=p_method, superclass_loss_weight=float(p_lambda),
                             epochs=int(p_epochs) or None, seed=int(p_seed), moe_init=p_init,
                             mixup_alpha=float(p_mixup) or None, mlp_dropout=float(p_dropout) or None)
        with st.spinner("Checking the dataset and starting…"):
            run_dir = jobs.start_pipeline(cfg, name=p_name.strip() or None)
    except ValueError as e:  # every validation error is a ValueError with a plain message
        st.error(f"Not started: {e}")
    else:
        st.session_state["tr_selected"] = run_dir.name
        st.success(f"Started **{run_dir.name}**. Follow its stages below.")


if jobs.pipeline_available():
    with st.expander("Run the whole paper pipeline instead (dense baseline → confusion → super-classes → MoE)"):
        pipeline_form()


# ----------------------------------------------------------------------------- jobs and live curves
def jobs_table(rows):
    import pandas as pd

    table = pd.DataFrame([{
        "run": r["name"], "kind": r["kind"], "state": r["state"],
        "started": (r["started"] or "")[:19].replace("T", " "), "elapsed": r["elapsed"],
        "model": r["model"], "dataset": r["dataset"], "step": r["step"], "epoch": r["epoch"],
        "loss": r["loss"], "test acc %": None if r["test_accuracy"] is None else 100 * r["test_accuracy"],
        "error": r["error"],
    } for r in rows])
    st.dataframe(table, hide_index=True, width="stretch", key="tr_jobs_table",
                 column_config={"test acc %": st.column_config.NumberColumn(format="%.2f"),
                                "loss": st.column_config.NumberColumn(format="%.4f")})


def open_in_picker(checkpoint) -> None:
    st.session_state[common.CKPT_KEY] = common.ckpt_ref(checkpoint)
    st.rerun(scope="app")


def pipeline_stages(row: dict) -> None:
    """The pipeline's stages read back from its folder; when it is done, its report and its models."""
    stages = runs.pipeline_progress(row["run_dir"], running=row["state"] == "running")
    st.markdown("\n".join(f"- {STAGE_ICONS.get(s['state'], '')} **{s['label']}**: {s['state']}"
                          + (f" · {common.md(s['detail'])}" if s["detail"] else "") for s in stages))
    report = runs.pipeline_report(row["run_dir"])
    if report is None:
        return
    with st.expander("Pipeline report", expanded=row["state"] == "finished"):
        st.markdown(report.replace("# ", "#### ", 1) if report.startswith("# ") else report)  # a section here
    models = runs.pipeline_checkpoints(row["run_dir"])
    for col, (name, path) in zip(st.columns(max(1, len(models))), models.items()):
        if col.button(f"Open {name} in the checkpoint picker", key=f"tr_open_{name}"):
            open_in_picker(path)


def show_job(row: dict) -> None:
    state = row["state"]
    if state == "running":
        c1, c2 = st.columns([4, 1])
        c1.info(f"**{row['name']}** is running ({row['elapsed']} so far"
                + (f", step {row['step']}" if row["step"] is not None else "") + "). Curves update every 2 s.")
        if c2.button("Cancel run", key="tr_cancel", type="secondary"):
            try:
                with st.spinner("Stopping…"):
                    final = jobs.cancel(row["name"])
            except ValueError as e:  # the run folder was deleted or moved meanwhile
                st.warning(f"Cannot cancel {row['name']}: {e}")
            else:
                st.toast(f"{row['name']}: {final}")
                st.rerun(scope="app")
    elif state == "failed":
        st.error(f"**{row['name']}** failed: {row['error'] or 'no error message was recorded'}")
        with st.expander("Last lines of the log"):
            st.code(runs.log_tail(row["run_dir"], 30) or "(empty log)", language=None)
    elif state == "cancelled":
        st.warning(f"**{row['name']}** was cancelled after {row['elapsed']}."
                   + (" Its last complete checkpoint is still in the picker." if row["checkpoint"] else ""))
    elif row["kind"] == "pipeline":
        st.success(f"**{row['name']}** finished in {row['elapsed']}: its models are in the sidebar checkpoint picker.")
    else:
        acc = row["test_accuracy"]
        st.success(f"**{row['name']}** finished in {row['elapsed']}"
                   + (f" with test accuracy {100 * acc:.2f}%" if acc is not None else "")
                   + ". It is in the sidebar checkpoint picker.")
        if row["checkpoint"] and st.button("Open it in the checkpoint picker", key="tr_open"):
            open_in_picker(row["checkpoint"])
    if row["kind"] == "pipeline":
        pipeline_stages(row)

    frames = metrics_frames(runs.read_metrics(row["run_dir"]))
    train, evals, load = frames["train"], frames["eval"], frames["load"]
    if train.empty and evals.empty:
        if state == "running":
            st.caption("Waiting for the first metrics (loading data and building the model)…")
        return
    c1, c2 = st.columns(2)
    if not train.empty:
        c1.plotly_chart(loss_figure(train), key="tr_loss_fig", width="stretch")
    c2.plotly_chart(accuracy_figure(train, evals), key="tr_acc_fig", width="stretch")
    if not load.empty:
        st.plotly_chart(training_load_figure(load), key="tr_load_fig", width="stretch")
    elif row["kind"] == "train" and (row["model"] or "").startswith(("mvmoe", "vmoe")):
        st.caption("Expert load appears after the first evaluation (at the end of an epoch).")


def jobs_panel() -> None:
    rows = jobs.list_jobs()
    states = {r["name"]: r["state"] for r in rows}
    seen = st.session_state.get("tr_seen_states")
    st.session_state["tr_seen_states"] = states
    if seen is not None and any(seen.get(n) == "running" and s != "running" for n, s in states.items()):
        # a run just ended: rerun the whole page so the sidebar picker lists its checkpoint
        common.refresh_checkpoints()
        st.rerun(scope="app")
    if not rows:
        st.info(f"No runs yet in `{paths.runs_dir()}`. Start one above: a synthetic run with "
                "Max steps 20 takes well under a minute.")
        return
    jobs_table(rows)
    names = [r["name"] for r in rows]
    if st.session_state.get("tr_selected") not in names:
        st.session_state["tr_selected"] = names[0]
    selected = st.selectbox("Show run", names, key="tr_selected")
    show_job(next(r for r in rows if r["name"] == selected))


st.subheader("Runs")
any_running = any(r["state"] == "running" for r in jobs.list_jobs())
# Tick every 2 s only while something runs; a start or a finish reruns the whole page and re-decides.
st.fragment(run_every=2.0 if any_running else None)(jobs_panel)()
