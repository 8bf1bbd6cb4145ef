"""What every benchmark shares: side-by-side timing, one training step, result rows, the machine.

Imports only the standard library, torch and `workbench.models`/`workbench.train`
(which import nothing else at module level), so a section can also run in the
separate venv that has timm (see benchmarks/peer.py).

A result row is a plain dict, so sections can run in subprocesses and hand
their rows back as JSON (`--json`):
    section, measurement, ours, comparison   (strings with units)
    ratio (float), ratio_kind                (what the ratio means, e.g. "time ours / dense")
    target (string or ""), met (True / False / None)
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

JSON_MARKER = "BENCHMARK-ROWS-JSON:"


def interleaved_times(fns: dict, repeats: int, warmup: int = 2,
                      clock: Callable[[], float] = time.perf_counter) -> dict:
    """Seconds of every call of each fn, `repeats` rounds of one call each, interleaved so that slow
    phases of a shared machine hit every candidate alike; round i of one fn pairs with round i of another."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def medians(times: dict) -> dict:
    """{name: median} of `interleaved_times`' {name: per-round seconds}."""
    return {name: statistics.median(t) for name, t in times.items()}


def side_by_side(fns: dict, repeats: int, warmup: int = 2, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Median seconds per call of each fn, interleaved (see `interleaved_times`)."""
    return medians(interleaved_times(fns, repeats, warmup, clock))


def paired_ratios(times: dict, numerator: str, denominator: str) -> tuple:
    """(median, 25th, 75th percentile) of the per-round ratio numerator / denominator of
    `interleaved_times`: pairing rounds cancels the machine's slow phases, and the quartiles
    say how much of a small difference is noise."""
    ratios = sorted(a / b for a, b in zip(times[numerator], times[denominator]))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return statistics.median(ratios), q1, q3


def train_step(model: torch.nn.Module, batch_size: int, amp_dtype=None, ours: bool = True, seed: int = 0,
               img_size: int = 28, in_chans: int = 1, num_classes: int = 10) -> Callable[[], None]:
    """A closure doing one training step the way workbench.train does: forward under autocast (or
    not), cross-entropy with label smoothing (+ the MoE's aux losses), backward, clipping, AdamW.

    `ours=False` for a peer model whose forward returns logits only. Random inputs: data loading
    is not measured.
    """
    from workbench.train import param_groups

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_chans, img_size, img_size, generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)

    def step() -> None:
        with torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            if ours:
                out = model(x, return_routing=True, labels=y)
                logits, aux = out.logits, out.total_aux_loss
            else:
                logits, aux = model(x), 0.0
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def largest_sample(family: Optional[str] = None) -> Optional[Path]:
    """The shipped sample checkpoint with the most parameters (of `family`, if given), or None.
    Unreadable cards are skipped."""
    from workbench.checkpoint import list_checkpoints, read_card
    from workbench.paths import samples_dir

    found = []
    for path in list_checkpoints(samples_dir()):
        try:
            card = read_card(path)
        except ValueError:
            continue
        if family is None or (card.get("config") or {}).get("family") == family:
            found.append(((card.get("params") or {}).get("total") or 0, (path / "model.safetensors").stat().st_size,
                          path))
    return max(found)[2] if found else None


def native_bf16() -> bool:
    from workbench.train import cpu_has_native_bf16

    return cpu_has_native_bf16()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_level() -> str:
    """The CPU's vector ISA as the figures see it: AVX2 / AVX-512 / AMX, with bf16 support, and a cap
    set through ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA named as a simulation."""
    try:
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                         if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return platform.machine()
    real = ("AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
            else "no AVX2")
    real += " with AVX512-BF16" if "avx512_bf16" in flags else ""
    real += ", no AMX" if "avx512f" in flags and "amx_tile" not in flags else ""
    caps = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)}
    if caps:
        level = torch.backends.cpu.get_cpu_capability()
        return (f"{level} (simulated on an {real} CPU: " + ", ".join(f"{k}={v}" for k, v in caps.items()) + ")")
    return real


def machine() -> dict:
    """What the figures depend on: CPU, cores, threads, ISA, torch, load at the time."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "memory": mem,
            "capability": torch.backends.cpu.get_cpu_capability(), "isa": isa_level(), "native_bf16": native_bf16(),
            "torch": torch.__version__, "python": platform.python_version(), "load_average": [round(v, 2) for v in load]}


def row(section: str, measurement: str, ours: str, comparison: str, ratio: Optional[float], ratio_kind: str,
        target: str = "", met: Optional[bool] = None) -> dict:
    return {"section": section, "measurement": measurement, "ours": ours, "comparison": comparison,
            "ratio": None if ratio is None else round(float(ratio), 4), "ratio_kind": ratio_kind,
            "target": target, "met": met}


def skipped(section: str, measurement: str, why: str) -> dict:
    return row(section, measurement, "skipped", why, None, "")


def format_ratio(r: dict) -> str:
    if r["ratio"] is None:
        return ""
    kind = r["ratio_kind"]
    if kind.startswith("fraction"):      # "fraction of peak" -> "34% (of peak)"
        detail = kind.removeprefix("fraction").strip()
        return f"{100 * r['ratio']:.0f}%" + (f" ({detail})" if detail else "")
    return f"{r['ratio']:.2f}× ({kind})"


def markdown_table(rows: list) -> str:
    lines = ["| section | measurement | ours | comparison | ratio | target | met |",
             "|---|---|---:|---:|---:|---|:-:|"]
    for r in rows:
        met = {True: "✓", False: "✗", None: ""}[r["met"]]
        lines.append(f"| {r['section']} | {r['measurement']} | {r['ours']} | {r['comparison']} | "
                     f"{format_ratio(r)} | {r['target']} | {met} |")
    return "\n".join(lines)


def emit(rows: list, as_json: bool) -> None:
    """Print the rows: a markdown table, or (for the aggregator) one JSON line after a marker."""
    if as_json:
        print(JSON_MARKER + json.dumps({"rows": rows, "machine": machine()}), flush=True)
    else:
        print(markdown_table(rows), flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"
