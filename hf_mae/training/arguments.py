"""TrainingArguments subclasses holding the MAE recipe knobs (defaults: the official MAE recipes)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import SchedulerType, TrainingArguments

from ..configuration_mae import DROP_PATH_RATE_HELP, MASK_RATIO_HELP, check_drop_path_rate, check_mask_ratio
from ..data.transforms import FINETUNE_AUGS, PRETRAIN_AUGS

logger = logging.getLogger(__name__)


class FloatOrNone(float):
    """The type of an optional float argument: a number, or `none` / `null` for None (`--base_learning_rate none`)."""

    def __new__(cls, value, name: str = "value"):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number or none, got {value!r}") from None


def _launched_on_cpu_only() -> bool:
    """True in a rank started by `accelerate launch` / `torchrun` (WORLD_SIZE > 1) on a machine without GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "ACCELERATE_USE_CPU" in os.environ:
        return False
    accelerator = getattr(torch, "accelerator", None)
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


@dataclass
class MAETrainingArguments(TrainingArguments):
    """Shared recipe knobs. The learning rate follows MAE's linear scaling rule, warm-up is given in epochs and the
    schedule is a half-cycle cosine to `min_learning_rate`, stepped per iteration."""

    learning_rate: FloatOrNone | None = field(
        default=None,
        metadata={
            "help": "the peak learning rate; when given it wins over --base_learning_rate (default: from the blr, "
            "else 5e-5)"
        },
    )
    base_learning_rate: FloatOrNone | None = field(
        default=None,
        metadata={
            "help": "MAE's blr: learning_rate = blr * effective batch / 256 (effective batch = per-device batch x "
            "gradient accumulation x processes); used when --learning_rate is not given; `none` = off"
        },
    )
    min_learning_rate: float = field(default=0.0, metadata={"help": "floor of the cosine schedule"})
    warmup_epochs: float | None = field(
        default=None, metadata={"help": "linear warm-up length in epochs (used when --warmup_steps is not given)"}
    )
    warmup_steps: float | None = field(
        default=None,
        metadata={
            "help": "linear warm-up in optimizer steps (< 1: a fraction of the run), as in transformers; when given, "
            "0 included, it wins over --warmup_epochs"
        },
    )
    layer_decay: float | None = field(
        default=None, metadata={"help": "layer-wise lr decay (MAE fine-tuning: 0.65 ViT-B, 0.75 ViT-L); None = off"}
    )
    max_nonfinite_steps: int = field(
        default=10,
        metadata={
            "help": "stop after this many optimizer steps in a row with a non-finite loss (each is skipped); checked "
            "every this many steps and at each log, so without a host sync per step; 0 = never stop"
        },
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "gradient clipping by global norm; 0 = none, as in the official MAE and DMAE recipes"},
    )
    lars: bool = field(
        default=False, metadata={"help": "LARS (momentum 0.9) instead of --optim, as MAE's linear probe"}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "start afresh in an output_dir that holds a previous run (its checkpoints are removed); without "
            "it such a run stops before touching anything"
        },
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "image models take only pixel_values"})
    report_to: None | str | list[str] = field(
        default="tensorboard",
        metadata={"help": "loggers: tensorboard (written under output_dir/runs), wandb, none, ..."},
    )
    lr_scheduler_type: str = field(default="cosine_with_min_lr")
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "the Trainer's per-step NaN check of the logged loss (a host sync each step); MAETrainer already "
            "skips non-finite steps and logs 0 for them"
        },
    )

    def __post_init__(self):
        if _launched_on_cpu_only() and not self.use_cpu:
            # `accelerate launch` with a multi-process CPU config (use_cpu: true) starts the ranks but does not tell
            # them to use gloo: without this each rank would train alone as a world of one
            logger.info(
                "%s processes launched and no accelerator: training on CPU with gloo", os.environ["WORLD_SIZE"]
            )
            self.use_cpu = True
        given = self.accelerator_config
        non_blocking_given = isinstance(given, (str, Path)) or (
            given is not None and (not isinstance(given, dict) or "non_blocking" in given)
        )
        if self.warmup_steps is None:
            self.warmup_steps = 0  # transformers' default: the warm-up is warmup_epochs' (MAETrainer)
        elif self.warmup_epochs is not None:
            logger.info("warmup_steps %g given: it wins over warmup_epochs %g", self.warmup_steps, self.warmup_epochs)
            self.warmup_epochs = None  # so the model card shows what was used
        super().__post_init__()
        if self.dataloader_pin_memory and not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for; avoids a warning per dataloader
        if self.dataloader_pin_memory and not self.use_cpu and not non_blocking_given:
            # pinned batches copied without blocking the host: a blocking copy waits for the GPU to finish the
            # previous step, a host sync per batch
            self.accelerator_config.non_blocking = True
        # transformers takes these as they come: 0 ends in a ZeroDivisionError or torch's "batch_size should be a
        # positive integer", and a negative weight decay or clipping norm is used (or ignored) silently
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0:  # the Trainer would take one step
            raise ValueError("max_steps must be > 0, or -1 to train for num_train_epochs; got 0")
        if self.max_steps < 0 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be > 0 (or give --max_steps), got {self.num_train_epochs}")
        for name in ("learning_rate", "base_learning_rate"):
            value = getattr(self, name)
            if isinstance(value, str):  # from a YAML / JSON file or a plain constructor call
                setattr(self, name, FloatOrNone(value, name))
            elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name} must be a number > 0 or none, got {value!r}")
        if self.learning_rate is not None:
            if self.base_learning_rate is not None:
                logger.info(
                    "learning_rate %.4g given: it wins over base_learning_rate %.3g", self.learning_rate,
                    self.base_learning_rate,
                )  # fmt: skip
                self.base_learning_rate = None  # so the model card shows what was used
        elif self.base_learning_rate is None:
            self.learning_rate = TrainingArguments.learning_rate  # transformers' default, as for a plain Trainer
        else:
            batch = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size
            self.learning_rate = self.base_learning_rate * batch / 256
            logger.info(
                "learning_rate = base_learning_rate %.3g x effective batch %d / 256 = %.4g",
                self.base_learning_rate,
                batch,
                self.learning_rate,
            )
        if self.min_learning_rate < 0 or self.min_learning_rate > self.learning_rate:
            raise ValueError(
                f"min_learning_rate must be in [0, learning_rate={self.learning_rate:.4g}], got {self.min_learning_rate}"
            )
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        if self.warmup_epochs is not None:
            if self.warmup_epochs < 0:
                raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
            if self.max_steps <= 0 and self.warmup_epochs >= self.num_train_epochs:
                raise ValueError(
                    f"warmup_epochs={self.warmup_epochs} must be shorter than num_train_epochs={self.num_train_epochs}"
                )
            # MAETrainer turns epochs into optimizer steps once the dataloader length is known
        if SchedulerType(self.lr_scheduler_type) == SchedulerType.COSINE_WITH_MIN_LR:
            self.lr_scheduler_kwargs = {"min_lr": self.min_learning_rate, **(self.lr_scheduler_kwargs or {})}

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warm-up in optimizer steps: an explicit `warmup_steps` wins; `warmup_epochs` counts epochs. MAETrainer
        converts epochs with the dataloader's length; a plain `transformers.Trainer` lands here, where an epoch is
        `num_training_steps / num_train_epochs` (exact unless `max_steps` cuts the run, which is then an error)."""
        if self.warmup_epochs is None or self.warmup_steps:
            return super().get_warmup_steps(num_training_steps)
        if self.max_steps > 0:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} with max_steps={self.max_steps}: the steps per epoch are unknown "
                "here. Train with hf_mae.training.MAETrainer (it counts the dataloader), or give --warmup_steps."
            )
        return min(round(self.warmup_epochs * num_training_steps / self.num_train_epochs), num_training_steps)


@dataclass
class MAEPretrainingArguments(MAETrainingArguments):
    """Pretraining: AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4, 40 warm-up epochs of 800 (official ViT-B recipe)."""

    base_learning_rate: FloatOrNone | None = field(default=1.5e-4, metadata={"help": "MAE pretraining blr"})
    weight_decay: float = field(default=0.05)
    adam_beta2: float = field(default=0.95)
    num_train_epochs: float = field(default=800)
    warmup_epochs: float | None = field(default=40)
    mask_ratio: float | None = field(
        default=None, metadata={"help": f"overrides MAEConfig.mask_ratio: {MASK_RATIO_HELP}"}
    )
    norm_pix_loss: bool | None = field(
        default=None,
        metadata={
            "help": "overrides MAEConfig.norm_pix_loss: regress per-patch normalised pixels (--norm_pix_loss) or raw "
            "ones (--no_norm_pix_loss); default: the preset's or checkpoint's"
        },
    )
    pretrain_aug: str = field(
        default="standard", metadata={"help": f"pretraining augmentation, one of {', '.join(PRETRAIN_AUGS)}"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.pretrain_aug not in PRETRAIN_AUGS:
            raise ValueError(f"pretrain_aug must be one of {PRETRAIN_AUGS}, got {self.pretrain_aug!r}")
        if self.mask_ratio is not None:
            check_mask_ratio(self.mask_ratio, owner=type(self).__name__)


@dataclass
class MAEFinetuningArguments(MAETrainingArguments):
    """Fine-tuning: blr 5e-4, layer decay 0.65, wd 0.05, 5 of 100 warm-up epochs, min lr 1e-6, drop path 0.1, and the
    `full` augmentation (RandAugment, erasing 0.25, Mixup 0.8, CutMix 1.0, label smoothing 0.1) of the MAE ViT-B recipe."""

    base_learning_rate: FloatOrNone | None = field(default=5e-4, metadata={"help": "MAE fine-tuning blr"})
    layer_decay: float | None = field(default=0.65)
    weight_decay: float = field(default=0.05)
    min_learning_rate: float = field(default=1e-6)
    num_train_epochs: float = field(default=100)
    warmup_epochs: float | None = field(default=5)
    drop_path_rate: float = field(
        default=0.1, metadata={"help": f"sets MAEConfig.drop_path_rate: {DROP_PATH_RATE_HELP}"}
    )
    finetune_aug: str = field(
        default="full", metadata={"help": "`small` (crop + flip) or `full` (RandAugment, erasing, Mixup/CutMix)"}
    )
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha (full aug only)"})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (full aug only)"})
    mixup_switch_prob: float = field(default=0.5)
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing (full aug only)"})
    random_erasing: float = field(default=0.25, metadata={"help": "random erasing probability (full aug only)"})
    linear_probe: bool = field(
        default=False,
        metadata={"help": "frozen encoder, BatchNorm + Linear head; implies finetune_aug small and drop_path_rate 0"},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.linear_probe and (self.finetune_aug, self.drop_path_rate) != ("small", 0.0):
            # the official linear probe: crop + flip only, no stochastic depth in the frozen encoder; set here so that
            # what the run uses is what the arguments (and the model card) say
            logger.info("linear_probe: finetune_aug small and drop_path_rate 0 (were %s, %s)", self.finetune_aug,
                        self.drop_path_rate)  # fmt: skip
            self.finetune_aug, self.drop_path_rate = "small", 0.0
        if self.finetune_aug not in FINETUNE_AUGS:
            raise ValueError(f"finetune_aug must be one of {FINETUNE_AUGS}, got {self.finetune_aug!r}")
        check_drop_path_rate(self.drop_path_rate, owner=type(self).__name__)
        for name in ("mixup", "cutmix", "label_smoothing", "random_erasing", "mixup_switch_prob"):
            value = getattr(self, name)
            upper = float("inf") if name in ("mixup", "cutmix") else 1.0  # alphas are unbounded, the rest are rates
            if not 0 <= value <= upper:
                raise ValueError(f"{name} must be in [0, {upper}], got {value}")


@dataclass
class MAELinearProbeArguments(MAEFinetuningArguments):
    """Linear probing: frozen encoder, cls token, BatchNorm + Linear head, LARS, blr 0.1, wd 0, 10 of 90 warm-up
    epochs, crop + flip only (the official MAE recipe)."""

    linear_probe: bool = field(default=True)
    lars: bool = field(default=True)
    base_learning_rate: FloatOrNone | None = field(default=0.1)
    weight_decay: float = field(default=0.0)
    layer_decay: float | None = field(default=None)
    min_learning_rate: float = field(default=0.0)
    num_train_epochs: float = field(default=90)
    warmup_epochs: float | None = field(default=10)
    drop_path_rate: float = field(default=0.0)
    finetune_aug: str = field(default="small")
