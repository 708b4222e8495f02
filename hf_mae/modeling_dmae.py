"""Distilled MAE (Bai et al., 2022, "Masked Autoencoders Enable Efficient Knowledge Distillers").

An MAE student (`MAEForPreTraining`, same modules and state-dict names) learns to reconstruct pixels and, through a
small projector, to match a frozen teacher's intermediate features. One forward pass:

1. draw the mask noise once, so the student and the teacher keep the same patches;
2. the student: encoder on the visible patches, decoder, pixel loss; block `student_layer`'s output is kept;
3. the teacher: the same image resized so that its patch grid equals the student's, the same visible patches, only
   `teacher_layer` blocks, no final norm (raw block outputs, cls included, as the official code);
4. `loss = reconstruction + distill_weight * distance(projector(student feature), teacher feature)`.

The teacher is held outside the module tree: it is not in `state_dict()`, `parameters()` (so neither the optimizer
nor DDP see it) or `train()`; it follows the student's `.to()` / `.cpu()` / `.float()` calls. Mask convention, as
everywhere in hf_mae: 0 = visible, 1 = removed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_dmae import DMAEConfig
from .losses import feature_distillation_loss
from .modeling_mae import MAEForPreTraining, MAEModel, interpolate_pos_embed

logger = logging.getLogger(__name__)


@dataclass
class DMAEForPreTrainingOutput(ModelOutput):
    """
    Args:
        loss: `reconstruction_loss + distill_weight * distillation_loss`.
        reconstruction_loss: MAE's pixel loss on the removed patches.
        distillation_loss: feature distance between the projected student block and the teacher block.
        logits: [B, L, patch_size**2 * num_channels] predicted pixels of every patch.
        mask: [B, L], 0 = visible, 1 = removed.
        ids_restore: [B, L], undoes the shuffle.
        hidden_states: the student encoder's hidden states (with `output_hidden_states`).
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    distillation_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.LongTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Teacher: loading and fitting to the student's grid
# ----------------------------------------------------------------------------------------------------------------------
def load_teacher(config: DMAEConfig) -> MAEModel:
    """Load `config.teacher_path` as a frozen `MAEModel`; any failure is a `ValueError` naming the path."""
    from .convert import load_encoder

    if not config.teacher_path:
        raise ValueError("DMAEConfig.teacher_path is not set: pass teacher= / set_teacher(), or set teacher_path")
    path = Path(config.teacher_path)
    if config.teacher_kind in ("auto", "hf_mae") and _model_type(path) == DMAEConfig.model_type:
        # a DMAE student as the teacher (a chain of distillations): its encoder; its own teacher is not loaded
        return DMAEForPreTraining.from_pretrained(path).mae.eval().requires_grad_(False)
    try:
        return load_encoder(path, kind=config.teacher_kind, freeze=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"DMAEConfig.teacher_path={config.teacher_path!r} (teacher_kind={config.teacher_kind!r}) cannot be loaded "
            f"as an MAE / ViT teacher: {error}"
        ) from error


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def fit_teacher_pos_embed(pos_embed: torch.Tensor, grid: int, mode: str) -> torch.Tensor:
    """Fit a square [1, 1 + n*n, D] position table (cls slot first) to a grid x grid patch grid.

    `"interpolate"`: bicubic resize. `"center_crop"`: the central grid x grid cells, which is what the teacher sees when
    the resized image is zero-padded to its native resolution and the padding tokens are dropped (the seed).
    """
    if mode == "interpolate":
        return interpolate_pos_embed(pos_embed, grid, grid)
    n = math.isqrt(pos_embed.shape[1] - 1)
    if grid > n:
        raise ValueError(
            f"DMAEConfig.teacher_pos_embed='center_crop' cannot cut the student's {grid}x{grid} grid out of the "
            f"teacher's native {n}x{n} position table; use 'interpolate'"
        )
    start = (n - grid) // 2
    patches = pos_embed[:, 1:].reshape(1, n, n, -1)[:, start : start + grid, start : start + grid]
    return torch.cat([pos_embed[:, :1], patches.reshape(1, grid * grid, -1)], dim=1)


@torch.no_grad()
def prepare_teacher(teacher: MAEModel, config: DMAEConfig) -> MAEModel:
    """Fit a teacher encoder to the distillation spec, in place: fill the teacher fields of `config`, keep only the
    first `teacher_layer` blocks, drop the final norm, fit the position table to the student's grid, freeze.

    The blocks beyond `teacher_layer` are released (ViT-L to block 18 drops a quarter of its weights).
    """
    if not isinstance(teacher, MAEModel):
        raise TypeError(f"the teacher must be an hf_mae MAEModel (see load_encoder), got {type(teacher)}")
    # what the teacher was before any earlier preparation (the same teacher may serve several students)
    native = getattr(teacher, "_dmae_native", None) or {
        "num_hidden_layers": teacher.config.num_hidden_layers,
        "pos_embed": teacher.pos_embed.detach().clone(),
    }
    grid = config.grid_size
    pos_embed = fit_teacher_pos_embed(native["pos_embed"], grid, config.teacher_pos_embed)
    config.attach_teacher(teacher.config.hidden_size, native["num_hidden_layers"], teacher.config.patch_size)
    layer = config.teacher_layer
    if layer > len(teacher.blocks):
        raise ValueError(
            f"DMAEConfig.teacher_layer={layer} but this teacher was already cut to {len(teacher.blocks)} blocks"
        )
    teacher.blocks = nn.ModuleList(list(teacher.blocks)[:layer])
    teacher.norm = nn.Identity()  # DMAE aligns raw block outputs
    teacher.pos_embed = nn.Parameter(pos_embed.to(teacher.pos_embed), requires_grad=False)
    teacher.grid_size = (grid, grid)
    teacher.config.image_size = config.teacher_input_size
    teacher.config.num_hidden_layers = layer
    teacher._dmae_native = native
    return teacher.eval().requires_grad_(False)


def build_projector(config: DMAEConfig) -> nn.Module:
    """The head from the student width to the teacher width (`config.projector`)."""
    if config.projector == "none":
        return nn.Identity()
    student, teacher = config.hidden_size, config.teacher_hidden_size
    if teacher is None:
        raise ValueError(
            "DMAEConfig.teacher_hidden_size is None, so the projector cannot be built: pass the teacher "
            "(DMAEForPreTraining(config, teacher=...)), set teacher_path, or set teacher_hidden_size"
        )
    if config.projector == "linear":
        projector = nn.Linear(student, teacher)
        # official DMAE creates its head after the MAE init, so it keeps nn.Linear's own init
        projector.torch_default_init = True
        return projector
    # the seed builds its MLP inside the encoder before MAE's init, so both layers get xavier / zero bias
    return nn.Sequential(nn.Linear(student, teacher), nn.GELU(), nn.Linear(teacher, teacher))


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------
class DMAEModel(MAEModel):
    """A DMAE student's encoder: what `AutoModel` loads from a student directory (decoder and projector dropped).
    `MAEModel` under the student's `DMAEConfig`: transformers' Auto classes pair each model class with one config
    class."""

    config_class = DMAEConfig

    @classmethod
    def _auto_classes(cls) -> dict[str, type[MAEModel]]:
        return {"AutoModel": cls}


class DMAEForPreTraining(MAEForPreTraining):
    """MAE student + projector, distilled from a frozen teacher held outside the module tree.

    Args:
        config: the student's MAE fields plus the distillation spec.
        teacher: an `MAEModel` (e.g. from `hf_mae.convert.load_encoder`); it is cut to `teacher_layer`
            blocks in place. Without it the teacher is loaded from `config.teacher_path` when first needed.
    """

    config_class = DMAEConfig
    config: DMAEConfig
    # an MAE checkpoint (continue pretraining with distillation) has no projector yet
    _allowed_missing_keys = (r"^projector\.",)
    _allowed_unexpected_keys = ()  # strict, whatever MAEForPreTraining tolerates
    _teacher: MAEModel | None = None  # a plain attribute, never a registered submodule

    def __init__(self, config: DMAEConfig, teacher: MAEModel | None = None):
        super().__init__(config)
        if teacher is None and config.teacher_hidden_size is None and config.projector != "none":
            if torch.empty(0).device.type == "meta":  # inside from_pretrained: no real weights to load a teacher into
                raise ValueError(
                    "DMAEConfig.teacher_hidden_size is None: fill it (load the teacher first, or set it) before "
                    "DMAEForPreTraining.from_pretrained"
                )
            teacher = load_teacher(config) if config.teacher_path else None
        if teacher is not None:
            self._attach(teacher)  # fills the teacher fields the projector needs
        self.projector = build_projector(config)
        self.post_init()  # initialises the projector only: the parent's modules are already marked initialised

    @classmethod
    def _auto_classes(cls) -> dict[str, type[MAEForPreTraining]]:
        return {"AutoModel": DMAEModel, "AutoModelForPreTraining": cls}

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "torch_default_init", False):
            # nn.Linear.reset_parameters, through the helpers that leave loaded weights alone
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)
        else:
            super()._init_weights(module)

    # -- the teacher --------------------------------------------------------------------------------------------------
    def _attach(self, teacher: MAEModel) -> None:
        prepare_teacher(teacher, self.config)
        object.__setattr__(self, "_teacher", teacher)

    @property
    def teacher(self) -> MAEModel:
        """The frozen, truncated teacher; loaded from `config.teacher_path` on first use when none was given."""
        if self._teacher is None:
            self.set_teacher(load_teacher(self.config))
        return self._teacher

    @property
    def has_teacher(self) -> bool:
        return self._teacher is not None

    def set_teacher(self, teacher: MAEModel) -> None:
        """Use `teacher` (an `MAEModel`, cut in place to `teacher_layer` blocks), moved to the student's device. Its
        width must match the projector the config was built with."""
        self._attach(teacher)
        teacher.to(self.device)

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cpu() / .float() / .half() move and cast the teacher along with the student
        super()._apply(fn, recurse)
        if self._teacher is not None:
            self._teacher._apply(fn, recurse)
        return self

    def teacher_features(
        self, pixel_values: torch.Tensor, noise: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> torch.Tensor:
        """Teacher block `teacher_layer` on the patches `noise` keeps: [B, 1 + kept, teacher_hidden_size], cls first.

        The images are resized so that the teacher's patch grid is the student's (64 px / patch 8 student, patch-16
        teacher: 128 px, 8 x 8 tokens); the shared noise then selects the same patches for both.
        """
        teacher = self.teacher
        if teacher.training:  # someone called .train() on it: dropout-free, but keep the contract
            teacher.eval()
        p, tp = self.config.patch_size, self.config.teacher_patch_size
        grid = (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)
        size = (grid[0] * tp, grid[1] * tp)
        if tuple(pixel_values.shape[-2:]) != size:
            # bilinear with antialias = torchvision's Resize, as the seed resized 64 -> 128
            pixel_values = F.interpolate(
                pixel_values.float(), size=size, mode="bilinear", align_corners=False, antialias=True
            )
        out = teacher(
            pixel_values.to(teacher.pos_embed.dtype),
            noise=noise,
            mask_ratio=self.config.mask_ratio,
            interpolate_pos_encoding=grid != tuple(teacher.grid_size),
        )
        return out.last_hidden_state  # the final norm is an Identity: this is the raw block output

    # -- forward ------------------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> DMAEForPreTrainingOutput | tuple:
        r"""
        Args:
            pixel_values: [B, C, H, W] normalised images.
            noise: [B, L] values whose argsort fixes the mask (small = kept); drawn here when `None` and shared with
                the teacher, so both keep the same patches.
            interpolate_pos_encoding: accept other resolutions (the teacher's table is resized too).
            output_hidden_states: also return the student encoder's hidden states.
            return_loss: always computed; tells `Trainer` that evaluation has a loss without labels.
        """
        if noise is None:
            p = self.config.patch_size
            num_patches = (pixel_values.shape[-2] // p) * (pixel_values.shape[-1] // p)
            noise = torch.rand(pixel_values.shape[0], num_patches, device=pixel_values.device)
        out = super().forward(
            pixel_values,
            noise=noise,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=True,
            return_dict=True,
        )
        student = self.projector(out.hidden_states[self.config.student_layer])  # [B, 1 + kept, D_teacher]
        with torch.no_grad():
            target = self.teacher_features(pixel_values, noise, interpolate_pos_encoding)
        distillation_loss = feature_distillation_loss(
            student, target, normalize=self.config.normalize_features, loss_type=self.config.distill_loss
        )
        loss = out.loss + self.config.distill_weight * distillation_loss
        result = DMAEForPreTrainingOutput(
            loss=loss,
            reconstruction_loss=out.loss,
            distillation_loss=distillation_loss,
            logits=out.logits,
            mask=out.mask,
            ids_restore=out.ids_restore,
            hidden_states=out.hidden_states if output_hidden_states else None,
        )
        return result if return_dict is not False else result.to_tuple()


__all__ = [
    "DMAEModel",
    "DMAEForPreTraining",
    "DMAEForPreTrainingOutput",
    "build_projector",
    "fit_teacher_pos_embed",
    "load_teacher",
    "prepare_teacher",
]
