"""Numerical parity of converted models with transformers' ViTMAE, the official MAE algorithm and timm's ViT.

Every tensor of every source model is random (including position tables, mask token and LayerNorm weights), so a
wrong mapping cannot hide behind a zero or an identity init. fp32, same `noise`, atol 1e-5.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from functools import partial  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.layers import PatchEmbed  # noqa: E402
from timm.models.vision_transformer import Block, VisionTransformer  # noqa: E402
from torch import nn  # noqa: E402
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

from hf_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel  # noqa: E402
from hf_mae.convert import (  # noqa: E402
    convert_official_checkpoint,
    convert_timm_state_dict,
    convert_transformers_model,
    timm_model_kwargs,
    to_official_state_dict,
    to_timm_state_dict,
    to_transformers,
)

ATOL = 1e-5


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every floating-point parameter and buffer: norm weights around 1, the rest around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=g)
            if name.endswith("running_var"):
                tensor.copy_(noise.abs() + 0.5)
            elif "norm" in name and name.endswith("weight"):
                tensor.copy_(1 + 0.2 * noise)
            else:
                tensor.copy_(0.3 * noise)
    return module.eval()


def inputs(channels: int, size: int, num_patches: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g), torch.rand(batch, num_patches, generator=g)


# ----------------------------------------------------------------------------------------------------------------------
# transformers ViTMAE
# ----------------------------------------------------------------------------------------------------------------------
TRANSFORMERS_CONFIGS = {
    "base": dict(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        mask_ratio=0.75,
        norm_pix_loss=False,
        qkv_bias=True,
        layer_norm_eps=1e-12,
    ),
    "normpix-nobias-1ch": dict(
        image_size=24,
        patch_size=3,
        num_channels=1,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=3,
        intermediate_size=192,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=128,
        mask_ratio=0.5,
        norm_pix_loss=True,
        qkv_bias=False,
        layer_norm_eps=1e-6,
    ),
    "wide-patch8-4ch": dict(
        image_size=32,
        patch_size=8,
        num_channels=4,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=8,
        intermediate_size=96,
        decoder_hidden_size=24,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=3,
        decoder_intermediate_size=40,
        mask_ratio=0.6,
        norm_pix_loss=True,
        qkv_bias=True,
        layer_norm_eps=1e-6,
    ),
}


def transformers_model(name: str, attn_implementation: str = "eager", seed: int = 0) -> ViTMAEForPreTraining:
    config = ViTMAEConfig(**TRANSFORMERS_CONFIGS[name])
    config._attn_implementation = attn_implementation
    return randomize_(ViTMAEForPreTraining(config), seed)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(TRANSFORMERS_CONFIGS))
def test_transformers_parity(name, attn_implementation):
    hf = transformers_model(name, attn_implementation)
    ours = convert_transformers_model(hf)
    spec = TRANSFORMERS_CONFIGS[name]
    assert isinstance(ours, MAEForPreTraining)
    assert ours.config.layer_norm_eps == spec["layer_norm_eps"]
    assert ours.config.norm_pix_loss == spec["norm_pix_loss"]
    assert ours.config.mask_ratio == spec["mask_ratio"]
    pixels, noise = inputs(spec["num_channels"], spec["image_size"], ours.config.num_patches)
    with torch.no_grad():
        expected, got = hf(pixel_values=pixels, noise=noise), ours(pixels, noise=noise)
        expected_latent = hf.vit(pixel_values=pixels, noise=noise).last_hidden_state
        got_latent = ours.mae(pixels, noise=noise).last_hidden_state
    torch.testing.assert_close(got.mask, expected.mask, atol=0, rtol=0)
    torch.testing.assert_close(got.ids_restore, expected.ids_restore, atol=0, rtol=0)
    torch.testing.assert_close(got_latent, expected_latent, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["base", "normpix-nobias-1ch"])
def test_hf_mae_transformers_round_trip_is_identical(name):
    ours = convert_transformers_model(transformers_model(name, seed=3))
    # the qkv_bias=False config gets zero decoder qkv biases from the conversion: the round trip keeps them zero
    back = convert_transformers_model(to_transformers(ours))
    before, after = ours.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert back.config.to_diff_dict() == ours.config.to_diff_dict()


def test_encoder_only_round_trip_through_vitmae_model():
    encoder = randomize_(MAEModel(MAEConfig(image_size=16, patch_size=4, hidden_size=32, num_attention_heads=2)))
    vit = to_transformers(encoder)
    assert type(vit).__name__ == "ViTMAEModel"
    back = convert_transformers_model(vit)
    assert isinstance(back, MAEModel)
    for key, value in encoder.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_to_transformers_rejects_decoder_qkv_bias_it_cannot_hold():
    ours = convert_transformers_model(transformers_model("normpix-nobias-1ch"))
    with torch.no_grad():
        ours.decoder.blocks[1].attn.qkv.bias.fill_(0.5)
    with pytest.raises(ValueError, match=r"decoder\.blocks\.1\.attn\.qkv\.bias"):
        to_transformers(ours)


# ----------------------------------------------------------------------------------------------------------------------
# Official MAE (facebookresearch/mae models_mae.py), re-stated from the algorithm
# ----------------------------------------------------------------------------------------------------------------------
class OfficialMAE(nn.Module):
    """MaskedAutoencoderViT as the official code computes it: timm blocks, LayerNorm eps 1e-6, official names."""

    def __init__(
        self, img_size, patch_size, in_chans, dim, depth, heads, dec_dim, dec_depth, dec_heads, mlp_ratio, npl
    ):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size, self.norm_pix_loss = patch_size, npl
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(dim)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dec_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dec_dim, dec_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(dec_depth)
        )
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch_size**2 * in_chans)

    def patchify(self, imgs):
        n, c, side, _ = imgs.shape
        p, g = self.patch_size, imgs.shape[2] // self.patch_size
        x = torch.einsum("nchpwq->nhwpqc", imgs.reshape(n, c, g, p, g, p))
        return x.reshape(n, g * g, p * p * c)

    @staticmethod
    def random_masking(x, mask_ratio, noise):
        n, length, dim = x.shape
        keep = int(length * (1 - mask_ratio))
        order = torch.argsort(noise, dim=1)  # ascending noise: the first `keep` stay
        restore = torch.argsort(order, dim=1)
        visible = torch.gather(x, 1, order[:, :keep, None].repeat(1, 1, dim))
        mask = torch.ones(n, length)
        mask[:, :keep] = 0
        return visible, torch.gather(mask, 1, restore), restore

    def forward_encoder(self, imgs, mask_ratio, noise):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, restore

    def forward_decoder(self, x, restore):
        x = self.decoder_embed(x)
        fill = self.mask_token.repeat(x.shape[0], restore.shape[1] + 1 - x.shape[1], 1)
        tokens = torch.cat([x[:, 1:], fill], dim=1)
        tokens = torch.gather(tokens, 1, restore[..., None].repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio, noise):
        latent, mask, restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, restore)
        return self.forward_loss(imgs, pred, mask), pred, mask, latent


OFFICIAL_CONFIGS = {
    "patch4-pixels": dict(
        img_size=32, patch_size=4, in_chans=3, dim=64, depth=2, heads=4, dec_dim=32, dec_depth=2, dec_heads=4
    )
    | dict(mlp_ratio=4.0, npl=False, mask_ratio=0.75),
    "patch3-normpix-1ch": dict(
        img_size=24, patch_size=3, in_chans=1, dim=48, depth=3, heads=3, dec_dim=16, dec_depth=1, dec_heads=2
    )
    | dict(mlp_ratio=2.0, npl=True, mask_ratio=0.5),
}


@pytest.mark.parametrize("name", list(OFFICIAL_CONFIGS))
def test_official_parity(name):
    spec = dict(OFFICIAL_CONFIGS[name])
    mask_ratio = spec.pop("mask_ratio")
    reference = randomize_(OfficialMAE(**spec), seed=5)
    ours = convert_official_checkpoint(
        reference.state_dict(),
        num_attention_heads=spec["heads"],
        decoder_num_attention_heads=spec["dec_heads"],
        norm_pix_loss=spec["npl"],
        mask_ratio=mask_ratio,
    )
    assert isinstance(ours, MAEForPreTraining)
    assert ours.config.layer_norm_eps == 1e-6 and ours.config.num_hidden_layers == spec["depth"]
    pixels, noise = inputs(spec["in_chans"], spec["img_size"], ours.config.num_patches)
    with torch.no_grad():
        loss, pred, mask, latent = reference(pixels, mask_ratio, noise)
        got = ours(pixels, noise=noise)
        got_latent = ours.mae(pixels, noise=noise).last_hidden_state
    torch.testing.assert_close(got.mask, mask, atol=0, rtol=0)
    torch.testing.assert_close(got_latent, latent, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.logits, pred, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, loss, atol=ATOL, rtol=0)


def official_classifier_state_dict(linear_probe: bool, mean_pool: bool, seed: int = 7) -> dict[str, torch.Tensor]:
    """What models_vit.py (+ main_linprobe.py's BatchNorm head) saves, built from timm's VisionTransformer."""
    vit = VisionTransformer(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
        global_pool="avg" if mean_pool else "token",
        fc_norm=mean_pool,
    )
    if linear_probe:
        vit.head = nn.Sequential(nn.BatchNorm1d(32, affine=False, eps=1e-6), vit.head)
    return dict(randomize_(vit, seed).state_dict())


@pytest.mark.parametrize(
    "layout",
    ["pretrain", "finetune-mean", "finetune-cls", "linprobe-cls"],
)
def test_official_round_trip_keeps_names_and_tensors(layout):
    if layout == "pretrain":
        spec = dict(OFFICIAL_CONFIGS["patch4-pixels"])
        spec.pop("mask_ratio")
        official = dict(randomize_(OfficialMAE(**spec)).state_dict())
    else:
        official = official_classifier_state_dict(layout.startswith("linprobe"), layout.endswith("mean"))
    model = convert_official_checkpoint(official)
    expected_class = MAEForPreTraining if layout == "pretrain" else MAEForImageClassification
    assert type(model) is expected_class
    if layout != "pretrain":
        assert model.config.num_labels == 5
        assert model.config.pooling == ("mean" if layout.endswith("mean") else "cls")
        assert model.config.head_type == ("linear_probe" if layout.startswith("linprobe") else "linear")
    back = to_official_state_dict(model)
    assert back.keys() == official.keys()
    for key, value in official.items():
        assert torch.equal(back[key], value), key


# ----------------------------------------------------------------------------------------------------------------------
# timm VisionTransformer
# ----------------------------------------------------------------------------------------------------------------------
def test_timm_round_trip_encoder_features():
    import timm

    ours = randomize_(
        MAEForPreTraining(
            MAEConfig(
                image_size=32,
                patch_size=4,
                hidden_size=192,
                num_hidden_layers=2,
                num_attention_heads=3,
                decoder_hidden_size=32,
                decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2,
            )
        )
    )
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2, num_classes=0
    ).eval()
    vit.load_state_dict(to_timm_state_dict(ours), strict=True)
    pixels, _ = inputs(3, 32, 64)
    with torch.no_grad():
        expected = ours.mae(pixels, mask_ratio=0.0).last_hidden_state
        torch.testing.assert_close(vit.forward_features(pixels), expected, atol=ATOL, rtol=0)
        # and back: timm's own state dict converts into an encoder with the same features (heads from the table)
        encoder = convert_timm_state_dict(vit.state_dict())
        assert isinstance(encoder, MAEModel) and encoder.config.num_attention_heads == 3
        torch.testing.assert_close(encoder(pixels, mask_ratio=0.0).last_hidden_state, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "pooling, head_type, global_pool",
    [("mean", "linear", "avg"), ("cls", "linear", "token"), ("cls", "linear_probe", "token")],
)
def test_timm_classifier_logits(pooling, head_type, global_pool):
    config = MAEConfig(
        image_size=32,
        patch_size=4,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        pooling=pooling,
        head_type=head_type,
        num_labels=7,
    )
    ours = randomize_(MAEForImageClassification(config))
    vit = VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=4,
        global_pool=global_pool,
        fc_norm=pooling == "mean",
        class_token=True,
        num_classes=7,
    ).eval()
    assert {k: v for k, v in timm_model_kwargs(ours).items()} == dict(
        img_size=32,
        patch_size=4,
        in_chans=3,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
        qkv_bias=True,
        class_token=True,
        global_pool=global_pool,
        fc_norm=pooling == "mean",
        num_classes=7,
    )
    vit.load_state_dict(to_timm_state_dict(ours), strict=True)
    pixels, _ = inputs(3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(vit(pixels), ours(pixels).logits, atol=ATOL, rtol=0)
        if head_type == "linear":  # a folded linear-probe head comes back as a plain linear head
            back = convert_timm_state_dict(vit.state_dict(), num_attention_heads=4)
            torch.testing.assert_close(back(pixels).logits, ours(pixels).logits, atol=ATOL, rtol=0)
