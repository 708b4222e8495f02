"""Loss math as pure functions: no modules, no state, each with its own tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's `norm_pix_loss` target: each patch [..., P] to mean 0 / unit (unbiased) variance."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def mae_reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    norm_pix_loss: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-patch MSE averaged over pixels, then over the removed patches only.

    Args:
        pred: [B, L, P] decoder output for every patch.
        target: [B, L, P] patchified pixels.
        mask: [B, L], 1 for removed patches (the only ones that count), 0 for visible ones.
        norm_pix_loss: normalise each target patch by its own mean and variance first.
        eps: variance epsilon of that normalisation.
    """
    # fp32 whatever the autocast dtype: the loss is a mean over many small squared errors
    pred, target, mask = pred.float(), target.float(), mask.float()
    if norm_pix_loss:
        target = normalize_patches(target, eps)
    loss = (pred - target).pow(2).mean(dim=-1)  # [B, L]
    return (loss * mask).sum() / mask.sum()


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a probability distribution per row (Mixup / CutMix / label smoothing targets)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class ids [B] or soft targets [B, C]."""
    if labels.dtype.is_floating_point:
        if labels.shape != logits.shape:
            raise ValueError(f"soft-target labels must have shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
        return soft_target_cross_entropy(logits, labels)
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"class-id labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels)
