"""Datasets for the workbench: one loader, five sources, uint8 tensors in memory.

Why this module looks the way it does:
- The paper's procedure needs a class hierarchy to check its discovered
  super-classes against, so every dataset carries a *reference* class -> group
  map where one exists (CIFAR-100's official coarse classes, the designed groups
  of `synthetic`, a clearly labelled unofficial map for Fashion-MNIST).
- Everything runs offline. Nothing downloads at import time or in tests; a
  download happens only when asked (`download=True`) and is checksummed.
  A missing dataset is one message listing every place looked and how to get it.
- Dataset files come from outside, so reading them must not run code: the CIFAR
  pickles go through an unpickler that refuses every global except numpy's array
  reconstruction, and corrupt files fail with the file's name and the problem.
- The datasets are small (<= 60k images of 32x32), so a split is held in memory
  as one uint8 tensor; `normalize` and `augment` work on whole batches in torch.

Public API (docs/CONTRACTS.md, "Data"): `load_dataset`, `ImageDataset`,
`DatasetError`, `heldout_split`, `normalize`, `augment`.
"""
from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DATASET_NAMES = ("fashion-mnist", "cifar10", "cifar100", "tiny-imagenet", "imagefolder:PATH", "synthetic")
SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A dataset is missing, corrupt or asked for with invalid options."""


@dataclass(eq=False)
class ImageDataset:
    """One split of a dataset, held in memory as uint8 images and int64 labels."""

    name: str                               # as passed to load_dataset, e.g. "fashion-mnist"
    split: str                              # "train" | "test"
    images: torch.Tensor = field(repr=False)  # uint8 (N, C, H, W)
    labels: torch.Tensor = field(repr=False)  # int64 (N,)
    classes: list[str]                      # class index -> name
    mean: tuple[float, ...]                 # per channel, 0..1 units, from the train split
    std: tuple[float, ...]
    reference_groups: Optional[list[int]] = None       # class index -> reference group index
    reference_group_names: Optional[list[str]] = None  # group index -> name
    reference_source: Optional[str] = None  # where the reference groups come from (official or not)
    hflip: bool = True                      # whether horizontal flips preserve the class

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                               f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise DatasetError(f"{self.name}: labels must be int64 ({len(self.images)},), got {self.labels.dtype} "
                               f"{tuple(self.labels.shape)}")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.classes):
            raise DatasetError(f"{self.name}: labels must lie in 0..{len(self.classes) - 1}")
        if not len(self.mean) == len(self.std) == self.images.shape[1]:
            raise DatasetError(f"{self.name}: mean/std need one value per channel ({self.images.shape[1]})")
        if self.reference_groups is not None and len(self.reference_groups) != len(self.classes):
            raise DatasetError(f"{self.name}: reference_groups needs one group per class ({len(self.classes)})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "ImageDataset":
        """The same dataset restricted to `idx` (indices or a boolean mask)."""
        idx = torch.as_tensor(idx)
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])


# ----------------------------------------------------------------------------- transforms

def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float32 (x / 255 - mean) / std, per channel."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    c = images_uint8.shape[-3]
    if not len(mean) == len(std) == c:
        raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)} and {len(std)}")
    m = torch.tensor(mean, dtype=torch.float32, device=images_uint8.device).view(c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images_uint8.device).view(c, 1, 1)
    return (images_uint8.float() / 255.0 - m) / s


def augment(x: torch.Tensor, hflip: bool, generator: Optional[torch.Generator] = None, pad: int = 2) -> torch.Tensor:
    """Random crop after padding by `pad`, plus a random horizontal flip when `hflip`.

    Works on a float batch (B, C, H, W) in one gather: every image gets its own
    offset (and flip), no Python loop over the batch. The padding repeats each
    image's edge pixels, so the border looks like the image's own background
    (zero padding of a normalised batch paints it the dataset's mean grey, an
    input the test set never shows; black is no better where backgrounds are not black).
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"augment expects a float batch (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    b, _, h, w = x.shape
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    cols = torch.arange(w, device=dev).expand(b, w)
    if hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
    rows = oy[:, None] + torch.arange(h, device=dev)           # (B, H) rows of the padded image
    cols = ox[:, None] + cols                                  # (B, W)
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate") if pad else x
    # NOTE: advanced indices separated by a slice put their dims first -> (B, H, W, C).
    out = xp[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def heldout_split(n: int, fraction: float = 0.1, seed: int = 0,
                  labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split of range(n) into (train_idx, heldout_idx): disjoint, covering, sorted.

    The held-out part is what the dense baseline's confusion matrix is computed
    on (the paper's step 2), so it must never overlap the indices trained on.
    With `labels`, each class contributes round(fraction * its count) images
    (at least one when it has two or more), so every class appears in both parts.
    """
    if n < 0 or not 0.0 <= fraction < 1.0:
        raise ValueError(f"need n >= 0 and 0 <= fraction < 1, got n={n}, fraction={fraction}")
    rng = np.random.default_rng(seed)
    if labels is None:
        held = rng.permutation(n)[: int(round(fraction * n))]
    else:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        held = []
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            k = int(round(fraction * len(members)))
            if fraction > 0 and len(members) >= 2:
                k = min(max(k, 1), len(members) - 1)
            held.append(members[:k])
        held = np.concatenate(held) if held else np.zeros(0, np.int64)
    mask = np.zeros(n, bool)
    mask[held] = True
    return torch.from_numpy(np.flatnonzero(~mask)), torch.from_numpy(np.flatnonzero(mask))


def channel_stats(images_uint8) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images (tensor or array), in 0..1 units.

    Exact and streaming: a 256-bin histogram per channel, accumulated over chunks
    of images, so memory stays flat (no float64 copy of the dataset).
    """
    x = images_uint8.numpy() if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"channel_stats expects uint8 (N, C, H, W), got {x.dtype} {x.shape}")
    hist = np.zeros((x.shape[1], 256), np.int64)
    for s in range(0, len(x), 4096):
        chunk = x[s:s + 4096]
        for c in range(x.shape[1]):
            hist[c] += np.bincount(chunk[:, c].reshape(-1), minlength=256)
    mean, std = [], []
    for h in hist.tolist():                          # Python ints: the sums below are exact
        n = sum(h)
        s1 = sum(v * k for v, k in enumerate(h))
        s2 = sum(v * v * k for v, k in enumerate(h))
        m = s1 / max(n, 1) / 255.0
        sd = math.sqrt(max(n * s2 - s1 * s1, 0)) / max(n, 1) / 255.0
        mean.append(round(m, 4))
        std.append(round(sd, 4) if sd > 1e-6 else 1.0)   # constant images: don't divide by 0
    return tuple(mean), tuple(std)


# ----------------------------------------------------------------------------- entry point

def load_dataset(name: str, split: str = "train", root: Optional[str | os.PathLike] = None,
                 download: bool = False, **kwargs) -> ImageDataset:
    """Load one split of a dataset by name (see DATASET_NAMES).

    `root` is a folder holding the dataset's files (directly or in a sub-folder
    named after the dataset); without it the loader searches the usual places
    and lists them if nothing is found. `download=True` fetches fashion-mnist or
    CIFAR from their official URLs and checks their MD5. Options (`kwargs`):
    synthetic: seed, num_train, num_test, num_classes, num_groups;
    imagefolder: seed, test_fraction, size.
    """
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    raw = str(name).strip()
    if raw.lower().startswith("imagefolder:"):
        _check_options(raw, kwargs, ("seed", "test_fraction", "size"), download)
        return _load_imagefolder(raw, split, **kwargs)
    key = raw.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(key, key)
    if key == "synthetic":
        _check_options(key, kwargs, ("seed", "num_train", "num_test", "num_classes", "num_groups"), download)
        return _load_synthetic(split, **kwargs)
    if key in ("tiny-imagenet", "tinyimagenet", "tiny-imagenet-200"):
        _check_options(key, kwargs, ("size",), download)
        return _load_tiny_imagenet(split, root, **kwargs)
    loaders = {"fashion-mnist": _load_fashion_mnist, "cifar10": _load_cifar10, "cifar100": _load_cifar100}
    if key not in loaders:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    _check_options(key, kwargs, ())
    return loaders[key](split, root, download)


def _check_options(name: str, kwargs: dict, allowed: Sequence[str], download: bool = False) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise DatasetError(f"{name}: unknown option(s) {unknown}; it accepts {list(allowed) or 'none'}")
    if download:
        raise DatasetError(f"{name} has nothing to download (download=True applies to fashion-mnist and CIFAR)")


def _search_bases(root) -> list[tuple[Path, str]]:
    """(data root, why it is searched), in search order: root argument, $WORKBENCH_DATA, ./data."""
    bases = []
    if root is not None:
        bases.append((Path(root).expanduser(), "root argument / --data-root"))
    env = os.environ.get("WORKBENCH_DATA")
    if env:
        bases.append((Path(env).expanduser(), "$WORKBENCH_DATA"))
    bases.append((Path.cwd() / "data", "./data in the working directory"))
    return bases


def _download_base(root) -> Path:
    """Where a download goes: the root argument, else $WORKBENCH_DATA, else ./data."""
    return _search_bases(root)[0][0]


def _fetch(url: str, dest: Path, md5: str) -> None:
    """Download `url` to `dest` atomically and check its MD5 (the checksum the dataset authors publish)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            shutil.copyfileobj(r, f, 1 << 20)
        got = _md5(Path(tmp))
        if got != md5:
            raise DatasetError(f"download of {url} has MD5 {got}, expected {md5}; not using it")
        os.replace(tmp, dest)
    except OSError as e:
        raise DatasetError(f"could not download {url}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# NOTE: Fashion-MNIST has no official hierarchy. This 4-group map is ours, for
# comparing discovered super-classes with an intuition; label it as unofficial.
FASHION_MNIST_GROUP_NAMES = ["tops", "bottoms+dresses", "footwear", "bags"]
FASHION_MNIST_GROUPS = [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]
FASHION_MNIST_SOURCE = "unofficial 4-group map (tops, bottoms+dresses, footwear, bags) — not official"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_MNIST_MD5 = {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                     "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                     "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                     "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}
FASHION_MNIST_URLS = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                      "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
# Module-level so tests can point them elsewhere.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")   # Debian: dataset-fashion-mnist
EVAL_BUNDLE_DIR = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "eval_bundle" / "fashion-mnist"


def _fashion_mnist_places(split: str, root) -> list[tuple[Path, str]]:
    places = [(Path(root).expanduser(), "root argument / --data-root")] if root is not None else []
    places += [(base / "fashion-mnist", why) for base, why in _search_bases(root)]
    places.append((FASHION_MNIST_SYSTEM_DIR, "Debian package dataset-fashion-mnist"))
    if split == "test":
        places.append((EVAL_BUNDLE_DIR, "the repository's evaluation bundle (test split only)"))
    return places


def _find_idx(folder: Path, gz_name: str) -> Optional[Path]:
    """The file as shipped (.gz), or an uncompressed copy of it."""
    for p in (folder / gz_name, folder / gz_name[:-3]):
        if p.is_file():
            return p
    return None


def _load_fashion_mnist(split: str, root, download: bool) -> ImageDataset:
    img_name, lbl_name = FASHION_MNIST_FILES[split]
    places = _fashion_mnist_places(split, root)
    found = None
    for folder, _ in places:
        img, lbl = _find_idx(folder, img_name), _find_idx(folder, lbl_name)
        if img and lbl:
            found = (img, lbl)
            break
    if found is None and download:
        target = _download_base(root) / "fashion-mnist"
        for fname in (img_name, lbl_name):
            if not (target / fname).is_file():
                _fetch_first(FASHION_MNIST_URLS, fname, target / fname, FASHION_MNIST_MD5[fname])
        found = (target / img_name, target / lbl_name)
    if found is None:
        looked = "\n".join(f"  - {folder}  ({why}){_partial(folder, (img_name, lbl_name))}" for folder, why in places)
        raise DatasetError(
            f"Fashion-MNIST ({split} split) not found: no folder holds both {img_name} and {lbl_name}.\n"
            f"Looked in:\n{looked}\n"
            "To get it: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs "
            f"{FASHION_MNIST_SYSTEM_DIR}), or put the four IDX .gz files in a folder and pass it as "
            "--data-root / root= (or set WORKBENCH_DATA to a folder containing fashion-mnist/), "
            "or load with download=True when online.")
    images = _read_idx(found[0], expect_ndim=3)
    labels = _read_idx(found[1], expect_ndim=1)
    if len(images) != len(labels):
        raise DatasetError(f"{found[0]} holds {len(images)} images but {found[1]} holds {len(labels)} labels")
    if len(labels) and labels.max() >= 10:
        raise DatasetError(f"{found[1]}: label {int(labels.max())} is out of range 0..9")
    return ImageDataset(
        name="fashion-mnist", split=split,
        images=torch.from_numpy(images.copy()).unsqueeze(1), labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(FASHION_MNIST_CLASSES), mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
        reference_groups=list(FASHION_MNIST_GROUPS), reference_group_names=list(FASHION_MNIST_GROUP_NAMES),
        reference_source=FASHION_MNIST_SOURCE, hflip=True)


def _partial(folder: Path, names: Sequence[str]) -> str:
    """A hint when a folder holds only some of the files."""
    have = [n for n in names if _find_idx(folder, n)]
    return f" — has {', '.join(have)} but not the rest" if have else ""


def _fetch_first(bases: Sequence[str], fname: str, dest: Path, md5: str) -> None:
    errors = []
    for base in bases:
        try:
            return _fetch(base + fname, dest, md5)
        except DatasetError as e:
            errors.append(str(e))
    raise DatasetError("\n".join(errors))


MAX_IDX_BYTES = 1 << 30   # an IDX file's data once decompressed (Fashion-MNIST's largest is 47 MB)


def _read_idx(path: Path, expect_ndim: int) -> np.ndarray:
    """An IDX file (as in MNIST) of unsigned bytes: magic 0x0000 08 <ndim>, big-endian sizes, data.

    Bounded after decompression: the header is read first, and no more than the data it announces
    (at most MAX_IDX_BYTES) plus one byte is ever decompressed, so a small .gz that inflates to many
    gigabytes is refused without filling memory."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            head = f.read(4 + 4 * expect_ndim)
            dims = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(expect_ndim))
            if len(head) == 4 + 4 * expect_ndim and math.prod(dims) > MAX_IDX_BYTES:
                raise DatasetError(f"{path}: its header announces {math.prod(dims)} bytes of data, more than an "
                                   f"IDX dataset here may hold ({MAX_IDX_BYTES >> 20} MB); is this the right file?")
            raw = head + f.read(math.prod(dims) + 1 if len(head) == 4 + 4 * expect_ndim else 0)
    except EOFError:
        raise DatasetError(f"{path}: truncated gzip file (ends before the end-of-stream marker); "
                           "download or copy it again") from None
    except (OSError, zlib.error) as e:
        raise DatasetError(f"{path}: not a readable gzip file ({e})") from None
    expect_magic = 0x0800 + expect_ndim          # 2051 for images, 2049 for labels
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expect_magic:
        what = "image" if expect_ndim == 3 else "label"
        raise DatasetError(f"{path}: wrong IDX magic number {magic} (expected {expect_magic} for an unsigned-byte "
                           f"{what} file); is this the right file?")
    header = 4 + 4 * expect_ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expect_ndim))
    expected = math.prod(dims)
    if len(raw) - header != expected:
        held = "more than that" if len(raw) - header > expected else str(len(raw) - header)
        raise DatasetError(f"{path}: header says {' x '.join(map(str, dims))} = {expected} bytes of data, "
                           f"but the file holds {held}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# ----------------------------------------------------------------------------- CIFAR

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", meta="batches.meta",
                    files={"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a"),
    "cifar100": dict(folder="cifar-100-python", meta="meta", files={"train": ["train"], "test": ["test"]},
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and nothing that could run code.

    A pickle names the callables it wants called (`find_class`); a malicious one
    names `os.system`. We hand out only what numpy's array/dtype reconstruction
    needs and refuse every other name, whatever the file says.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,   # numpy 1.x pickles
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # numpy 2.x pickles
        ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,           # protocol 5
        ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 at protocol 2 stores an array's raw bytes as _codecs.encode(text, "latin1"):
        # a pure str -> bytes conversion through the stdlib codec registry.
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}") from None


def _load_pickle(path: Path) -> dict:
    """A CIFAR pickle (written by Python 2: latin1 strings), loaded without running any code."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    except Exception as e:   # UnpicklingError, EOFError, ValueError, ... from a bad or hostile file
        raise DatasetError(f"{path}: not a valid CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict in the pickle, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(d: dict, key: str, path: Path):
    if key not in d:
        raise DatasetError(f"{path}: missing field {key!r} (has {sorted(map(str, d))})")
    return d[key]


def _labels(d: dict, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(_field(d, key, path), dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: {key!r} is not a list of integer labels ({e})") from None


def _names(values, path: Path) -> list[str]:
    if not isinstance(values, (list, tuple)):
        raise DatasetError(f"{path}: expected a list of class names, got {type(values).__name__}")
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def _find_cifar(key: str, split: str, root, download: bool) -> Path:
    spec = CIFAR[key]
    needed = [*spec["files"][split], spec["meta"]]
    places = [(Path(root).expanduser(), "root argument / --data-root")] if root is not None else []
    for base, why in _search_bases(root):
        places += [(base / spec["folder"], why), (base / key / spec["folder"], why)]
    for folder, _ in places:
        if all((folder / n).is_file() for n in needed):
            return folder
    if download:
        base = _download_base(root)
        archive = base / Path(spec["url"]).name
        if not archive.is_file():
            _fetch(spec["url"], archive, spec["md5"])
        try:
            with tarfile.open(archive, "r:gz") as tar:
                total = sum(m.size for m in tar.getmembers())      # (reads headers while streaming)
                if total > MAX_CIFAR_EXTRACTED_BYTES:
                    raise DatasetError(f"{archive}: {total / 1e6:.0f} MB once unpacked; the CIFAR archives hold "
                                       "about 180 MB. Not unpacking it")
                tar.extractall(base, filter="data")   # "data": no absolute paths, links out, devices
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DatasetError(f"{archive}: cannot extract ({e}); delete it and download again") from None
        return base / spec["folder"]
    looked = "\n".join(f"  - {folder}  ({why})" for folder, why in places)
    raise DatasetError(
        f"{key} ({split} split) not found: no folder holds {', '.join(needed)}.\n"
        f"Looked in:\n{looked}\n"
        f"To get it: download and unpack {spec['url']} (the official python version) into a folder and pass it "
        "as --data-root / root= (or set WORKBENCH_DATA), or load with download=True when online.")


MAX_CIFAR_EXTRACTED_BYTES = 1 << 30


def _cifar_arrays(folder: Path, files: Sequence[str], label_key: str, extra_key: Optional[str] = None):
    """Concatenated (images uint8 (N,3,32,32), labels, extra labels) from CIFAR batch files."""
    images, labels, extra = [], [], []
    for fname in files:
        path = folder / fname
        d = _load_pickle(path)
        data = np.asarray(_field(d, "data", path))
        y = _labels(d, label_key, path)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        if y.shape != (len(data),):
            raise DatasetError(f"{path}: {len(data)} images but {y.size} {label_key!r}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
        if extra_key:
            e = _labels(d, extra_key, path)
            if e.shape != y.shape:
                raise DatasetError(f"{path}: {len(y)} {label_key!r} but {e.size} {extra_key!r}")
            extra.append(e)
    return np.concatenate(images), np.concatenate(labels), (np.concatenate(extra) if extra_key else None)


def _check_range(labels: np.ndarray, n: int, path: Path) -> None:
    if len(labels) and not 0 <= labels.min() <= labels.max() < n:
        raise DatasetError(f"{path}: labels must lie in 0..{n - 1}, found {labels.min()}..{labels.max()}")


def _load_cifar10(split: str, root, download: bool) -> ImageDataset:
    folder = _find_cifar("cifar10", split, root, download)
    meta = folder / "batches.meta"
    classes = _names(_field(_load_pickle(meta), "label_names", meta), meta)
    images, labels, _ = _cifar_arrays(folder, CIFAR["cifar10"]["files"][split], "labels")
    _check_range(labels, len(classes), folder)
    return ImageDataset("cifar10", split, torch.from_numpy(images), torch.from_numpy(labels), classes,
                        CIFAR10_MEAN, CIFAR10_STD, hflip=True)


def _load_cifar100(split: str, root, download: bool) -> ImageDataset:
    folder = _find_cifar("cifar100", split, root, download)
    meta_path = folder / "meta"
    meta = _load_pickle(meta_path)
    classes = _names(_field(meta, "fine_label_names", meta_path), meta_path)
    coarse_names = _names(_field(meta, "coarse_label_names", meta_path), meta_path)
    images, fine, coarse = _cifar_arrays(folder, CIFAR["cifar100"]["files"][split], "fine_labels", "coarse_labels")
    _check_range(fine, len(classes), folder)
    _check_range(coarse, len(coarse_names), folder)
    # The official hierarchy is given per image; read the class -> coarse map off the data.
    groups = []
    for c in range(len(classes)):
        seen = np.unique(coarse[fine == c])
        if len(seen) != 1:
            raise DatasetError(f"{folder}: fine class {classes[c]!r} has coarse labels {seen.tolist()} "
                               "(expected exactly one)")
        groups.append(int(seen[0]))
    return ImageDataset("cifar100", split, torch.from_numpy(images), torch.from_numpy(fine), classes,
                        CIFAR100_MEAN, CIFAR100_STD, reference_groups=groups, reference_group_names=coarse_names,
                        reference_source="CIFAR-100 official coarse labels", hflip=True)


# ----------------------------------------------------------------------------- image folder

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
# Decoding: chunks of images per task; below PARALLEL_MIN_IMAGES starting processes costs more than it saves.
DECODE_CHUNK = 512
PARALLEL_MIN_IMAGES = 2048
IMAGEFOLDER_CACHE_VERSION = 1


def _class_files(folder: Path) -> dict[str, list[str]]:
    """{class name: sorted image file paths} for each sub-folder of `folder`, classes sorted by name.

    Plain strings and os.scandir: sorting 50,000 Path objects alone took seconds.
    """
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        with os.scandir(d) as entries:
            names = sorted(e.name for e in entries if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                           and not e.name.startswith("."))
        prefix = os.path.join(d, "")
        out[d.name] = [prefix + n for n in names]
    return out


def _load_imagefolder(name: str, split: str, seed: int = 0, test_fraction: float = 0.2,
                      size: Optional[int] = None) -> ImageDataset:
    """`imagefolder:PATH`: PATH/<class>/<image> (or PATH/train/... and PATH/test|val/...).

    Without train/test sub-folders the split is a deterministic per-class
    `test_fraction` split by `seed`. Images take the first training image's mode
    (grey or RGB) and size (or `size` x `size`); others are converted/resized.
    Both splits are decoded once (in parallel) and kept as uint8 arrays in the
    cache (`workbench.paths.cache_dir()`), keyed by the file list and mtimes; the
    test split is normalised with the training split's exact statistics.
    """
    if not 0 <= test_fraction < 1:
        raise DatasetError(f"{name}: test_fraction must be in [0, 1), got {test_fraction}")
    path = Path(name.split(":", 1)[1]).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{name}: {path} is not a folder (expected one sub-folder of images per class)")
    class_root, classes, items = _imagefolder_items(name, path, seed, test_fraction)
    images, mean, std = _decoded_split(path, items, split, dict(seed=seed, test_fraction=test_fraction, size=size))
    labels = torch.tensor([lbl for _, lbl in items[split]], dtype=torch.int64)
    groups, group_names, source = _read_superclasses(class_root, path, classes)
    return ImageDataset(name, split, torch.from_numpy(images), labels, classes, mean, std, groups, group_names,
                        source, hflip=True)


def _imagefolder_items(name: str, path: Path, seed: int, test_fraction: float):
    """-> (class root, classes, {split: [(file, label), ...]})."""
    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        class_root = path / "train"
        train = _class_files(class_root)
        classes = list(train)
        test = _class_files(test_dir)
        stray = sorted(set(test) - set(train))
        if stray:
            raise DatasetError(f"{test_dir}: classes {stray} have no folder in {class_root}")
        train_items = [(f, i) for i, c in enumerate(classes) for f in train[c]]
        test_items = [(f, i) for i, c in enumerate(classes) for f in test.get(c, [])]
    else:
        class_root = path
        files = _class_files(path)
        classes = list(files)
        train_items, test_items = [], []
        for i, c in enumerate(classes):
            tr, te = heldout_split(len(files[c]), test_fraction, seed=seed + i)
            train_items += [(files[c][j], i) for j in tr.tolist()]
            test_items += [(files[c][j], i) for j in te.tolist()]
    if len(classes) < 2:
        raise DatasetError(f"{name}: found {len(classes)} class folder(s) in {class_root}; need at least 2")
    present = {lbl for _, lbl in train_items}
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        raise DatasetError(f"{name}: class folder(s) {empty} in {class_root} have no training images "
                           f"(extensions read: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return class_root, classes, {"train": train_items, "test": test_items}


def _decoded_split(path: Path, items: dict, split: str, options: dict):
    """(uint8 (N, C, H, W) array of `split`, train mean, train std): from the cache, else decoded.

    A cold load decodes both splits at once and caches them, so the other split
    (and every later run) is a file read. Peak memory: the decoded dataset, once.
    """
    from .paths import cache_dir

    files = {s: [f for f, _ in items[s]] for s in SPLITS}
    folder_id = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    entry = cache_dir() / "imagefolder" / f"{folder_id}-{_listing_key(files, options)}"
    cached = _read_cached_split(entry, split, len(files[split]))
    if cached is not None:
        return cached
    from PIL import Image   # only decoding needs Pillow

    with _open_image(files["train"][0], Image) as first:
        mode = options.get("mode") or ("L" if first.mode in GREY_MODES else "RGB")
        wh = (options["size"],) * 2 if options["size"] else first.size
    arrays = {s: _decode_images(files[s], mode, wh) for s in SPLITS}
    mean, std = channel_stats(arrays["train"])
    _write_cache(entry, arrays, {"folder": str(path.resolve()), "mode": mode, "mean": mean, "std": std,
                                 "counts": {s: len(files[s]) for s in SPLITS}})
    return arrays[split], mean, std


def _listing_key(files: dict, options: dict) -> str:
    """Hash of the options and of every file's path, size and mtime, in split order: any change -> new key."""
    h = hashlib.sha256(json.dumps({"version": IMAGEFOLDER_CACHE_VERSION, **options}, sort_keys=True).encode())
    for split in SPLITS:
        h.update(f"\0{split}\0".encode())
        for f in files[split]:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _read_cached_split(entry: Path, split: str, count: int):
    """The cached (images, mean, std) of `split`, or None when absent or not what the key promises."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        # copy-on-write map: pages are read on first use and shared with every other process
        # that maps the same entry (training workers, the app); writes stay private
        images = np.load(entry / f"{split}.npy", mmap_mode="c", allow_pickle=False)
        mean, std = tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"])
    except (OSError, ValueError, KeyError, TypeError):   # missing, partial or foreign: decode again
        return None
    if (meta.get("version") != IMAGEFOLDER_CACHE_VERSION or images.dtype != np.uint8 or images.ndim != 4
            or len(images) != count or not len(mean) == len(std) == images.shape[1]):
        return None
    return images, mean, std


def _write_cache(entry: Path, arrays: dict, meta: dict) -> None:
    """Write the entry atomically (a folder renamed into place) and drop older entries of the same folder.
    A cache that cannot be written only costs the next load a decode."""
    parent = entry.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-"))
        try:
            for split, images in arrays.items():
                np.save(tmp / f"{split}.npy", images, allow_pickle=False)
            (tmp / "meta.json").write_text(json.dumps({"version": IMAGEFOLDER_CACHE_VERSION, **meta}))
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        folder_id = entry.name.split("-", 1)[0]
        for old in parent.glob(f"{folder_id}-*"):
            if old != entry:
                shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass


def _decode_workers(n: int) -> int:
    if n < PARALLEL_MIN_IMAGES or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    from .device import usable_cores

    return max(1, min(usable_cores(), 8, math.ceil(n / DECODE_CHUNK)))


def _decode_images(files: Sequence[str], mode: str, wh: tuple[int, int]) -> np.ndarray:
    """uint8 (N, C, H, W): chunks decoded by worker processes (JPEG/PNG parsing holds the GIL)."""
    c = 1 if mode == "L" else 3
    out = np.empty((len(files), c, wh[1], wh[0]), np.uint8)
    bounds = [(s, min(s + DECODE_CHUNK, len(files))) for s in range(0, len(files), DECODE_CHUNK)]
    chunks = [files[s:e] for s, e in bounds]
    workers = _decode_workers(len(files))
    if workers == 1:
        results = (_decode_chunk(chunk, mode, wh) for chunk in chunks)
        for (s, e), images in zip(bounds, results):
            out[s:e] = images
        return out
    # NOTE: fork, not spawn: a spawned worker re-imports torch (seconds); the workers only run Pillow.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        for (s, e), images in zip(bounds, pool.map(_decode_chunk, chunks, repeat(mode), repeat(wh))):
            out[s:e] = images
    finally:
        pool.shutdown(cancel_futures=True)
    return out


def _decode_chunk(files: Sequence[str], mode: str, wh: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    c = 1 if mode == "L" else 3
    out = np.empty((len(files), c, wh[1], wh[0]), np.uint8)
    for i, f in enumerate(files):
        with _open_image(f, Image) as img:
            img = img.convert(mode)
            if img.size != wh:
                img = img.resize(wh, Image.BILINEAR)
            out[i] = np.asarray(img).reshape(wh[1], wh[0], c).transpose(2, 0, 1)
    return out


def _open_image(path: str | Path, Image):
    try:
        img = Image.open(path)
        img.load()
        return img
    except Exception as e:   # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad files
        raise DatasetError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _read_superclasses(class_root: Path, path: Path, classes: list[str]):
    """The optional reference hierarchy beside the class folders (workbench/hierarchy_file.py:
    hierarchy.json, {class_name: group name or index}) -> (groups, names, source) or Nones."""
    from .hierarchy_file import read_hierarchy

    try:
        return read_hierarchy([class_root, path], classes)
    except ValueError as e:  # malformed, too large, too deeply nested, or not covering the classes
        raise DatasetError(str(e)) from None


# ----------------------------------------------------------------------------- Tiny ImageNet

def _load_tiny_imagenet(split: str, root, size: Optional[int] = None) -> ImageDataset:
    """The official tiny-imagenet-200 layout (workbench/tinyimagenet.py); `val` is the test split.

    Decoded once into the same uint8 cache as image folders (always RGB: the
    official set has some grey JPEGs). Reference hierarchy: WordNet 3.0 cut into
    10 groups (workbench/wordnet.py). Images keep their size (64x64 officially)
    unless `size` is given.
    """
    from . import tinyimagenet as tin
    from .wordnet import read_table, wordnet_groups

    folder = tin.find_root(_search_bases(root))
    wnids, classes, train, val = tin.read_layout(folder)
    if split == "test" and not val:
        raise DatasetError(f"{folder}: no val/val_annotations.txt, so there is no labelled test split")
    items = {"train": [(str(f), lbl) for f, lbl in train], "test": [(str(f), lbl) for f, lbl in val]}
    images, mean, std = _decoded_split(folder, items, split, {"size": size, "mode": "RGB", "layout": "tiny-imagenet"})
    labels = torch.tensor([lbl for _, lbl in items[split]], dtype=torch.int64)
    table = read_table()
    groups = names = source = None
    if all(w in table for w in wnids):
        k = min(tin.WORDNET_GROUPS, len(wnids))
        groups, names = wordnet_groups([table[w]["paths"] for w in wnids], k)
        source = f"WordNet 3.0 hypernyms cut into {k} groups (workbench/wordnet.py) — a reference, not official labels"
    return ImageDataset("tiny-imagenet", split, torch.from_numpy(images), labels, classes, mean, std, groups, names,
                        source, hflip=True)


# ----------------------------------------------------------------------------- synthetic

SYNTHETIC_PATTERNS = ["hstripes", "vstripes", "checker", "rings", "spokes", "dots"]
SYNTHETIC_PATTERN_NAMES = ["horizontal stripes", "vertical stripes", "checkerboard", "rings", "spokes", "dot grid"]


def _load_synthetic(split: str = "train", seed: int = 0, num_train: int = 4800, num_test: int = 1600,
                    num_classes: int = 16, num_groups: int = 4) -> ImageDataset:
    """A 28x28 grey dataset with a designed class hierarchy, generated in code (offline, ~0.2 s CPU).

    Design. Each *group* has its own coarse texture in the outer frame of the
    image (horizontal stripes, vertical stripes, checkerboard, rings, spokes,
    dot grid), at high contrast: groups are never confused. Each *class* within
    a group is a point on a small circle in (disk radius, disk brightness) space
    for a disk in the centre, e.g. large / bright / small / dim for 4 classes.
    Per image the radius and brightness are jittered (sd 0.75 px and 0.075), the
    whole image is shifted by up to 1 px, the texture contrast varies, and pixel
    noise (sd 0.12) is added: neighbouring classes on the circle overlap, so
    classes are confused with the others in their group and nowhere else.
    Every ingredient is symmetric under a horizontal flip, so `hflip` is True.

    Measured (defaults, seed 0, on the 1600 test images; chance is 1/16 = 6%):
    - LogisticRegression(C=0.05) on the 4800 train images pooled 2x2: 75.5%
      accuracy, 100% of the errors within the designed groups (on 960 train
      images pooled 4x4, as in tests/test_data.py: 55%, 100%).
    - vit-4x64, 10 epochs, AdamW lr 1e-3 with `augment` (crop + flip): 71.1%
      accuracy (per class 56-82%), >= 99.7% of the errors within groups from
      epoch 2 on, 100% at the end; spectral clustering of the symmetrised
      confusion matrix recovers the groups exactly (ARI 1.0).
    """
    if not 2 <= num_groups <= len(SYNTHETIC_PATTERNS):
        raise DatasetError(f"synthetic: need 2 <= num_groups <= {len(SYNTHETIC_PATTERNS)}, got {num_groups}")
    if not 2 * num_groups <= num_classes <= 8 * num_groups:
        raise DatasetError(f"synthetic: need 2..8 classes per group, i.e. {2 * num_groups} <= num_classes <= "
                           f"{8 * num_groups}, got num_classes={num_classes}")
    if num_train < 1 or num_test < 1:
        raise DatasetError(f"synthetic: num_train and num_test must be >= 1, got {num_train}, {num_test}")
    group_of, class_names = _synthetic_classes(num_classes, num_groups)
    args = dict(group_of=group_of, num_groups=num_groups)
    train_images, train_labels = _synthetic_images(num_train, np.random.default_rng([seed, 0]), **args)
    if split == "train":
        images, labels = train_images, train_labels
    else:
        images, labels = _synthetic_images(num_test, np.random.default_rng([seed, 1]), **args)
    mean, std = channel_stats(train_images)
    return ImageDataset(
        "synthetic", split, images, labels, class_names, mean, std,
        reference_groups=group_of.tolist(), reference_group_names=SYNTHETIC_PATTERN_NAMES[:num_groups],
        reference_source="synthetic: designed groups", hflip=True)


def _synthetic_detail(k: int, size: int) -> tuple[float, float]:
    """Class k of a group of `size`: (radius offset, brightness offset) directions on a unit circle."""
    a = 2 * math.pi * k / size
    return math.cos(a), math.sin(a)


def _synthetic_classes(num_classes: int, num_groups: int) -> tuple[np.ndarray, list[str]]:
    """Contiguous groups of (nearly) equal size, and names like "rings:large" or "rings:small+dim"."""
    group_of = np.concatenate([np.full(len(c), g) for g, c in
                               enumerate(np.array_split(np.arange(num_classes), num_groups))])
    names = []
    for g in range(num_groups):
        size = int((group_of == g).sum())
        for k in range(size):
            dr, db = _synthetic_detail(k, size)
            words = []
            if abs(dr) > 0.38:
                words.append("large" if dr > 0 else "small")
            if abs(db) > 0.38:
                words.append("bright" if db > 0 else "dim")
            names.append(f"{SYNTHETIC_PATTERNS[g]}:{'+'.join(words)}")
    if len(set(names)) != len(names):   # cannot happen for <= 8 classes per group; keep names unique anyway
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return group_of, names


def _synthetic_images(n: int, rng: np.random.Generator, group_of: np.ndarray,
                      num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes = len(group_of)
    labels = rng.permutation(np.arange(n) % num_classes)               # balanced classes
    size = 28
    grid = np.arange(size, dtype=np.float32) - (size - 1) / 2
    shift = rng.uniform(-1, 1, (2, n, 1, 1)).astype(np.float32)        # whole-image jitter, px
    y = grid[None, :, None] - shift[0]
    x = grid[None, None, :] - shift[1]
    y, x = np.broadcast_to(y, (n, size, size)), np.broadcast_to(x, (n, size, size))
    r = np.sqrt(x * x + y * y)

    # Group: a coarse texture in the frame around a central window of radius 9.
    w = np.float32(2 * np.pi / 7)                                      # texture period 7 px
    group = group_of[labels]
    texture = np.empty((n, size, size), np.float32)
    for g in range(num_groups):
        m = group == g
        xs, ys, rs = x[m], y[m], r[m]
        texture[m] = {
            "hstripes": lambda: np.cos(w * ys),
            "vstripes": lambda: np.cos(w * xs),
            "checker": lambda: np.sign(np.cos(w * xs) * np.cos(w * ys)),
            "rings": lambda: np.cos(w * rs),
            "spokes": lambda: np.cos(6 * np.arctan2(ys, xs)),
            "dots": lambda: np.clip(np.cos(w * xs) + np.cos(w * ys), 0, None) - 0.5,
        }[SYNTHETIC_PATTERNS[g]]()
    frame = 1 / (1 + np.exp((np.float32(9.0) - r) / np.float32(0.6)))
    contrast = rng.uniform(0.30, 0.45, (n, 1, 1)).astype(np.float32)
    img = np.float32(0.4) + contrast * texture * frame

    # Class: a central disk whose (radius, brightness) sit on a circle around (5.5 px, 0.78).
    group_size = np.bincount(group_of)
    first = np.searchsorted(group_of, np.arange(num_groups))          # groups are contiguous
    table = np.array([_synthetic_detail(c - int(first[g]), int(group_size[g])) for c, g in enumerate(group_of)])
    detail = table[labels]                                             # (n, 2) directions on the circle
    radius = (5.5 + 1.4 * detail[:, 0] + rng.normal(0, 0.75, n)).astype(np.float32)[:, None, None]
    bright = (0.78 + 0.12 * detail[:, 1] + rng.normal(0, 0.075, n)).astype(np.float32)[:, None, None]
    disk = 1 / (1 + np.exp((r - radius) / np.float32(0.4)))
    img = img * (1 - disk) + bright * disk
    img += np.float32(0.12) * rng.standard_normal(img.shape, dtype=np.float32)   # pixel noise
    images = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))



# ----------------------------------------------------------------------------- command line

def main(argv=None) -> None:
    """`python -m workbench.data download tiny-imagenet [--root DIR]` (needs internet; nothing else downloads)."""
    import argparse

    from . import tinyimagenet as tin

    ap = argparse.ArgumentParser(prog="python -m workbench.data", description="Fetch a dataset for the workbench.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="download and check a dataset")
    d.add_argument("dataset", choices=["tiny-imagenet"])
    d.add_argument("--root", default=None, help="where to put it (default: $WORKBENCH_DATA, else ./data)")
    args = ap.parse_args(argv)
    print(tin.TERMS)
    try:
        folder = tin.download(_download_base(args.root), url=tin.URL, md5=tin.MD5)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    print(f"Tiny ImageNet is in {folder}; train with --dataset tiny-imagenet --data-root {folder.parent}")


if __name__ == "__main__":
    main()
