"""Batch-1 latency (the "mobile" in Mobile V-MoE): dense vs per-image MoE vs per-token MoE.

    python -m benchmarks.batch1_latency [--width 192 --depth 12] [--repeats 30] [--compile] [--quick] [--json]

Same width and depth for all three: `vit-LxD`, `mvmoe-LxD-e10k1` (per-image
router, one expert per image: the dense MACs plus a router) and
`vmoe-LxD-e8k2` (per-token routing, two experts per token). fp32, eval mode,
inference_mode, 28x28x1 inputs. Batch 1 is timed in blocks of 20 calls, batch 256
one call at a time, the models interleaved round by round; a ratio is the median
of the per-round ratios, with their quartiles: on a shared 2-core VM, back-to-back
runs of the same code moved the batch-1 ratio between 0.99x and 1.14x, so the
quartiles say whether a few per cent are a difference or noise.
Eager and onnxruntime (each model exported by `workbench.export`, every expert in the graph,
same thread count; `--no-onnx` skips it) always; with --compile also `torch.compile` (inductor; minutes of
compiling on a 2-core machine), with a row saying whether it helps. Targets: per-image MoE <= 1.05x dense at batch 1, <= 1.02x at batch 256.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import emit, interleaved_times, medians, ms, paired_ratios, row  # noqa: E402
from workbench.models import create_model  # noqa: E402

SECTION = "batch-1 latency"
TARGETS = {1: 1.05, 256: 1.02}


def block(fn, calls: int):
    def run():
        for _ in range(calls):
            fn()
    return run


def compiled(model):
    """torch.compile of the forward, or None with the reason when it fails here."""
    try:
        fn = torch.compile(model, dynamic=False)
        return fn, ""
    except Exception as e:  # noqa: BLE001 - any backend failure becomes a row that says so
        return None, f"{type(e).__name__}: {e}"[:160]


def onnx_sessions(models: dict, folder: Path) -> dict:
    """Each model exported by workbench.export (all experts in the graph) -> an onnxruntime session
    with as many intra-op threads as torch uses, so the two runtimes get the same cores."""
    import onnxruntime as ort

    from workbench.export import check_all_experts_in_graph, export_onnx

    sessions = {}
    for name, model in models.items():
        path = export_onnx(model, folder / f"{name}.onnx", (1, 28, 28))
        check_all_experts_in_graph(model, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sessions


def measure_mode(models: dict, batch: int, repeats: int, mode: str, sessions: Optional[dict] = None) -> dict:
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    calls = 20 if batch == 1 else 1
    fns = {}
    for name, model in models.items():
        fn = model
        if mode == "compiled":
            fn, why = compiled(model)
            if fn is None:
                raise RuntimeError(why)
        if mode == "onnxruntime":
            feed = {"images": x.numpy()}
            fn = lambda x, s=sessions[name], feed=feed: s.run(["logits"], feed)  # noqa: E731
        fns[name] = block(lambda fn=fn: fn(x), calls)
    with torch.inference_mode():
        times = interleaved_times(fns, repeats, warmup=3)
    return {k: [v / calls for v in t] for k, t in times.items()}


def measure(width: int, depth: int, repeats: int, batches=(1, 256), modes=("eager", "compiled")) -> list:
    torch.manual_seed(0)
    shape = f"{depth}x{width}"
    names = {"dense": f"vit-{shape}", "image": f"mvmoe-{shape}-e10k1", "token": f"vmoe-{shape}-e8k2"}
    models = {k: create_model(v).eval() for k, v in names.items()}
    rows, eager, sessions = [], {}, None
    tmp = tempfile.TemporaryDirectory()
    for mode in modes:
        if mode == "onnxruntime":
            try:
                sessions = onnx_sessions(models, Path(tmp.name))
            except Exception as e:  # noqa: BLE001 - an export failure becomes a row that says so
                rows.append(row(SECTION, "onnxruntime", "skipped", f"{type(e).__name__}: {e}"[:200], None, ""))
                continue
        for batch in batches:
            try:
                times = measure_mode(models, batch, repeats if batch == 1 else max(3, repeats // 3), mode, sessions)
            except Exception as e:  # noqa: BLE001
                rows.append(row(SECTION, f"{mode}, batch {batch}", "skipped", f"{type(e).__name__}: {e}"[:200],
                                None, ""))
                continue
            ratio, q1, q3 = paired_ratios(times, "image", "dense")
            token_ratio, tq1, tq3 = paired_ratios(times, "token", "dense")
            t = medians(times)
            if mode == "eager":
                eager[batch] = t
            target = f"≤ {TARGETS[batch]:.2f}×" if batch in TARGETS else ""
            rounds = f"median of {len(times['dense'])} paired rounds"
            rows.append(row(SECTION, f"{mode}, batch {batch}, fp32: per-image {names['image']} vs dense {names['dense']} "
                            f"({rounds}; quartiles {q1:.2f}–{q3:.2f}×)",
                            ms(t["image"]), ms(t["dense"]), ratio, "time MoE / dense", target,
                            ratio <= TARGETS[batch] if batch in TARGETS else None))
            rows.append(row(SECTION, f"{mode}, batch {batch}, fp32: per-token {names['token']} vs dense {names['dense']} "
                            f"({rounds}; quartiles {tq1:.2f}–{tq3:.2f}×)",
                            ms(t["token"]), ms(t["dense"]), token_ratio, "time MoE / dense"))
            if mode != "eager" and batch in eager:
                rows.append(row(SECTION, f"batch {batch}: {mode} vs eager PyTorch, per-image MoE (dense: "
                                f"{eager[batch]['dense'] / t['dense']:.2f}×)", ms(t["image"]), ms(eager[batch]["image"]),
                                eager[batch]["image"] / t["image"], "speed-up"))
    tmp.cleanup()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=30, help="paired rounds at batch 1 (a third at batch 256)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows (exported models)")
    ap.add_argument("--quick", action="store_true", help="a 4x64 model, few repeats, eager (checks the plumbing)")
    ap.add_argument("--json", action="store_true", help="rows as JSON for `python -m benchmarks`")
    args = ap.parse_args()
    onnx = () if args.no_onnx else ("onnxruntime",)
    if args.quick:
        rows = measure(64, 4, 3, batches=(1, 8), modes=("eager", *onnx))
    else:
        rows = measure(args.width, args.depth, args.repeats,
                       modes=("eager", *onnx) + (("compiled",) if args.compile else ()))
    emit(rows, args.json)


if __name__ == "__main__":
    main()
