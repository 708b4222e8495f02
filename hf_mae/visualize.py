"""Figures: reconstruction grids and training curves, written as PNG with matplotlib's Agg backend."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def reconstruct(
    model,
    pixel_values: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run an MAE pretraining model and return images [B, C, H, W] in the model's input (normalised) space:
    `original`, `masked` (removed patches zeroed), `reconstruction` and `pasted` (visible patches put back).

    With `norm_pix_loss` the decoder predicts each patch normalised by its own mean/var; that is undone here with
    the statistics of the true patch, or the reconstruction looks like noise (MAE issues #12, #174).
    """
    model.eval()
    out = model(pixel_values, noise=noise)
    target = model.patchify(pixel_values)
    pred = out.logits.float()
    if model.config.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + model.config.norm_pix_eps) ** 0.5 + mean
    mask = out.mask[..., None]  # [B, L, 1], 1 = removed
    size = tuple(pixel_values.shape[-2:])
    return {
        "original": pixel_values,
        "masked": model.unpatchify(target * (1 - mask), size),
        "reconstruction": model.unpatchify(pred, size),
        "pasted": model.unpatchify(target * (1 - mask) + pred * mask, size),
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, title: str | None) -> Path:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    logger.info("wrote %s", path)
    return path


def _to_display(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the input normalisation; [B, C, H, W] -> [B, H, W, C] in [0, 1]."""
    c = images.shape[1]
    m = torch.tensor(mean[:c] if len(mean) >= c else mean * c).view(1, c, 1, 1)
    s = torch.tensor(std[:c] if len(std) >= c else std * c).view(1, c, 1, 1)
    images = (images.float().cpu() * s + m).clamp(0, 1)
    return images.permute(0, 2, 3, 1)


def save_reconstruction_grid(
    model,
    pixel_values: torch.Tensor,
    path: str | Path,
    noise: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    title: str | None = None,
) -> Path:
    """Write a PNG grid: one row per image with original | masked | reconstruction | reconstruction + visible."""
    plt = _pyplot()
    images = reconstruct(model, pixel_values, noise)
    columns = ["original", "masked", "reconstruction", "pasted"]
    labels = ["original", "masked", "reconstruction", "reconstruction + visible"]
    shown = {k: _to_display(v, mean, std) for k, v in images.items()}
    rows = pixel_values.shape[0]
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2 * rows + (0.4 if title else 0)), squeeze=False)
    for r in range(rows):
        for c, key in enumerate(columns):
            img = shown[key][r]
            ax = axes[r][c]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(labels[c], fontsize=9)
    return _save(fig, path, title)


def plot_training_curves(log_history: list[dict], path: str | Path, title: str | None = None) -> Path | None:
    """Plot every numeric series of a Trainer `log_history` (loss, eval_loss, learning_rate, top1, ...) against
    the step, one panel per series. Returns None when there is nothing to plot."""
    plt = _pyplot()
    skip = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
    series: dict[str, tuple[list, list]] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            if key in skip or key.endswith(("_runtime", "_per_second")) or not isinstance(value, (int, float)):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(step)
            ys.append(value)
    series = {k: v for k, v in series.items() if len(v[0]) > 0}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 2.8), squeeze=False)
    for ax, (key, (xs, ys)) in zip(axes[0], sorted(series.items())):
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(fig, path, title)
