import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from helpers import tiny_config
from matplotlib.colors import to_rgba
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from hf_mae import MAEForPreTraining
from hf_mae.losses import normalize_patches
from hf_mae.visualize import (
    BarPanel,
    bars_figure,
    image_tiles_figure,
    plot_training_curves,
    reconstruct,
    reconstruction_figure,
    save_reconstruction_grid,
    training_curves_figure,
)


def tiny(norm_pix_loss: bool) -> MAEForPreTraining:
    return MAEForPreTraining(tiny_config(num_hidden_layers=1, norm_pix_loss=norm_pix_loss)).eval()


class Perfect(torch.nn.Module):
    """Stands in for the decoder: predicts the exact (optionally normalised) target of every patch."""

    def __init__(self, model, pixels):
        super().__init__()
        target = model.patchify(pixels)
        self.pred = normalize_patches(target, model.config.norm_pix_eps) if model.config.norm_pix_loss else target

    def forward(self, latent, ids_restore, grid):
        return self.pred


def test_norm_pix_predictions_are_unnormalised_for_display():
    pixels = torch.randn(2, 3, 16, 16)
    for norm_pix in (False, True):
        model = tiny(norm_pix)
        model.decoder = Perfect(model, pixels)
        images = reconstruct(model, pixels, noise=torch.rand(2, 16))
        assert torch.allclose(images["reconstruction"], pixels, atol=1e-4), norm_pix
        assert torch.allclose(images["pasted"], pixels, atol=1e-4)


def test_masked_and_pasted_panels():
    model, pixels, noise = tiny(True), torch.randn(1, 3, 16, 16), torch.rand(1, 16)
    images = reconstruct(model, pixels, noise=noise)
    mask = model(pixels, noise=noise).mask[0].reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1)
    visible = mask == 0
    assert torch.equal(images["masked"][0][:, visible], pixels[0][:, visible])
    assert torch.all(images["masked"][0][:, ~visible] == 0)
    assert torch.equal(images["pasted"][0][:, visible], pixels[0][:, visible])
    assert torch.allclose(images["pasted"][0][:, ~visible], images["reconstruction"][0][:, ~visible])


def test_png_files(tmp_path):
    path = save_reconstruction_grid(tiny(True), torch.randn(3, 3, 16, 16), tmp_path / "r.png", title="t")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
    history = [
        {"loss": 1.0, "learning_rate": 1e-3, "step": 1},
        {"eval_loss": 0.9, "step": 1},
        {"loss": 0.5, "step": 2},
    ]
    curves = plot_training_curves(history, tmp_path / "c.png")
    assert curves is not None and curves.exists()
    assert plot_training_curves([{"step": 1}], tmp_path / "none.png") is None


# ----------------------------------------------------------------------------------------------------------------------
# Figures people want to look at
# ----------------------------------------------------------------------------------------------------------------------
def _rows_and_columns(fig):
    """(rows, columns) of the grid every panel of `fig` is placed on."""
    (geometry,) = {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes}
    return geometry


def _history(steps=3, **single):
    history = [
        {"loss": 2.0 - s / 10, "learning_rate": 1e-4 * s, "step": s, "epoch": s / 10} for s in range(1, steps + 1)
    ]
    history += [
        {"eval_loss": 1.5 - s / 20, "eval_runtime": 0.1, "step": s, "epoch": s / 10} for s in range(1, steps + 1)
    ]
    history += [{**single, "step": steps, "epoch": steps / 10}] if single else []
    return history


def test_train_and_eval_loss_share_an_axis_and_one_point_series_make_no_panel():
    history = _history(eval_top1=55.0, train_loss=1.7, train_runtime=3.0)
    fig = training_curves_figure(history, title="t")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "learning_rate"]  # no top1, train_loss or runtime panel: one point each, or bookkeeping
    loss_lines = fig.axes[0].get_lines()
    assert [line.get_linestyle() for line in loss_lines] == ["-", "--"]  # train solid, validation dashed
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["train", "validation"]
    plt.close(fig)
    # a one-point series next to a real curve is a marker on the same axis
    history = [e for e in _history() if "eval_loss" not in e] + [{"eval_loss": 1.2, "step": 3}]
    fig = training_curves_figure(history)
    single = [line for line in fig.axes[0].get_lines() if len(line.get_xdata()) == 1]
    assert len(single) == 1 and single[0].get_linestyle() == "None" and single[0].get_marker() == "o"
    plt.close(fig)
    assert training_curves_figure([{"loss": 1.0, "step": 1}, {"eval_loss": 1.0, "step": 1}]) is None
    # a short run: its evaluation at the last step, then the final evaluation at the same step, is still one point
    assert training_curves_figure([{"eval_loss": 2.3, "eval_top1": 9.7, "step": 3}] * 2) is None


def test_grids_have_at_most_four_panels_per_row():
    history = [{f"metric_{k}": float(k * s) for k in range(9)} | {"step": s} for s in range(3)]
    fig = training_curves_figure(history)
    assert len(fig.axes) == 9 and _rows_and_columns(fig) == (3, 4)
    plt.close(fig)
    panels = {
        f"ablation {k}": BarPanel(["a", "b"], {"small": [50.0, "failed"], "full": [60.0, None]}) for k in range(5)
    }
    fig = bars_figure(panels, title="bars", series=["full", "small"])
    assert len(fig.axes) == 5 and _rows_and_columns(fig) == (2, 4)
    # one colour per series in every panel, in the order asked for; a string is written where its bar would be
    bars = {patch.get_facecolor() for patch in fig.axes[0].patches if patch.get_height() == 60.0}
    assert bars == {to_rgba("C0")} and "failed" in [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)
    fig = image_tiles_figure({f"run {k}": np.zeros((20, 40, 3)) for k in range(7)})
    assert _rows_and_columns(fig) == (3, 3)
    plt.close(fig)


def test_axes_print_plain_numbers_without_an_offset():
    # a validation loss that moves in its fifth decimal (matplotlib: "1e-5+1" above the axis) and a learning rate of
    # a few 1e-6 (matplotlib: "1e-6" next to the title)
    history = [{"eval_loss": 1.0 + 1e-5 * s, "learning_rate": 2e-6 * s, "step": 1000 + s} for s in range(5)]
    fig = training_curves_figure(history)
    fig.canvas.draw()
    assert [ax.get_title() for ax in fig.axes] == ["loss (validation)", "learning_rate"]
    for ax in fig.axes:
        assert ax.yaxis.get_offset_text().get_text() == "" and ax.xaxis.get_offset_text().get_text() == ""
    loss_ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "1.00002" in loss_ticks and "4e-6" in [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert "1002" in [t.get_text() for t in fig.axes[0].get_xticklabels()]
    plt.close(fig)
    # a loss that moves in its sixth digit: each tick still has its own label
    fig = training_curves_figure([{"eval_loss": 1.0986 + 2e-6 * s, "step": s} for s in range(1, 6)])
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert len(labels) > 2 and len(set(labels)) == len(labels) and "1.098606" in labels, labels
    plt.close(fig)


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("rows", [1, 4])
def test_reconstruction_title_clears_the_column_headers(rows):
    fig = reconstruction_figure(tiny(True), torch.randn(rows, 3, 16, 16), title="mask ratio 0.75")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (title,) = [t.get_window_extent(renderer) for t in fig.texts if t.get_text() == "mask ratio 0.75"]
    headers = [ax.title for ax in fig.axes if ax.get_title()]
    assert [h.get_text() for h in headers] == ["original", "masked", "reconstruction", "reconstruction + visible"]
    for header in headers:
        box = header.get_window_extent(renderer)
        assert not _boxes_overlap(title, box), header.get_text()
        assert (title.y0 - box.y1) * 72 / fig.dpi >= 6, "the title sits on the headers"  # a clear gap, in points
    plt.close(fig)


def _drawn(fig):
    return [image for ax in fig.axes for image in ax.get_images()]


def test_grayscale_data_is_shown_in_grayscale():
    gray = torch.rand(2, 1, 16, 16)
    one_channel = MAEForPreTraining(tiny_config(num_hidden_layers=1, num_channels=1)).eval()
    mean, std = (
        torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1),
    )
    for model, pixels in (
        (one_channel, (gray - 0.485) / 0.229),
        (tiny(True), (gray.expand(2, 3, 16, 16) - mean) / std),
    ):
        fig = reconstruction_figure(model, pixels)
        images = _drawn(fig)
        assert len(images) == 8 and all(i.get_array().ndim == 2 and i.get_cmap().name == "gray" for i in images)
        assert all(i.get_clim() == (0.0, 1.0) for i in images)  # no per-image contrast stretch
        plt.close(fig)
    fig = reconstruction_figure(tiny(True), torch.randn(2, 3, 16, 16))  # colour data stays in colour
    assert all(i.get_array().shape[-1] == 3 for i in _drawn(fig))
    plt.close(fig)


def test_pipeline_reconstructions_reach_tensorboard_in_grayscale(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hf_mae.training import DataArguments, MAEPretrainingArguments, ModelArguments, run_pretraining

    args = MAEPretrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=2, warmup_steps=1, logging_steps=1,
        report_to=["tensorboard"], save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    data = DataArguments(dataset_name="digits", max_train_samples=32, max_eval_samples=8, num_reconstructions=2)
    run_pretraining(ModelArguments(preset="demo-tiny-32"), data, args)
    (run_dir,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert "reconstructions" in events.Tags()["images"] and "train/loss" in events.Tags()["scalars"]
    (logged,) = events.Images("reconstructions")
    assert logged.step == 2 and logged.width > 300
    # the digits are grayscale pictures stored as RGB: the PNG is all grey levels
    with Image.open(tmp_path / "reconstructions.png") as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert np.abs(pixels - pixels[..., :1]).max() == 0
