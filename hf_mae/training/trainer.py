"""A Trainer for MAE pretraining and fine-tuning: MAE's optimizer groups, guarded steps, reproducible eval masks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from ..data import apply_mixup
from ..modeling_mae import default_model_card
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
    "max_grad_norm",
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
      and `args.max_nonfinite_steps` such steps in a row stop the run with `NonFiniteLossError` (patch size 8 is
      known to diverge in the official code). With fused AdamW (the default) this costs no host sync per step: the
      kernel skips the update itself and the counters are checked every `max_nonfinite_steps` steps and at each log,
      so a run stops at most `max_nonfinite_steps - 1` steps after the limit is reached;
    - evaluation draws its random masks from `args.seed`, so `eval_loss` is comparable across evaluations;
    - `mixup` (a timm `Mixup`, from `hf_mae.data.build_mixup`) mixes training batches on the device; evaluation
      batches keep their hard labels.
    """

    def __init__(self, *args, mixup=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mixup = mixup
        self._pending_nonfinite: torch.Tensor | None = None  # 1.0 when a loss since the last step was NaN/inf
        self._nonfinite_counts: torch.Tensor | None = None
        self._nonfinite_reported = 0
        self._optimizer_steps = 0

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

    # -- the non-finite guard: no host sync per step ------------------------------------------------------------------
    # training_step records on the device whether its loss was finite; the optimizer step turns that into fused
    # AdamW's `found_inf` (the flag GradScaler uses), so a bad step is skipped by the kernel itself; the counters
    # are read back, one host sync, only every `max_nonfinite_steps` steps and when the Trainer logs.

    def _guard_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = optimizer.step

        def guarded_step(*args, **kwargs):
            bad, self._pending_nonfinite = self._pending_nonfinite, None
            if bad is None:  # a step outside `training_step` (a user's own loop)
                return step(*args, **kwargs)
            # every process must agree, or DDP's next all-reduce would pair a skipped step with a taken one
            bad = self.accelerator.reduce(bad, reduction="sum").clamp(max=1)
            self._count_nonfinite(bad)
            self._optimizer_steps += 1
            try:
                if getattr(optimizer, "_step_supports_amp_scaling", False):  # fused AdamW/Adam/SGD
                    previous = getattr(optimizer, "found_inf", None)  # set when a GradScaler drives the step (fp16)
                    optimizer.found_inf = bad if previous is None else torch.maximum(previous, bad)
                    try:
                        return step(*args, **kwargs)
                    finally:
                        if previous is None:
                            del optimizer.found_inf
                        else:
                            optimizer.found_inf = previous
                if bad.item():  # LARS, foreach AdamW, ...: they cannot skip on the device, so ask the host
                    return None
                return step(*args, **kwargs)
            finally:
                limit = getattr(self.args, "max_nonfinite_steps", 0)
                if limit and self._optimizer_steps % limit == 0:
                    self._check_nonfinite(self.state.global_step + 1)  # the step being taken

        optimizer.step = guarded_step

    def _count_nonfinite(self, bad: torch.Tensor) -> None:
        """Update the on-device counters [skipped in all, current streak, longest streak since the last check]."""
        if self._nonfinite_counts is None or self._nonfinite_counts.device != bad.device:
            self._nonfinite_counts = torch.zeros(3, device=bad.device)
        skipped, streak, longest = self._nonfinite_counts.unbind()
        streak = (streak + bad) * bad
        self._nonfinite_counts = torch.stack([skipped + bad, streak, torch.maximum(longest, streak)])

    def _check_nonfinite(self, step: int) -> None:
        """Read the counters back (a host sync), warn about new skipped steps and stop after too many in a row."""
        if self._nonfinite_counts is None:
            return
        skipped, streak, longest = (int(v) for v in self._nonfinite_counts.tolist())
        self._nonfinite_counts[2] = streak  # the next check looks at streaks from here on
        if skipped > self._nonfinite_reported:
            logger.warning(
                "non-finite loss: %d optimizer step(s) skipped up to step %d (%d in all, %d in a row at most)",
                skipped - self._nonfinite_reported,
                step,
                skipped,
                longest,
            )
            self._nonfinite_reported = skipped
        limit = getattr(self.args, "max_nonfinite_steps", 0)
        if limit and longest >= limit:
            raise NonFiniteLossError(
                f"Stopping: {longest} steps in a row had a non-finite loss (seen at step {step}). "
                "Lower the learning rate, raise warm-up, or use bf16 instead of fp16; resume from the last checkpoint "
                f"in {self.args.output_dir} with --resume_from_checkpoint."
            )

    @property
    def nonfinite_steps_skipped(self) -> int:
        """Optimizer steps skipped so far because a loss was NaN/inf (reading it is a host sync)."""
        return 0 if self._nonfinite_counts is None else int(self._nonfinite_counts[0])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: every process makes it at the same step
            self._check_nonfinite(self.state.global_step)
            if self._nonfinite_reported:
                logs["nonfinite_steps_skipped"] = self._nonfinite_reported
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self.mixup is not None:
            inputs = self._prepare_inputs(inputs)
            inputs["pixel_values"], inputs["labels"] = apply_mixup(
                self.mixup, inputs["pixel_values"], inputs["labels"]
            )
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss)
        bad = (~finite).float()
        # over gradient-accumulation micro-batches: one bad loss spoils the accumulated gradient
        pending = self._pending_nonfinite
        self._pending_nonfinite = bad if pending is None else torch.maximum(pending, bad)
        # a skipped step adds 0 to the logged loss (the Trainer's own nan filter would cost a host sync per step)
        return torch.where(finite, loss, torch.zeros_like(loss))

    def create_model_card(self, **kwargs) -> None:
        """Write README.md in output_dir: architecture, the recipe actually used and the metrics saved with
        `save_metrics` (output_dir/all_results.json). Also what `push_to_hub` uploads (transformers' generic card knows
        nothing about MAE)."""
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        recipe = {k: getattr(self.args, k) for k in RECIPE_FIELDS if hasattr(self.args, k)}
        body = default_model_card(model)
        body += "\n## Training recipe\n\n| knob | value |\n|---|---|\n"
        body += "".join(f"| {k} | {v} |\n" for k, v in recipe.items())
        saved = Path(self.args.output_dir) / "all_results.json"
        results = json.loads(saved.read_text()) if saved.is_file() else {}
        if results:
            body += "\n## Results\n\n| metric | value |\n|---|---|\n"
            body += "".join(
                f"| {k} | {v:.4f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in results.items()
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
