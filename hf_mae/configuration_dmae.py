"""Configuration of the Distilled MAE (Bai et al., 2022): the student's MAE config plus the distillation spec."""

from __future__ import annotations

from .configuration_mae import MAEConfig
from .losses import FEATURE_LOSSES as DISTILL_LOSSES

TEACHER_KINDS = ("auto", "hf_mae", "transformers", "official", "timm")
PROJECTOR_TYPES = ("linear", "mlp", "none")
TEACHER_POS_EMBED = ("interpolate", "center_crop")


def default_distill_layer(depth: int) -> int:
    """Three quarters of the depth (block 9 of 12, 18 of 24), the layer pair DMAE aligns."""
    return max(1, (3 * depth) // 4)


class DMAEConfig(MAEConfig):
    r"""
    Configuration for [`DMAEForPreTraining`]: every [`MAEConfig`] field describes the student; the fields below
    describe the teacher and the feature distillation. Teacher fields left `None` are filled from the teacher when it
    is attached, so a saved config rebuilds the projector without loading the teacher.

    Args:
        teacher_path (`str`, *optional*): the teacher checkpoint, anything `hf_mae.convert.load_encoder` reads
            (an hf_mae / transformers directory, an official / timm / hf_mae weights file).
        teacher_kind (`str`, defaults to `"auto"`): `"auto"`, `"hf_mae"`, `"transformers"`, `"official"` or `"timm"`.
        student_layer (`int`, *optional*): the student block whose output is distilled, 1-indexed (an index into
            `hidden_states`, whose entry 0 is the embeddings). Defaults to three quarters of the depth (9 of 12).
        teacher_layer (`int`, *optional*): the teacher block it is aligned with; the teacher runs only this many
            blocks. Defaults to three quarters of the teacher's depth (18 of 24).
        teacher_hidden_size (`int`, *optional*): the teacher's width (projector output); filled from the teacher.
        teacher_num_hidden_layers (`int`, *optional*): the teacher's depth before truncation; filled from the teacher.
        teacher_patch_size (`int`, *optional*): the teacher's patch size; filled from the teacher.
        teacher_image_size (`int`, *optional*): the resolution the teacher sees. The student's input is resized so
            that the teacher's patch grid equals the student's (64 px / patch 8 student, patch-16 teacher: 128 px);
            `None` derives exactly that, an explicit value must give the same grid.
        teacher_pos_embed (`str`, defaults to `"interpolate"`): how the teacher's position table (native grid, e.g.
            14 x 14 for 224 px / 16) is fitted to the student's grid: `"interpolate"` (bicubic) or `"center_crop"`
            (the central grid cells: the seed's 128 px image zero-padded to 224 px, padding tokens dropped).
        projector (`str`, defaults to `"linear"`): head on the student feature: `"linear"` (official DMAE, one
            `nn.Linear(student, teacher)` with PyTorch's default init), `"mlp"` (the seed: Linear, GELU, Linear, both to
            the teacher width, MAE's xavier init) or `"none"` (identity; the widths must match).
        normalize_features (`bool`, defaults to `True`): compare L2-normalised features (official DMAE); `False`
            compares raw features (the seed).
        distill_loss (`str`, defaults to `"l1"`): `"l1"` (both papers), `"smooth_l1"` or `"mse"`.
        distill_weight (`float`, defaults to 1.0): alpha in `loss = reconstruction + alpha * distillation`.
    """

    model_type = "hf_mae_dmae"
    # per-batch scalars, not predictions: keep them out of what Trainer gathers in evaluation
    keys_to_ignore_at_inference = ["reconstruction_loss", "distillation_loss"]

    def __init__(
        self,
        teacher_path: str | None = None,
        teacher_kind: str = "auto",
        student_layer: int | None = None,
        teacher_layer: int | None = None,
        teacher_hidden_size: int | None = None,
        teacher_num_hidden_layers: int | None = None,
        teacher_patch_size: int | None = None,
        teacher_image_size: int | None = None,
        teacher_pos_embed: str = "interpolate",
        projector: str = "linear",
        normalize_features: bool = True,
        distill_loss: str = "l1",
        distill_weight: float = 1.0,
        **kwargs,
    ):
        self.teacher_path = None if teacher_path is None else str(teacher_path)
        self.teacher_kind = teacher_kind
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.teacher_hidden_size = teacher_hidden_size
        self.teacher_num_hidden_layers = teacher_num_hidden_layers
        self.teacher_patch_size = teacher_patch_size
        self.teacher_image_size = teacher_image_size
        self.teacher_pos_embed = teacher_pos_embed
        self.projector = projector
        self.normalize_features = normalize_features
        self.distill_loss = distill_loss
        self.distill_weight = distill_weight
        super().__init__(**kwargs)  # sets the student fields, then runs validate_architecture

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def teacher_input_size(self) -> int | None:
        """Side of the image the teacher is fed (`teacher_image_size`, else the student grid x teacher patch)."""
        if self.teacher_image_size is not None:
            return self.teacher_image_size
        return None if self.teacher_patch_size is None else self.grid_size * self.teacher_patch_size

    def validate_architecture(self) -> None:
        super().validate_architecture()
        if self.student_layer is None:
            self.student_layer = default_distill_layer(self.num_hidden_layers)
        for name, choices in (
            ("teacher_kind", TEACHER_KINDS),
            ("projector", PROJECTOR_TYPES),
            ("distill_loss", DISTILL_LOSSES),
            ("teacher_pos_embed", TEACHER_POS_EMBED),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"DMAEConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not isinstance(self.normalize_features, bool):
            raise ValueError(f"DMAEConfig.normalize_features must be a bool, got {self.normalize_features!r}")
        weight = self.distill_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"DMAEConfig.distill_weight must be a number >= 0, got {weight!r}")
        for name in (
            "student_layer",
            "teacher_layer",
            "teacher_hidden_size",
            "teacher_num_hidden_layers",
            "teacher_patch_size",
            "teacher_image_size",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"DMAEConfig.{name} must be a positive integer, got {value!r}")
        if self.student_layer > self.num_hidden_layers:
            raise ValueError(
                f"DMAEConfig.student_layer={self.student_layer} is beyond the student's depth "
                f"num_hidden_layers={self.num_hidden_layers} (blocks count from 1)"
            )
        depth = self.teacher_num_hidden_layers
        if self.teacher_layer is not None and depth is not None and self.teacher_layer > depth:
            raise ValueError(
                f"DMAEConfig.teacher_layer={self.teacher_layer} is beyond the teacher's depth {depth} (blocks count "
                "from 1)"
            )
        if self.projector == "none" and self.teacher_hidden_size not in (None, self.hidden_size):
            raise ValueError(
                f"DMAEConfig.projector='none' needs equal widths, but the teacher is {self.teacher_hidden_size} wide "
                f"and the student hidden_size={self.hidden_size}; use projector 'linear' or 'mlp'"
            )
        if self.teacher_image_size is not None and self.teacher_patch_size is not None:
            size, patch = self.teacher_image_size, self.teacher_patch_size
            if size % patch or size // patch != self.grid_size:
                raise ValueError(
                    f"DMAEConfig.teacher_image_size={size} cannot give the teacher (patch {patch}) the student's "
                    f"{self.grid_size}x{self.grid_size} grid; use {self.grid_size * patch} or leave it None"
                )

    def attach_teacher(self, hidden_size: int, num_hidden_layers: int, patch_size: int) -> None:
        """Fill the teacher fields from the teacher's own config (checking any value already stated) and validate."""
        values = {
            "teacher_hidden_size": hidden_size,
            "teacher_num_hidden_layers": num_hidden_layers,
            "teacher_patch_size": patch_size,
        }
        for name, value in values.items():
            stated = getattr(self, name)
            if stated is not None and stated != value:
                raise ValueError(f"DMAEConfig.{name}={stated} but the teacher has {value}")
        before = {name: getattr(self, name) for name in (*values, "teacher_layer")}
        self.__dict__.update(values)
        if self.teacher_layer is None:
            self.teacher_layer = default_distill_layer(num_hidden_layers)
        try:
            self.validate_architecture()
        except ValueError:
            self.__dict__.update(before)  # a teacher that does not fit leaves the config as it was
            raise


__all__ = ["DMAEConfig", "default_distill_layer"]
