"""Export a checkpoint for deployment: ONNX (checked in onnxruntime) and a Hugging Face–style folder.

    python -m workbench.export CHECKPOINT --format onnx --out model.onnx [--hf-dir DIR] [--no-check] [--replace]

Why a parity check: an exported MoE can look fine and be wrong. Tracing records
only the branch the example input took, so a per-image MoE traced on an image
routed to expert 2 silently becomes a dense model with expert 2 for every
image. Our models switch to a dispatch without data-dependent branches while
being exported (`torch.compiler.is_exporting()`; see `Experts`), every
expert's weights stay in the graph and the router picks at run time; the export
then refuses to finish unless every expert's weights are in the graph and
onnxruntime agrees with PyTorch on real images (and on images routed to every
expert).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checkpoint import CARD, TRAIN_STATE, WEIGHTS, CheckpointError, load_checkpoint, read_card
from .runs import STATUS_FILE, TEMP_SUFFIX, atomic_copy, atomic_write_bytes, atomic_write_json

__all__ = ["ExportError", "export_onnx", "check_all_experts_in_graph", "onnx_parity", "verify_export",
           "write_hf_folder"]

OPSET = 18
PARITY_TARGET = {"agreement": 0.999, "max_abs_diff": 1e-4}   # fp32


class ExportError(ValueError):
    """The model cannot be exported, or the export does not match the model."""


EXPORT_LIBRARY = "moe-vision-workbench"   # config.json's library_name: marks a folder `write_hf_folder` wrote
# what marks a folder as a checkpoint or a run: an export never writes into one (except an earlier export)
MODEL_FOLDER_FILES = (WEIGHTS, CARD, TRAIN_STATE, STATUS_FILE)


def export_onnx(model: torch.nn.Module, path: Path, image_shape: tuple) -> Path:
    """Write `model` (eval mode, fp32) as ONNX with a dynamic batch dimension -> path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    example = torch.zeros(2, *image_shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=OPSET, input_names=["images"],
                          output_names=["logits"], dynamic_shapes={"x": {0: batch}}, verbose=False,
                          external_data=False)
    except Exception as e:   # torch.export raises many types; say what failed, not how
        raise ExportError(f"torch.onnx.export failed for {model.cfg.family} model: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return path


def is_earlier_export(folder: Path) -> bool:
    """A folder `write_hf_folder` wrote (its config.json names this library), with no training state."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("library_name") == EXPORT_LIBRARY and not any(
        (Path(folder) / f).exists() for f in (TRAIN_STATE, STATUS_FILE))


def _model_folder(path: Path) -> Optional[Path]:
    """The checkpoint or run folder `path` is, or lies inside (the nearest), else None."""
    for folder in [path, *path.parents]:
        if folder.is_dir() and any((folder / f).exists() for f in MODEL_FOLDER_FILES):
            return folder
    return None


def check_outputs(checkpoint: Path, out: Path, hf_dir: Optional[Path], replace: bool) -> None:
    """Refuse, before any work, an output that would destroy what the user did not name for replacing:
    a --out that is not a .onnx file, or that is or lies inside a checkpoint or run folder; an --hf-dir
    that is the source, or a checkpoint or run folder that is not an earlier export, or an earlier
    export without --replace. ValueError saying why."""
    source, out = checkpoint.resolve(), out.resolve()
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {out}: give a .onnx file to write")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a .onnx file to write")
    holder = _model_folder(out.parent)
    if holder is not None and not (replace and is_earlier_export(holder)):
        raise ValueError(f"--out {out}: lies inside the checkpoint or run folder {holder}; write the .onnx elsewhere"
                         + (" (add --replace to update an earlier export)" if is_earlier_export(holder) else ""))
    if out.exists() and not replace:
        raise ValueError(f"--out {out}: already exists; add --replace to overwrite it")
    if hf_dir is None:
        return
    hf = hf_dir.resolve()
    if hf == source or source in hf.parents:
        raise ValueError(f"--hf-dir {hf}: is the checkpoint being exported (or inside it); choose a new folder")
    holder = _model_folder(hf)
    if holder is not None and holder != hf:
        raise ValueError(f"--hf-dir {hf}: lies inside the checkpoint or run folder {holder}; choose a new folder")
    if holder == hf and not is_earlier_export(hf):
        raise ValueError(f"--hf-dir {hf}: is a checkpoint or run folder, not an earlier export; its weights and "
                         "card would be replaced. Choose a new folder")
    if holder == hf and not replace:
        raise ValueError(f"--hf-dir {hf}: holds an earlier export; add --replace to overwrite it")
    if hf.exists() and not hf.is_dir():
        raise ValueError(f"--hf-dir {hf}: is a file, not a folder")


def _expert_weight_shapes(model: torch.nn.Module) -> list[tuple[str, tuple]]:
    return [(name, tuple(p.shape)) for name, p in model.named_parameters() if name.endswith("experts.fc1_weight")]


def check_all_experts_in_graph(model: torch.nn.Module, path: Path) -> int:
    """Every MoE layer's stacked expert weights (E x hidden x width) must be a graph initializer -> count."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = [tuple(int(d) for d in init.dims) for init in graph.initializer]
    wanted = _expert_weight_shapes(model)
    missing = [name for name, shape in wanted if shapes.count(shape) < sum(s == shape for _, s in wanted)]
    if missing:
        raise ExportError(f"{path}: the exported graph lacks the full expert weights of {missing[:3]}: the export "
                          "kept only some experts (routing was traced for one input)")
    return len(wanted)


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_parity(model: torch.nn.Module, path: Path, x: torch.Tensor, batch_size: int = 256) -> dict:
    """Run PyTorch (fp32, eval) and onnxruntime on normalised images `x` -> agreement and max |logit diff|."""
    sess = _session(path)
    model = model.float().eval()
    diffs, agree, n = [], 0, 0
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size].float()
            ref = model(xb).numpy()
            got = sess.run(["logits"], {"images": xb.numpy()})[0]
            diffs.append(float(np.abs(ref - got).max()))
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            n += len(xb)
    return {"images": n, "agreement": agree / n, "max_abs_diff": max(diffs)}


def _routed_to_every_expert(model: torch.nn.Module, image_shape: tuple, n: int = 512) -> Optional[torch.Tensor]:
    """Inputs that the eager model routes to each expert at least once (per-image MoE), or None."""
    if model.cfg.family != "mvmoe":
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *image_shape, generator=g) * 3
    with torch.inference_mode():
        first = model(x, return_routing=True).routing[0].experts[:, 0]
    picks = [int(torch.nonzero(first == e)[0]) for e in range(model.cfg.num_experts) if (first == e).any()]
    return x[picks] if picks else None


def write_hf_folder(checkpoint: Path, out: Path, parity: Optional[dict] = None) -> Path:
    """config.json + model.safetensors + card.json + README.md (model card) -> out.

    The folder is also a workbench checkpoint: `load_checkpoint(out)` loads it.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    card = read_card(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    atomic_copy(checkpoint / WEIGHTS, out / WEIGHTS)
    atomic_copy(checkpoint / CARD, out / CARD)
    config = {"library_name": EXPORT_LIBRARY, "preset": card.get("preset"), "family":
              card["config"].get("family"), "id2label": {str(i): c for i, c in enumerate(card.get("classes") or [])},
              **card["config"]}
    atomic_write_json(out / "config.json", config)
    atomic_write_bytes(out / "README.md", _model_card(card, parity).encode("utf-8"))
    return out


def _model_card(card: dict, parity: Optional[dict]) -> str:
    cfg, metrics, macs = card["config"], card.get("metrics") or {}, card.get("macs") or {}
    acc = metrics.get("test_accuracy")
    family = {"vit": "dense ViT", "vmoe": "per-token V-MoE", "mvmoe": "per-image Mobile V-MoE"}.get(cfg.get("family"))
    data = card.get("dataset")
    terms = {"fashion-mnist": "Fashion-MNIST (MIT licence).",
             "tiny-imagenet": "Tiny ImageNet, a subset of ImageNet: the weights come from data whose terms allow "
                              "non-commercial research and educational use only."}.get(data, f"{data}.")
    lines = [
        "---", "library_name: moe-vision-workbench", "license: apache-2.0", "tags: [image-classification, "
        "mixture-of-experts, vision-transformer]", "---", "",
        f"# {card.get('preset')} on {data}", "",
        f"A {family} trained with the MoE Vision Workbench.", "",
        "| | |", "|---|---|",
        f"| test accuracy | {100 * acc:.2f} % |" if isinstance(acc, (int, float)) else "| test accuracy | n/a |",
        f"| MACs per image (active) | {macs.get('active', 0) / 1e6:.2f} M |",
        f"| parameters (total / active) | {macs.get('params_total')} / {macs.get('params_active')} |",
        f"| input | {cfg.get('in_chans')} x {cfg.get('img_size')} x {cfg.get('img_size')} |",
        f"| experts / k | {cfg.get('num_experts') or '-'} / {cfg.get('top_k') or '-'} |",
        "",
        f"**Data.** {terms}",
        "",
        "**Training command.** `" + str(card.get("command") or "n/a") + "`",
        "",
        "## Load it", "", "```python", "from workbench.checkpoint import load_checkpoint",
        "model, card = load_checkpoint('THIS_FOLDER')   # safetensors + JSON, never unpickles",
        "logits = model(images)                         # images normalised with the card's mean/std", "```", "",
    ]
    if parity:
        lines += ["## ONNX export", "",
                  f"`model.onnx` agrees with PyTorch on {parity['agreement']:.2%} of {parity['images']} test "
                  f"images (max |logit difference| {parity['max_abs_diff']:.2e}).", ""]
    return "\n".join(lines)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {n}")
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workbench.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="checkpoint folder (model.safetensors + card.json)")
    ap.add_argument("--format", choices=["onnx"], default="onnx")
    ap.add_argument("--out", required=True, help="the .onnx file to write")
    ap.add_argument("--hf-dir", help="also write a Hugging Face-style folder here (with the .onnx inside)")
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    ap.add_argument("--check-images", type=_positive, default=10000, help="test images for the parity check (>= 1)")
    ap.add_argument("--replace", action="store_true",
                    help="overwrite an existing --out file or an earlier export in --hf-dir (never a checkpoint "
                         "or run folder)")
    args = ap.parse_args(argv)
    try:
        check_outputs(Path(args.checkpoint), Path(args.out), Path(args.hf_dir) if args.hf_dir else None, args.replace)
        model, card = load_checkpoint(args.checkpoint)
        cfg = card["config"]
        shape = (cfg["in_chans"], cfg["img_size"], cfg["img_size"])
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.{os.getpid()}{TEMP_SUFFIX}")   # a failed export leaves no half file
        try:
            export_onnx(model, tmp, shape)
            n_experts = check_all_experts_in_graph(model, tmp)
            parity = None if args.no_check else _check(model, tmp, card, shape, args.check_images)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        path = out
        if args.hf_dir:
            folder = write_hf_folder(Path(args.checkpoint), Path(args.hf_dir), parity)
            atomic_copy(path, folder / "model.onnx")
    except (CheckpointError, ExportError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; {n_experts} MoE layer(s) with all experts)")
    if parity:
        print(f"parity on {parity['images']} images: {parity['agreement']:.3%} same predictions, "
              f"max |logit diff| {parity['max_abs_diff']:.2e}")
    return 0


def verify_export(model: torch.nn.Module, path: Path, images: torch.Tensor, image_shape: tuple) -> dict:
    """Parity on `images` (normalised) and, for a per-image MoE, on inputs routed to every expert.

    Raises ExportError below PARITY_TARGET: a graph specialised to one expert
    passes on images that happen to use that expert, never on all of them.
    """
    parity = onnx_parity(model, path, images)
    routed = _routed_to_every_expert(model, image_shape)
    checks = [parity]
    if routed is not None:
        parity["every_expert"] = onnx_parity(model, path, routed)
        checks.append(parity["every_expert"])
    worst = min(c["agreement"] for c in checks)
    diff = max(c["max_abs_diff"] for c in checks)
    if worst < PARITY_TARGET["agreement"] or diff > PARITY_TARGET["max_abs_diff"]:
        raise ExportError(f"{path}: onnxruntime disagrees with PyTorch ({worst:.3%} same predictions, "
                          f"max |logit diff| {diff:.2e}; targets {PARITY_TARGET})")
    return parity


def _check(model, path: Path, card: dict, shape: tuple, n: int) -> dict:
    from .data import load_dataset, normalize

    ds = load_dataset(card["dataset"], "test")
    return verify_export(model, path, normalize(ds.images[:n], ds.mean, ds.std), shape)


if __name__ == "__main__":
    sys.exit(main())
