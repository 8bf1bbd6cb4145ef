"""JSON from files the app did not write itself (cards, super-class maps, metrics), read within bounds.

Why: `json.loads` of 100,000 nested `[` raises `RecursionError` (not a
`ValueError`), and a deep or huge document that does parse still costs memory
and recursion in whatever walks it next (`st.json`, pandas, ...). Every such
read goes through `loads`/`read`, which refuse with a `JSONLimitError` (a
`ValueError`) that names the source and the limit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

MAX_DEPTH = 32          # cards nest 4 levels deep; maps and metrics 2
MAX_BYTES = 16 << 20    # a card with a 1000-class confusion matrix is ~5 MB


class JSONLimitError(ValueError):
    """A JSON document is malformed, too large, or nested too deeply."""


def depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, level)
        stack.extend((v, level + 1) for v in value if isinstance(v, (dict, list)))
    return deepest


def loads(data: Union[bytes, str], source: str = "JSON", max_bytes: int = MAX_BYTES,
          max_depth: int = MAX_DEPTH) -> Any:
    """Parse `data`; JSONLimitError (naming `source`) when it is malformed, over `max_bytes` or `max_depth`."""
    if len(data) > max_bytes:
        raise JSONLimitError(f"{source}: {len(data):,} bytes is more than the {max_bytes:,} accepted")
    try:
        value = json.loads(data)
    except RecursionError:
        raise JSONLimitError(f"{source}: nested more than {max_depth} levels deep") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JSONLimitError(f"{source}: not valid JSON ({e})") from None
    if depth(value) > max_depth:
        raise JSONLimitError(f"{source}: nested more than {max_depth} levels deep")
    return value


def read(path: Union[str, os.PathLike], max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """`loads` of a file, checking its size before reading it; OSError stays an OSError."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise JSONLimitError(f"{path}: {size:,} bytes is more than the {max_bytes:,} accepted")
    return loads(path.read_bytes(), str(path), max_bytes, max_depth)


__all__ = ["JSONLimitError", "MAX_BYTES", "MAX_DEPTH", "depth", "loads", "read"]
