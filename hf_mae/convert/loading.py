"""hf_mae's own directories, and any supported checkpoint -> hf_mae, whatever its format.

[`detect_checkpoint_kind`] tells the formats apart (a directory by its `model_type`, a weights file by its keys);
[`load_encoder`] hands each to its format module and returns the encoder, e.g. for a DMAE teacher.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..configuration_mae import MAEConfig
from ..modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel, MAEPreTrainedModel
from .common import (
    ARCHITECTURE_FIELDS,
    CONFIG_ARGUMENTS,
    NOT_IN_WEIGHTS,
    STATED_FIELDS,
    PathLike,
    build_and_load,
    full_state_dict,
    list_keys,
    load_checkpoint_file,
    rename_state_dict,
    resolve_config,
)
from .official import HF_MAE_TO_OFFICIAL, OFFICIAL_DECODER_KEY, convert_official_checkpoint, convert_timm_state_dict
from .vitmae import convert_transformers_model

# The foreign formats: each converts into hf_mae (`--source`) and out of it (`--target`).
SOURCES = TARGETS = ("official", "timm", "transformers")
CHECKPOINT_KINDS = ("auto", "hf_mae", *SOURCES)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

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
    stated = {k: getattr(model.config, k) for k in CONFIG_ARGUMENTS - {"label2id"} if hasattr(model.config, k)}
    if not isinstance(model, MAEForImageClassification):
        stated.pop("num_labels"), stated.pop("id2label")
    config = resolve_config(
        stated,
        ARCHITECTURE_FIELDS + STATED_FIELDS,
        preset,
        overrides,
        "hf_mae model",
        stated_by=dict.fromkeys(NOT_IN_WEIGHTS, "hf_mae config"),
    )
    return build_and_load(config, full_state_dict(model), model.config.image_size, "hf_mae model")


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
    if any(OFFICIAL_DECODER_KEY.match(k) for k in keys):
        return "official"
    if "cls_token" in sd or "patch_embed.proj.weight" in sd:
        return "timm"
    raise ValueError(f"{origin}: unknown checkpoint layout, keys: {list_keys(keys)}")


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
        # a bare hf_mae weights file has no config: read it as the official layout it renames to one-to-one
        if kind == "hf_mae" or (kind == "official" and _kind_of_state_dict(sd, str(path)) == "hf_mae"):
            sd = rename_state_dict(sd, HF_MAE_TO_OFFICIAL, str(path), "hf_mae")
            kind = "official"
        checkpoint: dict[str, Any] = {"model": sd, "args": args} if args is not None else dict(sd)
        convert = convert_official_checkpoint if kind == "official" else convert_timm_state_dict
        model = convert(checkpoint, preset=preset, **config_overrides)
    encoder = model if isinstance(model, MAEModel) else model.mae
    if freeze:
        encoder.eval().requires_grad_(False)
    return encoder
