"""Data path: `imagefolder:` cold and warm load time, and peak memory.

    python -m benchmarks.data_path [--folder PATH] [--images 50000] [--quick] [--json]

Without --folder, N synthetic 32x32 RGB JPEGs in 10 class folders (smooth random
fields plus noise, about 1 KB each like CIFAR-10's) are written once into
$TMPDIR/workbench-bench-jpegs-N and reused. The JPEG files sit in the OS page
cache: "cold" means no decoded cache yet, not a cold disk. Rows:
- cold load of the train split (fresh WORKBENCH_CACHE; decodes and caches both
  splits) vs the loader before the cache (one thread, statistics in float64),
  target <= 10 s;
- warm load of each split, target <= 1 s;
- peak memory of the cold load: this process's resident-set high-water mark
  above its level before the load (decode workers hold one chunk each) vs the
  decoded dataset, target <= 1.5x; and the old loader's peak beside it.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import emit, row  # noqa: E402
from workbench import data  # noqa: E402

SECTION = "data path"


def write_jpegs(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """n 32x32 RGB JPEGs in `classes` folders, written once (a `.complete` marker says the set is whole)."""
    from PIL import Image

    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(seed)
    per = n // classes
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.uniform(0, 255, (per, 4, 4, 3))
        for i in range(per):
            smooth = np.asarray(Image.fromarray(low[i].astype(np.uint8)).resize((32, 32), Image.BICUBIC))
            noisy = smooth.astype(np.int16) + rng.integers(-12, 13, (32, 32, 3))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    (root / ".complete").write_text("")
    return root


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def timed_with_peak(fn):
    """((wall s, CPU s of this process), peak resident bytes above the level before the call or None,
    result). CPU time beside wall time: on a busy machine the wall time mostly measures the others."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")       # reset the high-water mark (Linux)
        base = _status_kb("VmRSS")
    except (OSError, KeyError):
        base = None
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    seconds = (time.perf_counter() - t0, time.process_time() - c0)
    peak = None if base is None else (_status_kb("VmHWM") - base) * 1024
    return seconds, peak, result


def old_loader(name: str, split: str) -> torch.Tensor:
    """The imagefolder loader before the cache: serial decode into HWC, a permuted copy, float64 statistics."""
    _, _, items = data._imagefolder_items(name, Path(name.split(":", 1)[1]), 0, 0.2)
    files = [f for f, _ in items[split]]
    from PIL import Image

    out = np.empty((len(files), 32, 32, 3), np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as img:
            out[i] = np.asarray(img.convert("RGB"))
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    x = images.transpose(0, 1).reshape(3, -1).double() / 255.0
    x.mean(1), x.std(1, unbiased=False)
    return images


def measure(folder: Path) -> list:
    name = f"imagefolder:{folder}"
    jpegs = sorted(folder.glob("*/*.jpg"))
    n_files = len(jpegs)
    for f in jpegs:       # into the OS page cache first: both loaders then read from memory, whichever runs first
        f.read_bytes()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
        os.environ["WORKBENCH_CACHE"] = cache
        cold_s, cold_peak, train = timed_with_peak(lambda: data.load_dataset(name, "train"))
        n_train = len(train)
        del train
        warm = {s: timed_with_peak(lambda s=s: data.load_dataset(name, s)) for s in data.SPLITS}
        decoded = (n_train + len(warm["test"][2])) * 3 * 32 * 32
        warm = {s: v[:2] for s, v in warm.items()}
        touched = timed_with_peak(lambda: int(data.load_dataset(name, "train").images.sum()))[0]
        gc.collect()
        old_s, old_peak, _ = timed_with_peak(lambda: old_loader(name, "train"))
    what = f"{n_files} JPEGs 32x32 ({n_train} train)"
    mb = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MB"
    workers = data._decode_workers(n_files)
    rows = [row(SECTION, f"imagefolder cold load of the train split, {what}: decode both splits "
                f"(worker processes: {workers}; CPU time of this process only) + cache vs before: serial decode of the split, "
                "float64 statistics", f"{cold_s[0]:.1f} s (CPU {cold_s[1]:.1f} s)",
                f"{old_s[0]:.1f} s (CPU {old_s[1]:.1f} s)", old_s[0] / cold_s[0], "speed-up", "≤ 10 s",
                cold_s[0] <= 10)]
    for split, (seconds, _) in warm.items():
        rows.append(row(SECTION, f"imagefolder warm load (decoded cache, memory-mapped: pages are read on first "
                        f"use) of the {split} split, {what}", f"{seconds[0]:.2f} s (CPU {seconds[1]:.2f} s)", "1 s",
                        seconds[0], "time / target", "≤ 1 s", seconds[0] <= 1))
    rows.append(row(SECTION, f"imagefolder warm load of the train split then one pass over every pixel, {what}",
                    f"{touched[0]:.2f} s (CPU {touched[1]:.2f} s)", "", None, ""))
    if cold_peak is not None:
        rows.append(row(SECTION, f"imagefolder cold load, peak memory above the start vs the decoded dataset "
                        f"({mb(decoded)}, both splits); before: {mb(old_peak)} for the train split alone",
                        mb(cold_peak), mb(decoded), cold_peak / decoded, "peak / decoded size", "≤ 1.5×",
                        cold_peak <= 1.5 * decoded))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=None, help="an existing imagefolder (class sub-folders of JPEGs)")
    ap.add_argument("--images", type=int, default=50000, help="how many JPEGs to generate without --folder")
    ap.add_argument("--quick", action="store_true", help="2000 images (a smoke run, not figures to quote)")
    ap.add_argument("--json", action="store_true", help="rows as JSON for `python -m benchmarks`")
    args = ap.parse_args()
    n = 2000 if args.quick else args.images
    folder = Path(args.folder) if args.folder else write_jpegs(
        Path(tempfile.gettempdir()) / f"workbench-bench-jpegs-{n}", n)
    emit(measure(folder), args.json)


if __name__ == "__main__":
    main()
