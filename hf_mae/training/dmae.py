"""Distilled MAE training: the recipe arguments, the Trainer that holds the frozen teacher, and the run.

`DMAETrainer` holds the teacher (as trl's distillation trainers hold `teacher_model`) and its `compute_loss`
orchestrates a step: the student's forward (pixel loss and projected features), the teacher on the same visible
patches without grad, and `loss = reconstruction + distill_weight * feature_distillation_loss(...)`. The run itself is
`run_pretraining` with a DMAE student and this trainer: there is no second training loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate.utils import DynamoBackend
from transformers import set_seed

from ..configuration_dmae import (
    PROJECTOR_HELP,
    STUDENT_LAYER_HELP,
    DMAEConfig,
    check_projector,
    check_student_layer,
)
from ..convert import CHECKPOINT_KINDS
from ..losses import FEATURE_LOSSES, feature_distillation_loss
from ..modeling_dmae import DMAEForPreTraining
from ..modeling_mae import MAEModel, markdown_table
from .arguments import FloatOrNone, MAEPretrainingArguments
from .pipeline import DataArguments, ModelArguments, load_config, pretraining_overrides, run_pretraining
from .teacher import TEACHER_POS_EMBED, DMAETeacher, load_teacher, teacher_layout
from .trainer import MAETrainer

logger = logging.getLogger(__name__)

# DMAEConfig fields that DMAETrainingArguments can override (None there = keep the student config's)
STUDENT_FIELDS = ("student_layer", "projector")
LOSS_PARTS = ("reconstruction_loss", "distillation_loss")
# the dtype the teacher is cast to, per mixed-precision mode of the run (others, fp8 included: fp32)
TEACHER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DMAETrainingArguments(MAEPretrainingArguments):
    """DMAE pretraining: MAE's optimizer and blr 1.5e-4, 20 warm-up epochs of 100, the teacher, and the
    distillation loss (defaults: official DMAE, L1 between L2-normalised features, weight 1). `student_layer` and
    `projector` override the student's [`DMAEConfig`]."""

    base_learning_rate: FloatOrNone | None = field(default=1.5e-4, metadata={"help": "DMAE pretraining blr"})
    num_train_epochs: float = field(default=100)
    warmup_epochs: float | None = field(default=20)
    teacher_path: str | None = field(
        default=None,
        metadata={
            "help": "teacher checkpoint: hf_mae (MAE or DMAE) / transformers directory, or official / timm / hf_mae "
            "weights file"
        },
    )
    teacher_kind: str = field(default="auto", metadata={"help": f"one of {', '.join(CHECKPOINT_KINDS)}"})
    teacher_num_attention_heads: int | None = field(
        default=None,
        metadata={
            "help": "the teacher's attention heads, for an official / timm weights file (not in the weights: "
            "default width / 64, logged as assumed); a directory states its own"
        },
    )
    teacher_layer: int | None = field(
        default=None,
        metadata={
            "help": "teacher block aligned with the student's, 1-indexed; the teacher runs only this many blocks "
            "(default: three quarters of its depth, 18 of 24)"
        },
    )
    teacher_pos_embed: str = field(
        default="interpolate",
        metadata={
            "help": "fit the teacher's position table to the student's grid: interpolate (bicubic) or center_crop "
            "(the reproduction study's 128 px image zero-padded to 224 px)"
        },
    )
    teacher_image_size: int | None = field(
        default=None,
        metadata={"help": "resolution the teacher sees (default, and only choice: student grid x teacher patch size)"},
    )
    distill_loss: str = field(default="l1", metadata={"help": f"one of {', '.join(FEATURE_LOSSES)}"})
    distill_weight: float = field(default=1.0, metadata={"help": "alpha: loss = pixel + alpha * feature"})
    normalize_features: bool = field(
        default=True,
        metadata={
            "help": "compare L2-normalised features (official DMAE); false compares raw ones (the reproduction study)"
        },
    )
    student_layer: int | None = field(
        default=None, metadata={"help": f"overrides DMAEConfig.student_layer: {STUDENT_LAYER_HELP}"}
    )
    projector: str | None = field(default=None, metadata={"help": f"overrides DMAEConfig.projector: {PROJECTOR_HELP}"})

    def __post_init__(self):
        super().__post_init__()
        for name, choices in (
            ("teacher_kind", CHECKPOINT_KINDS),
            ("teacher_pos_embed", TEACHER_POS_EMBED),
            ("distill_loss", FEATURE_LOSSES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("teacher_layer", "teacher_image_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        weight = self.distill_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"distill_weight must be a number >= 0, got {weight!r}")
        if not isinstance(self.normalize_features, bool):
            raise ValueError(f"normalize_features must be true or false, got {self.normalize_features!r}")
        owner = type(self).__name__
        check_student_layer(self.student_layer, owner=owner)
        if self.projector is not None:
            check_projector(self.projector, owner=owner)


class DMAETrainer(MAETrainer):
    """[`MAETrainer`] for [`DMAEForPreTraining`] that holds the frozen teacher, as trl's distillation trainers hold
    `teacher_model`.

    Args:
        teacher: an `MAEModel` at full depth (e.g. from [`load_teacher`]; one loaded encoder can serve several
            trainers) or a checkpoint path (read with `args.teacher_kind`); `None` reads `args.teacher_path`. It is
            fitted to the student as [`DMAETeacher`] (`args.teacher_layer` blocks, `args.teacher_pos_embed`,
            `args.teacher_image_size`), frozen, in eval mode, on the run's device in its mixed-precision dtype. It is
            never in the optimizer, a checkpoint or the student's `state_dict`.
        args: [`DMAETrainingArguments`] (the teacher and loss settings).

    Training logs add `reconstruction_loss` and `distillation_loss`, averaged like `loss` over the steps since the
    last log and over processes; evaluation adds `eval_reconstruction_loss` / `eval_distillation_loss`, averaged
    over examples, and computes losses only (no metric needs the [N, L, p*p*C] predictions gathered).
    """

    def __init__(self, *args, teacher: MAEModel | str | os.PathLike | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        student = self.accelerator.unwrap_model(self.model)
        if not isinstance(student, DMAEForPreTraining):
            raise TypeError(f"DMAETrainer trains a DMAEForPreTraining, got {type(student).__name__}")
        if not isinstance(self.args, DMAETrainingArguments):
            raise TypeError(
                f"DMAETrainer needs DMAETrainingArguments (teacher and loss), got {type(self.args).__name__}"
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                "DMAETrainer does not support nn.DataParallel; start one process per GPU with `accelerate launch` or "
                "`torchrun`"
            )
        if teacher is None:
            if not self.args.teacher_path:
                raise ValueError(
                    "DMAETrainer needs a teacher: pass teacher= (an MAEModel from hf_mae.training.load_teacher, or a "
                    "checkpoint path) or set DMAETrainingArguments.teacher_path"
                )
            teacher = self.args.teacher_path
        heads = self.args.teacher_num_attention_heads
        if isinstance(teacher, (str, os.PathLike)):
            teacher = load_teacher(teacher, self.args.teacher_kind, heads)
        elif heads is not None and heads != teacher.config.num_attention_heads:  # a loaded teacher has its heads
            raise ValueError(
                f"teacher_num_attention_heads={heads}, but the teacher given has {teacher.config.num_attention_heads} "
                "heads: load it with load_teacher(path, num_attention_heads=...) or leave the argument unset"
            )
        self.teacher = DMAETeacher(
            teacher, student.config, self.args.teacher_layer, self.args.teacher_pos_embed, self.args.teacher_image_size
        )
        # What `accelerator.prepare_model(teacher, evaluation_mode=True)` does for trl's teacher, done here: the
        # device, the run's dtype (as the student's mixed precision computes), its autocast (in `compute_loss`) and
        # torch.compile. Registering the teacher among the accelerator's models instead would make Trainer.evaluate()
        # before train() take the student for prepared (no autocast), and FSDP would leave the teacher on the CPU.
        # The accelerator's precision, not `args.bf16` / `args.fp16`: a launch config's `mixed_precision: bf16`
        # (fsdp2.yaml, multi_gpu.yaml) sets only the former, and would leave the teacher in fp32 (twice the memory).
        dtype = TEACHER_DTYPES.get(self.accelerator.mixed_precision, torch.float32)
        self.teacher.to(device=self.args.device, dtype=dtype)
        dynamo = self.accelerator.state.dynamo_plugin
        if dynamo.backend != DynamoBackend.NO:
            self.teacher.compile(**dynamo.to_kwargs())
        self._mask_ratio = student.config.mask_ratio
        self._loss_parts: dict[str, torch.Tensor] = {}

    # -- one step: the student, the teacher on the same patches, the two loss terms ----------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`reconstruction + distill_weight * distillation`; the outputs are the student's (their `loss` is the
        reconstruction term)."""
        reconstruction, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        with torch.no_grad(), self.accelerator.autocast():
            # ids_restore is a permutation, so its argsort is the student's shuffle: as the teacher's noise it keeps
            # the student's visible patches, in the same order
            target = self.teacher(
                inputs["pixel_values"], noise=outputs["ids_restore"].float(), mask_ratio=self._mask_ratio
            )
        distillation = feature_distillation_loss(
            outputs["student_features"], target, self.args.normalize_features, self.args.distill_loss
        )
        loss = reconstruction + self.args.distill_weight * distillation
        # training: one weight per micro-batch, as Trainer averages `loss`; evaluation: per example, as `eval_loss`
        split, weight = ("train", 1.0) if model.training else ("eval", float(inputs["pixel_values"].shape[0]))
        values = [reconstruction.detach().float(), distillation.detach().float()]
        parts = torch.stack([*values, torch.ones_like(values[0])]) * weight  # the last entry counts the weight
        self._loss_parts[split] = parts + self._loss_parts[split] if split in self._loss_parts else parts
        return (loss, outputs) if return_outputs else loss

    def _reduce_loss_parts(self, split: str, prefix: str = "") -> dict[str, float]:
        """Mean of the accumulated terms over steps (or examples) and processes; a collective, so every process calls
        it at the same point."""
        parts = self._loss_parts.pop(split, None)
        if parts is None:
            return {}
        total = self.accelerator.reduce(parts, reduction="sum")
        return {f"{prefix}{name}": (total[i] / total[-1]).item() for i, name in enumerate(LOSS_PARTS)}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log, which Trainer makes on every process right after gathering `loss`
            logs.update(self._reduce_loss_parts("train"))
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        if prediction_loss_only is None and self.compute_metrics is None:
            prediction_loss_only = True
        self._loss_parts.pop("eval", None)
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        output.metrics.update(self._reduce_loss_parts("eval", prefix=f"{metric_key_prefix}_"))
        return output

    def distillation_spec(self) -> dict[str, object]:
        """The student head, the teacher as fitted and the loss: what the model card lists under "Distillation"."""
        config, teacher = self.accelerator.unwrap_model(self.model).config, self.teacher
        return {
            "student_layer": f"{config.student_layer} of {config.num_hidden_layers}",
            "projector": config.projector,
            "teacher_path": self.args.teacher_path or "given to DMAETrainer",
            "teacher_kind": self.args.teacher_kind,
            "teacher_layer": f"{teacher.layer} of {teacher.depth}",
            "teacher_hidden_size": teacher.hidden_size,
            "teacher_patch_size": teacher.patch_size,
            "teacher_image_size": teacher.image_size,
            "teacher_pos_embed": teacher.pos_embed_mode,
            "distill_loss": self.args.distill_loss,
            "normalize_features": self.args.normalize_features,
            "distill_weight": self.args.distill_weight,
        }

    def _model_card_summary(self, model, base: str | None, datasets: list[str]) -> str:
        """MAETrainer's sentence, said of DMAE: the student also learns the teacher's features."""
        summary = super()._model_card_summary(model, base, datasets)
        teacher = f"`{self.args.teacher_path}`" if self.args.teacher_path else "a frozen teacher"
        return summary.replace(
            "Masked Autoencoder (MAE) pretraining",
            f"Distilled Masked Autoencoder (DMAE) pretraining (pixel reconstruction + feature distillation from {teacher})",
            1,
        )

    def model_card_sections(self) -> list[tuple[str, str]]:
        """MAETrainer's card sections plus the distillation spec."""
        return [*super().model_card_sections(), ("Distillation", markdown_table(self.distillation_spec()))]


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------
def build_distillation_config(
    model_args: ModelArguments, training_args: DMAETrainingArguments, teacher_hidden_size: int
) -> DMAEConfig:
    """Student config from `model_name_or_path` (an MAE or DMAE directory) or the preset, with the MAE overrides of
    `config_overrides` / `mask_ratio`, the student overrides of the training arguments, and the teacher's width."""
    overrides = pretraining_overrides(model_args, training_args)
    overrides.update({k: getattr(training_args, k) for k in STUDENT_FIELDS if getattr(training_args, k) is not None})
    config = load_config(DMAEConfig, model_args, overrides)
    stated = config.teacher_hidden_size
    if stated is not None and stated != teacher_hidden_size:
        raise ValueError(
            f"{model_args.model_name_or_path}: the student's projector maps to teacher_hidden_size={stated}, but the "
            f"teacher {training_args.teacher_path} is {teacher_hidden_size} wide"
        )
    config.update({"teacher_hidden_size": teacher_hidden_size})  # validated: a 'none' projector needs equal widths
    return config


def build_distillation_model(
    model_args: ModelArguments, training_args: DMAETrainingArguments
) -> tuple[DMAEForPreTraining, MAEModel]:
    """The DMAE student and its teacher, loaded once at full depth (`DMAETrainer` fits it to the student). Every
    inconsistency (teacher file, layers, widths, grid) raises a `ValueError` here, before any data is loaded."""
    if not training_args.teacher_path:
        raise ValueError("DMAE needs a teacher: set --teacher_path")
    teacher = load_teacher(
        training_args.teacher_path, training_args.teacher_kind, training_args.teacher_num_attention_heads
    )
    config = build_distillation_config(model_args, training_args, teacher.config.hidden_size)
    layer, image_size = teacher_layout(
        teacher.config,
        config,
        training_args.teacher_layer,
        training_args.teacher_pos_embed,
        training_args.teacher_image_size,
    )
    if model_args.model_name_or_path:
        model = DMAEForPreTraining.from_pretrained(
            model_args.model_name_or_path, config=config, **model_args.hub_kwargs()
        )
    else:
        model = DMAEForPreTraining(config)
    logger.info(
        "DMAE: student block %d of %d -> %s projector -> teacher block %d of %d (%d wide, patch %d, sees %d px)",
        config.student_layer,
        config.num_hidden_layers,
        config.projector,
        layer,
        teacher.config.num_hidden_layers,
        teacher.config.hidden_size,
        teacher.config.patch_size,
        image_size,
    )
    return model, teacher


def run_distillation(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DMAETrainingArguments,
    extra_callbacks: list | None = None,
) -> dict[str, float]:
    """Pretrain a DMAE student: build it and load its teacher, then `run_pretraining` with [`DMAETrainer`]."""
    set_seed(training_args.seed)  # the student's init, as run_pretraining seeds the MAE's
    model, teacher = build_distillation_model(model_args, training_args)
    return run_pretraining(
        model_args,
        data_args,
        training_args,
        model=model,
        trainer_cls=DMAETrainer,
        extra_callbacks=extra_callbacks,
        trainer_kwargs={"teacher": teacher},
    )


__all__ = [
    "STUDENT_FIELDS",
    "DMAETrainer",
    "DMAETrainingArguments",
    "build_distillation_config",
    "build_distillation_model",
    "run_distillation",
]
