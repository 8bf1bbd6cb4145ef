"""Train: start a short training run in the background and follow it live.

The run is a separate process (`workbench.jobs`), so this page stays
responsive and the run survives a reload; everything below is read back from
the run folder (status.json, metrics.jsonl, log.txt).
"""

import streamlit as st

from pages import common
from pages.figures import accuracy_figure, loss_figure, metrics_frames, training_load_figure
from workbench import jobs, paths, runs
from workbench.models.config import ModelConfig, preset_name
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
    "imagefolder": "your own images: one sub-folder per class",
}
SC_NONE, SC_PAGE, SC_FILE, SC_REF = ("None: the router learns end to end (V-MoE balancing losses)",
                                     "The map from the Super-classes page", "Upload a map file (JSON)",
                                     "The dataset's reference hierarchy")

st.title("Train")
st.caption("Start a short training run; it runs in the background, survives a page reload, and its checkpoint "
           "appears in the sidebar checkpoint picker when an epoch ends.")
common.checkpoint_picker()


# ----------------------------------------------------------------------------- the form
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
    kind = c1.selectbox("Dataset", ["synthetic", "fashion-mnist", "cifar10", "cifar100", "imagefolder"],
                        key="tr_dataset", help="synthetic needs no download and trains in seconds.")
    c1.caption(DATASET_HELP[kind])
    dataset = kind
    if kind == "imagefolder":
        folder = c1.text_input("Image folder", key="tr_folder", placeholder="/path/to/folder with class sub-folders")
        dataset = f"imagefolder:{folder.strip()}"
    family = c2.selectbox("Model family", list(FAMILIES), format_func=FAMILIES.get, key="tr_family")
    d1, d2 = c2.columns(2)
    depth = d1.number_input("Depth L (blocks)", 1, 24, 4, key="tr_depth")
    width = d2.selectbox("Width D", [64, 96, 192, 384], key="tr_width")

    with c1:
        sc_map, sc_groups = superclass_choice(family, kind)
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
        cfg = TrainConfig(
            model=model_from_fields(shape, overrides, "the shape chosen above"), dataset=dataset,
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

if jobs.pipeline_available():
    with st.expander("Run the whole paper pipeline instead (dense baseline → confusion → super-classes → MoE)"):
        st.caption("Trains a dense baseline, clusters its held-out confusion graph into super-classes and trains "
                   "a Mobile V-MoE whose router predicts them; both checkpoints appear in the picker.")
        q1, q2 = st.columns(2)
        p_dataset = q1.selectbox("Dataset", ["synthetic", "fashion-mnist", "cifar10", "cifar100"], key="tr_pipe_ds")
        p_epochs = q2.number_input("Epochs per model (0 = the pipeline's default)", 0, jobs.MAX_EPOCHS, 0,
                                   key="tr_pipe_epochs")
        if st.button("Start pipeline", key="tr_pipe_start"):
            try:
                extra = ["--epochs", str(int(p_epochs))] if p_epochs else []
                run_dir = jobs.start_pipeline(jobs.PipelineOptions(dataset=p_dataset, extra_args=extra))
            except ValueError as e:
                st.error(f"Not started: {e}")
            else:
                st.session_state["tr_selected"] = run_dir.name
                st.success(f"Started **{run_dir.name}**.")


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
    else:
        acc = row["test_accuracy"]
        st.success(f"**{row['name']}** finished in {row['elapsed']}"
                   + (f" with test accuracy {100 * acc:.2f}%" if acc is not None else "")
                   + ". It is in the sidebar checkpoint picker.")
        if row["checkpoint"] and st.button("Open it in the checkpoint picker", key="tr_open"):
            st.session_state[common.CKPT_KEY] = common.ckpt_ref(row["checkpoint"])
            st.rerun(scope="app")

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
