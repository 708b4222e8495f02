"""Figures, drawn with matplotlib's Agg backend: reconstruction grids, training curves, and the panels the
reproduction study's report is made of (curves, grouped bars, image tiles).

The `*_figure` functions return a matplotlib `Figure` (or None when there is nothing to draw); [`save_figure`]
writes one as PNG and closes it. Every grid has at most [`MAX_COLUMNS`] panels per row, titles sit above the panels
(constrained layout), and axes print plain numbers, never an offset such as `1e-5 +`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

MAX_COLUMNS = 4
# inches around each panel (constrained layout; matplotlib's 3 pt leaves a title touching the panel titles below it)
_PAD = 0.08
# keys of a Trainer log_history that are bookkeeping, not curves
_NOT_CURVES = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` as PNG at `path` (folders created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    logger.info("wrote %s", path)
    return path


def panel_grid(
    count: int,
    panel_size: tuple[float, float] = (3.6, 2.8),
    title: str | None = None,
    max_columns: int = MAX_COLUMNS,
) -> tuple[Figure, list[Axes]]:
    """A figure with `count` panels in rows of at most `max_columns`, constrained layout, `title` above them all.

    Returns `(figure, axes)`, `axes` a flat list of `count` axes (the unused places of the last row are removed).
    """
    plt = _pyplot()
    columns = min(count, max_columns, MAX_COLUMNS)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(panel_size[0] * columns, panel_size[1] * rows), squeeze=False)
    fig.set_layout_engine("constrained", h_pad=_PAD)
    axes = list(axes.flat)
    for ax in axes[count:]:
        ax.remove()
    if title:
        fig.suptitle(title, fontsize=11)
    return fig, axes[:count]


def _plain_number(value: float, digits: int = 6) -> str:
    """A tick label that stands on its own: `2.3015`, `1.00001`, `0.00015`, `6e-6`."""
    return f"{value:.{digits}g}".replace("e-0", "e-").replace("e+0", "e+")


def _plain_numbers(ax: Axes) -> None:
    """Every tick labelled in full: no offset (`1e-5 +` above an axis of losses that barely move) and no multiplier
    floating next to the panel's title (`1e-6` above a learning rate), with as many digits as it takes to tell the
    ticks apart (`1.098605`, `1.09861`, not `1.09861` twice)."""
    from matplotlib.ticker import Formatter

    class PlainFormatter(Formatter):
        def __call__(self, value, pos=None):
            return _plain_number(value)

        def format_ticks(self, values):
            for digits in range(6, 16):
                labels = [_plain_number(v, digits) for v in values]
                if len(set(labels)) == len(labels):
                    break
            return labels

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(PlainFormatter())


# ----------------------------------------------------------------------------------------------------------------------
# Reconstructions
# ----------------------------------------------------------------------------------------------------------------------
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


def _to_display(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the input normalisation; [B, C, H, W] -> [B, H, W, C] in [0, 1]."""
    c = images.shape[1]
    m = torch.tensor(mean[:c] if len(mean) >= c else mean * c).view(1, c, 1, 1)
    s = torch.tensor(std[:c] if len(std) >= c else std * c).view(1, c, 1, 1)
    images = (images.float().cpu() * s + m).clamp(0, 1)
    return images.permute(0, 2, 3, 1)


def is_grayscale(images: torch.Tensor, tolerance: float = 1 / 255) -> bool:
    """One channel, or channels equal to within `tolerance` ([B, H, W, C] in [0, 1]): grayscale pictures stored as
    RGB (the built-in `digits`, grayscale scans) count as grayscale."""
    if images.shape[-1] == 1:
        return True
    return bool((images - images[..., :1]).abs().amax() <= tolerance)


RECONSTRUCTION_COLUMNS = {
    "original": "original",
    "masked": "masked",
    "reconstruction": "reconstruction",
    "pasted": "reconstruction + visible",
}


def reconstruction_figure(
    model,
    pixel_values: torch.Tensor,
    noise: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    title: str | None = None,
) -> Figure:
    """One row per image: original | masked | reconstruction | reconstruction + visible, with the column headers
    on the first row and `title` above them. Grayscale inputs (see [`is_grayscale`]) are drawn in grayscale, the
    reconstruction too (the mean of its channels)."""
    images = reconstruct(model, pixel_values, noise)
    shown = {k: _to_display(v, mean, std) for k, v in images.items()}
    gray = is_grayscale(shown["original"])
    rows = pixel_values.shape[0]
    fig, axes = _pyplot().subplots(rows, 4, figsize=(8, 2 * rows + (0.3 if title else 0)), squeeze=False)
    fig.set_layout_engine("constrained", h_pad=_PAD)
    for r in range(rows):
        for c, (key, header) in enumerate(RECONSTRUCTION_COLUMNS.items()):
            ax = axes[r][c]
            if gray:
                ax.imshow(shown[key][r].mean(-1), cmap="gray", vmin=0.0, vmax=1.0)
            else:
                ax.imshow(shown[key][r])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(header, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_reconstruction_grid(
    model,
    pixel_values: torch.Tensor,
    path: str | Path,
    noise: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    title: str | None = None,
) -> Path:
    """Write [`reconstruction_figure`] as a PNG."""
    return save_figure(reconstruction_figure(model, pixel_values, noise, mean, std, title), path)


# ----------------------------------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Curve:
    """One line of a panel.

    Args:
        x, y: the points; a curve of a single point is drawn as a marker.
        label: its name in the legend (curves with the same label share one entry, so give them one colour).
        color: any matplotlib colour (None: the panel's next colour).
        validation: drawn dashed, training curves solid.
    """

    x: Sequence[float]
    y: Sequence[float]
    label: str = ""
    color: Any = None
    validation: bool = False


def history_series(log_history: Sequence[Mapping], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """The numeric values of `key` in a Trainer `log_history` against `x` (`step` or `epoch`)."""
    points = [(e[x], e[key]) for e in log_history if x in e and isinstance(e.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def curves_figure(
    panels: Mapping[str, Sequence[Curve]], title: str | None = None, xlabel: str = "step"
) -> Figure | None:
    """One panel per entry of `panels` (its key is the panel's title), in rows of at most `MAX_COLUMNS`.

    A panel in which no curve has two points is left out; None when no panel is left. The legend, below the panels,
    names every label; when a label has both training and validation curves, it shows the label's colour and, once,
    the two line styles.
    """
    from matplotlib.lines import Line2D

    kept = {name: [c for c in curves if len(c.x)] for name, curves in panels.items()}
    # distinct x values, not entries: a run's final evaluation repeats the last in-training one at the same step
    kept = {name: curves for name, curves in kept.items() if any(len(set(c.x)) > 1 for c in curves)}
    if not kept:
        return None
    fig, axes = panel_grid(len(kept), title=title)
    colors: dict[str, Any] = {}
    styles: dict[str, set[bool]] = {}
    for ax, (name, curves) in zip(axes, kept.items()):
        for curve in curves:
            if len(set(curve.x)) == 1:
                style = {"linestyle": "none", "marker": "o", "markersize": 4}
            else:
                style = {"linestyle": "--" if curve.validation else "-", "linewidth": 1.2}
                if len(curve.x) < 12:  # few points: show where they are
                    style.update(marker="o", markersize=3)
            (line,) = ax.plot(curve.x, curve.y, color=curve.color, **style)
            if curve.label:
                colors.setdefault(curve.label, line.get_color())
                styles.setdefault(curve.label, set()).add(curve.validation)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        _plain_numbers(ax)
    mixed = any(len(s) > 1 for s in styles.values())
    handles = [
        Line2D(
            [], [], color=colors[label], linestyle="--" if styles[label] == {True} and not mixed else "-", label=label
        )
        for label in colors
    ]
    if mixed:
        handles += [
            Line2D([], [], color="0.4", linestyle="-", label="train"),
            Line2D([], [], color="0.4", linestyle="--", label="validation"),
        ]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    return fig


def history_panels(log_history: Sequence[Mapping], x: str = "step") -> dict[str, list[Curve]]:
    """A Trainer `log_history` as panels: `eval_<name>` shares the axis of `<name>` (train loss and validation loss
    on one panel), every other numeric series gets its own; losses first."""
    keys = dict.fromkeys(
        k
        for entry in log_history
        for k, v in entry.items()
        if isinstance(v, (int, float)) and k not in _NOT_CURVES and not k.endswith(("_runtime", "_per_second"))
    )
    panels: dict[str, list[tuple[str, bool]]] = {}
    for key in keys:
        validation = key.startswith("eval_")
        panels.setdefault(key.removeprefix("eval_"), []).append((key, validation))
    order = sorted(panels, key=lambda name: not name.endswith("loss"))
    result = {}
    for name in order:
        kinds = {validation for _, validation in panels[name]}
        both = len(kinds) > 1
        title = f"{name} (validation)" if kinds == {True} else name
        result[title] = [
            Curve(
                *history_series(log_history, key, x),
                label=("validation" if validation else "train") if both else "",
                color="C1" if validation else "C0",
                validation=validation,
            )
            for key, validation in panels[name]
        ]
    return result


def training_curves_figure(log_history: Sequence[Mapping], title: str | None = None) -> Figure | None:
    """Every numeric series of a Trainer `log_history` against the step (see [`history_panels`]); None when nothing
    has two points."""
    return curves_figure(history_panels(log_history), title=title)


def plot_training_curves(log_history: Sequence[Mapping], path: str | Path, title: str | None = None) -> Path | None:
    """Write [`training_curves_figure`] as a PNG; None (and no file) when there is nothing to plot."""
    fig = training_curves_figure(log_history, title)
    if fig is None:
        logger.info("no series of the log history has two points: %s not written", path)
        return None
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------------
# Bars and image tiles
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class BarPanel:
    """Grouped bars: one group per category (a tick on the x axis), one bar per series in it.

    Args:
        categories: the tick labels.
        values: series label -> one value per category: a number is a bar, a string is written where the bar would
            be (e.g. `failed`), None leaves the place empty.
    """

    categories: list[str]
    values: dict[str, list[float | str | None]] = field(default_factory=dict)


def bars_figure(
    panels: Mapping[str, BarPanel],
    title: str | None = None,
    ylabel: str = "top-1 (%)",
    series: Sequence[str] | None = None,
) -> Figure | None:
    """One grouped-bar panel per entry (its key is the panel's title), one y scale for all so bars compare across
    panels. A series has the same colour in every panel: the n-th colour for the n-th name of `series` (default:
    the order of first appearance), so several figures can share colours. None when no panel has a series."""
    from matplotlib.patches import Patch

    panels = {name: panel for name, panel in panels.items() if panel.values}
    if not panels:
        return None
    used = list(dict.fromkeys(s for panel in panels.values() for s in panel.values))
    order = list(dict.fromkeys([*(series or []), *used]))
    colors = {s: f"C{order.index(s) % 10}" for s in used}
    fig, axes = panel_grid(len(panels), panel_size=(4.2, 3.3), title=title)
    top = 1.0
    for ax, (name, panel) in zip(axes, panels.items()):
        width = 0.8 / len(panel.values)
        for j, (label, values) in enumerate(panel.values.items()):
            for i, value in enumerate(values):
                x = i + (j - (len(panel.values) - 1) / 2) * width
                if isinstance(value, str):  # failed / blocked / not run: say so where the bar would be
                    ax.text(x, 1, value, rotation=90, ha="center", va="bottom", fontsize=8, color=colors[label])
                elif value is not None:
                    bar = ax.bar(x, value, width, color=colors[label])
                    ax.bar_label(bar, fmt="%.1f", fontsize=7)
                    top = max(top, value)
        ax.set_xticks(range(len(panel.categories)), panel.categories, fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in axes:
        ax.set_ylim(0, top * 1.15)
    handles = [Patch(color=colors[s], label=s) for s in used]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    return fig


def image_tiles_figure(images: Mapping[str, Any], title: str | None = None, max_columns: int = 3) -> Figure | None:
    """Pictures side by side (e.g. each run's reconstruction grid), titled by their keys, at most `max_columns` per
    row (each picture is itself a grid: three keep it legible); `images` are image files or arrays [H, W] /
    [H, W, C]. None when empty."""
    import matplotlib.image

    if not images:
        return None
    images = {k: matplotlib.image.imread(v) if isinstance(v, (str, Path)) else v for k, v in images.items()}
    first = next(iter(images.values()))
    aspect = first.shape[0] / first.shape[1]
    fig, axes = panel_grid(len(images), (5.0, 5.0 * aspect + 0.3), title=title, max_columns=max_columns)
    for ax, (name, image) in zip(axes, images.items()):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    return fig


__all__ = [
    "MAX_COLUMNS",
    "BarPanel",
    "Curve",
    "bars_figure",
    "curves_figure",
    "history_panels",
    "history_series",
    "image_tiles_figure",
    "is_grayscale",
    "panel_grid",
    "plot_training_curves",
    "reconstruct",
    "reconstruction_figure",
    "save_figure",
    "save_reconstruction_grid",
    "training_curves_figure",
]
