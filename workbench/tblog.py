"""TensorBoard mirror of a run's metrics, so `tensorboard --logdir runs/` shows every run.

`metrics.jsonl` stays the source of truth (the app and `--resume` read it);
this writes the same records as TensorBoard scalars next to it, with the
`tensorboard` package's writer (`torch.utils.tensorboard.SummaryWriter`).
Tags: `train/loss`, `train/ce`, `train/aux/<name>`, `train/accuracy`,
`train/lr`, `train/grad_norm`, `train/img_per_s`; `eval/test_accuracy`,
`eval/test_loss`; `load/block<i>/expert<e>` and `load/block<i>/dropped`;
`routing/router_accuracy` and `routing/churn` (from routing snapshots).
The x-axis is the optimiser step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["TensorBoardMirror", "scalars_of"]

_TRAIN = {"loss": "train/loss", "ce": "train/ce", "train_accuracy": "train/accuracy", "lr": "train/lr",
          "grad_norm": "train/grad_norm", "img_per_s": "train/img_per_s"}
_EVAL = {"test_accuracy": "eval/test_accuracy", "test_loss": "eval/test_loss"}
_ROUTING = {"router_accuracy": "routing/router_accuracy", "churn": "routing/churn"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalars_of(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl record ({} for records that have none)."""
    kind = record.get("type")
    out: dict[str, float] = {}
    if kind == "train":
        out.update({tag: record[k] for k, tag in _TRAIN.items() if _number(record.get(k))})
        out.update({f"train/aux/{k}": v for k, v in (record.get("aux") or {}).items() if _number(v)})
    elif kind == "eval":
        out.update({tag: record[k] for k, tag in _EVAL.items() if _number(record.get(k))})
        for layer in record.get("expert_load") or []:
            block = f"load/block{layer.get('layer')}"
            out.update({f"{block}/expert{e}": f for e, f in enumerate(layer.get("fraction") or []) if _number(f)})
            if _number(layer.get("dropped")):
                out[f"{block}/dropped"] = layer["dropped"]
    elif kind == "routing":
        out.update({tag: record[k] for k, tag in _ROUTING.items() if _number(record.get(k))})
    return {k: float(v) for k, v in out.items()}


class TensorBoardMirror:
    """Writes each record's scalars as TensorBoard events under `<run_dir>/tensorboard/`."""

    def __init__(self, run_dir: Path, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard hides events from after the saved step (they are logged again)
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step,
                                    flush_secs=10)

    def write(self, record: dict) -> None:
        step = record.get("step")
        if not _number(step):
            return
        for tag, value in scalars_of(record).items():
            self.writer.add_scalar(tag, value, global_step=int(step))

    def close(self) -> None:
        self.writer.close()
