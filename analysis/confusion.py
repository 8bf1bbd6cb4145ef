"""Predictions and confusion matrices of a trained classifier.

Mobile V-MoE (Daxberger et al., arXiv 2309.04354), in its training procedure
for the per-image router: a dense baseline is trained, its confusion matrix is
taken on data held out from training, and the confusion graph is clustered into
semantic super-classes that become the router's targets. This module computes
that matrix (steps 1-2 of SPEC section 2, "Super-class discovery"); the graph
and the clustering live in `analysis/superclasses.py`.

Why fp32 by default: on this project's CPU (AVX512-BF16, 2 cores) bf16 autocast
is about 2x faster (vit-12x192, batch 512: 7.2 s -> 3.3 s) but flips 1-2% of the
top-1 predictions of an untrained model, and the super-classes should not
depend on the numeric format. `bf16=True` opts in for quick looks in the app.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix

from .collect import predict_logits


def predict(
    model: nn.Module,
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    *,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions (N,) int64 and softmax probabilities (N, classes) fp32, on CPU.

    Runs batched under `torch.inference_mode()` with the model in eval mode (its
    previous mode is restored afterwards); batches go to the model's device.
    `bf16=True` runs the forward under bf16 autocast (faster, not bit-identical).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, but got {batch_size}")
    images = torch.as_tensor(images_uint8)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), but got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("no images to predict")
    logits = predict_logits(model, images, mean, std, batch_size, bf16=bf16)
    p = torch.softmax(torch.from_numpy(logits), dim=-1)
    return p.argmax(dim=-1), p


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes) int64: row = true class, column = predicted class."""
    y_true = np.asarray(torch.as_tensor(y_true).cpu()).ravel()
    y_pred = np.asarray(torch.as_tensor(y_pred).cpu()).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        # NOTE: sklearn silently drops labels outside `labels`; fail instead of losing counts.
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}, but got {y.min()}..{y.max()}")
    return _sk_confusion_matrix(y_true, y_pred, labels=np.arange(num_classes)).astype(np.int64)


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Row-normalised rates P(predicted j | true i); rows with no samples stay 0."""
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class (diagonal / row sum); NaN for classes with no samples."""
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(axis=1)
    return np.divide(np.diag(cm), totals, out=np.full(len(cm), np.nan), where=totals > 0)


def model_confusion(model: nn.Module, dataset, batch_size: int = 512, *, bf16: bool = False) -> np.ndarray:
    """Confusion counts of `model` on an `ImageDataset` (e.g. the held-out split)."""
    preds, _ = predict(model, dataset.images, dataset.mean, dataset.std, batch_size=batch_size, bf16=bf16)
    return confusion_matrix(dataset.labels, preds, dataset.num_classes)


def off_diagonal(matrix) -> np.ndarray:
    """The matrix with its diagonal blanked (NaN): the confusions, which a colour scale shared with the
    diagonal (85-99 % correct) would leave near-white."""
    m = np.array(matrix, dtype=np.float64)
    np.fill_diagonal(m, np.nan)
    return m
