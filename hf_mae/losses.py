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


FEATURE_LOSSES = ("l1", "smooth_l1", "mse")


def feature_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    normalize: bool = True,
    loss_type: str = "l1",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Distance between projected student features and teacher features, averaged over every element (DMAE).

    Args:
        student: [B, N, D] student features after the projector.
        teacher: [B, N, D] teacher features (treated as a constant: detach them or compute them without grad).
        normalize: L2-normalise each token's feature over D first (official DMAE, `F.normalize(dim=-1)`); `False`
            compares raw features (the reproduction study's reproduction).
        loss_type: "l1" (both papers), "smooth_l1" (Huber with beta 1) or "mse".
        eps: norm floor of the normalisation (`F.normalize`'s default).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} differ in shape"
        )
    if loss_type not in FEATURE_LOSSES:
        raise ValueError(f"loss_type must be one of {FEATURE_LOSSES}, got {loss_type!r}")
    # fp32 whatever the autocast dtype: normalised features differ in the third decimal
    student, teacher = student.float(), teacher.float()
    if normalize:
        student = F.normalize(student, dim=-1, eps=eps)
        teacher = F.normalize(teacher, dim=-1, eps=eps)
    if loss_type == "l1":
        return F.l1_loss(student, teacher)
    if loss_type == "mse":
        return F.mse_loss(student, teacher)
    return F.smooth_l1_loss(student, teacher, beta=1.0)
