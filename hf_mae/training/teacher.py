"""The DMAE teacher, on the training side: loaded once from any MAE / ViT checkpoint, then fitted to a student.

`load_teacher` reads a checkpoint into a frozen `MAEModel` at full depth. `DMAETeacher` fits it to one student, the
way DMAE runs its teacher: the first `teacher_layer` blocks, no final norm (raw block outputs, cls included, as the
official code), the position table fitted to the student's patch grid, and the student's images resized so that the
teacher's grid is the student's (64 px / patch 8 student, patch-16 teacher: 128 px, 8 x 8 tokens). It shares the
encoder's modules rather than cutting the encoder in place, so one loaded encoder can serve several students.
`DMAETrainer` builds and holds it, as trl's trainers hold their `teacher_model`.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration_dmae import DMAEConfig, default_distill_layer
from ..configuration_mae import MAEConfig
from ..convert import load_encoder
from ..modeling_mae import MAEModel, interpolate_pos_embed

TEACHER_POS_EMBED = ("interpolate", "center_crop")


def load_teacher(path: str | os.PathLike, kind: str = "auto", num_attention_heads: int | None = None) -> MAEModel:
    """Load the encoder of a checkpoint as a frozen, eval-mode `MAEModel` at its full depth.

    Args:
        path: an hf_mae directory (an MAE, or a DMAE student: a chain of distillations), a transformers ViTMAE
            directory, or an official / timm / hf_mae weights file (`hf_mae.convert.load_encoder` reads them all).
        kind: one of `hf_mae.convert.CHECKPOINT_KINDS` (`"auto"` detects it).
        num_attention_heads: the teacher's heads, which a weights file does not hold (`None`: width / 64, logged as
            assumed); a directory states its own, and another value is an error.

    Raises:
        ValueError: naming `path` and `kind`, whatever the reason the checkpoint cannot be read.
    """
    try:
        return load_encoder(path, kind=kind, freeze=True, num_attention_heads=num_attention_heads)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"teacher_path={str(path)!r} (teacher_kind={kind!r}) cannot be loaded as an MAE / ViT teacher: {error}"
        ) from error


def teacher_layout(
    teacher: MAEConfig,
    student: DMAEConfig,
    layer: int | None = None,
    pos_embed: str = "interpolate",
    image_size: int | None = None,
) -> tuple[int, int]:
    """The teacher blocks that run and the side of the image the teacher sees, `(layer, image_size)`, checked
    against the teacher's and the student's configs.

    Args:
        teacher: the teacher encoder's config (its full depth).
        student: the student's config: its patch grid, and the width its projector maps to.
        layer: the last teacher block run, 1-indexed; `None` = three quarters of the depth (18 of 24).
        pos_embed: how the teacher's position table is fitted to the student's grid (`TEACHER_POS_EMBED`).
        image_size: the resolution the teacher sees; `None` = the student's grid x the teacher's patch size, the
            only value that gives both the same grid.

    Raises:
        ValueError: naming the setting that cannot fit.
    """
    width = student.hidden_size if student.projector == "none" else student.teacher_hidden_size
    if width != teacher.hidden_size:
        raise ValueError(
            f"the teacher is {teacher.hidden_size} wide but the student's projector ({student.projector!r}) gives "
            f"{width} features (DMAEConfig.teacher_hidden_size={student.teacher_hidden_size}, hidden_size="
            f"{student.hidden_size}); build the student for this teacher"
        )
    depth = teacher.num_hidden_layers
    layer = default_distill_layer(depth) if layer is None else layer
    if not 1 <= layer <= depth:
        raise ValueError(f"teacher_layer={layer} is beyond the teacher's depth {depth} (blocks count from 1)")
    grid, patch = student.image_size // student.patch_size, teacher.patch_size
    if image_size is not None and image_size != grid * patch:
        raise ValueError(
            f"teacher_image_size={image_size} cannot give the teacher (patch {patch}) the student's {grid}x{grid} "
            f"grid; use {grid * patch} or leave it None"
        )
    if pos_embed not in TEACHER_POS_EMBED:
        raise ValueError(f"teacher_pos_embed must be one of {TEACHER_POS_EMBED}, got {pos_embed!r}")
    native = teacher.image_size // patch
    if pos_embed == "center_crop" and grid > native:
        raise ValueError(
            f"teacher_pos_embed='center_crop' cannot cut the student's {grid}x{grid} grid out of the teacher's native "
            f"{native}x{native} position table; use 'interpolate'"
        )
    return layer, grid * patch


def _fit_pos_embed(pos_embed: torch.Tensor, grid: int, mode: str) -> torch.Tensor:
    """Fit a square [1, 1 + n*n, D] position table (cls slot first) to a grid x grid patch grid (`teacher_layout`
    has checked that a crop fits).

    `"interpolate"`: bicubic resize. `"center_crop"`: the central grid x grid cells, which is what the teacher sees when
    the resized image is zero-padded to its native resolution and the padding tokens are dropped (the reproduction
    study).
    """
    if mode == "interpolate":
        return interpolate_pos_embed(pos_embed, grid, grid)
    n = math.isqrt(pos_embed.shape[1] - 1)
    start = (n - grid) // 2
    patches = pos_embed[:, 1:].reshape(1, n, n, -1)[:, start : start + grid, start : start + grid]
    return torch.cat([pos_embed[:, :1], patches.reshape(1, grid * grid, -1)], dim=1)


class DMAETeacher(nn.Module):
    """A frozen teacher fitted to one student: the first `layer` blocks of `encoder`, no final norm, its position
    table fitted to the student's grid. The patch embedding, cls token and blocks are `encoder`'s own modules (shared,
    not copied: moving or casting this teacher moves them); only the fitted position table is new.

    Args:
        encoder: the teacher at full depth (e.g. from [`load_teacher`]); left unchanged.
        student: the student's config.
        layer, pos_embed, image_size: as for [`teacher_layout`], which checks them.
    """

    def __init__(
        self,
        encoder: MAEModel,
        student: DMAEConfig,
        layer: int | None = None,
        pos_embed: str = "interpolate",
        image_size: int | None = None,
    ):
        super().__init__()
        if not isinstance(encoder, MAEModel):
            raise TypeError(
                f"the teacher must be an hf_mae MAEModel (hf_mae.training.load_teacher reads any MAE / ViT checkpoint), "
                f"got {type(encoder).__name__}"
            )
        self.layer, self.image_size = teacher_layout(encoder.config, student, layer, pos_embed, image_size)
        self.depth = encoder.config.num_hidden_layers
        self.hidden_size, self.patch_size = encoder.config.hidden_size, encoder.config.patch_size
        self.pos_embed_mode = pos_embed
        self.patch_embed = encoder.patch_embed
        self.cls_token = encoder.cls_token
        self.blocks = nn.ModuleList(list(encoder.blocks)[: self.layer])
        grid = self.image_size // self.patch_size
        table = _fit_pos_embed(encoder.pos_embed.detach(), grid, pos_embed)
        self.pos_embed = nn.Parameter(table.clone(), requires_grad=False)
        self.requires_grad_(False)
        self.eval()

    def extra_repr(self) -> str:
        return (
            f"blocks 1-{self.layer} of {self.depth}, {self.hidden_size} wide, patch {self.patch_size}, sees "
            f"{self.image_size} px, position table: {self.pos_embed_mode}"
        )

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        """Block `layer`'s raw output on the cls token and the patches `noise` keeps: [B, 1 + kept, hidden_size].

        Args:
            pixel_values: [B, C, H, W] the student's images. They are resized to `image_size` (bilinear with
                antialias, torchvision's Resize, as the reproduction study resized 64 -> 128 px), so the teacher's
                patch grid is the student's.
            noise: [B, L] on that grid; the patches are kept as MAE's `random_masking` keeps them. The student's
                `ids_restore` (as float) is such a noise: it keeps the student's visible patches, in the same order.
            mask_ratio: the student's.
        """
        size = (self.image_size, self.image_size)
        if tuple(pixel_values.shape[-2:]) != size:
            pixel_values = F.interpolate(
                pixel_values.float(), size=size, mode="bilinear", align_corners=False, antialias=True
            )
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype)) + self.pos_embed[:, 1:]  # [B, L, D]
        x = MAEModel.random_masking(x, mask_ratio, noise)[0]  # [B, kept, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return x  # no final norm: DMAE aligns raw block outputs


__all__ = ["TEACHER_POS_EMBED", "DMAETeacher", "load_teacher", "teacher_layout"]
