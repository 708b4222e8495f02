"""The official MAE code (facebookresearch/mae) and timm's `VisionTransformer`, both directions.

They share the ViT key layout (`blocks.N.attn.qkv`, `patch_embed.proj`, `pos_embed`, ...); the official pretraining
checkpoints add the decoder (`decoder_*`, `mask_token`), its fine-tuned ones timm's `fc_norm` / `head`. hf_mae nests
the encoder under `mae.` and renames the decoder's and the head's prefixes, so conversion is renaming.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from ..modeling_mae import MAEForImageClassification, MAEModel, MAEPreTrainedModel
from .common import (
    ARCHITECTURE_FIELDS,
    PathLike,
    StateDict,
    build_and_load,
    full_state_dict,
    infer_config,
    list_keys,
    load_checkpoint_file,
    rename_key,
    rename_state_dict,
    resolve_config,
    unwrap_state_dict,
)

logger = logging.getLogger(__name__)

OFFICIAL_TO_HF_MAE: tuple[tuple[str, str], ...] = (
    ("cls_token", "mae.cls_token"),
    ("pos_embed", "mae.pos_embed"),
    ("patch_embed.proj.", "mae.patch_embed.proj."),
    ("blocks.", "mae.blocks."),
    ("norm.", "mae.norm."),
    ("mask_token", "decoder.mask_token"),
    ("decoder_embed.", "decoder.embed."),
    ("decoder_pos_embed", "decoder.pos_embed"),
    ("decoder_blocks.", "decoder.blocks."),
    ("decoder_norm.", "decoder.norm."),
    ("decoder_pred.", "decoder.pred."),
    ("fc_norm.", "mae.fc_norm."),
    ("head.", "classifier."),
)
HF_MAE_TO_OFFICIAL = tuple((dst, src) for src, dst in OFFICIAL_TO_HF_MAE)
OFFICIAL_DECODER_KEY = re.compile(r"^(mask_token$|decoder_)")

# timm features hf_mae cannot represent, with the reason given in the error.
_UNSUPPORTED_TIMM_FEATURES: tuple[tuple[str, str], ...] = (
    (r"\.ls[12]\.", "layer scale (ls1/ls2)"),
    (r"\.attn\.[qk]_norm\.", "query/key normalisation (q_norm/k_norm)"),
    (r"^reg_token$", "register tokens (reg_token)"),
    (r"^dist_token$|^head_dist\.", "a distillation token (DeiT)"),
    (r"^norm_pre\.", "a pre-norm before the blocks (norm_pre)"),
    (r"^attn_pool\.", "attention pooling (attn_pool)"),
    (r"^patch_embed\.norm\.", "a norm inside the patch embedding"),
    (r"\.attn\.norm\.|\.mlp\.norm\.", "scale norms inside attention / MLP"),
)


# ----------------------------------------------------------------------------------------------------------------------
# Into hf_mae
# ----------------------------------------------------------------------------------------------------------------------
def _check_vit_layout(sd: Mapping[str, torch.Tensor], source: str, allow_decoder: bool) -> None:
    """Reject, with the offending keys named, what a plain MAE ViT cannot represent."""
    for pattern, feature in _UNSUPPORTED_TIMM_FEATURES:
        keys = [k for k in sd if re.search(pattern, k)]
        if keys:
            raise ValueError(f"{source} checkpoint uses {feature}, which hf_mae cannot represent: {list_keys(keys)}")
    if not allow_decoder:
        keys = [k for k in sd if OFFICIAL_DECODER_KEY.match(k)]
        if keys:
            raise ValueError(
                f"{source} checkpoint holds MAE decoder keys ({list_keys(keys)}); convert it with --source official"
            )
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in sd]
    if missing:
        what = " (a ViT without class token is not supported)" if "cls_token" in missing else ""
        raise ValueError(f"{source} checkpoint lacks keys: {', '.join(missing)}{what}")
    for key in ("pos_embed", "decoder_pos_embed"):
        if key not in sd:
            continue
        length = sd[key].shape[1]
        if math.isqrt(length - 1) ** 2 == length - 1 and length > 1:
            continue
        if math.isqrt(length) ** 2 == length:
            raise ValueError(
                f"{source} checkpoint: {key} of shape {tuple(sd[key].shape)} has no class-token slot "
                "(timm no_embed_class=True), which hf_mae cannot represent"
            )
        raise ValueError(
            f"{source} checkpoint: {key} of shape {tuple(sd[key].shape)} is not 1 + a square grid of patches"
        )
    if "fc_norm.weight" in sd and not any(k.startswith("head.") for k in sd):
        raise ValueError(
            f"{source} checkpoint has fc_norm but no head (timm global_pool='avg' with num_classes=0): keys "
            "fc_norm.weight, fc_norm.bias have no place in MAEModel; keep the head or drop fc_norm"
        )


def _convert_vit_layout(
    checkpoint: PathLike | Mapping[str, torch.Tensor] | nn.Module,
    source: str,
    allow_decoder: bool,
    preset: str | None,
    overrides: Mapping[str, Any],
) -> MAEPreTrainedModel:
    if isinstance(checkpoint, nn.Module):  # e.g. a timm VisionTransformer in memory
        checkpoint = checkpoint.state_dict()
    if isinstance(checkpoint, Mapping):
        origin = f"{source} state dict"
        sd, args = unwrap_state_dict(checkpoint, origin)
    elif not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"expected a state dict, a module or a path, got {type(checkpoint).__name__}")
    else:
        sd, args = load_checkpoint_file(checkpoint)
        origin = f"{source} checkpoint {checkpoint}"
    _check_vit_layout(sd, source, allow_decoder)
    full = rename_state_dict(sd, OFFICIAL_TO_HF_MAE, origin, "hf_mae")
    inferred = infer_config(full)
    # what the official training run recorded beats our defaults, but not explicit overrides
    recorded = {k: getattr(args, k) for k in ("norm_pix_loss", "mask_ratio") if args is not None and hasattr(args, k)}
    config = resolve_config(
        {**inferred, **recorded},
        ARCHITECTURE_FIELDS,
        preset,
        overrides,
        origin,
        stated_by=dict.fromkeys(recorded, "checkpoint args"),
    )
    # errors name the keys as the checkpoint spells them (the renaming is one-to-one)
    return build_and_load(
        config, full, inferred["image_size"], origin, lambda key: rename_key(key, HF_MAE_TO_OFFICIAL) or key
    )


def convert_official_checkpoint(
    checkpoint: PathLike | Mapping[str, torch.Tensor], *, preset: str | None = None, **config_overrides: Any
) -> MAEPreTrainedModel:
    """Convert a checkpoint of the official MAE code (facebookresearch/mae).

    Args:
        checkpoint: a `.pth` path (weights under `model` or at the top level; the training `args` are allowed and
            their `norm_pix_loss` / `mask_ratio` used) or an in-memory state dict with official names.
        preset: name of an `hf_mae.PRESETS` entry supplying what the weights do not tell (heads, mask ratio, ...).
        config_overrides: `MAEConfig` fields, e.g. `num_attention_heads=16`, `norm_pix_loss=True`, `image_size=128`
            (interpolates the position embeddings).

    Returns:
        `MAEForPreTraining` for a pretraining checkpoint (decoder present), `MAEForImageClassification` for a
        fine-tuned or linear-probe one (head present; `num_labels` from its shape, mean pooling when `fc_norm` is
        present), else `MAEModel`. In eval mode.
    """
    return _convert_vit_layout(checkpoint, "official", True, preset, config_overrides)


def convert_timm_state_dict(
    state_dict_or_path: PathLike | Mapping[str, torch.Tensor] | nn.Module,
    *,
    preset: str | None = None,
    **config_overrides: Any,
) -> MAEModel | MAEForImageClassification:
    """Convert a timm `VisionTransformer` state dict (class token, LayerNorm, no layer scale / qk-norm / registers).

    Args:
        state_dict_or_path: the state dict, a `.safetensors` / `.pth` file holding it, or the timm model itself.
        preset: name of an `hf_mae.PRESETS` entry supplying what the weights do not tell.
        config_overrides: `MAEConfig` fields, as for [`convert_official_checkpoint`].

    Returns:
        `MAEModel` (no head), or `MAEForImageClassification` when `head.*` is present: `fc_norm` present means
        `global_pool='avg'` (pooling "mean"); a head on the final `norm` is read as timm's default
        `global_pool='token'` (pooling "cls").
    """
    return _convert_vit_layout(state_dict_or_path, "timm", False, preset, config_overrides)


# ----------------------------------------------------------------------------------------------------------------------
# Out of hf_mae
# ----------------------------------------------------------------------------------------------------------------------
def to_official_state_dict(model: MAEPreTrainedModel) -> StateDict:
    """The model's weights under the official MAE names (shared storage with the model)."""
    # an unknown key is only reachable if the modeling code grows a tensor the table does not know
    return rename_state_dict(full_state_dict(model), HF_MAE_TO_OFFICIAL, f"hf_mae {type(model).__name__}", "official")


def to_timm_state_dict(model: MAEPreTrainedModel) -> StateDict:
    """A state dict for timm's `VisionTransformer` built with [`timm_model_kwargs`], loadable with `strict=True`.

    The decoder of an `MAEForPreTraining` is dropped. A linear-probe head (BatchNorm without affine + Linear) is
    folded into one Linear, exact in eval mode.
    """
    if isinstance(model, MAEModel) and isinstance(model.norm, nn.Identity):
        raise ValueError(
            "this MAEModel has no final norm (the encoder of a mean-pooling classifier); timm has no such layout, "
            "convert the MAEForImageClassification itself"
        )
    sd = to_official_state_dict(model)
    dropped = [k for k in sd if OFFICIAL_DECODER_KEY.match(k)]
    if dropped:
        logger.info("timm layout is encoder-only: dropping %d decoder tensors", len(dropped))
    sd = {k: v.contiguous() for k, v in sd.items() if k not in dropped}
    if "head.1.weight" in sd:
        bn = model.classifier[0]
        scale = (sd.pop("head.0.running_var") + bn.eps).rsqrt()
        mean = sd.pop("head.0.running_mean")
        sd.pop("head.0.num_batches_tracked", None)
        weight = sd.pop("head.1.weight") * scale[None]
        sd["head.weight"] = weight
        sd["head.bias"] = sd.pop("head.1.bias") - weight @ mean
        logger.info("Folded the linear-probe BatchNorm into the head (eval-mode statistics)")
    if model.config.layer_norm_eps != 1e-6:
        logger.warning(
            "layer_norm_eps=%g but timm's ViT uses 1e-6: build it with norm_layer=partial(nn.LayerNorm, eps=%g) "
            "(timm_model_kwargs does)",
            model.config.layer_norm_eps,
            model.config.layer_norm_eps,
        )
    return sd


def timm_model_kwargs(model: MAEPreTrainedModel) -> dict[str, Any]:
    """Keyword arguments for `timm.models.vision_transformer.VisionTransformer` matching [`to_timm_state_dict`]."""
    c = model.config
    mean_pool = isinstance(model, MAEForImageClassification) and c.pooling == "mean"
    kwargs: dict[str, Any] = dict(
        img_size=c.image_size,
        patch_size=c.patch_size,
        in_chans=c.num_channels,
        embed_dim=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_ratio=c.mlp_ratio,
        qkv_bias=c.qkv_bias,
        class_token=True,
        global_pool="avg" if mean_pool else "token",
        fc_norm=mean_pool,
        num_classes=c.num_labels if isinstance(model, MAEForImageClassification) else 0,
    )
    if c.layer_norm_eps != 1e-6:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=c.layer_norm_eps)
    return kwargs
