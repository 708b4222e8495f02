"""Configuration of the MAE models: the single source of every architectural choice."""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

# Named presets. ViT-T/S/B/L/H follow the ViT / DeiT widths; the decoder is MAE's default (512 wide, 8 deep,
# 16 heads) for all of them. `seed-vit-b8-64` is the reproduction study ("Exploring MAE vision learners"): ViT-B,
# patch 8, 64 px, norm_pix_loss on.
PRESETS: dict[str, dict[str, Any]] = {
    "vit-tiny-patch16-224": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3),
    "vit-small-patch16-224": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vit-base-patch16-224": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vit-large-patch16-224": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "vit-huge-patch14-224": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, patch_size=14),
    "seed-vit-b8-64": dict(
        image_size=64,
        patch_size=8,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=8,
        decoder_num_attention_heads=16,
        mask_ratio=0.75,
        norm_pix_loss=True,
    ),
    # A few-second model for demos and tests on CPU.
    "demo-tiny-32": dict(
        image_size=32,
        patch_size=4,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        mask_ratio=0.75,
        norm_pix_loss=True,
    ),
}

POOLING_TYPES = ("mean", "cls")
HEAD_TYPES = ("linear", "linear_probe")

# The one statement of these two settings' meaning and range; training arguments that override them use both.
MASK_RATIO_HELP = "fraction of patches removed in pretraining, in (0, 1)"
DROP_PATH_RATE_HELP = "stochastic depth, linearly increasing over the encoder blocks, in [0, 1)"


def check_mask_ratio(value: float, owner: str = "MAEConfig") -> None:
    """Raise `ValueError` unless `value` is a valid `mask_ratio` (in (0, 1)); `owner` names the dataclass."""
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{owner}.mask_ratio must be in (0, 1), got {value!r}")


def check_drop_path_rate(value: float, owner: str = "MAEConfig") -> None:
    """Raise `ValueError` unless `value` is a valid `drop_path_rate` (in [0, 1)); `owner` names the dataclass."""
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{owner}.drop_path_rate must be in [0, 1), got {value!r}")


class MAEConfig(PretrainedConfig):
    r"""
    Configuration for [`MAEModel`], [`MAEForPreTraining`] and [`MAEForImageClassification`].

    Args:
        image_size (`int`, defaults to 224): height and width of the input images.
        patch_size (`int`, defaults to 16): side of each square patch.
        num_channels (`int`, defaults to 3): input channels.
        hidden_size (`int`, defaults to 768): encoder width.
        num_hidden_layers (`int`, defaults to 12): encoder depth.
        num_attention_heads (`int`, defaults to 12): encoder heads; must divide `hidden_size`.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width as a multiple of the block width.
        qkv_bias (`bool`, defaults to `True`): bias on the fused query/key/value projection.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of every LayerNorm, as in the official MAE.
        decoder_hidden_size (`int`, defaults to 512): decoder width.
        decoder_num_hidden_layers (`int`, defaults to 8): decoder depth.
        decoder_num_attention_heads (`int`, defaults to 16): decoder heads; must divide `decoder_hidden_size`.
        decoder_mlp_ratio (`float`, defaults to 4.0): decoder MLP ratio.
        mask_ratio (`float`, defaults to 0.75): fraction of patches removed in pretraining, in (0, 1).
            `MAEPretrainingArguments.mask_ratio` overrides it (validated by the same `check_mask_ratio`).
        norm_pix_loss (`bool`, defaults to `False`): regress per-patch normalised pixels (mean 0, var 1).
        norm_pix_eps (`float`, defaults to 1e-6): epsilon of that normalisation (the reproduction study used 1e-5).
        drop_path_rate (`float`, defaults to 0.0): stochastic depth, linearly increasing over the encoder blocks, in
            [0, 1). `MAEFinetuningArguments.drop_path_rate` sets it for fine-tuning (same `check_drop_path_rate`).
        pooling (`str`, defaults to `"mean"`): classification feature: `"mean"` (global average of the patch tokens
            followed by `fc_norm`, MAE fine-tuning) or `"cls"` (final-normed cls token, MAE linear probing).
        head_type (`str`, defaults to `"linear"`): `"linear"` or `"linear_probe"` (BatchNorm without affine +
            Linear; the linear-probe run freezes the encoder).
        use_fc_norm (`bool`, *optional*): the encoder's layout, recorded by the model built on this config so that a
            saved directory's encoder reloads as it was (`MAEModel` / `AutoModel`): `True` when it ends in `fc_norm`
            over the mean patch token instead of the final LayerNorm (a `pooling="mean"` classifier, MAE's fine-tuning
            ViT), `False` otherwise (pretraining, `pooling="cls"`). `None` (a config never built into a model):
            `True` only for a config saved by a mean-pooling `MAEForImageClassification`.
        initializer_range (`float`, defaults to 0.02): std of the cls and mask tokens.
        head_init_std (`float`, defaults to 2e-5): std of the fine-tuning head (MAE uses trunc-normal 2e-5).
    """

    model_type = "hf_mae"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        decoder_hidden_size: int = 512,
        decoder_num_hidden_layers: int = 8,
        decoder_num_attention_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        norm_pix_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        pooling: str = "mean",
        head_type: str = "linear",
        initializer_range: float = 0.02,
        head_init_std: float = 2e-5,
        use_fc_norm: bool | None = None,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_mlp_ratio = decoder_mlp_ratio
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.norm_pix_eps = norm_pix_eps
        self.drop_path_rate = drop_path_rate
        self.pooling = pooling
        self.head_type = head_type
        self.initializer_range = initializer_range
        self.head_init_std = head_init_std
        self.use_fc_norm = use_fc_norm
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """Raise `ValueError` naming the field and value of the first inconsistent setting."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MAEConfig.{name} must be a positive integer, got {value!r}")

        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "decoder_hidden_size",
            "decoder_num_hidden_layers",
            "decoder_num_attention_heads",
        ):
            positive_int(name)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"MAEConfig.image_size={self.image_size} is not divisible by MAEConfig.patch_size={self.patch_size}"
            )
        for width, heads in (
            ("hidden_size", "num_attention_heads"),
            ("decoder_hidden_size", "decoder_num_attention_heads"),
        ):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(
                    f"MAEConfig.{heads}={getattr(self, heads)} does not divide MAEConfig.{width}={getattr(self, width)}"
                )
        for width in ("hidden_size", "decoder_hidden_size"):
            if getattr(self, width) % 4:
                raise ValueError(
                    f"MAEConfig.{width}={getattr(self, width)} must be a multiple of 4 for 2-D sin-cos position embeddings"
                )
        check_mask_ratio(self.mask_ratio)
        check_drop_path_rate(self.drop_path_rate)
        for name in ("mlp_ratio", "decoder_mlp_ratio", "layer_norm_eps", "norm_pix_eps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"MAEConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"MAEConfig.pooling must be one of {POOLING_TYPES}, got {self.pooling!r}")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"MAEConfig.head_type must be one of {HEAD_TYPES}, got {self.head_type!r}")
        if self.use_fc_norm is not None and not isinstance(self.use_fc_norm, bool):
            raise ValueError(f"MAEConfig.use_fc_norm must be None, True or False, got {self.use_fc_norm!r}")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        # transformers names the file when it is not JSON, but valid JSON that is no object ends in a TypeError
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not isinstance(config_dict, dict):
            raise ValueError(
                f"{pretrained_model_name_or_path}: its config.json holds a {type(config_dict).__name__}, not a JSON "
                "object of config fields"
            )
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        # `from_pretrained(path, **overrides)` sets the overrides after __init__'s checks: check them too
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate_architecture()
        return result

    def update(self, config_dict: dict[str, Any]) -> None:
        super().update(config_dict)
        self.validate_architecture()

    @property
    def encoder_uses_fc_norm(self) -> bool:
        """`use_fc_norm`, or for a config never built into a model, whether a mean-pooling classifier saved it."""
        if self.use_fc_norm is not None:
            return self.use_fc_norm
        return self.pooling == "mean" and "MAEForImageClassification" in (self.architectures or ())

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_masked(self) -> int:
        """Patches removed per image: L minus the `int(L * (1 - mask_ratio))` kept, as in the official code."""
        return self.num_patches - int(self.num_patches * (1 - self.mask_ratio))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MAEConfig:
        """Build a config from a named preset (see `PRESETS`), with keyword overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown MAE preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        kwargs = copy.deepcopy(PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)
