"""hf_mae's own directories, and any supported checkpoint -> hf_mae, whatever its format.

[`detect_checkpoint_kind`] tells the formats apart (a directory by its `model_type`, a weights file by its keys);
[`load_encoder`] hands each to its format module and returns the encoder, e.g. for a DMAE teacher. A DMAE student's
directory is an hf_mae directory like an MAE's: it loads (and converts, and teaches the next student) as the MAE it
is, without the projector that maps its features into its own teacher's space.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..configuration_dmae import DMAEConfig
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

HF_MAE_MODEL_TYPES = (MAEConfig.model_type, DMAEConfig.model_type)
# the class each saved architecture loads as: a DMAE student as the MAE it is
_HF_MAE_CLASSES = {cls.__name__: cls for cls in (MAEForPreTraining, MAEModel, MAEForImageClassification)}
_HF_MAE_CLASSES.update(DMAEForPreTraining=MAEForPreTraining, DMAEModel=MAEModel)
# the fields a DMAEConfig adds to the MAE's: its projector's
_PROJECTOR_FIELDS = set(inspect.signature(DMAEConfig.__init__).parameters) - set(
    inspect.signature(MAEConfig.__init__).parameters
)


def _read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} is not a save_pretrained directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a valid JSON file ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object of config fields")
    return config


def load_hf_mae_model(directory: PathLike, **kwargs: Any) -> MAEPreTrainedModel:
    """Load an hf_mae `save_pretrained` directory with the class named in its config's `architectures`; a DMAE
    student's as the MAE it is (`DMAEForPreTraining` -> `MAEForPreTraining`, its projector dropped)."""
    config = _read_config_json(Path(directory))
    model_type = config.get("model_type")
    if model_type not in HF_MAE_MODEL_TYPES:
        raise ValueError(f"{directory} holds model_type={model_type!r}, not one of hf_mae's {HF_MAE_MODEL_TYPES}")
    names = [n for n in config.get("architectures") or [] if n in _HF_MAE_CLASSES]
    if not names:
        raise ValueError(f"{directory}: config.json names no hf_mae architecture ({config.get('architectures')})")
    if model_type == DMAEConfig.model_type and "config" not in kwargs:
        student = DMAEConfig.from_pretrained(directory).to_dict()
        ignored = _PROJECTOR_FIELDS | {"model_type", "architectures", "auto_map", "transformers_version"}
        kwargs["config"] = MAEConfig(**{k: v for k, v in student.items() if k not in ignored})
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
    """ "hf_mae" (an MAE or DMAE) or "transformers" for a `save_pretrained` directory (by `model_type`); "official"
    (decoder keys), "timm" (encoder names) or "hf_mae" (`mae.`-prefixed names) for a weights file, by its keys."""
    path = Path(path)
    if path.is_dir():
        model_type = _read_config_json(path).get("model_type")
        kinds = {**dict.fromkeys(HF_MAE_MODEL_TYPES, "hf_mae"), "vit_mae": "transformers"}
        if model_type not in kinds:
            raise ValueError(f"{path}: model_type {model_type!r} is none of {', '.join(kinds)}")
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
        path_or_dir: an hf_mae (MAE or DMAE) or transformers `save_pretrained` directory, or an official / timm /
            hf_mae weights file (`.pth`, `.pt`, `.bin`, `.safetensors`).
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
