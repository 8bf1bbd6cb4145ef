"""Tiny ImageNet (CS231n): 200 ImageNet classes, 500 training and 50 validation images each.

The paper's setting in miniature: its classes are WordNet synsets, so the
super-classes found from a confusion graph can be judged against WordNet
(`workbench/wordnet.py`). Read from the official layout, at any image size:

    tiny-imagenet-200/wnids.txt, words.txt
    tiny-imagenet-200/train/<wnid>/images/*.JPEG
    tiny-imagenet-200/val/images/*.JPEG + val/val_annotations.txt

The official test split has no labels, so `val` is our test split. Terms:
ImageNet allows use for non-commercial research and education only and no
redistribution — the project ships weights and cards, never the images.
`python -m workbench.data download tiny-imagenet [--root DIR]` fetches the
official archive for users with internet (nothing downloads in tests).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional

FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
WORDNET_GROUPS = 10           # the paper's E: the dataset's reference hierarchy is WordNet cut into 10 groups
TERMS = ("Tiny ImageNet is a subset of ImageNet. ImageNet's terms of access allow its use only for "
         "non-commercial research and educational purposes, and do not allow redistributing the images.")

__all__ = ["FOLDER", "URL", "TERMS", "TinyImageNetError", "find_root", "read_layout", "download", "extract"]


from .data import DatasetError, _md5


class TinyImageNetError(DatasetError):
    """The Tiny ImageNet folder or archive is missing or not in the official layout."""


def find_root(bases: list[tuple[Path, str]]) -> Path:
    """The `tiny-imagenet-200` folder under the first base that has it (or a base that is it)."""
    for base, _ in bases:
        for cand in (base / FOLDER, base):
            if (cand / "wnids.txt").is_file() and (cand / "train").is_dir():
                return cand
    looked = "\n".join(f"  {b / FOLDER}  ({why})" for b, why in bases)
    raise TinyImageNetError(
        f"Tiny ImageNet not found. Looked in:\n{looked}\nGet it with `python -m workbench.data download "
        f"tiny-imagenet --root DIR` (needs internet; {TERMS}) or point $WORKBENCH_DATA at the folder holding "
        f"{FOLDER}/.")


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise TinyImageNetError(f"{path}: cannot read ({e})") from None


def read_layout(root: Path) -> tuple[list[str], list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """-> (wnids in label order, class names, train (file, label) items, val items)."""
    wnids = [w.strip() for w in _lines(root / "wnids.txt")]
    if len(set(wnids)) != len(wnids) or len(wnids) < 2:
        raise TinyImageNetError(f"{root / 'wnids.txt'}: need at least 2 distinct class ids, got {len(wnids)}")
    label = {w: i for i, w in enumerate(wnids)}
    names = {}
    if (root / "words.txt").is_file():                    # the official file lists all 82k synsets
        for line in _lines(root / "words.txt"):
            w, _, text = line.partition("\t")
            if w in label:
                names[w] = text.split(",")[0].strip()
    classes = [names.get(w) or w for w in wnids]
    train = []
    for w in wnids:
        folder = root / "train" / w / "images"
        files = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
        if not files:
            raise TinyImageNetError(f"{folder}: no training images (*.JPEG) for class {w}")
        train += [(f, label[w]) for f in files]
    val = []
    ann = root / "val" / "val_annotations.txt"
    if ann.is_file():
        for n, line in enumerate(_lines(ann), 1):
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in label:
                raise TinyImageNetError(f"{ann}:{n}: expected 'file<TAB>wnid...' with a wnid from wnids.txt")
            f = root / "val" / "images" / Path(fields[0]).name
            if not f.is_file():
                raise TinyImageNetError(f"{ann}:{n}: {f} does not exist")
            val.append((f, label[fields[1]]))
    return wnids, classes, train, val


MAX_EXTRACTED_BYTES = 1 << 30      # the official archive holds ~250 MB of JPEGs: refuse anything past 1 GiB
MAX_MEMBERS = 250_000              # ... and ~120,000 files


def extract(archive: Path, dest: Path) -> Path:
    """Unpack the official zip into `dest` -> the dataset folder, all or nothing.

    Refused before anything is written: members that would land outside `dest`, more than
    MAX_MEMBERS files or MAX_EXTRACTED_BYTES in all once decompressed (zipfile never inflates a
    member past the size it declares). The tree is unpacked into a temporary folder beside the
    destination and moved into place only when complete, so a full disk or a kill leaves no
    partial dataset that a later run would take for a finished one.
    """
    dest = dest.resolve()
    final = dest / FOLDER
    try:
        with zipfile.ZipFile(archive) as z:
            members = z.infolist()
            for m in members:
                target = (dest / m.filename).resolve()
                if dest not in target.parents and target != dest:
                    raise TinyImageNetError(f"{archive}: member {m.filename!r} would be written outside {dest}")
            if not any(m.filename.rstrip("/") == f"{FOLDER}/wnids.txt" for m in members):
                raise TinyImageNetError(f"{archive}: no {FOLDER}/wnids.txt inside; not the Tiny ImageNet archive")
            total = sum(m.file_size for m in members)
            if len(members) > MAX_MEMBERS or total > MAX_EXTRACTED_BYTES:
                raise TinyImageNetError(f"{archive}: {len(members)} files, {total / 1e6:.0f} MB once unpacked; the "
                                        f"Tiny ImageNet archive has ~120,000 files and ~250 MB. Not unpacking it")
            dest.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=dest, prefix=f".{FOLDER}.partial-"))
            try:
                z.extractall(staging)
                if final.exists():
                    raise TinyImageNetError(f"{final} appeared while unpacking; remove it or use it")
                os.replace(staging / FOLDER, final)
            except OSError as e:
                raise TinyImageNetError(f"unpacking {archive} into {dest} failed ({e.strerror or e}); nothing was "
                                        "kept, free some space and run the download again") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except zipfile.BadZipFile as e:
        raise TinyImageNetError(f"{archive}: not a zip archive ({e})") from None
    return final


def download(root: Path, url: str = URL, md5: Optional[str] = MD5) -> Path:
    """Fetch the official archive into `root`, check its MD5, extract it -> the dataset folder."""
    root = Path(root).expanduser()
    if (root / FOLDER / "wnids.txt").is_file():
        return root / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix="tiny-imagenet-", suffix=".zip.part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            shutil.copyfileobj(r, f, 1 << 20)
        if md5 and _md5(Path(tmp)) != md5:
            raise TinyImageNetError(f"download of {url} has the wrong MD5 (expected {md5}); not using it")
        return extract(Path(tmp), root)
    except OSError as e:
        raise TinyImageNetError(f"could not download {url}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
