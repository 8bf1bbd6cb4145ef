"""The super-class map file: its schema, its one validator, its loader and writer.

    {"dataset": "fashion-mnist", "method": "spectral", "num_groups": E,
     "classes": {class name: group index 0..E-1}, "groups": [label per group]}

Written by the analysis (clustering a confusion graph, `analysis.superclasses`)
or by hand; read by training. Only the schema is checked here; whether E
equals the model's expert count is `ModelConfig`'s rule (one place).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from . import safejson
from .runs import atomic_write_json

MAX_MAP_BYTES = 4 * 1024 * 1024  # far above any real map (100 classes: ~3 KB)


def validate_map(mapping, where: str = "super-class map") -> int:
    """Check the schema; -> the number of groups E. ValueError in plain words otherwise."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be a JSON object")
    classes = mapping.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise ValueError(f'{where} needs "classes": {{class name: group index}}')
    bad = [k for k, v in classes.items() if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ValueError(f"{where}: group indices must be integers, not for {bad}")
    present = sorted(set(classes.values()))
    if present != list(range(len(present))):
        raise ValueError(f"{where}: group indices must be 0..E-1 with every group used, but got {present}")
    num_groups = len(present)
    if mapping.get("num_groups", num_groups) != num_groups:
        raise ValueError(f"{where}: num_groups is {mapping['num_groups']} but the classes use {num_groups} groups")
    labels = mapping.get("groups", [None] * num_groups)
    if not isinstance(labels, list) or len(labels) != num_groups:
        raise ValueError(f"{where}: 'groups' must be a list of {num_groups} group labels")
    if not isinstance(mapping.get("dataset", ""), (str, type(None))):
        raise ValueError(f"{where}: 'dataset' must be a dataset name")
    return num_groups


def parse_map(data: Union[bytes, str], where: str = "super-class map") -> dict:
    """JSON text or bytes (an upload, a file) -> a validated map."""
    if len(data) > MAX_MAP_BYTES:
        raise ValueError(f"{where} is {len(data)} bytes; a super-class map is at most {MAX_MAP_BYTES} bytes")
    mapping = safejson.loads(data, where, max_bytes=MAX_MAP_BYTES)   # malformed / too deep: a ValueError
    validate_map(mapping, where)
    return mapping


def read_map(path) -> dict:
    """A validated map from a file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"super-class map {path}: no such file")
    return parse_map(path.read_bytes(), f"super-class map {path}")


def assignment_for(mapping: dict, class_names: Sequence[str], where: str = "super-class map") -> list[int]:
    """Class index -> group for a dataset's `class_names` (in their order)."""
    classes = mapping["classes"]
    names = [str(c) for c in class_names]
    missing = [c for c in names if c not in classes]
    extra = [c for c in classes if c not in set(names)]
    if missing or extra:
        raise ValueError(f"{where} does not match the dataset's classes: missing {missing}, extra {extra}")
    return [int(classes[c]) for c in names]


def load_superclass_map(path, class_names: Sequence[str]) -> list[int]:
    """Class index -> group from a map file, checked against the dataset's `class_names`."""
    return assignment_for(read_map(path), class_names, f"super-class map {path}")


def save_superclass_map(path, mapping: dict) -> None:
    """Write a (validated) map as JSON atomically."""
    validate_map(mapping)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, mapping)


def for_training(spec: Optional[Union[str, dict]], dataset) -> Optional[dict]:
    """A run's super-classes in the card's form {"assignment", "names", "method", "file"}.

    `spec` is a map (dict), a map file, "reference" (the dataset's own hierarchy) or None.
    """
    if spec is None:
        return None
    if spec == "reference":
        if dataset.reference_groups is None:
            raise ValueError(f"dataset {dataset.name!r} has no reference hierarchy; pass a super-class map file")
        a = [int(g) for g in dataset.reference_groups]
        names = list(dataset.reference_group_names or [f"group {g}" for g in range(max(a) + 1)])
        return {"assignment": a, "names": names, "method": f"reference:{dataset.reference_source}", "file": None}
    mapping = spec if isinstance(spec, dict) else read_map(spec)
    where = "the super-class map" if isinstance(spec, dict) else f"super-class map {spec}"
    if isinstance(spec, dict):
        validate_map(mapping, where)
    made_for = mapping.get("dataset")
    if made_for and made_for != dataset.name:
        raise ValueError(f"{where} was made for {made_for!r} but the run uses {dataset.name!r}; choose that "
                         "dataset or make a map for this one on the Super-classes page")
    a = assignment_for(mapping, dataset.classes, where)
    names = mapping.get("groups") or [f"group {g}" for g in range(max(a) + 1)]
    return {"assignment": a, "names": [str(n) for n in names], "method": str(mapping.get("method", "file")),
            "file": None if isinstance(spec, dict) else str(spec)}
