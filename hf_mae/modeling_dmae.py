"""Distilled MAE (Bai et al., 2022, "Masked Autoencoders Enable Efficient Knowledge Distillers"): the student.

An MAE (`MAEForPreTraining`, same modules and state-dict names) plus a small projector. One forward pass gives the
pixel loss on the removed patches and the output of block `student_layer` (cls and visible tokens, before any norm)
mapped by the projector to the teacher's width. The frozen teacher and the distillation loss are the trainer's
(`hf_mae.training.DMAETrainer`): this model never sees a teacher, so a saved student is an MAE with one extra head.
Mask convention, as everywhere in hf_mae: 0 = visible, 1 = removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_dmae import DMAEConfig
from .modeling_mae import MAEForPreTraining, MAEModel


@dataclass
class DMAEForPreTrainingOutput(ModelOutput):
    """
    Args:
        loss: MAE's pixel loss on the removed patches (the trainer adds the distillation term).
        student_features: [B, 1 + kept, teacher_hidden_size] block `student_layer`'s output on the cls and visible
            tokens, after the projector; the teacher's features on the same patches are its target.
        logits: [B, L, patch_size**2 * num_channels] predicted pixels of every patch.
        mask: [B, L], 0 = visible, 1 = removed.
        ids_restore: [B, L], undoes the shuffle. Its argsort is the shuffle, whose first `kept` entries are the
            visible patches in the order of `student_features[:, 1:]`.
        hidden_states: the student encoder's hidden states (with `output_hidden_states`).
    """

    loss: torch.FloatTensor | None = None
    student_features: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.LongTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def build_projector(config: DMAEConfig) -> nn.Module:
    """The head from the student width to the teacher width (`config.projector`)."""
    if config.projector == "none":
        return nn.Identity()
    student, teacher = config.hidden_size, config.teacher_hidden_size
    if teacher is None:
        raise ValueError(
            f"DMAEConfig.teacher_hidden_size is None, so the {config.projector!r} projector cannot be built: set it to "
            "the teacher's width (hf_mae.training.load_teacher(path).config.hidden_size)"
        )
    if config.projector == "linear":
        projector = nn.Linear(student, teacher)
        # official DMAE creates its head after the MAE init, so it keeps nn.Linear's own init
        projector.torch_default_init = True
        return projector
    # the reproduction study builds its MLP inside the encoder before MAE's init, so both layers get xavier / zero bias
    return nn.Sequential(nn.Linear(student, teacher), nn.GELU(), nn.Linear(teacher, teacher))


class DMAEModel(MAEModel):
    """A DMAE student's encoder: what `AutoModel` loads from a student directory (decoder and projector dropped).
    `MAEModel` under the student's `DMAEConfig`: transformers' Auto classes pair each model class with one config
    class."""

    config_class = DMAEConfig

    @classmethod
    def _auto_classes(cls) -> dict[str, type[MAEModel]]:
        return {"AutoModel": cls}


class DMAEForPreTraining(MAEForPreTraining):
    """MAE student + projector. The distillation target, a frozen teacher's features on the same visible patches, is
    computed by [`~hf_mae.training.DMAETrainer`]."""

    config_class = DMAEConfig
    config: DMAEConfig
    # an MAE checkpoint (continue pretraining with distillation) has no projector yet
    _allowed_missing_keys = (r"^projector\.",)

    def __init__(self, config: DMAEConfig):
        super().__init__(config)
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
            noise: [B, L] values whose argsort fixes the mask (small = kept).
            interpolate_pos_encoding: accept other resolutions by resizing both position tables.
            output_hidden_states: also return the student encoder's hidden states.
            return_loss: always computed; tells `Trainer` that evaluation has a loss without labels.
        """
        out = super().forward(
            pixel_values,
            noise=noise,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=True,
            return_dict=True,
        )
        student = self.projector(out.hidden_states[self.config.student_layer])  # [B, 1 + kept, D_teacher]
        result = DMAEForPreTrainingOutput(
            loss=out.loss,
            student_features=student,
            logits=out.logits,
            mask=out.mask,
            ids_restore=out.ids_restore,
            hidden_states=out.hidden_states if output_hidden_states else None,
        )
        return result if return_dict is not False else result.to_tuple()


__all__ = ["DMAEModel", "DMAEForPreTraining", "DMAEForPreTrainingOutput", "build_projector"]
