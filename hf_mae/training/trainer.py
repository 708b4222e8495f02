"""A Trainer for MAE pretraining and fine-tuning: MAE's optimizer groups, guarded steps, reproducible eval masks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from .optim import param_groups

logger = logging.getLogger(__name__)

# the TrainingArguments fields a model card lists under "Training recipe" (those the run's arguments have)
RECIPE_FIELDS = (
    "learning_rate",
    "base_learning_rate",
    "min_learning_rate",
    "num_train_epochs",
    "max_steps",
    "warmup_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "layer_decay",
    "lars",
    "mask_ratio",
    "pretrain_aug",
    "finetune_aug",
    "mixup",
    "cutmix",
    "label_smoothing",
    "random_erasing",
    "drop_path_rate",
    "linear_probe",
    "bf16",
    "seed",
)


class NonFiniteLossError(RuntimeError):
    """Raised when `max_nonfinite_steps` optimizer steps in a row had a non-finite loss."""


class MAETrainer(Trainer):
    """`transformers.Trainer` with what MAE recipes need and the stock one lacks:

    - AdamW parameter groups from `hf_mae.training.optim.param_groups` (no decay on 1-D tensors and biases,
      optional layer-wise lr decay from `args.layer_decay`);
    - a step whose loss is NaN/inf on any process is skipped on all of them (no update, no momentum change), logged,
      and `args.max_nonfinite_steps` such steps in a row stop the run with `NonFiniteLossError`
      (patch size 8 is known to diverge in the official code);
    - evaluation draws its random masks from `args.seed`, so `eval_loss` is comparable across evaluations;
    - `mixup` (a timm `Mixup`, from `hf_mae.data.build_mixup`) mixes training batches on the device; evaluation
      batches keep their hard labels.
    """

    def __init__(self, *args, mixup=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mixup = mixup
        self.results: dict = {}  # final metrics, shown in the model card
        self._skip_this_step = False
        self._nonfinite_streak = 0
        self.nonfinite_steps_skipped = 0

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = param_groups(
                opt_model, self.args.learning_rate, self.args.weight_decay, getattr(self.args, "layer_decay", None)
            )
            if getattr(self.args, "lars", False):
                from timm.optim import Lars

                # MAE's LARS adapts the step of matrices by their trust ratio and leaves biases / 1-D tensors plain
                for group in groups:
                    group["always_adapt"] = all(p.ndim > 1 for p in group["params"])
                self.optimizer = Lars(groups, lr=self.args.learning_rate, momentum=0.9)
            else:
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            self._guard_optimizer_step(self.optimizer)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        warmup_epochs = getattr(self.args, "warmup_epochs", None)
        # an explicit --warmup_steps wins over the recipe's warm-up epochs
        if self.lr_scheduler is None and warmup_epochs is not None and not self.args.warmup_steps:
            steps_per_epoch = max(len(self.get_train_dataloader()) // self.args.gradient_accumulation_steps, 1)
            self.args.warmup_steps = min(round(warmup_epochs * steps_per_epoch), num_training_steps)
            logger.info("warm-up: %s epochs = %d optimizer steps", warmup_epochs, self.args.warmup_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    def _guard_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = optimizer.step

        def guarded_step(*args, **kwargs):
            if self._skip_this_step:
                self._skip_this_step = False
                return None
            self._nonfinite_streak = 0
            return step(*args, **kwargs)

        optimizer.step = guarded_step

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self.mixup is not None:
            from ..data import apply_mixup

            inputs = self._prepare_inputs(inputs)
            inputs["pixel_values"], inputs["labels"] = apply_mixup(
                self.mixup, inputs["pixel_values"], inputs["labels"]
            )
        loss = super().training_step(model, inputs, num_items_in_batch)
        # every process must agree, or DDP's next all-reduce would pair a skipped step with a taken one
        finite = bool(torch.isfinite(self.accelerator.gather(loss.detach().reshape(1))).all())
        if not finite:
            self._skip_this_step = True
            self._nonfinite_streak += 1
            self.nonfinite_steps_skipped += 1
            logger.warning(
                "non-finite loss at step %d: optimizer step skipped (%d in a row, %d in all)",
                self.state.global_step,
                self._nonfinite_streak,
                self.nonfinite_steps_skipped,
            )
            limit = getattr(self.args, "max_nonfinite_steps", 0)
            if limit and self._nonfinite_streak >= limit:
                raise NonFiniteLossError(
                    f"Stopping: {self._nonfinite_streak} steps in a row had a non-finite loss (last at step "
                    f"{self.state.global_step}). Lower the learning rate, raise warm-up, or use bf16 instead of fp16; "
                    f"resume from the last checkpoint in {self.args.output_dir} with --resume_from_checkpoint."
                )
            return torch.zeros_like(loss)
        return loss

    def create_model_card(self, **kwargs) -> None:
        """Write README.md in output_dir: architecture, the recipe actually used and `self.results`. Also what
        `push_to_hub` uploads (transformers' generic card knows nothing about MAE)."""
        if not self.is_world_process_zero():
            return
        from ..modeling_mae import default_model_card

        model = self.accelerator.unwrap_model(self.model)
        recipe = {k: getattr(self.args, k) for k in RECIPE_FIELDS if hasattr(self.args, k)}
        body = default_model_card(model)
        body += "\n## Training recipe\n\n| knob | value |\n|---|---|\n"
        body += "".join(f"| {k} | {v} |\n" for k, v in recipe.items())
        if self.results:
            body += "\n## Results\n\n| metric | value |\n|---|---|\n"
            body += "".join(
                f"| {k} | {v:.4f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in self.results.items()
            )
        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.args.output_dir) / "README.md").write_text(body, encoding="utf-8")

    def evaluate(self, *args, **kwargs):
        # fixed masks for evaluation, without disturbing the training random stream
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.args.seed)
            return super().evaluate(*args, **kwargs)


def topk_predictions(logits: torch.Tensor, labels: torch.Tensor | None = None, k: int = 5) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the top-k class ids [B, k] instead of all logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices


def build_compute_metrics(k: int = 5):
    """`compute_metrics` for the Trainer: top-1 and top-k accuracy (in %) through hf_mae's offline `evaluate`
    metric module, from the top-k ids that `topk_predictions` keeps."""
    from hf_mae.metrics import load_topk_accuracy

    metric = load_topk_accuracy()

    def compute_metrics(eval_pred) -> dict[str, float]:
        topk, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(topk, tuple):
            topk = topk[0]
        result = metric.compute(predictions=np.asarray(topk), references=np.asarray(labels), k=k)
        return {"top1": result["top1"], f"top{k}": result[f"top{k}"]}

    return compute_metrics
