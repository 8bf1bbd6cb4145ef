"""Shared pieces of every page: the checkpoint picker, cached loaders and linked selections.

Pages import this module (`from pages.common import ...`; `workbench/app.py`
puts the repo root on `sys.path`). Nothing here computes anything about a
model: it picks, loads and caches, and keeps the user's selection (checkpoint,
class, expert, layer) in `st.session_state` mirrored in `st.query_params`, so
every view is linked to the others and can be shared as a URL.
"""
from __future__ import annotations

import copy
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st

from workbench import paths
from workbench.checkpoint import (CARD, WEIGHTS, CheckpointError, inspect_checkpoint, list_checkpoints, read_card,
                                  sha256_file)

CKPT_KEY = "sel_ckpt"            # session_state key of the selected checkpoint ("samples/<rel>" | "runs/<rel>")
DEFAULT_MAX_IMAGES = 500         # test images analysed per page (sidebar setting): cold pages stay fast


# ----------------------------------------------------------------------------- small helpers
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!:|~$<>])")


def md(text: Any) -> str:
    """`text` escaped for st.markdown / labels: class names such as "rings:small" or "T-shirt/top" stay literal.

    (Streamlit reads ":name[...]" and ":shortcode:" as directives.)
    """
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def short(text: Any, limit: int = 120) -> str:
    """`text` cut to `limit` characters (names from cards and URLs can be any length)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "…"


def need(condition: Any, message: str) -> None:
    """Show `message` as an info box and stop the page when `condition` is falsy."""
    if not condition:
        st.info(message)
        st.stop()


def need_moe(card: dict, lacks: str = "router") -> None:
    """Stop a page that needs experts, with a message, when the checkpoint is a dense model."""
    need(card["config"].get("family") in ("vmoe", "mvmoe"), f"This is a dense model: it has no {lacks}. Pick a "
         "V-MoE (per-token) or Mobile V-MoE (per-image) checkpoint in the sidebar.")


def _roots() -> dict[str, Path]:
    return {"samples": paths.samples_dir(), "runs": paths.runs_dir()}


def ckpt_ref(path: Path) -> str:
    """'samples/<rel>' or 'runs/<rel>': a checkpoint path relative to the root it lives under."""
    path = Path(path).resolve()
    for tag, root in _roots().items():
        if path == root or root in path.parents:
            rel = path.relative_to(root).as_posix()
            return f"{tag}/{rel}" if rel != "." else tag
    raise ValueError(f"{path} is not under the samples or runs folder")


MAX_REF_CHARS = 1024   # a checkpoint reference from a URL: longer is never a folder of ours


def resolve_ref(ref: str) -> Optional[Path]:
    """The checkpoint folder named by a 'samples/<rel>' | 'runs/<rel>' reference, or None if invalid."""
    if not isinstance(ref, str) or not ref or len(ref) > MAX_REF_CHARS:
        return None
    tag, _, rel = ref.partition("/")
    root = _roots().get(tag)
    if root is None:
        return None
    try:
        path = paths.inside(root, rel or ".")
        return path if path.is_dir() else None
    except (ValueError, OSError):  # outside the root, NUL bytes, names too long for the file system
        return None


# ----------------------------------------------------------------------------- linked selection
_INVALID = object()
_URL_KEYS = "_sel_from_url"   # session_state: selections read from the URL and not yet shown to be valid


def _cast(value: Any, like: Any) -> Any:
    """A URL string as the type of `like`, or _INVALID (URLs can hold anything, of any length)."""
    text = str(value).strip()
    if like is None or isinstance(like, str):
        return text if len(text) <= 200 else _INVALID
    if isinstance(like, bool):
        return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(text.lower(), _INVALID)
    if isinstance(like, int):
        return int(text) if re.fullmatch(r"[+-]?\d{1,18}", text) else _INVALID
    if isinstance(like, float):
        try:
            number = float(text) if len(text) <= 40 else float("nan")
        except ValueError:
            return _INVALID
        return number if math.isfinite(number) else _INVALID
    return _INVALID


def _warn_link(key: str, raw: Any, why: str, used: Any) -> None:
    st.sidebar.warning(f"The link's `{md(key)}={md(short(raw, 40))}` {why}; showing {md(used)} instead.")


def selection(key: str, default: Any) -> Any:
    """The shared selection `key` (e.g. "class", "expert", "layer"): session state, else URL, else default.

    A URL value is cast to the type of `default`; one that cannot be (any
    string, of any length) gives a sidebar message and the default.
    """
    skey = f"sel_{key}"
    if skey in st.session_state:
        return st.session_state[skey]
    if key in st.query_params:
        raw = st.query_params[key]
        value = _cast(raw, default)
        if value is _INVALID:
            _warn_link(key, raw, "is not a valid value", default)
            value = default
        else:
            st.session_state.setdefault(_URL_KEYS, set()).add(key)
        st.session_state[skey] = value
        return value
    return default


def _came_from_url(key: str) -> bool:
    """Whether selection `key` was read from the URL and not yet checked against the choices (checks it now)."""
    keys = st.session_state.get(_URL_KEYS) or set()
    if key in keys:
        keys.discard(key)
        return True
    return False


def index_selection(key: str, n: int, default: int = 0) -> int:
    """The shared selection `key` as an index in 0..n-1; an out-of-range value from the URL gives a message."""
    value = selection(key, default)
    from_url = _came_from_url(key)
    if not 0 <= value < n:
        if from_url:
            _warn_link(key, value, f"is outside 0–{n - 1}", default)
        value = default
    return value


def set_selection(key: str, value: Any) -> None:
    """Store the shared selection `key` in session state and mirror it in the URL."""
    st.session_state[f"sel_{key}"] = value
    if value is None:
        st.query_params.pop(key, None)
    else:
        st.query_params[key] = str(value)


def linked_selectbox(label: str, options: Sequence, key: str, default: Any = None,
                     format_func: Callable = str, container=None, **kwargs) -> Any:
    """A selectbox whose value is the shared selection `key` (linked across pages and the URL).

    The widget's own state is rewritten from the shared selection on every
    run (a widget with the same key on another page is a different widget to
    Streamlit), and a user's change reaches the shared selection through
    `on_change`, before the page runs.
    """
    options = list(options)
    if not options:
        return None
    container = container or st
    current = selection(key, default if default is not None else options[0])
    from_url = _came_from_url(key)
    if current not in options:
        if from_url:
            _warn_link(key, current, "is not one of the choices here", format_func(options[0]))
        current = options[0]
    wkey = f"w_{key}"
    st.session_state[wkey] = current
    value = container.selectbox(label, options, key=wkey, format_func=format_func,
                                on_change=lambda: set_selection(key, st.session_state[wkey]), **kwargs)
    set_selection(key, value)
    return value


def mirror_selections(*keys: str) -> None:
    """Re-write stored selections into the URL (page switches clear query params)."""
    for key in keys:
        skey = f"sel_{key}"
        if skey in st.session_state and st.session_state[skey] is not None:
            st.query_params[key] = str(st.session_state[skey])


# ----------------------------------------------------------------------------- checkpoints
@st.cache_data(show_spinner=False, max_entries=256)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def checkpoint_hash(path: Path) -> str:
    """Content key of a checkpoint: sha256 of model.safetensors and of the card's model config.

    Both matter: two checkpoints can hold identical weights with different
    routing settings (k, capacity ratio, ...). Cached on path + mtime + size.
    """
    import hashlib
    import json

    f = Path(path) / WEIGHTS
    stat = f.stat()
    weights = _file_digest(str(f), stat.st_mtime_ns, stat.st_size)
    config = json.dumps(load_card(path).get("config"), sort_keys=True)
    return hashlib.sha256(f"{weights}:{config}".encode()).hexdigest()


def weights_hash(path: Path) -> str:
    """sha256 of the checkpoint's model.safetensors (cached on path + mtime + size)."""
    f = Path(path) / WEIGHTS
    stat = f.stat()
    return _file_digest(str(f), stat.st_mtime_ns, stat.st_size)


def _stamp(path: Path) -> Optional[tuple]:
    """(mtime, size) of the card and the weights: the checkpoint's cache key (None when a file is gone)."""
    try:
        return tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in (Path(path) / CARD, Path(path) / WEIGHTS))
    except OSError:
        return None


@st.cache_data(show_spinner=False, max_entries=512)
def _inspect(path: str, root: str, stamp: Optional[tuple]) -> tuple[Optional[dict], Optional[str]]:
    """(card, None) when the checkpoint can be opened, else (None, why): card and config vs weights header."""
    try:
        for name in (CARD, WEIGHTS):  # a file linked from elsewhere would be read outside the app's folders
            paths.inside(root, Path(path) / name)
        return inspect_checkpoint(path), None
    except ValueError as e:  # CheckpointError, or a link out of the checkpoint folders
        return None, str(e)
    except OSError as e:
        return None, f"cannot be read: {e}"


def _root_of(path: Path) -> Path:
    return _roots()[ckpt_ref(path).split("/")[0]]


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint at `path` cannot be opened (None when it can); cached on the files' stamps."""
    return _inspect(str(path), str(_root_of(path)), _stamp(path))[1]


@st.cache_data(show_spinner=False, ttl=5)
def _available(samples: str, runs: str) -> list[tuple[str, str, Optional[str]]]:
    """(ref, label, problem or None) of every checkpoint folder under the two roots."""
    out = []
    for path in list_checkpoints(samples, runs):
        try:
            ref = ckpt_ref(path)
        except ValueError:  # a linked folder that resolves outside both roots
            continue
        card, problem = _inspect(str(path), str(_root_of(path)), _stamp(path))
        label = card_label(path, card) if card is not None else f"⚠ {path.name} · cannot be opened"
        out.append((ref, label, problem))
    return out


def refresh_checkpoints() -> None:
    """Forget the cached checkpoint list (e.g. when a training run just finished)."""
    _available.clear()


def card_label(path: Path, card: dict) -> str:
    acc = (card.get("metrics") or {}).get("test_accuracy")
    acc_txt = f"{100 * acc:.1f}%" if isinstance(acc, (int, float)) else "n/a"
    ref = ckpt_ref(path)
    where = "run" if ref.startswith("runs/") else "sample"
    name, preset = ref.split("/", 1)[-1], short(card.get("preset"), 40)   # pipeline models: <run>/dense, <run>/moe
    head = name if name == preset else f"{name} ({preset})"
    return f"{head} · {short(card.get('dataset'), 40)} · {acc_txt} · {where}"


def _entries() -> list[tuple[str, str, Optional[str]]]:
    roots = _roots()
    return [e for e in _available(str(roots["samples"]), str(roots["runs"]))
            if (p := resolve_ref(e[0])) is not None and (p / CARD).is_file()]  # not deleted since cached


def available_checkpoints() -> list[tuple[Path, str]]:
    """Every checkpoint the app can open: (folder, label). Broken ones are left out (the picker names them)."""
    return [(resolve_ref(ref), label) for ref, label, problem in _entries() if problem is None]


def _ref_from_url(refs: list[str]) -> Optional[str]:
    """The checkpoint named by the URL's `ckpt` (any string), or None with a sidebar warning."""
    url_ref = st.query_params.get("ckpt")
    if url_ref is None:
        return None
    url_path = resolve_ref(url_ref)
    if url_path is not None and ckpt_ref(url_path) in refs:
        return ckpt_ref(url_path)
    st.sidebar.warning(f"Checkpoint `{md(short(url_ref, 80))}` from the link is not available; showing another one.")
    return None


SHOWCASE = "samples/fmnist-mvmoe-6x64-e4k1"   # what a new session opens on: the shipped super-class MoE


def default_checkpoint(refs: list, problems: dict) -> str:
    """A new session's checkpoint: the showcase sample, else the first shipped sample, else the first
    run that opens (a run trained from the UI never displaces the samples for the next visitor)."""
    usable = [ref for ref in refs if problems[ref] is None]
    if SHOWCASE in usable:
        return SHOWCASE
    return next((ref for ref in usable if ref.startswith("samples")), usable[0] if usable else refs[0])


def checkpoint_picker() -> Optional[Path]:
    """Sidebar checkpoint selector shared by all pages; the choice is kept in session state and the URL.

    Returns the selected checkpoint folder, or None (with a helpful message)
    when there is none to choose. Checkpoints that cannot be opened are listed
    with a warning sign, and the reason is shown under the picker when chosen.
    """
    entries = _entries()
    if not entries:
        st.sidebar.info("No checkpoints found.")
        st.info(
            f"No checkpoints found in `{paths.samples_dir()}` or `{paths.runs_dir()}`. "
            "Train one on the **Train** page, or from a shell: "
            "`python -m workbench.train --dataset synthetic --model mvmoe-4x64-e4k1 --epochs 1 --out runs/first`."
        )
        return None
    refs = [ref for ref, _, _ in entries]
    labels = {ref: label for ref, label, _ in entries}
    problems = {ref: problem for ref, _, problem in entries}
    current = st.session_state.get(CKPT_KEY)
    if current is None:
        current = _ref_from_url(refs)
    if current not in refs:
        if current is not None:
            st.sidebar.warning(f"Checkpoint `{md(short(current, 80))}` is gone (deleted or renamed); "
                               "showing another one.")
        current = default_checkpoint(refs, problems)
    st.session_state["w_ckpt"] = current  # see linked_selectbox: the shared choice drives the widget

    def changed():
        st.session_state[CKPT_KEY] = st.session_state["w_ckpt"]

    ref = st.sidebar.selectbox("Checkpoint", refs, key="w_ckpt", format_func=lambda r: labels.get(r, r),
                               on_change=changed,
                               help="Sample checkpoints shipped with the workbench and your training runs.")
    st.session_state[CKPT_KEY] = ref
    st.query_params["ckpt"] = ref
    if problems[ref]:
        st.sidebar.warning(f"**{md(Path(ref).name)}** cannot be opened: {md(problems[ref])}")
    _max_images_widget()
    _bf16_widget()
    mirror_selections("class", "expert", "layer")
    return resolve_ref(ref)


def forget_on_checkpoint_change(scope: str, *widget_keys: str) -> None:
    """Drop the page's widget state (`widget_keys`) when the checkpoint changed since the page last ran.

    Knobs such as disabled experts or k only make sense for the model they were set on.
    """
    ref = st.session_state.get(CKPT_KEY)
    marker = f"_ckpt_of_{scope}"
    if st.session_state.get(marker) != ref:
        for key in widget_keys:
            st.session_state.pop(key, None)
        st.session_state[marker] = ref


def _max_images_widget() -> None:
    """Sidebar setting: how many test images analyses use (shared by every page)."""
    st.session_state["w_max_images"] = max_images()  # the shared value drives the widget on every page

    def changed():
        st.session_state["cfg_max_images"] = int(st.session_state["w_max_images"])

    st.sidebar.number_input(
        "Test images analysed", min_value=100, max_value=20000, step=500, key="w_max_images", on_change=changed,
        help="Analyses use the first N images of a fixed shuffle of the test split; fewer is faster.")


def _bf16_widget() -> None:
    """Sidebar setting: run analysis passes under bf16 autocast (shared by every page)."""
    st.session_state["w_bf16"] = analysis_bf16()

    def changed():
        st.session_state["cfg_bf16"] = bool(st.session_state["w_bf16"])

    st.sidebar.toggle("Fast analysis (bf16)", key="w_bf16", on_change=changed,
                      help="Run the analysis passes under bf16 autocast: about 2× faster on CPUs with bf16 "
                           "support, but a few near-tied router decisions or predictions may flip. "
                           "Routers always run in fp32.")


def analysis_bf16() -> bool:
    """Whether analysis passes run under bf16 autocast (the sidebar setting; off by default)."""
    return bool(st.session_state.get("cfg_bf16", False))


def max_images() -> int:
    """How many test images analyses use (the sidebar setting drawn by `checkpoint_picker`)."""
    return int(st.session_state.get("cfg_max_images", DEFAULT_MAX_IMAGES))


# ----------------------------------------------------------------------------- loading
@st.cache_resource(show_spinner="Loading model…", max_entries=8)
def _load_model(path: str, digest: str):
    from workbench.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path)
    return model


def load_model(path: Path):
    """The checkpoint's model in eval mode, cached by path + weights hash.

    The cached object is shared: never change its routing settings in place;
    use `model_copy` for inference-time knobs.
    """
    return _load_model(str(path), weights_hash(path))


def model_copy(path: Path):
    """A private deep copy of the cached model, safe to `set_routing` on."""
    return copy.deepcopy(load_model(path))


@st.cache_data(show_spinner=False, max_entries=64)
def _load_card(path: str, mtime_ns: int) -> dict:
    return read_card(path)


def load_card(path: Path) -> dict:
    """The checkpoint's card.json (cached until the file changes)."""
    return _load_card(str(path), (Path(path) / CARD).stat().st_mtime_ns)


def open_checkpoint(path: Optional[Path]) -> tuple[Optional[dict], Optional[Path]]:
    """(card, path) of the selected checkpoint, or a message + st.stop() when it cannot be read."""
    need(path is not None, "Pick a checkpoint in the sidebar to use this page.")
    try:
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(problem)
        return load_card(path), path
    except (CheckpointError, OSError) as e:
        st.warning(f"This checkpoint cannot be opened: {md(e)}")
        st.stop()


def get_model(path: Path):
    """load_model with a warning + stop instead of a traceback when the weights are unusable."""
    try:
        return load_model(path)
    except (CheckpointError, OSError) as e:
        st.warning(f"The model in `{path.name}` cannot be loaded: {e}")
        st.stop()


@st.cache_data(show_spinner="Loading test data…", max_entries=4)
def _load_data(dataset: str):
    from workbench.data import load_dataset

    return load_dataset(dataset, "test")


def _load_eval_data(card_dataset: str):
    """The test split of a card's dataset; DataLocationError (a ValueError) for data outside the data roots."""
    return _load_data(paths.resolve_card_data(card_dataset))


def load_eval_data(card: dict, quiet: bool = False):
    """The test split of the card's dataset (an `ImageDataset`), or None with a warning when unavailable.

    Also None (with a warning) when the data does not fit the checkpoint: other
    classes or another image shape than the model was trained on.
    """
    name = card.get("dataset")
    try:
        ds = _load_eval_data(name)
    except ImportError as e:
        if not quiet:
            st.warning(f"The data module is not available: {e}")
        return None
    except ValueError as e:  # DatasetError is a ValueError; it says where it looked and how to get the data
        if not quiet:
            st.warning(f"The test data of **{md(short(name))}** is not available here, so this view cannot be "
                       f"computed.\n\n{md(e)}")
        return None
    problem = data_mismatch(card, ds) or (None if len(ds) else "its test split has no images.")
    if problem:
        if not quiet:
            st.warning(f"The test data of **{md(short(name))}** found here does not match this checkpoint: "
                       f"{md(problem)}")
        return None
    return ds


def missing_data_reason(card: dict) -> Optional[str]:
    """Why the card's test images cannot be used here, in one line (None when they can)."""
    name = card.get("dataset")
    try:
        ds = _load_eval_data(name)
    except (ImportError, ValueError) as e:
        return f"the test images of **{md(short(name))}** are not here ({md(short(str(e), 300))})"
    problem = data_mismatch(card, ds)
    return f"the test data found here does not match this checkpoint ({md(problem)})" if problem else None


def data_mismatch(card: dict, ds) -> Optional[str]:
    """Why `ds` cannot evaluate the checkpoint of `card` (None when it can)."""
    cfg = card.get("config") or {}
    classes = [str(c) for c in card.get("classes") or []]
    if classes and [str(c) for c in ds.classes] != classes:
        return f"it has {ds.num_classes} classes ({', '.join(map(str, ds.classes[:4]))}, …), the model {len(classes)}."
    shape = (cfg.get("in_chans"), cfg.get("img_size"), cfg.get("img_size"))
    if None not in shape and tuple(ds.image_shape) != shape:
        return f"its images are {tuple(ds.image_shape)} (C, H, W), the model expects {shape}."
    return None


def dataset_or_none(name: str):
    """The test split of dataset `name`, or None when it is not available (no message)."""
    try:
        return _load_eval_data(name)
    except (ImportError, ValueError):
        return None


def subset_indices(n: int, size: int):
    """The test-split indices of the analysed subset of `n` of `size` images (a fixed shuffle, sorted), so
    that a page can name an image by its test-split number, as every other page does."""
    import numpy as np

    if n >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(0).permutation(size)[:n])


@st.cache_resource(show_spinner=False, max_entries=8)
def _subset(name: str, n: int, size: int):
    ds = _load_eval_data(name)
    return ds.subset(subset_indices(n, len(ds)).tolist())


def eval_subset(card: dict, n: Optional[int] = None, quiet: bool = False):
    """The first `n` (default: the sidebar setting) images of a fixed shuffle of the test split, or None
    (with a warning unless `quiet`: a page that shows something else instead says so once itself)."""
    ds = load_eval_data(card, quiet=quiet)
    if ds is None:
        return None
    n = max_images() if n is None else n
    if n >= len(ds):
        return ds
    return _subset(card["dataset"], int(n), len(ds))


@st.cache_data(show_spinner="Computing the confusion matrix on the test split…", max_entries=16)
def _test_confusion(digest: str, n: int, _model, _ds) -> list:
    from analysis.confusion import model_confusion

    return model_confusion(_model, _ds).tolist()


def confusion_picker(card: dict, path: Path):
    """Sidebar choice of the confusion matrix to use -> (counts as float array, source label).

    The card's held-out confusion (the paper's input to super-class discovery)
    when it has one, or the model's confusion on the test split computed now.
    Stops the page with a message when neither is available.
    """
    import numpy as np

    conf = card.get("confusion") or {}
    sources = [f"{conf.get('split', 'held-out')} split (from the card)"] if conf.get("matrix") else []
    sources.append("test split (computed now)")
    source = st.sidebar.radio("Confusion of", sources, key="w_confusion_source",
                              help="The paper clusters the dense baseline's confusion on held-out training "
                                   "data; the test split works for any checkpoint.")
    if source.endswith("(from the card)"):
        cm = np.asarray(conf["matrix"], dtype=np.float64)
    else:
        ds = eval_subset(card)
        need(ds is not None, "No test data to compute a confusion matrix from (see the warning above).")
        cm = np.asarray(_test_confusion(checkpoint_hash(path), len(ds), get_model(path), ds), dtype=np.float64)
    n = len(card.get("classes") or [])
    need(cm.shape == (n, n), f"The confusion matrix has shape {cm.shape} but the card lists {n} classes.")
    return cm, source


def to_pil(image_chw):
    """uint8 (C, H, W) array/tensor -> PIL image (grey or RGB), for display."""
    import numpy as np
    from PIL import Image

    a = np.asarray(image_chw)
    return Image.fromarray(a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0)))


MAX_UPLOAD_BYTES = 2 * 1024 * 1024   # the server's cap too (workbench/.streamlit/config.toml: maxUploadSize = 2)
MAX_UPLOAD_PIXELS = 4096 * 4096       # decoded size checked from the header: larger is refused as a bomb
UPLOAD_FORMATS = ("PNG", "JPEG")


class UploadError(ValueError):
    """An uploaded file that cannot be used; the message says why."""


def _decode_upload(data: bytes, target_wh: tuple[int, int]):
    """Pillow image of an uploaded PNG/JPEG, decoded only after its header passed the size checks."""
    import io
    import warnings

    from PIL import Image

    bomb = (f"the image is larger than {MAX_UPLOAD_PIXELS / 1e6:.1f} megapixels once decoded "
            "(a decompression bomb?); it is not decoded")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadError(bomb) from None
        if img.format not in UPLOAD_FORMATS:
            raise UploadError(f"expected a PNG or JPEG file, got {img.format or 'an unknown format'}")
        w, h = img.size
        if w * h > MAX_UPLOAD_PIXELS:
            raise UploadError(f"{bomb}: {w}×{h} pixels")
        if img.format == "JPEG":
            img.draft(img.mode, target_wh)  # decode a large JPEG at a reduced scale directly
        img.load()
    return img, (w, h)


def _to_8bit(img):
    """16-bit and 32-bit grey images scaled to 0..255 (Pillow's convert("L") would clip at 255)."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.float64) / 65535.0   # PNG holds at most 16 bits per sample
        return Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8), "L"), True
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        return Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8), "L"), True
    return img, False


def read_uploaded_image(data: bytes, image_shape: Sequence[int]):
    """Bytes of an uploaded PNG or JPEG -> (uint8 array (C, H, W) of `image_shape`, notes for the user).

    Parsed only with Pillow, after checking the byte size and the header's
    pixel count (so a decompression bomb is refused before decoding). Any
    mode is converted to the dataset's grey/RGB (16-bit grey is scaled, not
    clipped) and any size is resized to the model's input; each change is
    described in the notes. Raises ValueError with a message for the user.
    """
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    c, h, w = (int(v) for v in image_shape)
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"the file is {len(data) / 1024:.0f} KB; images up to {MAX_UPLOAD_BYTES // 1024} KB are accepted")
    try:
        img, size = _decode_upload(data, (w, h))
        img = ImageOps.exif_transpose(img)
        notes, mode = [], img.mode
        img, scaled = _to_8bit(img)
        if scaled:
            notes.append(f"Scaled the {mode} image's values to 0–255.")
        want = "L" if c == 1 else "RGB"
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img)
            notes.append("Placed the transparent image on a white background.")
        if img.mode != want:
            notes.append(f"Converted from mode {mode} to {'grey' if c == 1 else 'RGB'}.")
            img = img.convert(want)
        if img.size != (w, h):
            notes.append(f"Resized from {size[0]}×{size[1]} to the model's {w}×{h} pixels.")
            img = img.resize((w, h), Image.Resampling.LANCZOS)
    except UploadError:
        raise
    except UnidentifiedImageError:
        raise UploadError("not a PNG or JPEG image (Pillow cannot identify it)") from None
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, DecompressionBomb*, ...
        raise ValueError(f"not a readable PNG or JPEG image ({type(e).__name__}: {e})") from None
    a = np.array(img, dtype=np.uint8)   # a writable copy (torch warns about read-only arrays)
    a = a[None] if c == 1 else np.transpose(a, (2, 0, 1))
    return np.ascontiguousarray(a), notes


__all__ = [
    "md", "need", "need_moe", "selection", "index_selection", "set_selection", "linked_selectbox", "mirror_selections",
    "checkpoint_picker", "available_checkpoints", "refresh_checkpoints", "checkpoint_hash", "weights_hash", "ckpt_ref", "resolve_ref",
    "load_model", "model_copy", "get_model", "load_card", "open_checkpoint", "load_eval_data", "eval_subset", "dataset_or_none", "analysis_bf16",
    "max_images",
    "DEFAULT_MAX_IMAGES", "read_uploaded_image", "MAX_UPLOAD_BYTES", "MAX_UPLOAD_PIXELS", "short", "checkpoint_problem", "forget_on_checkpoint_change", "confusion_picker", "to_pil", "SUPERCLASS_MAP_KEY", "session_superclass_map", "group_sources",
]


# ----------------------------------------------------------------------------- super-class maps
SUPERCLASS_MAP_KEY = "superclass_map"   # session_state: the map chosen on the Super-classes page (map-file dict)


def session_superclass_map(classes: Optional[Sequence[str]] = None) -> Optional[dict]:
    """The super-class map chosen on the Super-classes page (docs/CONTRACTS.md map-file dict), or None.

    With `classes`, only a map whose class names match them is returned.
    """
    m = st.session_state.get(SUPERCLASS_MAP_KEY)
    if not m:
        return None
    if classes is not None and list(m.get("classes", {})) != [str(c) for c in classes]:
        return None
    return m


def group_sources(card: dict, ds=None) -> dict[str, tuple[list[int], list[str]]]:
    """Available class -> group assignments for colouring: {source label: (assignment, group names)}."""
    out = {}
    classes = card.get("classes") or []
    sc = card.get("superclasses")
    if sc and sc.get("assignment"):
        a = [int(g) for g in sc["assignment"]]
        out["checkpoint's super-classes"] = (a, list(sc.get("names") or [f"group {g}" for g in range(max(a) + 1)]))
    m = session_superclass_map(classes)
    if m:
        out[f"map from Super-classes page ({m.get('method')}, E={m.get('num_groups')})"] = (
            [int(m["classes"][str(c)]) for c in classes], list(m.get("groups") or []))
    if ds is not None and getattr(ds, "reference_groups", None):
        ref = [int(g) for g in ds.reference_groups]
        names = list(getattr(ds, "reference_group_names", None) or [f"group {g}" for g in range(max(ref) + 1)])
        out["dataset's reference groups"] = (ref, names)
    return out
