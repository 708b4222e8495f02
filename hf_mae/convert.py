"""Convert MAE checkpoints between hf_mae and the official MAE code, timm and transformers' ViTMAE.

Into hf_mae (the output is a `save_pretrained` directory that `from_pretrained` / `AutoModel` load after `import hf_mae`):

    python -m hf_mae.convert --source official mae_pretrain_vit_base.pth out/mae-vit-base --norm_pix_loss
    python -m hf_mae.convert --source timm vit_small_patch16_224.safetensors out/vit-small
    python -m hf_mae.convert --source transformers path/to/vit-mae-base out/mae-vit-base --image_size 128

Out of hf_mae:

    python -m hf_mae.convert --target transformers out/mae-vit-base out/vit-mae-base   # ViTMAEForPreTraining dir
    python -m hf_mae.convert --target timm out/mae-finetuned vit_finetuned.safetensors # or .pth
    python -m hf_mae.convert --target official out/mae-vit-base mae_vit_base.pth       # {"model": state_dict}

What the weights decide (widths, depths, patch size, channels, MLP ratios, qkv bias, which heads exist) is read from
the tensors and cannot be overridden; what they cannot tell (attention heads, mask ratio, `norm_pix_loss`) comes from
the flags, a `--preset`, the `args` saved in an official training checkpoint, or defaults: heads from the ViT table
{192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16} (width // 64 otherwise; the MAE decoder's 512 gets its 16), LayerNorm
eps 1e-6. A different `--image_size` resizes the position tables (bicubic, `interpolate_pos_embed`).

Every conversion is strict: a missing, unexpected or wrong-shape tensor raises `ValueError` naming the keys, in the
source's own names where it has them. Nothing is ever loaded partially.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import initialization as hf_init

from .configuration_mae import PRESETS, MAEConfig
from .modeling_mae import (
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    MAEPreTrainedModel,
    interpolate_pos_embed,
)

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike

SOURCES = ("official", "transformers", "timm")
TARGETS = ("transformers", "timm", "official")
CHECKPOINT_KINDS = ("auto", "hf_mae", "transformers", "official", "timm")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

# Attention heads cannot be read from the weights. ViT-Ti/S/B/L/H use these; other widths get 64-wide heads.
DEFAULT_NUM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Every released MAE decoder is 512 wide with 16 heads (models_mae.py), so that width keeps its 16.
DEFAULT_DECODER_NUM_HEADS = {512: 16}

# Config fields the tensors (or a transformers config) fix: an override that disagrees is an error, not a choice.
_ARCHITECTURE_FIELDS = (
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "mlp_ratio",
    "qkv_bias",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_mlp_ratio",
    "num_labels",
    "pooling",
    "head_type",
)
# Also fixed when the source states them (transformers configs, hf_mae directories).
_STATED_FIELDS = ("num_attention_heads", "decoder_num_attention_heads", "layer_norm_eps")
_CONFIG_ARGUMENTS = set(inspect.signature(MAEConfig.__init__).parameters) - {"self", "kwargs"} | {
    "num_labels",
    "id2label",
    "label2id",
}

# ----------------------------------------------------------------------------------------------------------------------
# Key layouts. Official MAE and timm share the encoder names; hf_mae nests the encoder under `mae.` and renames the
# decoder's and the head's prefixes. A rule ending in "." renames a prefix, any other rule one exact name.
# ----------------------------------------------------------------------------------------------------------------------
_OFFICIAL_TO_HF_MAE: tuple[tuple[str, str], ...] = (
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
_HF_MAE_TO_OFFICIAL = tuple((dst, src) for src, dst in _OFFICIAL_TO_HF_MAE)
_OFFICIAL_DECODER_KEY = re.compile(r"^(mask_token$|decoder_)")

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

# transformers ViTMAE (v5 names) per-block names -> hf_mae per-block names; q/k/v are fused separately.
_TRANSFORMERS_BLOCK = (
    ("layernorm_before", "norm1"),
    ("attention.o_proj", "attn.proj"),
    ("layernorm_after", "norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
)
_TRANSFORMERS_TOP = (
    ("vit.embeddings.cls_token", "mae.cls_token"),
    ("vit.embeddings.position_embeddings", "mae.pos_embed"),
    ("vit.embeddings.patch_embeddings.projection.weight", "mae.patch_embed.proj.weight"),
    ("vit.embeddings.patch_embeddings.projection.bias", "mae.patch_embed.proj.bias"),
    ("vit.layernorm.weight", "mae.norm.weight"),
    ("vit.layernorm.bias", "mae.norm.bias"),
)
_TRANSFORMERS_DECODER_TOP = (
    ("decoder.mask_token", "decoder.mask_token"),
    ("decoder.decoder_pos_embed", "decoder.pos_embed"),
    ("decoder.decoder_embed.weight", "decoder.embed.weight"),
    ("decoder.decoder_embed.bias", "decoder.embed.bias"),
    ("decoder.decoder_norm.weight", "decoder.norm.weight"),
    ("decoder.decoder_norm.bias", "decoder.norm.bias"),
    ("decoder.decoder_pred.weight", "decoder.pred.weight"),
    ("decoder.decoder_pred.bias", "decoder.pred.bias"),
)


def _rename(keys: list[str], rules: tuple[tuple[str, str], ...]) -> tuple[dict[str, str], list[str]]:
    """Map each key through the first matching rule. Returns {old: new} and the keys no rule matched."""
    renamed, unknown = {}, []
    for key in keys:
        for src, dst in rules:
            if (src.endswith(".") and key.startswith(src)) or key == src:
                renamed[key] = dst + key[len(src) :]
                break
        else:
            unknown.append(key)
    return renamed, unknown


def _list_keys(keys: list[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ----------------------------------------------------------------------------------------------------------------------
# Reading checkpoint files
# ----------------------------------------------------------------------------------------------------------------------
def load_checkpoint_file(path: PathLike) -> tuple[StateDict, argparse.Namespace | None]:
    """Read a `.safetensors` file or a torch pickle (`.pth`, `.pt`, `.bin`) as a flat state dict.

    Torch pickles are read with `weights_only=True`; the `argparse.Namespace` that official MAE training checkpoints
    store under `args` is the one extra type allowed. The weights may sit under `model` (official MAE),
    `state_dict` (timm training checkpoints) or at the top level; a DDP `module.` prefix is removed.

    Returns:
        The state dict and the checkpoint's `args` (or `None`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unwrap_state_dict(load_file(str(path)), str(path))
        except Exception as error:  # safetensors raises its own SafetensorError for a truncated / corrupt file
            if isinstance(error, ValueError) and str(path) in str(error):
                raise
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects that torch.load(weights_only=True) refuses to unpickle; only tensors, containers "
            f"and argparse.Namespace are accepted. Re-save the state dict alone. ({error})"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:  # a truncated zip archive or pickle
        raise ValueError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {error}") from error
    return _unwrap_state_dict(obj, str(path))


def _unwrap_state_dict(obj: Any, origin: str) -> tuple[StateDict, argparse.Namespace | None]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{origin}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    args = obj.get("args") if isinstance(obj.get("args"), argparse.Namespace) else None
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{origin}: unknown checkpoint layout, these entries are not tensors: {_list_keys(not_tensors)} "
            "(expected the weights at the top level or under 'model' / 'state_dict')"
        )
    state_dict = dict(obj)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict, args


# ----------------------------------------------------------------------------------------------------------------------
# Config: inference, overrides, validation
# ----------------------------------------------------------------------------------------------------------------------
def default_num_heads(width: int, table: Mapping[int, int] = DEFAULT_NUM_HEADS) -> int:
    """Heads for a width the weights cannot tell: the ViT table, else the largest divisor <= width // 64."""
    if width in table:
        return table[width]
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


def _mlp_ratio(hidden: int, width: int) -> float:
    """The float whose `int(width * ratio)` gives back `hidden`, as MAEConfig builds its MLPs."""
    ratio = hidden / width
    while int(width * ratio) < hidden:  # float rounding, e.g. 1000 / 3
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _block_count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"block indices under {prefix!r} are not 0..N-1: {sorted(indices)}")
    return len(indices)


def _infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture from the shapes of an hf_mae-named (full-model, `mae.`-prefixed) state dict."""
    required = ("mae.patch_embed.proj.weight", "mae.pos_embed", "mae.cls_token", "mae.blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"cannot infer the architecture, missing keys: {_list_keys(missing)}")
    width, channels, patch_h, patch_w = sd["mae.patch_embed.proj.weight"].shape
    if patch_h != patch_w:
        raise ValueError(f"non-square patches ({patch_h}x{patch_w}) in patch_embed.proj.weight are not supported")
    grid = math.isqrt(sd["mae.pos_embed"].shape[1] - 1)
    config: dict[str, Any] = dict(
        image_size=grid * patch_h,
        patch_size=patch_h,
        num_channels=channels,
        hidden_size=width,
        num_hidden_layers=_block_count(sd, "mae.blocks."),
        num_attention_heads=default_num_heads(width),
        mlp_ratio=_mlp_ratio(sd["mae.blocks.0.mlp.fc1.weight"].shape[0], width),
        qkv_bias="mae.blocks.0.attn.qkv.bias" in sd,
        layer_norm_eps=1e-6,
    )
    if "decoder.embed.weight" in sd and "decoder.blocks.0.mlp.fc1.weight" in sd:
        dec_width = sd["decoder.embed.weight"].shape[0]
        config.update(
            decoder_hidden_size=dec_width,
            decoder_num_hidden_layers=_block_count(sd, "decoder.blocks."),
            decoder_num_attention_heads=default_num_heads(
                dec_width, {**DEFAULT_NUM_HEADS, **DEFAULT_DECODER_NUM_HEADS}
            ),
            decoder_mlp_ratio=_mlp_ratio(sd["decoder.blocks.0.mlp.fc1.weight"].shape[0], dec_width),
        )
    head = sd.get("classifier.weight", sd.get("classifier.1.weight"))
    if head is not None:
        config.update(
            num_labels=head.shape[0],
            head_type="linear" if "classifier.weight" in sd else "linear_probe",
            pooling="mean" if "mae.fc_norm.weight" in sd else "cls",
        )
    return config


def _resolve_config(
    inferred: Mapping[str, Any],
    fixed: tuple[str, ...],
    preset: str | None,
    overrides: Mapping[str, Any],
    source: str,
) -> MAEConfig:
    """Inferred values < preset < overrides, except that fixed fields must agree and image_size may only change
    through an explicit override (the position tables are then interpolated)."""
    unknown = sorted(set(overrides) - _CONFIG_ARGUMENTS)
    if unknown:
        raise ValueError(f"unknown config overrides: {', '.join(unknown)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown MAE preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
    kwargs = dict(inferred)
    explicit = {k: v for k, v in overrides.items() if v is not None}
    layers = [(f"preset {preset!r}", PRESETS[preset])] if preset else []
    layers.append(("override", explicit))
    for origin, values in layers:
        for name, value in values.items():
            locked = name in fixed or (name == "image_size" and "image_size" not in explicit)
            if locked and name in inferred and value != inferred[name]:
                hint = " (pass image_size to interpolate the position embeddings)" if name == "image_size" else ""
                raise ValueError(
                    f"{origin} sets {name}={value!r} but the {source} checkpoint has {name}={inferred[name]!r}{hint}"
                )
            kwargs[name] = value
    return MAEConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------------------
def _load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    source_name: Callable[[str], str] = lambda key: key,
) -> None:
    """`load_state_dict(strict=True)`, first checking keys and shapes so that the error names them all."""
    expected = module.state_dict()

    def show(keys: list[str]) -> list[str]:
        return [k if source_name(k) == k else f"{source_name(k)} (-> {k})" for k in keys]

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{source_name(k)}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list_keys(show(missing))}")
    if unexpected:
        problems.append(f"unexpected keys: {_list_keys(show(unexpected))}")
    if mismatched:
        problems.append(f"wrong shapes: {_list_keys(mismatched)}")
    if problems:
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:  # dtype or other torch-side failures
        raise ValueError(f"{source} does not load into {type(module).__name__}: {error}") from error


def _full_state_dict(model: MAEPreTrainedModel) -> StateDict:
    """hf_mae names as in MAEForPreTraining / MAEForImageClassification (`mae.` prefix) for any model class."""
    state_dict = model.state_dict()
    return {f"mae.{k}": v for k, v in state_dict.items()} if isinstance(model, MAEModel) else dict(state_dict)


def _model_class(keys: Any) -> type[MAEPreTrainedModel]:
    has_decoder = any(k.startswith("decoder.") for k in keys)
    has_head = any(k.startswith(("classifier.", "mae.fc_norm.")) for k in keys)
    if has_decoder and has_head:
        raise ValueError("checkpoint holds both a pretraining decoder and a classification head")
    if has_decoder:
        return MAEForPreTraining
    return MAEForImageClassification if has_head else MAEModel


def _build_and_load(
    config: MAEConfig,
    full: StateDict,
    image_size: int,
    source: str,
    source_name: Callable[[str], str] = lambda key: key,
) -> MAEPreTrainedModel:
    """Build the model class the keys call for and load `full` (hf_mae names) into it strictly."""
    cls = _model_class(full)
    full = dict(full)
    if config.image_size != image_size:
        grid = config.image_size // config.patch_size
        for key in ("mae.pos_embed", "decoder.pos_embed"):
            if key in full:
                full[key] = interpolate_pos_embed(full[key], grid, grid)
        logger.info("Interpolated position embeddings from %d px to %d px", image_size, config.image_size)
    # every tensor is overwritten by the strict load, so skip the (for ViT-L/H slow) random init
    with hf_init.no_init_weights():
        model = cls(config)
    if cls is MAEModel:  # the encoder's own names lack the `mae.` prefix
        state_dict = {k[len("mae.") :] if k.startswith("mae.") else k: v for k, v in full.items()}
        _load_strict(model, state_dict, source, lambda key: source_name(f"mae.{key}"))
    else:
        _load_strict(model, full, source, source_name)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Converted %s into %s (%.2f M parameters)", source, cls.__name__, n_params / 1e6)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Official MAE and timm
# ----------------------------------------------------------------------------------------------------------------------
def _check_vit_layout(sd: Mapping[str, torch.Tensor], source: str, allow_decoder: bool) -> None:
    """Reject, with the offending keys named, what a plain MAE ViT cannot represent."""
    for pattern, feature in _UNSUPPORTED_TIMM_FEATURES:
        keys = [k for k in sd if re.search(pattern, k)]
        if keys:
            raise ValueError(f"{source} checkpoint uses {feature}, which hf_mae cannot represent: {_list_keys(keys)}")
    if not allow_decoder:
        keys = [k for k in sd if _OFFICIAL_DECODER_KEY.match(k)]
        if keys:
            raise ValueError(
                f"{source} checkpoint holds MAE decoder keys ({_list_keys(keys)}); convert it with --source official"
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
        sd, args = _unwrap_state_dict(checkpoint, f"{source} state dict")
        origin = f"{source} state dict"
    elif not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"expected a state dict, a module or a path, got {type(checkpoint).__name__}")
    else:
        sd, args = load_checkpoint_file(checkpoint)
        origin = f"{source} checkpoint {checkpoint}"
    _check_vit_layout(sd, source, allow_decoder)
    renamed, unknown = _rename(list(sd), _OFFICIAL_TO_HF_MAE)
    if unknown:
        raise ValueError(f"{origin}: unexpected keys with no hf_mae counterpart: {_list_keys(unknown)}")
    full = {renamed[k]: v for k, v in sd.items()}
    inferred = _infer_config(full)
    # what the official training run recorded beats our defaults, but not explicit overrides
    defaults = {k: getattr(args, k) for k in ("norm_pix_loss", "mask_ratio") if args is not None and hasattr(args, k)}
    config = _resolve_config({**inferred, **defaults}, _ARCHITECTURE_FIELDS, preset, overrides, source)
    official_name = {new: old for old, new in renamed.items()}

    def source_name(key: str) -> str:
        return official_name.get(key) or _rename([key], _HF_MAE_TO_OFFICIAL)[0].get(key, key)

    return _build_and_load(config, full, inferred["image_size"], origin, source_name)


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


def to_official_state_dict(model: MAEPreTrainedModel) -> StateDict:
    """The model's weights under the official MAE names (shared storage with the model)."""
    full = _full_state_dict(model)
    renamed, unknown = _rename(list(full), _HF_MAE_TO_OFFICIAL)
    if unknown:  # only reachable if the modeling code grows a tensor this table does not know
        raise ValueError(f"no official name for: {_list_keys(unknown)}")
    return {renamed[k]: v for k, v in full.items()}


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
    dropped = [k for k in sd if _OFFICIAL_DECODER_KEY.match(k)]
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
        from functools import partial

        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=c.layer_norm_eps)
    return kwargs


# ----------------------------------------------------------------------------------------------------------------------
# transformers ViTMAE
# ----------------------------------------------------------------------------------------------------------------------
def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"ViTMAEConfig.{name}={value!r}: hf_mae supports square sizes only")
        value = value[0]
    return int(value)


def _config_from_transformers(tc: Any, has_decoder: bool) -> dict[str, Any]:
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
        mlp_ratio=_mlp_ratio(tc.intermediate_size, tc.hidden_size),
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
            decoder_mlp_ratio=_mlp_ratio(tc.decoder_intermediate_size, tc.decoder_hidden_size),
        )
    return config


def _transformers_to_hf_mae(sd: Mapping[str, torch.Tensor], tc: Any, has_decoder: bool) -> StateDict:
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

    top = _TRANSFORMERS_TOP + (_TRANSFORMERS_DECODER_TOP if has_decoder else ())
    groups = [("vit.layers.", "mae.blocks.", tc.num_hidden_layers, tc.qkv_bias)]
    if has_decoder:
        # transformers' decoder follows config.qkv_bias; hf_mae's decoder always has the bias (official MAE), zero here
        groups.append(("decoder.decoder_layers.", "decoder.blocks.", tc.decoder_num_hidden_layers, True))
    for src, dst in top:
        out[dst] = take(src)
    for src_prefix, dst_prefix, depth, want_bias in groups:
        for i in range(depth):
            s, d = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            for src, dst in _TRANSFORMERS_BLOCK:
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
                f"{what} keys: {_list_keys(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected))
            )
        )
    return out


def _hf_mae_to_transformers(full: Mapping[str, torch.Tensor], qkv_bias: bool) -> StateDict:
    back_top = {dst: src for src, dst in _TRANSFORMERS_TOP + _TRANSFORMERS_DECODER_TOP}
    back_block = {dst: src for src, dst in _TRANSFORMERS_BLOCK}
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


def _load_transformers_dir(directory: PathLike) -> nn.Module:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

    config = ViTMAEConfig.from_pretrained(directory)
    architectures = config.architectures or ["ViTMAEForPreTraining"]
    cls = ViTMAEModel if architectures[0] == "ViTMAEModel" else ViTMAEForPreTraining
    # transformers v5 renames v4 checkpoints (attention.attention.query, ...) while it loads
    model, info = cls.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ValueError(
            f"transformers checkpoint {directory} does not fit {cls.__name__}: "
            + "; ".join(f"{k.replace('_', ' ')}: {_list_keys([str(x) for x in v])}" for k, v in problems.items() if v)
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
    from transformers import ViTMAEForPreTraining, ViTMAEModel

    if isinstance(model_or_dir, (str, os.PathLike)):
        source = f"transformers checkpoint {model_or_dir}"
        model_or_dir = _load_transformers_dir(model_or_dir)
    else:
        source = f"transformers {type(model_or_dir).__name__}"
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
    config = _resolve_config(inferred, _ARCHITECTURE_FIELDS + _STATED_FIELDS, preset, config_overrides, "transformers")
    full = _transformers_to_hf_mae(sd, tc, has_decoder)
    return _build_and_load(config, full, inferred["image_size"], source)


def to_transformers(model: MAEForPreTraining | MAEModel, attn_implementation: str | None = None) -> nn.Module:
    """Convert an hf_mae model into transformers' ViTMAE.

    Args:
        model: `MAEForPreTraining` (gives `ViTMAEForPreTraining`) or `MAEModel` with its final norm (gives
            `ViTMAEModel`). transformers has no ViTMAE classifier: export those with [`to_timm_state_dict`].
        attn_implementation: "eager" or "sdpa" (transformers' default when unset).

    Returns:
        The transformers model in eval mode; `save_pretrained` it to share.
    """
    from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

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
    full = _hf_mae_to_transformers(_full_state_dict(model), c.qkv_bias)
    with hf_init.no_init_weights():
        if isinstance(model, MAEModel):
            out = ViTMAEModel(tc)
            full = {k[len("vit.") :]: v for k, v in full.items()}
        else:
            out = ViTMAEForPreTraining(tc)
    _load_strict(out, full, f"hf_mae {type(model).__name__}")
    return out.eval()


# ----------------------------------------------------------------------------------------------------------------------
# hf_mae directories and the DMAE teacher
# ----------------------------------------------------------------------------------------------------------------------
_HF_MAE_CLASSES = {cls.__name__: cls for cls in (MAEForPreTraining, MAEModel, MAEForImageClassification)}


def _read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} is not a save_pretrained directory (no config.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_hf_mae_model(directory: PathLike, **kwargs: Any) -> MAEPreTrainedModel:
    """Load an hf_mae `save_pretrained` directory with the class named in its config's `architectures`."""
    config = _read_config_json(Path(directory))
    if config.get("model_type") != MAEConfig.model_type:
        raise ValueError(f"{directory} holds model_type={config.get('model_type')!r}, not {MAEConfig.model_type!r}")
    names = [n for n in config.get("architectures") or [] if n in _HF_MAE_CLASSES]
    if not names:
        raise ValueError(f"{directory}: config.json names no hf_mae architecture ({config.get('architectures')})")
    return _HF_MAE_CLASSES[names[0]].from_pretrained(directory, **kwargs)


def _reconfigure(model: MAEPreTrainedModel, preset: str | None, overrides: Mapping[str, Any]) -> MAEPreTrainedModel:
    """Rebuild an hf_mae model with non-architecture overrides; a new image_size interpolates the position tables."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides and preset is None:
        return model
    stated = {k: getattr(model.config, k) for k in _CONFIG_ARGUMENTS - {"label2id"} if hasattr(model.config, k)}
    if not isinstance(model, MAEForImageClassification):
        stated.pop("num_labels"), stated.pop("id2label")
    config = _resolve_config(stated, _ARCHITECTURE_FIELDS + _STATED_FIELDS, preset, overrides, "hf_mae")
    return _build_and_load(config, _full_state_dict(model), model.config.image_size, "hf_mae model")


def detect_checkpoint_kind(path: PathLike) -> str:
    """ "hf_mae" or "transformers" for a `save_pretrained` directory (by `model_type`); "official" (decoder keys),
    "timm" (encoder names) or "hf_mae" (`mae.`-prefixed names) for a weights file, by its keys."""
    path = Path(path)
    if path.is_dir():
        model_type = _read_config_json(path).get("model_type")
        kinds = {MAEConfig.model_type: "hf_mae", "vit_mae": "transformers"}
        if model_type not in kinds:
            raise ValueError(f"{path}: model_type {model_type!r} is neither hf_mae nor vit_mae")
        return kinds[model_type]
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"{path}: expected a directory or a {'/'.join(CHECKPOINT_SUFFIXES)} file")
    return _kind_of_state_dict(load_checkpoint_file(path)[0], str(path))


def _kind_of_state_dict(sd: Mapping[str, torch.Tensor], origin: str) -> str:
    keys = list(sd)
    if any(k.startswith(("vit.", "embeddings.")) for k in keys):
        raise ValueError(f"{origin} holds transformers ViTMAE names without its config; pass the save_pretrained dir")
    if any(k.startswith(("mae.", "decoder.")) for k in keys):
        return "hf_mae"
    if any(_OFFICIAL_DECODER_KEY.match(k) for k in keys):
        return "official"
    if "cls_token" in sd or "patch_embed.proj.weight" in sd:
        return "timm"
    raise ValueError(f"{origin}: unknown checkpoint layout, keys: {_list_keys(keys)}")


def load_encoder(
    path_or_dir: PathLike,
    kind: str = "auto",
    *,
    freeze: bool = False,
    preset: str | None = None,
    **config_overrides: Any,
) -> MAEModel:
    """Load the encoder of any supported MAE / ViT checkpoint as an hf_mae `MAEModel` (a DMAE teacher, features).

    Args:
        path_or_dir: an hf_mae or transformers `save_pretrained` directory, or an official / timm / hf_mae weights
            file (`.pth`, `.pt`, `.bin`, `.safetensors`).
        kind: "auto" (see [`detect_checkpoint_kind`]), "hf_mae", "transformers", "official" or "timm".
        freeze: put the encoder in eval mode with `requires_grad=False` (as a teacher is used).
        preset, config_overrides: as for [`convert_official_checkpoint`]; `image_size` interpolates the position
            embeddings for every kind.

    Returns:
        The `MAEModel`. For a mean-pooling classifier checkpoint it has no final norm (the fine-tuned encoder has
        none); block outputs (`output_hidden_states`) are unaffected.
    """
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
    path = Path(path_or_dir)
    if kind == "auto":
        kind = detect_checkpoint_kind(path)
    if kind == "transformers":
        model = convert_transformers_model(path, preset=preset, **config_overrides)
    elif path.is_dir():
        if kind != "hf_mae":
            raise ValueError(f"{path} is a directory; kind={kind!r} expects a weights file")
        model = _reconfigure(load_hf_mae_model(path), preset, config_overrides)
    else:
        sd, args = load_checkpoint_file(path)
        if kind == "hf_mae" or (kind == "official" and _kind_of_state_dict(sd, str(path)) == "hf_mae"):
            renamed, unknown = _rename(list(sd), _HF_MAE_TO_OFFICIAL)
            if unknown:
                raise ValueError(f"{path}: unexpected keys with no hf_mae counterpart: {_list_keys(unknown)}")
            sd = {renamed[k]: v for k, v in sd.items()}
            kind = "official"
        checkpoint: dict[str, Any] = dict(sd)
        if args is not None:
            checkpoint = {"model": sd, "args": args}
        convert = convert_official_checkpoint if kind == "official" else convert_timm_state_dict
        model = convert(checkpoint, preset=preset, **config_overrides)
    encoder = model if isinstance(model, MAEModel) else model.mae
    if freeze:
        encoder.eval().requires_grad_(False)
    return encoder


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_mae.convert",
        description="Convert MAE checkpoints into hf_mae (--source) or out of it (--target).",
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--source", choices=SOURCES, help="format of INPUT; OUTPUT is an hf_mae directory")
    direction.add_argument("--target", choices=TARGETS, help="format of OUTPUT; INPUT is an hf_mae directory")
    parser.add_argument("input", help="checkpoint file or directory")
    parser.add_argument(
        "output", help="directory (hf_mae, transformers) or file (timm: .safetensors/.pth; official: .pth)"
    )
    group = parser.add_argument_group("config for --source (what the weights cannot tell)")
    group.add_argument("--preset", choices=sorted(PRESETS), help="start from this hf_mae preset")
    group.add_argument(
        "--norm_pix_loss", action="store_true", default=None, help="the model regresses normalised pixels"
    )
    group.add_argument("--image_size", type=int, help="interpolate the position embeddings to this resolution")
    group.add_argument("--num_attention_heads", type=int, help="encoder heads (default: ViT table / width // 64)")
    group.add_argument("--decoder_num_attention_heads", type=int, help="decoder heads (default: 16 for width 512)")
    group.add_argument("--mask_ratio", type=float, help="pretraining mask ratio (default: checkpoint args or 0.75)")
    return parser


def _save_state_dict(sd: StateDict, path: Path, wrap: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors" and wrap is None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    elif path.suffix in (".pth", ".pt", ".bin"):
        torch.save({wrap: sd} if wrap else sd, path)
    else:
        allowed = ".pth/.pt/.bin" if wrap else ".safetensors/.pth/.pt/.bin"
        raise ValueError(f"output {path}: unknown extension {path.suffix!r}, use {allowed}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m hf_mae.convert`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        k: getattr(args, k)
        for k in ("norm_pix_loss", "image_size", "num_attention_heads", "decoder_num_attention_heads", "mask_ratio")
        if getattr(args, k) is not None
    }
    if args.target and (overrides or args.preset):
        parser.error("--preset and the config flags apply to --source conversions only")
    try:
        _run(args, overrides)
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 1
    return 0


def _run(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    output = Path(args.output)
    if args.source:
        if args.source == "transformers":
            model = convert_transformers_model(args.input, preset=args.preset, **overrides)
        elif args.source == "official":
            model = convert_official_checkpoint(args.input, preset=args.preset, **overrides)
        else:
            model = convert_timm_state_dict(args.input, preset=args.preset, **overrides)
        model.save_pretrained(output)
        logger.info("Saved %s to %s", type(model).__name__, output)
        return
    model = load_hf_mae_model(args.input)
    if args.target == "transformers":
        to_transformers(model).save_pretrained(output)
    elif args.target == "timm":
        _save_state_dict(to_timm_state_dict(model), output)
        shown = {k: v for k, v in timm_model_kwargs(model).items() if k != "norm_layer"}
        logger.info("Build the timm model with VisionTransformer(**%s)", shown)
    else:
        _save_state_dict(to_official_state_dict(model), output, wrap="model")
    logger.info("Saved %s weights to %s", args.target, output)


if __name__ == "__main__":
    raise SystemExit(main())
