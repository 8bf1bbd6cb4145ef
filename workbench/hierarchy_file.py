"""An image folder's reference hierarchy: `hierarchy.json` beside the class folders.

    {"cat": "pets", "dog": "pets", "frog": "wild"}      class name -> group name (or group index)

It is the human grouping that discovered super-classes are scored against (ARI/NMI in the
pipeline's report, the Super-classes vs hierarchy page), like CIFAR-100's coarse labels. It is
not the pipeline's super-class *map* (workbench/superclass_map.py: {"classes": {...},
"num_groups": E, ...}), which routes a model and is written as `superclasses.json`.

Image folders used to carry this file as `superclasses.json` too. That name is still read for
one release when the file is in this format (with a FutureWarning and a note in the dataset's
`reference_source`); a super-class map found under it is left alone, never misread as a hierarchy.

`python -m workbench.pipeline` writes `hierarchy-template.json` in this format (each class -> the
name of its discovered super-class): edit it and copy it beside the class folders as hierarchy.json.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

HIERARCHY_FILE = "hierarchy.json"
OLD_NAME = "superclasses.json"            # read until the next release when in this format
TEMPLATE_FILE = "hierarchy-template.json"  # what the pipeline writes for the user to edit
MAX_BYTES = 1 << 20


def is_hierarchy(obj) -> bool:
    """Is `obj` in this format (an object of class name -> group name or index)? A super-class map
    (its values are objects and lists) is not."""
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in obj.values())


def parse_hierarchy(mapping, classes: Sequence[str], source) -> tuple[list[int], list[str]]:
    """-> (group index per class, group names); ValueError naming `source` and the rule."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{source}: expected an object {{class_name: group}}, got {type(mapping).__name__}")
    missing, unknown = sorted(set(classes) - set(mapping)), sorted(set(mapping) - set(classes))
    if missing or unknown:
        raise ValueError(f"{source}: must map every class folder to a group; missing {missing}, unknown {unknown}")
    if not is_hierarchy(mapping):
        raise ValueError(f"{source}: each class must map to a group name or a group index")
    values = [mapping[c] for c in classes]
    if all(isinstance(v, int) for v in values):
        order = sorted(set(values))
        names = [f"group {v}" for v in order]
    else:   # group names: numbered in order of first appearance
        values = [str(v) for v in values]
        order = list(dict.fromkeys(values))
        names = order
    return [order.index(v) for v in values], names


def read_hierarchy(folders: Sequence[Path], classes: Sequence[str]):
    """The hierarchy beside the class folders (first of `folders` that has one) -> (groups, names,
    source) or (None, None, None). ValueError for a file that is malformed, too large or too deep."""
    from .safejson import read

    for name in (HIERARCHY_FILE, OLD_NAME):
        for path in (Path(f) / name for f in folders):
            if not path.is_file():
                continue
            try:
                mapping = read(path, max_bytes=MAX_BYTES)
            except OSError as e:
                raise ValueError(f"{path}: cannot be read ({e})") from None
            if name == OLD_NAME and not is_hierarchy(mapping):
                continue   # a super-class map (the pipeline's format) left here: not a hierarchy
            groups, names = parse_hierarchy(mapping, classes, path)
            if name == HIERARCHY_FILE:
                return groups, names, f"{HIERARCHY_FILE} ({path})"
            warnings.warn(f"{path}: the reference hierarchy file is now called {HIERARCHY_FILE}; rename it "
                          f"(the name {OLD_NAME} is read for one more release)", FutureWarning, stacklevel=2)
            return groups, names, f"{OLD_NAME} ({path}; deprecated name: rename it to {HIERARCHY_FILE})"
    return None, None, None


def hierarchy_template(classes: Sequence[str], assignment: Sequence[int], group_names: Sequence[str]) -> dict:
    """{class: its group's name}, the names made unique so the file reads back as the same grouping."""
    names = list(group_names)
    if len(set(names)) < len(names):
        names = [f"{n} (group {g})" for g, n in enumerate(names)]
    return {c: names[int(g)] for c, g in zip(classes, assignment)}


def write_hierarchy(path, mapping: dict) -> None:
    """Write a hierarchy file atomically (after checking it is one)."""
    from .runs import atomic_write_json

    parse_hierarchy(mapping, list(mapping), path)
    atomic_write_json(path, mapping)

