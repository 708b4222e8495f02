"""Configuration of the Distilled MAE (Bai et al., 2022): the student's MAE config plus what its projector needs.

The teacher and the distillation loss are training settings (`hf_mae.training.DMAETrainingArguments`): a saved DMAE
student is an MAE with one extra head, and loads without its teacher.
"""

from __future__ import annotations

import logging

from .configuration_mae import MAEConfig

logger = logging.getLogger(__name__)

PROJECTOR_TYPES = ("linear", "mlp", "none")
# The one statement of these settings' meaning; DMAETrainingArguments overrides them with the same help and checks.
STUDENT_LAYER_HELP = "the distilled student block, 1-indexed (default: three quarters of the depth, 9 of 12)"
PROJECTOR_HELP = (
    "head from the student width to the teacher's: linear (official DMAE), mlp (the reproduction study) or none"
)
# Written to config.json by hf_mae before the teacher and the loss became training arguments; read and ignored.
_TRAINING_FIELDS = (
    "teacher_path",
    "teacher_kind",
    "teacher_layer",
    "teacher_num_hidden_layers",
    "teacher_patch_size",
    "teacher_image_size",
    "teacher_pos_embed",
    "normalize_features",
    "distill_loss",
    "distill_weight",
)


def default_distill_layer(depth: int) -> int:
    """Three quarters of the depth (block 9 of 12, 18 of 24), the layer pair DMAE aligns."""
    return max(1, (3 * depth) // 4)


def check_student_layer(value: int | None, owner: str = "DMAEConfig", depth: int | None = None) -> None:
    """Raise `ValueError` unless `value` is None or a block index in [1, depth]; `owner` names the dataclass."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.student_layer must be a positive integer, got {value!r}")
    if depth is not None and value > depth:
        raise ValueError(
            f"{owner}.student_layer={value} is beyond the student's depth num_hidden_layers={depth} (blocks count "
            "from 1)"
        )


def check_projector(value: str, owner: str = "DMAEConfig") -> None:
    """Raise `ValueError` unless `value` is one of `PROJECTOR_TYPES`; `owner` names the dataclass."""
    if value not in PROJECTOR_TYPES:
        raise ValueError(f"{owner}.projector must be one of {PROJECTOR_TYPES}, got {value!r}")


class DMAEConfig(MAEConfig):
    r"""
    Configuration for [`DMAEForPreTraining`]: every [`MAEConfig`] field describes the student; the fields below
    describe the head that maps its features into the teacher's space. Which teacher, which of its blocks, how its
    grid is fitted and the loss are training settings ([`~hf_mae.training.DMAETrainingArguments`]).

    Args:
        student_layer (`int`, *optional*): the student block whose output is distilled, 1-indexed (an index into
            `hidden_states`, whose entry 0 is the embeddings). Defaults to three quarters of the depth (9 of 12).
        projector (`str`, defaults to `"linear"`): head on the student feature: `"linear"` (official DMAE, one
            `nn.Linear(student, teacher)` with PyTorch's default init), `"mlp"` (the reproduction study: Linear,
            GELU, Linear, both to the teacher width, MAE's xavier init) or `"none"` (identity; the widths must match).
        teacher_hidden_size (`int`, *optional*): the teacher's width, which the projector maps to. Needed to build a
            `"linear"` / `"mlp"` projector; `hf_mae.training.run_distillation` fills it from the teacher.

    Config files written by older hf_mae versions also hold the teacher and loss fields (`teacher_path`,
    `distill_weight`, ...); they are ignored on loading.
    """

    model_type = "hf_mae_dmae"
    # the projected features are a training signal, not a prediction: Trainer does not gather them in evaluation
    keys_to_ignore_at_inference = ["student_features"]
    # modules of a DMAE checkpoint that only pretraining uses: a model without them (MAEModel, the classifier) that
    # loads this checkpoint drops them instead of failing its strict load
    pretraining_heads = ("decoder", "projector")

    def __init__(
        self,
        student_layer: int | None = None,
        projector: str = "linear",
        teacher_hidden_size: int | None = None,
        **kwargs,
    ):
        ignored = [name for name in _TRAINING_FIELDS if kwargs.pop(name, None) is not None]
        if ignored:
            logger.info(
                "DMAEConfig: ignoring %s, saved by an older hf_mae; they are DMAETrainingArguments now",
                ", ".join(ignored),
            )
        self.student_layer = student_layer
        self.projector = projector
        self.teacher_hidden_size = teacher_hidden_size
        super().__init__(**kwargs)  # sets the student fields, then runs validate_architecture

    def validate_architecture(self) -> None:
        super().validate_architecture()
        if self.student_layer is None:
            self.student_layer = default_distill_layer(self.num_hidden_layers)
        check_student_layer(self.student_layer, depth=self.num_hidden_layers)
        check_projector(self.projector)
        width = self.teacher_hidden_size
        if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
            raise ValueError(f"DMAEConfig.teacher_hidden_size must be a positive integer, got {width!r}")
        if self.projector == "none" and width not in (None, self.hidden_size):
            raise ValueError(
                f"DMAEConfig.projector='none' needs equal widths, but the teacher is {width} wide and the student "
                f"hidden_size={self.hidden_size}; use projector 'linear' or 'mlp'"
            )


__all__ = ["PROJECTOR_TYPES", "DMAEConfig", "check_projector", "check_student_layer", "default_distill_layer"]
