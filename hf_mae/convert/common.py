"""What every format shares: reading checkpoint files, renaming keys, inferring and resolving the config, and the
strict load into an hf_mae model.

The format modules ([`official`], [`vitmae`]) map a foreign state dict onto hf_mae names (`mae.`-prefixed, as in
`MAEForPreTraining` / `MAEForImageClassification`), then hand it here to build the config and load it strictly.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import initialization as hf_init

from ..configuration_mae import PRESETS, MAEConfig
from ..modeling_mae import (
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
    MAEPreTrainedModel,
    interpolate_pos_embed,
)

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike
RenameRules = tuple[tuple[str, str], ...]

# Attention heads cannot be read from the weights. ViT-Ti/S/B/L/H use these; other widths get 64-wide heads.
DEFAULT_NUM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Every released MAE decoder is 512 wide with 16 heads (models_mae.py), so that width keeps its 16.
DEFAULT_DECODER_NUM_HEADS = {512: 16}

# Config fields the tensors (or a transformers config) fix: an override that disagrees is an error, not a choice.
ARCHITECTURE_FIELDS = (
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
STATED_FIELDS = ("num_attention_heads", "decoder_num_attention_heads", "layer_norm_eps")
CONFIG_ARGUMENTS = set(inspect.signature(MAEConfig.__init__).parameters) - {"self", "kwargs"} | {
    "num_labels",
    "id2label",
    "label2id",
}
# Not in the weights, and a wrong value changes the model without any error (attention splits the width
# differently; the loss target changes): every conversion logs where each came from, so a guess is visible.
NOT_IN_WEIGHTS = ("num_attention_heads", "decoder_num_attention_heads", "norm_pix_loss")
_DECODER_ONLY = ("decoder_num_attention_heads", "norm_pix_loss")


# ----------------------------------------------------------------------------------------------------------------------
# Key renaming. A rule ending in "." renames a prefix, any other rule one exact name.
# ----------------------------------------------------------------------------------------------------------------------
def rename_key(key: str, rules: RenameRules) -> str | None:
    """`key` renamed by the first matching rule, or `None` when no rule matches."""
    for src, dst in rules:
        if (src.endswith(".") and key.startswith(src)) or key == src:
            return dst + key[len(src) :]
    return None


def rename_state_dict(
    state_dict: Mapping[str, torch.Tensor], rules: RenameRules, origin: str, target: str
) -> StateDict:
    """Every key renamed by `rules`; keys no rule matches are a `ValueError` naming them."""
    renamed = {key: rename_key(key, rules) for key in state_dict}
    unknown = [key for key, new in renamed.items() if new is None]
    if unknown:
        raise ValueError(f"{origin}: unexpected keys with no {target} counterpart: {list_keys(unknown)}")
    return {renamed[key]: value for key, value in state_dict.items()}


def list_keys(keys: list[str], limit: int = 20) -> str:
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
        try:
            return unwrap_state_dict(load_file(str(path)), str(path))
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
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: Any, origin: str) -> tuple[StateDict, argparse.Namespace | None]:
    """The flat state dict inside a checkpoint object (see [`load_checkpoint_file`]) and its `args`, if any."""
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
            f"{origin}: unknown checkpoint layout, these entries are not tensors: {list_keys(not_tensors)} "
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


def mlp_ratio(hidden: int, width: int) -> float:
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


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture from the shapes of an hf_mae-named (full-model, `mae.`-prefixed) state dict; the heads, which
    the shapes cannot tell, from [`default_num_heads`]."""
    required = ("mae.patch_embed.proj.weight", "mae.pos_embed", "mae.cls_token", "mae.blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"cannot infer the architecture, missing keys: {list_keys(missing)}")
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
        mlp_ratio=mlp_ratio(sd["mae.blocks.0.mlp.fc1.weight"].shape[0], width),
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
            decoder_mlp_ratio=mlp_ratio(sd["decoder.blocks.0.mlp.fc1.weight"].shape[0], dec_width),
        )
    head = sd.get("classifier.weight", sd.get("classifier.1.weight"))
    if head is not None:
        config.update(
            num_labels=head.shape[0],
            head_type="linear" if "classifier.weight" in sd else "linear_probe",
            pooling="mean" if "mae.fc_norm.weight" in sd else "cls",
        )
    return config


def resolve_config(
    inferred: Mapping[str, Any],
    fixed: tuple[str, ...],
    preset: str | None,
    overrides: Mapping[str, Any],
    origin: str,
    stated_by: Mapping[str, str],
) -> MAEConfig:
    """The config of a conversion: inferred values < preset < overrides, except that fixed fields must agree and
    image_size may only change through an explicit override (the position tables are then interpolated).

    Args:
        inferred: what the source tells (read from its shapes or its own config) or, for [`NOT_IN_WEIGHTS`],
            guessed.
        fixed: fields a preset or override may not change.
        origin: the source as named in errors and the log, e.g. "official checkpoint mae.pth".
        stated_by: for the fields of `inferred` the source states rather than guesses, what states them (e.g.
            "checkpoint args"); the [`NOT_IN_WEIGHTS`] fields missing here were assumed, which is logged.
    """
    unknown = sorted(set(overrides) - CONFIG_ARGUMENTS)
    if unknown:
        raise ValueError(f"unknown config overrides: {', '.join(unknown)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown MAE preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
    kwargs = dict(inferred)
    told_by = {name: stated_by.get(name, "assumed") for name in NOT_IN_WEIGHTS}
    explicit = {k: v for k, v in overrides.items() if v is not None}
    layers = [(f"preset {preset!r}", PRESETS[preset])] if preset else []
    layers.append(("override", explicit))
    for layer, values in layers:
        for name, value in values.items():
            locked = name in fixed or (name == "image_size" and "image_size" not in explicit)
            if locked and name in inferred and value != inferred[name]:
                hint = " (pass image_size to interpolate the position embeddings)" if name == "image_size" else ""
                raise ValueError(f"{layer} sets {name}={value!r} but the {origin} has {name}={inferred[name]!r}{hint}")
            kwargs[name] = value
            told_by[name] = "given" if layer == "override" else layer
    config = MAEConfig(**kwargs)
    _log_not_in_weights(config, told_by, origin, has_decoder="decoder_hidden_size" in inferred)
    return config


def _log_not_in_weights(config: MAEConfig, told_by: Mapping[str, str], origin: str, has_decoder: bool) -> None:
    """One line with the values the weights cannot tell and where each came from; a warning if any is a guess."""
    names = [n for n in NOT_IN_WEIGHTS if has_decoder or n not in _DECODER_ONLY]
    shown = ", ".join(f"{n}={getattr(config, n)!r} ({told_by[n]})" for n in names)
    if any(told_by[n] == "assumed" for n in names):
        logger.warning(
            "%s: not in the weights: %s. Assumed values are guesses: if one is wrong, pass it (the flag or keyword "
            "of the same name; for a DMAE teacher --teacher_num_attention_heads) or a preset",
            origin,
            shown,
        )
    else:
        logger.info("%s: not in the weights: %s", origin, shown)


# ----------------------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------------------
def load_strict(
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
        problems.append(f"missing keys: {list_keys(show(missing))}")
    if unexpected:
        problems.append(f"unexpected keys: {list_keys(show(unexpected))}")
    if mismatched:
        problems.append(f"wrong shapes: {list_keys(mismatched)}")
    if problems:
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:  # dtype or other torch-side failures
        raise ValueError(f"{source} does not load into {type(module).__name__}: {error}") from error


def full_state_dict(model: MAEPreTrainedModel) -> StateDict:
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


def build_and_load(
    config: MAEConfig,
    full: StateDict,
    image_size: int,
    source: str,
    source_name: Callable[[str], str] = lambda key: key,
) -> MAEPreTrainedModel:
    """Build the model class the keys call for and load `full` (hf_mae names) into it strictly.

    `image_size` is the resolution of `full`'s position tables; they are interpolated when the config's differs.
    """
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
        load_strict(model, state_dict, source, lambda key: source_name(f"mae.{key}"))
    else:
        load_strict(model, full, source, source_name)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Converted %s into %s (%.2f M parameters)", source, cls.__name__, n_params / 1e6)
    return model
