"""Masked Autoencoder (He et al., 2021) as HuggingFace models.

The stages read top to bottom as in the official `models_mae.py`: `patchify`, `random_masking`, the visible-only
encoder (`MAEModel`), the decoder with mask tokens (`MAEDecoder`) and the loss (`hf_mae.losses`).
Mask convention, everywhere in this package: 0 = visible (kept), 1 = removed.

Parameter names follow the official MAE / timm layout (`patch_embed.proj`, `blocks.N.attn.qkv`, ...), so official
and timm checkpoints convert by renaming prefixes only. This file imports nothing from hf_mae but its config and
loss functions, so `save_pretrained` can ship it as remote code that loads without hf_mae installed.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from .configuration_mae import MAEConfig, check_mask_ratio
from .image_processing_mae import build_image_processor
from .losses import classification_loss, mae_reconstruction_loss

logger = logging.getLogger(__name__)

# (strict, source, the checkpoint's pretraining heads) of the `from_pretrained` call in progress; read by
# `_adjust_missing_and_unexpected_keys`.
_STRICT_LOADING: contextvars.ContextVar[tuple[bool, str, tuple[str, ...]]] = contextvars.ContextVar(
    "_STRICT_LOADING", default=(True, "?", ())
)
# the `from_pretrained` arguments that locate a checkpoint's config.json
_CONFIG_LOCATION_KWARGS = (
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "local_files_only",
    "revision",
    "subfolder",
)


# ----------------------------------------------------------------------------------------------------------------------
# Position embeddings
# ----------------------------------------------------------------------------------------------------------------------
def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding [1 (cls) + grid_h * grid_w, embed_dim], row-major over the patch grid.

    Laid out as the released MAE weights expect: the first half encodes the column (w) index, the second half the
    row (h) index, each half `[sin | cos]` with frequencies 1 / 10000^(i / (D/4)). The cls slot is zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2-D sin-cos embeddings, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    out_w = cols.flatten()[:, None] * omega[None]  # [L, D/4]
    out_h = rows.flatten()[:, None] * omega[None]
    pos = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)  # [L, D]
    if cls_token:
        pos = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), pos], dim=0)
    return pos.float()


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Bicubic resize of a square [1, 1 + n*n, D] position table (cls slot first) to a grid_h x grid_w grid."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    n = math.isqrt(patch_pos.shape[1])
    if n * n != patch_pos.shape[1]:
        raise ValueError(f"position table of {patch_pos.shape[1]} patches is not a square grid")
    if (n, n) == (grid_h, grid_w):
        return pos_embed
    dim = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class MAEModelOutput(ModelOutput):
    """
    transformers' `BaseModelOutputWithPooling` (first `last_hidden_state`, then `pooler_output`, `hidden_states`) plus
    the masking.

    Args:
        last_hidden_state: [B, 1 + kept, D] encoder output (cls first), after the final LayerNorm (none in the
            `use_fc_norm` layout: the raw output of the last block, as timm's `forward_features`).
        pooler_output: [B, D] one feature per image: `fc_norm` of the mean patch token in the `use_fc_norm` layout
            (MAE's fine-tuning feature), else the final-normed cls token (MAE's linear-probe feature).
        hidden_states: embeddings + each block's output, before the final norm (with `output_hidden_states`).
        mask: [B, L], 0 = visible, 1 = removed (all zeros without masking).
        ids_restore: [B, L], the permutation that undoes the shuffle of `random_masking`.
        ids_keep: [B, kept], indices of the visible patches, in the order the encoder saw them.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    mask: torch.LongTensor | None = None
    ids_restore: torch.LongTensor | None = None
    ids_keep: torch.LongTensor | None = None


@dataclass
class MAEForPreTrainingOutput(ModelOutput):
    """
    Args:
        loss: reconstruction loss on the removed patches.
        logits: [B, L, patch_size**2 * num_channels] predicted pixels of every patch (normalised per patch when
            `norm_pix_loss`).
        mask: [B, L], 0 = visible, 1 = removed.
        ids_restore: [B, L], undoes the shuffle.
        hidden_states: encoder hidden states (with `output_hidden_states`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.LongTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------------
def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    # Written here rather than imported from timm so the remote-code copy of this file needs only torch/transformers.
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class MAEPatchEmbed(nn.Module):
    """Conv with stride = kernel = patch size: [B, C, H, W] -> [B, H/p * W/p, D]."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class MAEAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            x = _low_precision_cpu_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def _low_precision_cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the scores and softmax in fp32 and the value product in q's dtype.

    At ViT sequence lengths (17 and 65 tokens for the reproduction study's ViT-B/8 at 64 px) this is 3-5x faster,
    forward + backward, than SDPA's fused CPU kernel in bf16, with errors of the same size (the scores are fp32, as in
    that kernel). fp32 on CPU and every dtype on GPU keep the fused kernel.
    """
    with torch.autocast("cpu", enabled=False):
        scores = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)  # [B, heads, N, N]
        return scores.softmax(dim=-1).to(v.dtype) @ v


class MAEMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MAEBlock(GradientCheckpointingLayer):
    """Pre-norm ViT block (timm's `Block` as used by the official MAE)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = MAEAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MAEMlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


# ----------------------------------------------------------------------------------------------------------------------
# Base class: init, strict loading, model card
# ----------------------------------------------------------------------------------------------------------------------
class MAEPreTrainedModel(PreTrainedModel):
    config_class = MAEConfig
    config: MAEConfig
    base_model_prefix = "mae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MAEBlock"]
    _supports_sdpa = True
    _can_compile_fullgraph = True
    # The losses are means over the local batch. Without this, Trainer sees `**kwargs` in forward, counts the labels
    # for a `num_items_in_batch` the model never uses, and then multiplies the loss by the number of processes
    # (DDP) and skips its division by the gradient-accumulation steps: the gradients come out scaled.
    accepts_loss_kwargs = False
    # Checkpoint keys that may be absent / left over without failing the load (regexes, logged in one line each).
    _allowed_missing_keys: tuple[str, ...] = ()
    _allowed_unexpected_keys: tuple[str, ...] = ()

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's protocol for layer-wise lr decay: patch/cls/pos = layer 0, block i = layer i + 1, the final norm
        with the last block, everything else (fc_norm, head, decoder) after them."""
        p = "" if isinstance(self, MAEModel) else r"mae\."
        return dict(
            stem=rf"^{p}(?:cls_token|pos_embed|patch_embed)",
            blocks=[(rf"^{p}blocks\.(\d+)", None), (rf"^{p}norm\.", (99999,))],
        )

    def _init_weights(self, module: nn.Module) -> None:
        # The official MAE init. `init.*` helpers leave tensors loaded from a checkpoint untouched. transformers only
        # calls this for modules that own parameters directly, hence the per-leaf dispatch.
        if isinstance(module, nn.Linear):
            # the classification head carries its own std (trunc-normal 2e-5 fine-tuning, 0.01 linear probe)
            head_std = getattr(module, "head_init_std", None)
            if head_std is not None:
                init.trunc_normal_(module.weight, std=head_std)
            else:
                init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # the patch embedding is initialised like a Linear on the flattened patch, not like a Conv
            weight = module.weight
            if not getattr(weight, "_is_hf_initialized", False):
                flat = torch.empty(weight.shape[0], weight[0].numel(), dtype=weight.dtype, device=weight.device)
                nn.init.xavier_uniform_(flat)
                init.copy_(weight, flat.view_as(weight))
            init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)  # else left as allocated (garbage) when loaded without a head
        elif isinstance(module, MAEModel):
            init.normal_(module.cls_token, std=self.config.initializer_range)
            init.copy_(module.pos_embed, get_2d_sincos_pos_embed(module.pos_embed.shape[-1], *module.grid_size)[None])
        elif isinstance(module, MAEDecoder):
            init.normal_(module.mask_token, std=self.config.initializer_range)
            init.copy_(module.pos_embed, get_2d_sincos_pos_embed(module.pos_embed.shape[-1], *module.grid_size)[None])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool = True, **kwargs):
        """`PreTrainedModel.from_pretrained`, except that missing or unexpected checkpoint keys are an error.

        Keys this class expects to differ (a new classification head, a dropped decoder) and the heads the checkpoint's
        config class declares as `pretraining_heads` (dropped) are logged in one line each.
        `strict=False` falls back to transformers' warn-and-initialise behaviour.
        """
        heads = _checkpoint_pretraining_heads(pretrained_model_name_or_path, kwargs, cls.config_class)
        token = _STRICT_LOADING.set((strict, str(pretrained_model_name_or_path), heads))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":  # safetensors' own type for a truncated / corrupt file
                raise
            raise ValueError(
                f"{pretrained_model_name_or_path}: a *.safetensors weights file is truncated or corrupt ({error}); "
                "re-download or re-save it"
            ) from error
        finally:
            _STRICT_LOADING.reset(token)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # transformers' hook between loading and its report: tolerate what the class allows, reject the rest
        super()._adjust_missing_and_unexpected_keys(loading_info)
        strict, source, heads = _STRICT_LOADING.get()
        # what this class may lack, plus the pretraining-only heads the checkpoint's config declares and this model
        # has no module for (a model that has one loads it strictly)
        dropped = tuple(rf"^{re.escape(head)}\." for head in heads if not hasattr(self, head))
        unexpected = self._allowed_unexpected_keys + dropped
        problems = []
        for kind, allowed in (("missing", self._allowed_missing_keys), ("unexpected", unexpected)):
            keys = getattr(loading_info, f"{kind}_keys")
            tolerated = {k for k in keys if any(re.search(p, k) for p in allowed)}
            if tolerated:
                groups = ", ".join(sorted({k.rsplit(".", 1)[0].split(".")[0] for k in tolerated}))
                action = "newly initialised" if kind == "missing" else "dropped"
                logger.info(
                    "%s from %s: %s %d tensors (%s)", type(self).__name__, source, action, len(tolerated), groups
                )
            rest = sorted(set(keys) - tolerated)
            setattr(loading_info, f"{kind}_keys", set(rest))
            if rest:
                problems.append(f"{kind} keys: {', '.join(rest[:20])}{' ...' if len(rest) > 20 else ''}")
        if problems and strict:
            raise ValueError(
                f"Checkpoint {source} does not fit {type(self).__name__}: {'; '.join(problems)}. "
                "Convert foreign checkpoints with `python -m hf_mae.convert`, or pass strict=False to load partially."
            )

    @classmethod
    def _auto_classes(cls) -> dict[str, type[PreTrainedModel]]:
        """Every Auto class a directory saved from this class loads into, with the class each one gives.

        Any MAE checkpoint holds an encoder (`AutoModel`, what `pipeline("image-feature-extraction")` loads) and can
        start a classifier (`AutoModelForImageClassification`, with a new head when it has none).
        """
        return {"AutoModel": MAEModel, "AutoModelForImageClassification": MAEForImageClassification}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` (safetensors, config, remote code) with every Auto class the directory
        fits in `auto_map`, plus an image processor and a model card where the directory has none."""
        if self.is_remote_code():  # registered for an Auto class (by `import hf_mae`, or by a remote-code load)
            # transformers adds only the saved class to `auto_map`, next to whatever the checkpoint this model was
            # loaded from listed; rebuild it so that each Auto class the directory fits, and only those, loads it
            # with `trust_remote_code=True`. Every class named here lives in the files transformers ships with it.
            self.config.auto_map = {
                auto_class: f"{model_class.__module__.rsplit('.', 1)[-1]}.{model_class.__name__}"
                for auto_class, model_class in self._auto_classes().items()
            }
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self._save_image_processor(Path(save_directory))
            card = Path(save_directory) / "README.md"
            if not card.exists():
                default_model_card(self).save(card)

    def _save_image_processor(self, directory: Path) -> None:
        """Write the evaluation preprocessing the model expects (`preprocessor_config.json`, transformers'
        `BitImageProcessor`: loads without hf_mae), so `pipeline(model=directory)` works. A processor already there
        for this image size is kept (a training run writes its own, with its crop_pct)."""
        path = directory / "preprocessor_config.json"
        size = self.config.image_size
        if self.config.num_channels != 3:
            if not path.exists():
                logger.warning(
                    "%s: no image processor saved: hf_mae's preprocessing is RGB, the model takes %d channels",
                    directory,
                    self.config.num_channels,
                )
            return
        if path.exists():
            try:
                crop = json.loads(path.read_text(encoding="utf-8")).get("crop_size")
            except (OSError, ValueError, AttributeError):
                crop = None
            if crop == {"height": size, "width": size}:
                return
            logger.warning("%s: replacing %s (crop size %s) by one for %d px images", directory, path.name, crop, size)
        build_image_processor(size).save_pretrained(directory)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload hf_mae model",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **save_kwargs,
    ):
        """Upload what `save_pretrained` writes. A model card already on the Hub repo is kept, else ours is sent
        (transformers' own `push_to_hub` would replace it by an empty template)."""
        from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        try:
            ModelCard.load(repo_id, token=token)
            keep_remote_card = True
        except Exception:  # no card on the Hub yet (or unreachable): send ours
            keep_remote_card = False
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, **save_kwargs)
            operations = [
                CommitOperationAdd(path_in_repo=f.relative_to(tmp).as_posix(), path_or_fileobj=str(f))
                for f in sorted(Path(tmp).rglob("*"))
                if f.is_file() and not (keep_remote_card and f.name == "README.md")
            ]
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )


def _checkpoint_pretraining_heads(
    pretrained_model_name_or_path, kwargs: dict, own_config_class: type[PretrainedConfig]
) -> tuple[str, ...]:
    """The `pretraining_heads` that the config class of a checkpoint's `model_type` (the loading class's own, else as
    registered with AutoConfig) declares: a model without those modules drops them on loading, and this file names no
    other model's keys. () when the checkpoint has no readable config or its class declares none."""
    if pretrained_model_name_or_path is None:
        return ()
    location = {name: kwargs[name] for name in _CONFIG_LOCATION_KWARGS if name in kwargs}
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **location)
    except (OSError, ValueError):  # no config.json there: from_pretrained reports it, or a config was passed
        return ()
    model_type = config_dict.get("model_type")
    if model_type == own_config_class.model_type:  # also under remote code, where AutoConfig may not know the type
        config_class = own_config_class
    else:
        config_class = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None
    return tuple(getattr(config_class, "pretraining_heads", ()))


# The card's body, rendered by huggingface_hub's `ModelCard.from_template` (Jinja); the metadata comes from a
# `ModelCardData` as `card_data`.
MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Architecture

{{ architecture }}
{% for heading, text in sections %}
## {{ heading }}

{{ text }}
{% endfor %}
## Use

```python
import hf_mae  # registers the classes; or pass trust_remote_code=True without hf_mae installed
from transformers import {{ auto_class }}
model = {{ auto_class }}.from_pretrained("path/or/repo")
```
"""


def markdown_table(rows: dict[str, Any], header: tuple[str, str] = ("field", "value")) -> str:
    """`{name: value}` as a two-column markdown table (floats with 6 significant digits)."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {f'{v:.6g}' if isinstance(v, float) else v} |" for k, v in rows.items()]
    return "\n".join(lines)


def is_hub_model_id(name: str | None) -> bool:
    """True for a name that can only mean a Hub repo (not an existing local path): what a card's `base_model` may
    hold; the Hub refuses a card whose `base_model` is a local path."""
    if not name or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def default_model_card(
    model: MAEPreTrainedModel,
    card_data: ModelCardData | None = None,
    title: str | None = None,
    summary: str | None = None,
    base_model: str | None = None,
    sections: Sequence[tuple[str, str]] = (),
) -> ModelCard:
    """The model card of `model`, through huggingface_hub: the metadata of `card_data` (license, datasets, eval
    results, ...) completed with the library, pipeline tag, tags and `base_model` (when a Hub id), and a body saying
    what the model is, its architecture, `sections` (heading, markdown) and how to load it.

    Without `summary` it states only what the config shows (training code knows how the weights were trained and
    says so); `base_model` is the checkpoint the weights started from, named in the body whatever it is.
    """
    c = model.config
    classifier = isinstance(model, MAEForImageClassification)
    pretraining = isinstance(model, MAEForPreTraining)
    data = card_data or ModelCardData()
    data.library_name = "transformers"
    data.pipeline_tag = data.pipeline_tag or ("image-classification" if classifier else "image-feature-extraction")
    own_tags = ["hf_mae", "vision", "vit"] + (["mae", "masked-autoencoder", "self-supervised"] if pretraining else [])
    data.tags = list(dict.fromkeys([*(data.tags or []), *own_tags]))
    if base_model and data.base_model is None and is_hub_model_id(base_model):
        data.base_model = base_model
    rows = {"image size / patch": f"{c.image_size} / {c.patch_size}"}
    rows["encoder"] = f"{c.hidden_size} wide, {c.num_hidden_layers} blocks, {c.num_attention_heads} heads"
    if pretraining:
        rows["decoder"] = (
            f"{c.decoder_hidden_size} wide, {c.decoder_num_hidden_layers} blocks, {c.decoder_num_attention_heads} heads"
        )
        rows["mask ratio"] = c.mask_ratio
        rows["norm_pix_loss"] = c.norm_pix_loss
    if classifier:
        rows["head"] = f"{c.pooling} pooling, {c.head_type} head, {c.num_labels} classes"
    rows["parameters"] = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"
    if summary is None:
        kind = (
            "a Masked Autoencoder (MAE): the ViT encoder sees the visible patches, a light decoder reconstructs the "
            "removed ones"
            if pretraining
            else "an image classifier: ViT encoder + head"
            if classifier
            else "a ViT encoder"
        )
        summary = f"{type(model).__name__} from [hf_mae](https://github.com/hf-mae/hf_mae), {kind}."
        if base_model:
            summary += f" Weights loaded from `{base_model}`."
    auto_class = (
        "AutoModelForImageClassification" if classifier else "AutoModelForPreTraining" if pretraining else "AutoModel"
    )
    return ModelCard.from_template(
        data,
        template_str=MODEL_CARD_TEMPLATE,
        title=title or f"{type(model).__name__} (hf_mae)",
        summary=summary,
        architecture=markdown_table(rows),
        sections=list(sections),
        auto_class=auto_class,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------------------
class MAEModel(MAEPreTrainedModel):
    """The ViT encoder. Given `noise` or a `mask_ratio` it sees only the visible patches (MAE pretraining); called
    without either it encodes every patch, in order (features, fine-tuning), the same on every call.

    Two layouts, as timm's ViT: the pretraining one ends in the final LayerNorm and pools the cls token (MAE's
    linear-probe feature); with `use_fc_norm` the final norm is not built and `fc_norm` normalises the mean patch
    token (MAE's fine-tuning feature). `pooler_output` is that feature, so `AutoModel` on a fine-tuned directory gives
    what its classification head saw.

    Args:
        config: the architecture.
        use_fc_norm: the layout; `None` takes `config.encoder_uses_fc_norm` (a saved encoder's own layout). It is
            recorded in `config.use_fc_norm`, so the saved directory reloads with it.
    """

    # a pretraining checkpoint loads its encoder here, the decoder dropped (and the heads its config declares); a
    # fine-tuned one without its head, as transformers' ViTModel loads a ViTForImageClassification checkpoint
    _allowed_unexpected_keys = (r"^decoder\.", r"^classifier\.")

    def __init__(self, config: MAEConfig, use_fc_norm: bool | None = None):
        super().__init__(config)
        self.use_fc_norm = config.encoder_uses_fc_norm if use_fc_norm is None else use_fc_norm
        config.use_fc_norm = self.use_fc_norm
        self.grid_size = (config.image_size // config.patch_size,) * 2
        self.patch_embed = MAEPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        # fixed sin-cos table, stored in checkpoints; frozen in pretraining, learnable in fine-tuning as in MAE
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, config.hidden_size), requires_grad=False)
        dpr = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.blocks = nn.ModuleList(
            MAEBlock(
                config.hidden_size,
                config.num_attention_heads,
                config.mlp_ratio,
                config.qkv_bias,
                config.layer_norm_eps,
                drop_path=dpr[i],
            )
            for i in range(config.num_hidden_layers)
        )
        # MAE's fine-tuning ViT (global pool) replaces the final norm by fc_norm after pooling
        self.norm = nn.Identity() if self.use_fc_norm else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if self.use_fc_norm else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Patch embeddings plus position embeddings, without the cls token: [B, L, D]."""
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be [batch, channels, height, width], got shape {tuple(pixel_values.shape)}"
            )
        _, channels, height, width = pixel_values.shape
        if channels != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels but config.num_channels={self.config.num_channels}"
            )
        p = self.config.patch_size
        if interpolate_pos_encoding:
            if height % p or width % p:
                raise ValueError(f"image size {height}x{width} is not divisible by config.patch_size={p}")
        elif (height, width) != (self.config.image_size,) * 2:
            raise ValueError(
                f"Input image size {height}x{width} does not match config.image_size={self.config.image_size}; "
                "resize the images or pass interpolate_pos_encoding=True"
            )
        pos_embed = interpolate_pos_embed(self.pos_embed, height // p, width // p)
        return self.patch_embed(pixel_values) + pos_embed[:, 1:]

    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample shuffle by argsort of uniform noise; keep the first `int(L * (1 - mask_ratio))` patches.

        Returns the kept tokens [B, kept, D], the mask [B, L] (0 keep, 1 remove), `ids_restore` [B, L] and
        `ids_keep` [B, kept].
        """
        B, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        elif noise.shape != (B, L):
            raise ValueError(f"noise must have shape [batch, num_patches] = [{B}, {L}], got {list(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)  # ascend: small is keep
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(B, L, device=x.device, dtype=x.dtype)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore, ids_keep

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
    ) -> MAEModelOutput | tuple:
        r"""
        Args:
            pixel_values: [B, C, H, W] normalised images.
            noise: [B, L] values whose argsort decides the mask (small = kept); masks at `mask_ratio`, or at
                `config.mask_ratio` when that is not given.
            mask_ratio: fraction of patches removed, in (0, 1), drawing the mask from `noise` or at random
                (`MAEForPreTraining` passes `config.mask_ratio`). `None` or 0.0 without `noise`: no masking, every
                patch in order.
            interpolate_pos_encoding: accept other resolutions by resizing the position table.
            output_hidden_states: also return the embeddings and every block's output (before the final norm).
        """
        if noise is not None and mask_ratio is None:
            mask_ratio = self.config.mask_ratio
        if noise is not None and mask_ratio == 0:
            raise ValueError("MAEModel: noise draws a mask, but mask_ratio=0.0 asks for none; pass one or the other")
        x = self.embed(pixel_values, interpolate_pos_encoding)  # [B, L, D]
        B, L, _ = x.shape
        if mask_ratio:
            check_mask_ratio(mask_ratio, owner="MAEModel.forward")
            x, mask, ids_restore, ids_keep = self.random_masking(x, mask_ratio, noise)
        else:
            mask = x.new_zeros(B, L)
            ids_restore = ids_keep = torch.arange(L, device=x.device).expand(B, L)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)  # [B, 1 + kept, D]
        hidden_states = (x,) if output_hidden_states else None
        for block in self.blocks:
            x = block(x)
            if output_hidden_states:
                hidden_states += (x,)
        x = self.norm(x)
        pooled = self.fc_norm(x[:, 1:].mean(dim=1)) if self.fc_norm is not None else x[:, 0]  # [B, D]
        out = MAEModelOutput(x, pooled, hidden_states, mask, ids_restore, ids_keep)
        return out if return_dict is not False else out.to_tuple()


# ----------------------------------------------------------------------------------------------------------------------
# Decoder and pretraining model
# ----------------------------------------------------------------------------------------------------------------------
class MAEDecoder(nn.Module):
    """Light decoder: project, append mask tokens, unshuffle, add fixed sin-cos, blocks, predict pixels."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        dim = config.decoder_hidden_size
        self.grid_size = (config.image_size // config.patch_size,) * 2
        self.embed = nn.Linear(config.hidden_size, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            MAEBlock(dim, config.decoder_num_attention_heads, config.decoder_mlp_ratio, True, config.layer_norm_eps)
            for _ in range(config.decoder_num_hidden_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.pred = nn.Linear(dim, config.patch_size**2 * config.num_channels)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """latent [B, 1 + kept, D_enc] -> predicted pixels [B, L, p*p*C] (cls output dropped)."""
        x = self.embed(latent)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, L, Dd], shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + interpolate_pos_embed(self.pos_embed, *grid_size)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x[:, 1:]))  # the cls output is not needed: not computed


class MAEForPreTraining(MAEPreTrainedModel):
    """MAE encoder + decoder with the reconstruction loss on the removed patches."""

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        self.mae = MAEModel(config, use_fc_norm=False)
        self.decoder = MAEDecoder(config)
        self.post_init()

    @classmethod
    def _auto_classes(cls) -> dict[str, type[PreTrainedModel]]:
        return {**super()._auto_classes(), "AutoModelForPreTraining": cls}

    def get_input_embeddings(self) -> nn.Module:
        return self.mae.patch_embed

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C], each patch row-major with channels last (the official order)."""
        p, c = self.config.patch_size, self.config.num_channels
        B, _, H, W = pixel_values.shape
        x = pixel_values.reshape(B, c, H // p, p, W // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * c)

    def unpatchify(self, patches: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, H, W]."""
        p, c = self.config.patch_size, self.config.num_channels
        H, W = image_size or (self.config.image_size,) * 2
        h, w = H // p, W // p
        if h * w != patches.shape[1]:
            raise ValueError(f"{patches.shape[1]} patches do not tile an image of {H}x{W} with patch size {p}")
        x = patches.reshape(patches.shape[0], h, w, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(patches.shape[0], c, H, W)

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> MAEForPreTrainingOutput | tuple:
        r"""
        Args:
            pixel_values: [B, C, H, W] normalised images.
            noise: [B, L] values whose argsort fixes the mask (small = kept).
            interpolate_pos_encoding: accept other resolutions by resizing both position tables.
            output_hidden_states: also return the encoder's hidden states.
            return_loss: always computed; the argument tells `Trainer` that this model returns a loss without labels,
                so evaluation reports `eval_loss`.
        """
        enc = self.mae(
            pixel_values,
            noise=noise,
            mask_ratio=self.config.mask_ratio,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
        )
        p = self.config.patch_size
        grid = (pixel_values.shape[2] // p, pixel_values.shape[3] // p)
        logits = self.decoder(enc.last_hidden_state, enc.ids_restore, grid)
        loss = mae_reconstruction_loss(
            logits, self.patchify(pixel_values), enc.mask, self.config.norm_pix_loss, self.config.norm_pix_eps
        )
        out = MAEForPreTrainingOutput(loss, logits, enc.mask, enc.ids_restore, enc.hidden_states)
        return out if return_dict is not False else out.to_tuple()


# ----------------------------------------------------------------------------------------------------------------------
# Classification (fine-tuning and linear probing)
# ----------------------------------------------------------------------------------------------------------------------
class MAEForImageClassification(MAEPreTrainedModel):
    """Encoder on all patches + head on its `pooler_output`. `pooling="mean"`: average of patch tokens -> `fc_norm`
    (held by the encoder, whose final norm is not built) -> head (MAE fine-tuning). `pooling="cls"`: final-normed cls
    token -> head. `head_type="linear_probe"`: BatchNorm without affine + Linear (MAE linear probing). Freezing the
    encoder is the linear-probe run's choice (`hf_mae.training.pipeline.freeze_for_linear_probe`), not the model's.
    Checkpoints saved before `fc_norm` moved into the encoder (key `fc_norm.*`) load unchanged: transformers adds the
    `mae.` prefix."""

    _allowed_missing_keys = (r"^classifier\.", r"^mae\.fc_norm\.")
    # the final norm a mean-pooling classifier does not build; `mae.` is absent in a bare encoder's checkpoint
    _allowed_unexpected_keys = (r"^decoder\.", r"^(?:mae\.)?norm\.")

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mae = MAEModel(config, use_fc_norm=config.pooling == "mean")
        self.mae.pos_embed.requires_grad_(True)  # learnable in fine-tuning, as in MAE
        linear = nn.Linear(config.hidden_size, config.num_labels)
        linear.head_init_std = 0.01 if config.head_type == "linear_probe" else config.head_init_std
        if config.head_type == "linear_probe":
            self.classifier = nn.Sequential(nn.BatchNorm1d(config.hidden_size, affine=False, eps=1e-6), linear)
        else:
            self.classifier = linear
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.mae.patch_embed

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # a checkpoint without a head (a pretraining directory) gives a random classifier: say so loudly, as
        # transformers does, since `pipeline("image-classification")` would otherwise predict noise silently
        new_head = any(key.startswith("classifier.") for key in loading_info.missing_keys)
        super()._adjust_missing_and_unexpected_keys(loading_info)
        if new_head:
            logger.warning(
                "%s holds no classification head: the %d-label classifier of %s is newly initialised (random), so its "
                "predictions mean nothing until it is fine-tuned",
                _STRICT_LOADING.get()[1],
                self.config.num_labels,
                type(self).__name__,
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values: [B, C, H, W] normalised images.
            labels: class ids [B] (int) or soft targets [B, num_labels] (float, e.g. from Mixup / CutMix).
        """
        enc = self.mae(
            pixel_values,
            mask_ratio=0.0,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
        )
        logits = self.classifier(enc.pooler_output)
        loss = classification_loss(logits, labels) if labels is not None else None
        out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=enc.hidden_states)
        return out if return_dict is not False else out.to_tuple()


__all__ = [
    "MAEPreTrainedModel",
    "MAEModel",
    "MAEForPreTraining",
    "MAEForImageClassification",
    "MAEModelOutput",
    "MAEForPreTrainingOutput",
    "get_2d_sincos_pos_embed",
    "interpolate_pos_embed",
]
