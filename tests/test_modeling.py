import math

import pytest
import torch
from helpers import tiny_config

from hf_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel
from hf_mae.modeling_mae import get_2d_sincos_pos_embed
from hf_mae.training.pipeline import freeze_for_linear_probe


def reference_sincos(dim: int, grid: int) -> torch.Tensor:
    """The official numpy formula, written out element by element."""
    table = torch.zeros(1 + grid * grid, dim, dtype=torch.float64)
    quarter = dim // 4
    for h in range(grid):
        for w in range(grid):
            row = 1 + h * grid + w
            for i in range(quarter):
                omega = 1.0 / 10000 ** (i / quarter)
                table[row, i] = math.sin(w * omega)
                table[row, quarter + i] = math.cos(w * omega)
                table[row, 2 * quarter + i] = math.sin(h * omega)
                table[row, 3 * quarter + i] = math.cos(h * omega)
    return table.float()


def test_sincos_matches_analytic_formula():
    assert torch.allclose(get_2d_sincos_pos_embed(16, 3, 3), reference_sincos(16, 3), atol=1e-6)


def test_init_values():
    torch.manual_seed(0)
    config = tiny_config(hidden_size=256, num_attention_heads=4, decoder_hidden_size=128)
    model = MAEForPreTraining(config)
    assert torch.allclose(model.mae.pos_embed[0], reference_sincos(256, 4), atol=1e-6)
    assert torch.allclose(model.decoder.pos_embed[0], reference_sincos(128, 4), atol=1e-6)
    assert not model.mae.pos_embed.requires_grad and not model.decoder.pos_embed.requires_grad
    # tokens: normal(0.02)
    assert 0.012 < model.mae.cls_token.std().item() < 0.03
    assert 0.012 < model.decoder.mask_token.std().item() < 0.03
    # xavier-uniform Linear: bound sqrt(6 / (fan_in + fan_out)), zero bias
    fc1 = model.mae.blocks[0].mlp.fc1
    bound = math.sqrt(6 / (fc1.in_features + fc1.out_features))
    assert fc1.weight.abs().max() <= bound and fc1.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(fc1.bias) == 0
    # patch embedding initialised as a Linear over the flattened patch
    w = model.mae.patch_embed.proj.weight
    bound = math.sqrt(6 / (w[0].numel() + w.shape[0]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    norm = model.mae.blocks[0].norm1
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0) and norm.eps == 1e-6


def test_classifier_head_init():
    config = tiny_config(num_labels=7)
    model = MAEForImageClassification(config)
    assert model.classifier.weight.std().item() < 1e-4  # trunc-normal(2e-5)
    probe = MAEForImageClassification(tiny_config(num_labels=7, head_type="linear_probe", pooling="cls"))
    assert isinstance(probe.classifier[0], torch.nn.BatchNorm1d) and not probe.classifier[0].affine
    # the model does not decide training policy: built directly, its encoder is trainable ...
    assert probe.mae.pos_embed.requires_grad and all(p.requires_grad for p in probe.mae.parameters())
    # ... and the linear-probe run freezes it
    freeze_for_linear_probe(probe)
    trainable = {n for n, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.1.weight", "classifier.1.bias"}


def test_forward_shapes_and_mask():
    config = tiny_config(mask_ratio=0.75)
    model = MAEForPreTraining(config).eval()
    x = torch.randn(3, 3, 16, 16)
    out = model(x)
    assert out.logits.shape == (3, 16, 4 * 4 * 3)
    assert out.mask.shape == (3, 16) and torch.all(out.mask.sum(1) == 12)
    assert out.ids_restore.shape == (3, 16)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    enc = model.mae(x, noise=torch.rand(3, 16))
    assert enc.last_hidden_state.shape == (3, 1 + 4, 32)


def test_same_noise_same_mask_and_output():
    model = MAEForPreTraining(tiny_config()).eval()
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    a, b = model(x, noise=noise), model(x, noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    # the kept patches are the ones with the smallest noise
    kept = noise.argsort(dim=1)[:, :4]
    assert torch.all(a.mask.gather(1, kept) == 0)
    c = model(x, noise=torch.rand(2, 16))
    assert not torch.equal(a.mask, c.mask)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_counts_only_masked_patches(norm_pix_loss):
    model = MAEForPreTraining(tiny_config(norm_pix_loss=norm_pix_loss)).eval()
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    out = model(x, noise=noise)
    target = model.patchify(x)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    # changing predictions on visible patches leaves the loss unchanged ...
    from hf_mae.losses import mae_reconstruction_loss

    changed = out.logits.clone()
    changed[out.mask == 0] += 100.0
    loss = mae_reconstruction_loss(changed, model.patchify(x), out.mask, norm_pix_loss)
    assert torch.allclose(loss, out.loss)
    # ... and the value is the mean per-patch MSE over the removed patches
    per_patch = ((out.logits - target) ** 2).mean(-1)
    expected = per_patch[out.mask == 1].mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)
    # a perfect prediction on the removed patches gives zero loss
    perfect = torch.where(out.mask.bool()[..., None], target, out.logits)
    assert mae_reconstruction_loss(perfect, model.patchify(x), out.mask, norm_pix_loss).item() < 1e-10


def test_patchify_roundtrip_and_order():
    model = MAEForPreTraining(tiny_config(num_channels=2, image_size=8, patch_size=2))
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    patches = model.patchify(x)
    assert patches.shape == (1, 16, 8)
    # first patch, pixel-major with channels last: (0,0,c0), (0,0,c1), (0,1,c0), ...
    assert patches[0, 0].tolist() == [0.0, 64.0, 1.0, 65.0, 8.0, 72.0, 9.0, 73.0]
    assert torch.equal(model.unpatchify(patches), x)


def test_classification_labels_and_soft_targets():
    model = MAEForImageClassification(tiny_config(num_labels=5))
    x = torch.randn(4, 3, 16, 16)
    hard = model(x, labels=torch.tensor([0, 1, 2, 3]))
    soft = model(x, labels=torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 5).float())
    assert hard.logits.shape == (4, 5)
    assert torch.allclose(hard.loss, soft.loss, atol=1e-6)
    hard.loss.backward()
    assert model.mae.blocks[0].attn.qkv.weight.grad is not None
    assert model.mae.pos_embed.requires_grad  # learnable in fine-tuning, as in MAE
    with pytest.raises(ValueError, match="soft-target labels"):
        model(x, labels=torch.rand(4, 3))


def test_cls_pooling_uses_final_norm():
    model = MAEForImageClassification(tiny_config(num_labels=3, pooling="cls")).eval()
    assert isinstance(model.mae.norm, torch.nn.LayerNorm) and model.mae.fc_norm is None
    assert model.config.use_fc_norm is False
    x = torch.randn(2, 3, 16, 16)
    enc = model.mae(x)
    assert torch.equal(enc.pooler_output, enc.last_hidden_state[:, 0])
    assert torch.equal(model(x).logits, model.classifier(enc.pooler_output))
    mean_model = MAEForImageClassification(tiny_config(num_labels=3)).eval()
    assert isinstance(mean_model.mae.norm, torch.nn.Identity) and mean_model.config.use_fc_norm is True
    # the recipe's feature: fc_norm of the mean patch token, held by the encoder so AutoModel gives it too
    enc = mean_model.mae(x)
    assert torch.allclose(enc.pooler_output, mean_model.mae.fc_norm(enc.last_hidden_state[:, 1:].mean(1)))
    assert torch.equal(mean_model(x).logits, mean_model.classifier(enc.pooler_output))


def test_interpolate_pos_encoding():
    model = MAEForPreTraining(tiny_config()).eval()
    x = torch.randn(1, 3, 24, 24)
    with pytest.raises(ValueError, match="does not match config.image_size=16"):
        model(x)
    out = model(x, interpolate_pos_encoding=True)
    assert out.logits.shape == (1, 36, 48) and torch.all(out.mask.sum(1) == 27)
    clf = MAEForImageClassification(tiny_config(num_labels=2))
    assert clf(x, interpolate_pos_encoding=True).logits.shape == (1, 2)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = MAEForPreTraining(tiny_config())
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    model(x, noise=noise).loss.backward()
    ref = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.mae.blocks[0].gradient_checkpointing
    model(x, noise=noise).loss.backward()
    got = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(ref) == len(got) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ref, got))


def test_drop_path_only_in_training():
    model = MAEForImageClassification(tiny_config(num_labels=2, drop_path_rate=0.5)).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x).logits, model(x).logits)
    assert model.mae.blocks[-1].drop_path == 0.5 and model.mae.blocks[0].drop_path == 0.0


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=0.0), "mask_ratio"),
        (dict(image_size=18), "image_size=18"),
        (dict(num_attention_heads=5), "num_attention_heads=5"),
        (dict(decoder_num_attention_heads=3), "decoder_num_attention_heads=3"),
        (dict(hidden_size=30, num_attention_heads=3), "hidden_size=30"),
        (dict(pooling="max"), "pooling"),
        (dict(head_type="mlp"), "head_type"),
        (dict(patch_size=0), "patch_size"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
    ],
)
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_presets():
    seed = MAEConfig.from_preset("seed-vit-b8-64")
    assert (seed.image_size, seed.patch_size, seed.hidden_size, seed.num_hidden_layers) == (64, 8, 768, 12)
    assert (seed.decoder_hidden_size, seed.decoder_num_hidden_layers, seed.decoder_num_attention_heads) == (512, 8, 16)
    assert seed.norm_pix_loss and seed.mask_ratio == 0.75 and seed.num_patches == 64
    for name, width in [
        ("vit-tiny-patch16-224", 192),
        ("vit-small-patch16-224", 384),
        ("vit-large-patch16-224", 1024),
    ]:
        assert MAEConfig.from_preset(name).hidden_size == width
    assert MAEConfig.from_preset("vit-huge-patch14-224").patch_size == 14
    assert MAEConfig.from_preset("seed-vit-b8-64", mask_ratio=0.9).mask_ratio == 0.9
    with pytest.raises(ValueError, match="Unknown MAE preset 'vit-xl'"):
        MAEConfig.from_preset("vit-xl")


def test_bad_inputs():
    model = MAEForPreTraining(tiny_config()).eval()
    with pytest.raises(ValueError, match="1 channels but config.num_channels=3"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"noise must have shape \[batch, num_patches\] = \[2, 16\]"):
        model(torch.randn(2, 3, 16, 16), noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="not divisible by config.patch_size=4"):
        model(torch.randn(1, 3, 18, 18), interpolate_pos_encoding=True)


def test_encoder_masks_only_when_asked():
    model = MAEModel(tiny_config()).eval()
    x = torch.randn(2, 3, 16, 16)
    # no noise, no mask_ratio: every patch in order, the same on every call (features, pipelines)
    out = model(x, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 17, 32)
    assert torch.all(out.mask == 0) and torch.equal(out.ids_restore[0], torch.arange(16))
    assert len(out.hidden_states) == 3  # embeddings + 2 blocks
    assert torch.equal(model(x).last_hidden_state, out.last_hidden_state)
    assert torch.equal(model(x, mask_ratio=0.0).last_hidden_state, out.last_hidden_state)
    # the pretraining layout pools the final-normed cls token
    assert out.pooler_output.shape == (2, 32) and torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    # noise alone masks at config.mask_ratio (0.75: 4 of 16 kept); an explicit ratio wins
    noise = torch.rand(2, 16)
    assert model(x, noise=noise).last_hidden_state.shape == (2, 5, 32)
    assert model(x, noise=noise, mask_ratio=0.5).last_hidden_state.shape == (2, 9, 32)
    masked = model(x, mask_ratio=0.5)
    assert masked.last_hidden_state.shape == (2, 9, 32) and torch.all(masked.mask.sum(1) == 8)
    with pytest.raises(ValueError, match="mask_ratio=0.0 asks for none"):
        model(x, noise=noise, mask_ratio=0.0)
    with pytest.raises(ValueError, match=r"MAEModel.forward.mask_ratio must be in \(0, 1\), got 1.0"):
        model(x, mask_ratio=1.0)


def test_pretraining_still_masks_at_the_config_ratio():
    model = MAEForPreTraining(tiny_config(mask_ratio=0.5)).eval()
    out = model(torch.randn(2, 3, 16, 16))
    assert torch.all(out.mask.sum(1) == 8)


def test_bf16_cpu_attention_matches_fp32():
    from hf_mae.modeling_mae import MAEAttention

    torch.manual_seed(0)
    attn = MAEAttention(64, 4)
    x = torch.randn(2, 17, 64)
    reference = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), reference, atol=0.05, rtol=0.05)
    assert (low.float() - reference).pow(2).mean().sqrt() < 0.01
