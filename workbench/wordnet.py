"""WordNet 3.0 hypernym paths of ImageNet classes, and groups cut from them.

ImageNet class ids are WordNet noun offsets (`n01443537` = goldfish), so the
super-classes a confusion graph yields can be judged against a human
hierarchy. The project ships the derived table (class -> every hypernym path,
root first) in `workbench/resources/tiny_imagenet_wordnet.tsv`, made by
`python -m workbench.wordnet derive` from Debian's `wordnet-base` (WordNet 3.0;
its licence is in `workbench/resources/WORDNET_LICENSE`); the database itself
is not shipped.

`wordnet_groups(paths, k)` cuts the hierarchy into exactly k groups: classes
are clustered (scikit-learn, average linkage) by how deep their lowest common
hypernym lies, so two dog breeds are close and a dog and a teapot are far; each
group is named by its members' lowest common hypernym.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence

import numpy as np

RESOURCES = Path(__file__).resolve().parent / "resources"
TINY_IMAGENET_TABLE = RESOURCES / "tiny_imagenet_wordnet.tsv"
DATA_NOUN = Path("/usr/share/wordnet/data.noun")     # Debian: wordnet-base
_WNID = re.compile(r"n\d{8}")

__all__ = ["read_data_noun", "hypernym_paths", "read_table", "write_table", "wordnet_groups", "wnids_of",
           "path_text"]

Path_ = list[tuple[str, str]]   # [(wnid, lemma)], root first


def read_data_noun(path: Path = DATA_NOUN) -> dict[str, tuple[str, list[str]]]:
    """{wnid: (first lemma, [hypernym wnids])} from WordNet's data.noun (`@` and `@i` pointers)."""
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" "):                   # licence header
                continue
            fields = line.split(" | ")[0].split()
            offset, w_cnt = fields[0], int(fields[3], 16)
            lemma = fields[4]
            p = 4 + 2 * w_cnt
            hypernyms = []
            for i in range(int(fields[p])):
                symbol, target, pos = fields[p + 1 + 4 * i: p + 4 + 4 * i]
                if symbol in ("@", "@i") and pos == "n":
                    hypernyms.append("n" + target)
            out["n" + offset] = (lemma, hypernyms)
    return out


def hypernym_paths(wnid: str, db: dict) -> list[Path_]:
    """Every path from the root ('entity') down to `wnid`, sorted, as [(wnid, lemma), ...]."""
    if wnid not in db:
        raise ValueError(f"{wnid} is not a WordNet 3.0 noun synset")
    lemma, parents = db[wnid]
    if not parents:
        return [[(wnid, lemma)]]
    return sorted(p + [(wnid, lemma)] for parent in parents for p in hypernym_paths(parent, db))


def write_table(path: Path, wnids: Sequence[str], names: Sequence[str], db: dict) -> None:
    """One line per class: wnid, name, then each hypernym path as `wnid:lemma/wnid:lemma/...`."""
    lines = ["# wnid\tname\thypernym paths (root first; WordNet 3.0, see WORDNET_LICENSE)\n"]
    for wnid, name in zip(wnids, names):
        paths = ["/".join(f"{w}:{lemma}" for w, lemma in p) for p in hypernym_paths(wnid, db)]
        lines.append("\t".join([wnid, name, *paths]) + "\n")
    Path(path).write_text("".join(lines))


def read_table(path: Path = TINY_IMAGENET_TABLE) -> dict[str, dict]:
    """{wnid: {"name": str, "paths": [[(wnid, lemma), ...], ...]}} in file order."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        wnid, name, *paths = line.split("\t")
        if not _WNID.fullmatch(wnid) or not paths:
            raise ValueError(f"{path}:{n}: expected 'wnid<TAB>name<TAB>path...', got {line[:80]!r}")
        out[wnid] = {"name": name, "paths": [[tuple(node.split(":", 1)) for node in p.split("/")] for p in paths]}
    return out


def wnids_of(class_names: Sequence[str], table: dict) -> list[str] | None:
    """The WordNet ids of classes named as our datasets name them (first name in words.txt), or None.

    Cards store class names, not ids; this finds the ids again for the
    classes of a Tiny ImageNet checkpoint, so its WordNet reference needs no data.
    """
    by_name: dict[str, str] = {}
    for wnid, entry in table.items():
        by_name.setdefault(entry["name"].split(",")[0].strip(), wnid)
        by_name.setdefault(wnid, wnid)
    out = [by_name.get(str(c).strip()) for c in class_names]
    return None if any(w is None for w in out) or len(set(out)) != len(out) else out


def path_text(paths: list[Path_]) -> str:
    """The first hypernym path without its 4 most general nodes (entity › physical entity › object › whole)."""
    lemmas = [lemma.replace("_", " ") for _, lemma in paths[0]]
    return " › ".join(lemmas[4:] if len(lemmas) > 6 else lemmas)


def _ancestors(paths: list[Path_]) -> dict[str, int]:
    """{ancestor wnid: its greatest depth on any of the class's paths} (root depth 1)."""
    depth: dict[str, int] = {}
    for p in paths:
        for d, (w, _) in enumerate(p, 1):
            depth[w] = max(depth.get(w, 0), d)
    return depth


def wordnet_groups(paths: Sequence[list[Path_]], k: int) -> tuple[list[int], list[str]]:
    """Cut the classes' hierarchy into exactly `k` groups -> (group per class, group names).

    Distance between two classes: 1 - depth(deepest common hypernym) / the
    deeper of the two classes. Groups come from average-linkage clustering on
    that distance and are numbered by size (largest first).
    """
    from sklearn.cluster import AgglomerativeClustering

    n = len(paths)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of classes), got {k}")
    anc = [_ancestors(p) for p in paths]
    own = [max(a.values()) for a in anc]
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            common = max((min(anc[i][w], anc[j][w]) for w in anc[i].keys() & anc[j].keys()), default=0)
            dist[i, j] = dist[j, i] = 1 - common / max(own[i], own[j])
    if k == n:
        labels = np.arange(n)
    elif k == 1:
        labels = np.zeros(n, dtype=int)
    else:
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(dist)
    order = sorted(range(k), key=lambda g: (-(labels == g).sum(), np.flatnonzero(labels == g)[0]))
    groups = [order.index(int(g)) for g in labels]
    names = [_common_name([paths[i] for i in range(n) if groups[i] == g]) for g in range(k)]
    repeated = {name for name in names if names.count(name) > 1}
    for g, name in enumerate(names):       # two groups under one hypernym: name each by its first member too
        if name in repeated:
            names[g] = f"{name} ({paths[groups.index(g)][0][-1][1].replace('_', ' ')}, …)"
    return groups, names


def _common_name(members: list[list[Path_]]) -> str:
    """The lemma of the deepest hypernym shared by every member (on any of its paths)."""
    shared = set.intersection(*(set(_ancestors(p)) for p in members))
    best = max(shared, key=lambda w: min(_ancestors(p)[w] for p in members))
    return next(lemma for path in members[0] for w, lemma in path if w == best).replace("_", " ")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m workbench.wordnet",
                                 description="Derive the shipped WordNet table of the Tiny ImageNet classes.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("derive", help="write the table from WordNet's data.noun (Debian: wordnet-base)")
    d.add_argument("--wnids", required=True, help="wnids.txt (one class id per line, label order)")
    d.add_argument("--words", help="words.txt (wnid<TAB>names) for the class names")
    d.add_argument("--data-noun", default=str(DATA_NOUN))
    d.add_argument("--out", default=str(TINY_IMAGENET_TABLE))
    args = ap.parse_args(argv)
    wnids = [w.strip() for w in Path(args.wnids).read_text().split() if w.strip()]
    words = {}
    if args.words:
        for line in Path(args.words).read_text().splitlines():
            w, _, name = line.partition("\t")
            words[w] = name.strip()
    db = read_data_noun(Path(args.data_noun))
    write_table(Path(args.out), wnids, [words.get(w, db[w][0]) for w in wnids], db)
    print(f"wrote {len(wnids)} classes to {args.out}")


if __name__ == "__main__":
    main()
