"""Distilled MAE training: the recipe arguments, a Trainer that logs both loss terms, and the run.

The distillation term is computed inside `DMAEForPreTraining.forward`; `DMAETrainer` only keeps the teacher on the
right device and dtype and logs `reconstruction_loss` / `distillation_loss` next to `loss`. The run itself is
`run_pretraining` with a DMAE student and this trainer: there is no second training loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import set_seed

from ..configuration_dmae import DISTILL_LOSSES, PROJECTOR_TYPES, TEACHER_KINDS, TEACHER_POS_EMBED, DMAEConfig
from ..modeling_dmae import DMAEForPreTraining, load_teacher, prepare_teacher
from ..modeling_mae import markdown_table
from .arguments import FloatOrNone, MAEPretrainingArguments
from .pipeline import DataArguments, ModelArguments, load_config, pretraining_overrides, run_pretraining
from .trainer import MAETrainer

logger = logging.getLogger(__name__)

# DMAEConfig fields that DMAETrainingArguments can override from the command line (None there = keep the config's)
DISTILL_FIELDS = (
    "teacher_path",
    "teacher_kind",
    "student_layer",
    "teacher_layer",
    "projector",
    "normalize_features",
    "distill_loss",
    "distill_weight",
    "teacher_pos_embed",
    "teacher_image_size",
)
LOSS_PARTS = ("reconstruction_loss", "distillation_loss")


@dataclass
class DMAETrainingArguments(MAEPretrainingArguments):
    """DMAE pretraining: MAE's optimizer and blr 1.5e-4, 20 warm-up epochs of 100 (official DMAE), plus the teacher
    and distillation knobs of [`DMAEConfig`]; each one left `None` keeps the model config's value."""

    base_learning_rate: FloatOrNone | None = field(default=1.5e-4, metadata={"help": "DMAE pretraining blr"})
    num_train_epochs: float = field(default=100)
    warmup_epochs: float | None = field(default=20)
    teacher_path: str | None = field(
        default=None,
        metadata={"help": "teacher checkpoint: hf_mae / transformers directory or official / timm / hf_mae file"},
    )
    teacher_kind: str | None = field(default=None, metadata={"help": f"one of {', '.join(TEACHER_KINDS)}"})
    student_layer: int | None = field(
        default=None, metadata={"help": "distilled student block, 1-indexed (default: 3/4 of the depth, 9 of 12)"}
    )
    teacher_layer: int | None = field(
        default=None, metadata={"help": "teacher block it is aligned with (default: 3/4 of the depth, 18 of 24)"}
    )
    projector: str | None = field(
        default=None, metadata={"help": "linear (official DMAE), mlp (the seed) or none (equal widths)"}
    )
    normalize_features: bool | None = field(
        default=None, metadata={"help": "L1 between L2-normalised features (official) instead of raw ones (the seed)"}
    )
    distill_loss: str | None = field(default=None, metadata={"help": f"one of {', '.join(DISTILL_LOSSES)}"})
    distill_weight: float | None = field(default=None, metadata={"help": "alpha: loss = pixel + alpha * feature"})
    teacher_pos_embed: str | None = field(
        default=None, metadata={"help": "interpolate (default) or center_crop (the seed's pad-to-224 layout)"}
    )
    teacher_image_size: int | None = field(
        default=None, metadata={"help": "resolution the teacher sees (default: student grid x teacher patch size)"}
    )

    def __post_init__(self):
        super().__post_init__()
        for name, choices in (
            ("teacher_kind", TEACHER_KINDS),
            ("projector", PROJECTOR_TYPES),
            ("distill_loss", DISTILL_LOSSES),
            ("teacher_pos_embed", TEACHER_POS_EMBED),
        ):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        for name in ("student_layer", "teacher_layer", "teacher_image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.distill_weight is not None and not self.distill_weight >= 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")

    def distillation_overrides(self) -> dict[str, Any]:
        """The DMAEConfig fields these arguments set."""
        return {name: getattr(self, name) for name in DISTILL_FIELDS if getattr(self, name) is not None}


class DMAETrainer(MAETrainer):
    """[`MAETrainer`] for [`DMAEForPreTraining`]:

    - the teacher (outside the model's parameters, so neither the optimizer nor DDP see it) is loaded if needed, moved
      to the run's device once and cast to its mixed-precision dtype;
    - training logs add `reconstruction_loss` and `distillation_loss`, averaged like `loss` over the steps since the
      last log and over processes; evaluation adds `eval_reconstruction_loss` / `eval_distillation_loss`, averaged
      over examples;
    - evaluation computes losses only (no metric needs the [N, L, p*p*C] predictions gathered).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        student = self.accelerator.unwrap_model(self.model)
        if not isinstance(student, DMAEForPreTraining):
            raise TypeError(f"DMAETrainer trains a DMAEForPreTraining, got {type(student).__name__}")
        if self.args.n_gpu > 1:
            raise ValueError(
                "DMAETrainer does not support nn.DataParallel (the teacher is not replicated); start one process per "
                "GPU with `accelerate launch` or `torchrun`"
            )
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32
        student.teacher.to(device=self.args.device, dtype=dtype)  # loads it from teacher_path if it is not there yet
        self._loss_parts: dict[str, torch.Tensor] = {}

    # -- the two loss terms -------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        # training: one weight per micro-batch, as Trainer averages `loss`; evaluation: per example, as `eval_loss`
        split, weight = ("train", 1.0) if model.training else ("eval", float(inputs["pixel_values"].shape[0]))
        values = [outputs[name].detach().float() for name in LOSS_PARTS]
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

    def model_card_sections(self) -> list[tuple[str, str]]:
        """MAETrainer's card sections plus the distillation spec."""
        config = self.accelerator.unwrap_model(self.model).config
        fields = (*DISTILL_FIELDS, "teacher_hidden_size", "teacher_num_hidden_layers", "teacher_patch_size")
        values = {name: getattr(config, name) for name in fields} | {"teacher_image_size": config.teacher_input_size}
        return [*super().model_card_sections(), ("Distillation", markdown_table(values))]


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------
def build_distillation_config(model_args: ModelArguments, training_args: DMAETrainingArguments) -> DMAEConfig:
    """Student config from `model_name_or_path` (an MAE or DMAE directory) or the preset, with the MAE overrides of
    `config_overrides` / `mask_ratio` and the distillation overrides of the training arguments."""
    overrides = pretraining_overrides(model_args, training_args)
    overrides.update(training_args.distillation_overrides())
    config = load_config(DMAEConfig, model_args, overrides)
    config.validate_architecture()  # from_pretrained sets keyword overrides after __init__'s checks
    return config


def build_distillation_model(model_args: ModelArguments, training_args: DMAETrainingArguments) -> DMAEForPreTraining:
    """The DMAE student with its teacher attached. Every inconsistency (teacher file, layers, widths, grid) raises a
    `ValueError` here, before any data is loaded."""
    config = build_distillation_config(model_args, training_args)
    if not config.teacher_path:
        raise ValueError("DMAE needs a teacher: set --teacher_path (or teacher_path in the model's config)")
    teacher = prepare_teacher(load_teacher(config), config)  # fills the teacher fields the projector needs
    if model_args.model_name_or_path:
        model = DMAEForPreTraining.from_pretrained(
            model_args.model_name_or_path, config=config, **model_args.hub_kwargs()
        )
        model.set_teacher(teacher)
    else:
        model = DMAEForPreTraining(config, teacher=teacher)
    logger.info(
        "DMAE: student block %d of %d -> %s projector -> teacher block %d of %d (%d wide, patch %d, sees %d px)",
        config.student_layer,
        config.num_hidden_layers,
        config.projector,
        config.teacher_layer,
        config.teacher_num_hidden_layers,
        config.teacher_hidden_size,
        config.teacher_patch_size,
        config.teacher_input_size,
    )
    return model


def run_distillation(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: DMAETrainingArguments,
    extra_callbacks: list | None = None,
) -> dict[str, float]:
    """Pretrain a DMAE student: build it and its teacher, then `run_pretraining` with [`DMAETrainer`]."""
    set_seed(training_args.seed)  # the student's init, as run_pretraining seeds the MAE's
    model = build_distillation_model(model_args, training_args)
    return run_pretraining(
        model_args,
        data_args,
        training_args,
        model=model,
        trainer_cls=DMAETrainer,
        extra_callbacks=extra_callbacks,
    )


__all__ = [
    "DISTILL_FIELDS",
    "DMAETrainer",
    "DMAETrainingArguments",
    "build_distillation_config",
    "build_distillation_model",
    "run_distillation",
]
