import torch
from helpers import tiny_config
from PIL import Image

from hf_mae import MAEForPreTraining
from hf_mae.losses import normalize_patches
from hf_mae.visualize import plot_training_curves, reconstruct, save_reconstruction_grid


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
