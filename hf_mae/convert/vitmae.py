"""transformers' ViTMAE (`ViTMAEForPreTraining`, `ViTMAEModel`), both directions.

transformers keeps separate q/k/v projections and its own block names; hf_mae fuses q/k/v into one `attn.qkv` (in
that order, as the official code and timm do). Unlike a weights file, a transformers directory states its heads,
`norm_pix_loss` and `layer_norm_eps`, so those are kept rather than guessed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel
from transformers import initialization as hf_init

from ..modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel
from .common import (
    ARCHITECTURE_FIELDS,
    NOT_IN_WEIGHTS,
    STATED_FIELDS,
    PathLike,
    StateDict,
    build_and_load,
    full_state_dict,
    list_keys,
    load_strict,
    mlp_ratio,
    resolve_config,
)

logger = logging.getLogger(__name__)

# transformers ViTMAE (v5 names) per-block names -> hf_mae per-block names; q/k/v are fused separately.
_BLOCK = (
    ("layernorm_before", "norm1"),
    ("attention.o_proj", "attn.proj"),
    ("layernorm_after", "norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
)
_TOP = (
    ("vit.embeddings.cls_token", "mae.cls_token"),
    ("vit.embeddings.position_embeddings", "mae.pos_embed"),
    ("vit.embeddings.patch_embeddings.projection.weight", "mae.patch_embed.proj.weight"),
    ("vit.embeddings.patch_embeddings.projection.bias", "mae.patch_embed.proj.bias"),
    ("vit.layernorm.weight", "mae.norm.weight"),
    ("vit.layernorm.bias", "mae.norm.bias"),
)
_DECODER_TOP = (
    ("decoder.mask_token", "decoder.mask_token"),
    ("decoder.decoder_pos_embed", "decoder.pos_embed"),
    ("decoder.decoder_embed.weight", "decoder.embed.weight"),
    ("decoder.decoder_embed.bias", "decoder.embed.bias"),
    ("decoder.decoder_norm.weight", "decoder.norm.weight"),
    ("decoder.decoder_norm.bias", "decoder.norm.bias"),
    ("decoder.decoder_pred.weight", "decoder.pred.weight"),
    ("decoder.decoder_pred.bias", "decoder.pred.bias"),
)


# ----------------------------------------------------------------------------------------------------------------------
# Into hf_mae
# ----------------------------------------------------------------------------------------------------------------------
def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"ViTMAEConfig.{name}={value!r}: hf_mae supports square sizes only")
        value = value[0]
    return int(value)


def _config_from_transformers(tc: ViTMAEConfig, has_decoder: bool) -> dict[str, Any]:
    if tc.hidden_act != "gelu":
        raise ValueError(f"ViTMAEConfig.hidden_act={tc.hidden_act!r}: hf_mae blocks use exact GELU ('gelu') only")
    head_dim = getattr(tc, "head_dim", None)
    if head_dim is not None and head_dim * tc.num_attention_heads != tc.hidden_size:
        raise ValueError(f"ViTMAEConfig.head_dim={head_dim} x heads != hidden_size={tc.hidden_size}")
    if tc.hidden_dropout_prob or tc.attention_probs_dropout_prob:
        logger.warning("hf_mae has no dropout: hidden/attention dropout of the ViTMAE config is dropped")
    config = dict(
        image_size=_square(tc.image_size, "image_size"),
        patch_size=_square(tc.patch_size, "patch_size"),
        num_channels=tc.num_channels,
        hidden_size=tc.hidden_size,
        num_hidden_layers=tc.num_hidden_layers,
        num_attention_heads=tc.num_attention_heads,
        mlp_ratio=mlp_ratio(tc.intermediate_size, tc.hidden_size),
        qkv_bias=tc.qkv_bias,
        layer_norm_eps=tc.layer_norm_eps,  # transformers defaults to 1e-12, the MAE weights were trained with 1e-6
        mask_ratio=tc.mask_ratio,
        norm_pix_loss=tc.norm_pix_loss,
        norm_pix_eps=1e-6,  # hard-coded in transformers' loss
        initializer_range=tc.initializer_range,
    )
    if has_decoder:
        config.update(
            decoder_hidden_size=tc.decoder_hidden_size,
            decoder_num_hidden_layers=tc.decoder_num_hidden_layers,
            decoder_num_attention_heads=tc.decoder_num_attention_heads,
            decoder_mlp_ratio=mlp_ratio(tc.decoder_intermediate_size, tc.decoder_hidden_size),
        )
    return config


def _transformers_to_hf_mae(sd: Mapping[str, torch.Tensor], tc: ViTMAEConfig, has_decoder: bool) -> StateDict:
    """ViTMAEForPreTraining names (v5) -> hf_mae names, fusing q/k/v (in that order) into `attn.qkv`."""
    out: StateDict = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(src: str) -> torch.Tensor | None:
        if src not in sd:
            missing.append(src)
            return None
        used.add(src)
        return sd[src]

    top = _TOP + (_DECODER_TOP if has_decoder else ())
    groups = [("vit.layers.", "mae.blocks.", tc.num_hidden_layers, tc.qkv_bias)]
    if has_decoder:
        # transformers' decoder follows config.qkv_bias; hf_mae's decoder always has the bias (official MAE), zero here
        groups.append(("decoder.decoder_layers.", "decoder.blocks.", tc.decoder_num_hidden_layers, True))
    for src, dst in top:
        out[dst] = take(src)
    for src_prefix, dst_prefix, depth, want_bias in groups:
        for i in range(depth):
            s, d = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            for src, dst in _BLOCK:
                for kind in ("weight", "bias"):
                    out[f"{d}{dst}.{kind}"] = take(f"{s}{src}.{kind}")
            qkv = [take(f"{s}attention.{n}_proj.weight") for n in "qkv"]
            out[f"{d}attn.qkv.weight"] = None if None in qkv else torch.cat(qkv, dim=0)
            if tc.qkv_bias:
                biases = [take(f"{s}attention.{n}_proj.bias") for n in "qkv"]
                out[f"{d}attn.qkv.bias"] = None if None in biases else torch.cat(biases, dim=0)
            elif want_bias:
                out[f"{d}attn.qkv.bias"] = qkv[0].new_zeros(3 * qkv[0].shape[0])
    unexpected = sorted(set(sd) - used)
    if missing or unexpected:
        raise ValueError(
            "transformers ViTMAE state dict does not fit: "
            + "; ".join(
                f"{what} keys: {list_keys(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected))
            )
        )
    return out


def _load_transformers_dir(directory: PathLike) -> ViTMAEForPreTraining | ViTMAEModel:
    config = ViTMAEConfig.from_pretrained(directory)
    architectures = config.architectures or ["ViTMAEForPreTraining"]
    cls = ViTMAEModel if architectures[0] == "ViTMAEModel" else ViTMAEForPreTraining
    # transformers v5 renames v4 checkpoints (attention.attention.query, ...) while it loads
    model, info = cls.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ValueError(
            f"transformers checkpoint {directory} does not fit {cls.__name__}: "
            + "; ".join(f"{k.replace('_', ' ')}: {list_keys([str(x) for x in v])}" for k, v in problems.items() if v)
        )
    return model


def convert_transformers_model(
    model_or_dir: PathLike | nn.Module, *, preset: str | None = None, **config_overrides: Any
) -> MAEForPreTraining | MAEModel:
    """Convert transformers' `ViTMAEForPreTraining` (or `ViTMAEModel`) into hf_mae.

    Args:
        model_or_dir: a loaded model, or a `save_pretrained` directory (old v4 checkpoints are renamed by
            transformers while loading).
        preset: name of an `hf_mae.PRESETS` entry; only non-architecture fields (mask ratio, ...) may differ.
        config_overrides: `MAEConfig` fields that the transformers config does not fix, e.g. `norm_pix_loss`,
            `mask_ratio`, `drop_path_rate`, or `image_size` (interpolates the position embeddings). The
            architecture, heads and `layer_norm_eps` (transformers' default is 1e-12) are kept from the source.

    Returns:
        `MAEForPreTraining` (or `MAEModel` for a `ViTMAEModel`) in eval mode.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        origin = f"transformers checkpoint {model_or_dir}"
        model_or_dir = _load_transformers_dir(model_or_dir)
    else:
        origin = f"transformers {type(model_or_dir).__name__}"
    if isinstance(model_or_dir, ViTMAEForPreTraining):
        has_decoder, sd = True, model_or_dir.state_dict()
    elif isinstance(model_or_dir, ViTMAEModel):
        has_decoder, sd = False, {f"vit.{k}": v for k, v in model_or_dir.state_dict().items()}
    else:
        raise TypeError(
            f"expected ViTMAEForPreTraining, ViTMAEModel or a directory, got {type(model_or_dir).__name__}"
        )
    tc = model_or_dir.config
    inferred = _config_from_transformers(tc, has_decoder)
    config = resolve_config(
        inferred,
        ARCHITECTURE_FIELDS + STATED_FIELDS,
        preset,
        config_overrides,
        origin,
        stated_by=dict.fromkeys(NOT_IN_WEIGHTS, "transformers config"),
    )
    full = _transformers_to_hf_mae(sd, tc, has_decoder)
    return build_and_load(config, full, inferred["image_size"], origin)


# ----------------------------------------------------------------------------------------------------------------------
# Out of hf_mae
# ----------------------------------------------------------------------------------------------------------------------
def _hf_mae_to_transformers(full: Mapping[str, torch.Tensor], qkv_bias: bool) -> StateDict:
    back_top = {dst: src for src, dst in _TOP + _DECODER_TOP}
    back_block = {dst: src for src, dst in _BLOCK}
    out: StateDict = {}
    for key, value in full.items():
        if key in back_top:
            out[back_top[key]] = value
            continue
        m = re.fullmatch(r"(mae\.blocks|decoder\.blocks)\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            raise ValueError(f"no transformers ViTMAE name for {key}")
        prefix = "vit.layers." if m.group(1) == "mae.blocks" else "decoder.decoder_layers."
        base, name, kind = f"{prefix}{m.group(2)}.", m.group(3), m.group(4)
        if name == "attn.qkv":
            if kind == "bias" and not qkv_bias:
                if value.any():  # hf_mae's decoder always has a qkv bias, transformers' follows config.qkv_bias
                    raise ValueError(
                        f"{key} is non-zero but transformers' ViTMAE with qkv_bias=False has no bias there"
                    )
                continue
            for n, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{base}attention.{n}_proj.{kind}"] = part.contiguous()
        elif name in back_block:
            out[f"{base}{back_block[name]}.{kind}"] = value
        else:
            raise ValueError(f"no transformers ViTMAE name for {key}")
    return out


def to_transformers(
    model: MAEForPreTraining | MAEModel, attn_implementation: str | None = None
) -> ViTMAEForPreTraining | ViTMAEModel:
    """Convert an hf_mae model into transformers' ViTMAE.

    Args:
        model: `MAEForPreTraining` (gives `ViTMAEForPreTraining`) or `MAEModel` with its final norm (gives
            `ViTMAEModel`). transformers has no ViTMAE classifier: export those with [`to_timm_state_dict`].
        attn_implementation: "eager" or "sdpa" (transformers' default when unset).

    Returns:
        The transformers model in eval mode; `save_pretrained` it to share.
    """
    if isinstance(model, MAEForImageClassification):
        raise ValueError(
            "transformers has no ViTMAE classification model; export it with --target timm (to_timm_state_dict)"
        )
    if isinstance(model, MAEModel) and isinstance(model.norm, nn.Identity):
        raise ValueError("this MAEModel has no final norm, which ViTMAEModel always has")
    c = model.config
    if c.norm_pix_loss and c.norm_pix_eps != 1e-6:
        logger.warning("norm_pix_eps=%g: transformers' ViTMAE loss always uses 1e-6", c.norm_pix_eps)
    if c.drop_path_rate:
        logger.info("transformers' ViTMAE has no stochastic depth: drop_path_rate=%g is not carried", c.drop_path_rate)
    tc = ViTMAEConfig(
        image_size=c.image_size,
        patch_size=c.patch_size,
        num_channels=c.num_channels,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        intermediate_size=int(c.hidden_size * c.mlp_ratio),
        hidden_act="gelu",
        qkv_bias=c.qkv_bias,
        layer_norm_eps=c.layer_norm_eps,
        decoder_hidden_size=c.decoder_hidden_size,
        decoder_num_hidden_layers=c.decoder_num_hidden_layers,
        decoder_num_attention_heads=c.decoder_num_attention_heads,
        decoder_intermediate_size=int(c.decoder_hidden_size * c.decoder_mlp_ratio),
        mask_ratio=c.mask_ratio,
        norm_pix_loss=c.norm_pix_loss,
        initializer_range=c.initializer_range,
    )
    if attn_implementation is not None:
        tc._attn_implementation = attn_implementation
    full = _hf_mae_to_transformers(full_state_dict(model), c.qkv_bias)
    with hf_init.no_init_weights():
        if isinstance(model, MAEModel):
            out = ViTMAEModel(tc)
            full = {k[len("vit.") :]: v for k, v in full.items()}
        else:
            out = ViTMAEForPreTraining(tc)
    load_strict(out, full, f"hf_mae {type(model).__name__}")
    return out.eval()
