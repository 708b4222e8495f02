"""A Trainer for MAE pretraining and fine-tuning: MAE's optimizer groups, guarded steps, reproducible eval masks."""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

from ..data import apply_mixup
from ..data.device_data import DeviceImageDataset
from ..data.seeding import EpochSeeded, EpochSeededDataset
from ..metrics import load_topk_accuracy
from ..modeling_mae import MAEForImageClassification, default_model_card, markdown_table
from .fsdp import (
    FSDP_MODEL_NAME,
    check_fsdp_applied,
    check_model_sharded,
    enable_fsdp2_on_cpu,
    incomplete_sharded_model,
    load_sharded_model,
    plain_model,
    sharded_model_dirs,
)
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
# the recipe knobs of the `full` fine-tuning augmentation, which `small` (and the linear probe) do not use
FULL_AUG_FIELDS = ("mixup", "cutmix", "label_smoothing", "random_erasing")


def _listify(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _card_license(base: str | None) -> str | None:
    """The license in the model card of a local directory `base`, if it has one."""
    readme = Path(base) / "README.md" if base else None
    if readme is None or not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.license
    except Exception:  # a hand-written or broken card: no license to inherit
        return None


class NonFiniteLossError(RuntimeError):
    """Raised when `max_nonfinite_steps` optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteWeightsError(RuntimeError):
    """Raised instead of saving a checkpoint or a model whose weights hold NaN/inf."""


def _nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN/inf (one host read for all of them)."""
    names = [name for name, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not names:
        return []
    device = tensors[names[0]].device
    flags = torch.stack([(~torch.isfinite(tensors[name])).any().to(device) for name in names]).tolist()
    return [name for name, bad in zip(names, flags) if bad]


def newest_finite_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-<step>` in `output_dir` whose saved weights are all finite, or None."""
    from safetensors import safe_open

    checkpoints = [p for p in Path(output_dir).glob("checkpoint-*") if checkpoint_step(p) is not None]
    for checkpoint in sorted(checkpoints, key=checkpoint_step, reverse=True):
        files = sorted(checkpoint.glob("*.safetensors"))
        sharded = sharded_model_dirs(checkpoint)  # FSDP's SHARDED_STATE_DICT: no safetensors in the checkpoint
        try:
            finite = bool(files or sharded)
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    finite = finite and not _nonfinite_tensors({k: f.get_tensor(k) for k in f.keys()})
            for folder in sharded:
                finite = finite and not _nonfinite_tensors(load_sharded_model(folder))
        except (OSError, RuntimeError, ValueError):  # unreadable: not a checkpoint to resume from
            finite = False
        if finite:
            return checkpoint
    return None


class OutputDirExistsError(FileExistsError):
    """Raised instead of overwriting an output_dir that holds a previous run."""


# what a previous run leaves in output_dir; run logs alone (runs/, log_history.json) are not a run worth keeping
RUN_FILES = ("model.safetensors", "results.json", "trainer_state.json")


# A checkpoint is written under this prefix and renamed to `checkpoint-<step>` once complete. The leading "_" keeps
# it out of the Trainer's rotation (`checkpoint-*`), `get_last_checkpoint` and its Hub uploads (which skip "_*").
PARTIAL_PREFIX = "_partial-"


def checkpoint_step(path: Path) -> int | None:
    return int(path.name[11:]) if path.name.startswith("checkpoint-") and path.name[11:].isdigit() else None


def incomplete_reason(checkpoint: str | Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete. MAETrainer's checkpoints appear only
    once complete (see `MAETrainer._save_checkpoint`); for those written otherwise (a stock Trainer, a copy cut
    short), trainer_state.json, which the Trainer writes last, serves as the commit mark."""
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return "it is not a directory"
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable trainer_state.json (the save was interrupted)"
    step = checkpoint_step(checkpoint)
    if step is not None and state.get("global_step") != step:
        return f"trainer_state.json is for step {state.get('global_step')}"
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights and not sharded_model_dirs(checkpoint):
        return f"no weights (*.safetensors or a sharded {FSDP_MODEL_NAME}_0)"
    sharded_reason = incomplete_sharded_model(checkpoint)
    if sharded_reason is not None:
        return sharded_reason
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as error:  # safetensors raises its own error types for a truncated file
            return f"{file.name} is unreadable ({error})"
    return incomplete_training_state(checkpoint)


def incomplete_training_state(checkpoint: Path) -> str | None:
    """Why the optimizer / scheduler / RNG state of `checkpoint` cannot be resumed from, or None. The Trainer resumes
    silently without any of these files it does not find (a fresh optimizer, a restarted schedule: not the run that
    was interrupted), so a checkpoint holding some of them must hold all. One holding none is a `save_only_model`
    checkpoint, which resumes the weights only, as the Trainer does."""
    files = {p.name: p for p in checkpoint.iterdir()}
    optimizer = [
        name
        for name, path in files.items()
        if name in (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN)
        or name.endswith(f"-{OPTIMIZER_NAME}")  # one per process (tensor / sequence parallel)
        or (name.startswith("optimizer_") and path.is_dir())  # FSDP's sharded optimizer
    ]
    deepspeed = "latest" in files  # DeepSpeed keeps optimizer (and its scheduler) in its global_step folder
    scheduler = SCHEDULER_NAME in files
    rng = [name for name in files if re.fullmatch(r"rng_state(_\d+)?\.pth", name)]
    if not (optimizer or deepspeed or scheduler or rng):
        return None
    missing = [
        what
        for what, present in ((OPTIMIZER_NAME, optimizer or deepspeed), (SCHEDULER_NAME, scheduler or deepspeed))
        if not present
    ] + ([] if rng else ["rng_state.pth"])
    if missing:
        return f"{', '.join(missing)} missing (the save was cut short)"
    for name in optimizer:
        if files[name].is_dir() and not (files[name] / ".metadata").is_file():
            return f"{name} has no .metadata (the sharded save was interrupted)"
    # torch.save writes a zip archive whose directory is at the end: a truncated file has none (a cheap check)
    for name in sorted(n for n in files if n.endswith((".pt", ".pth")) and files[n].is_file()):
        if not zipfile.is_zipfile(files[name]):
            return f"{name} is unreadable (truncated or not a torch.save file)"
    return None


def newest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-<step>` in `output_dir` that is complete; each newer incomplete one is logged, and so
    is each save that was interrupted (a `_partial-checkpoint-<step>` folder)."""
    for partial in sorted(Path(output_dir).glob(f"{PARTIAL_PREFIX}{PREFIX_CHECKPOINT_DIR}-*")):
        logger.warning("ignoring %s: the save of that checkpoint was interrupted", partial)
    checkpoints = [p for p in Path(output_dir).glob("checkpoint-*") if checkpoint_step(p) is not None]
    for checkpoint in sorted(checkpoints, key=checkpoint_step, reverse=True):
        reason = incomplete_reason(checkpoint)
        if reason is None:
            return checkpoint
        logger.warning("skipping incomplete checkpoint %s: %s", checkpoint, reason)
    return None


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str | Path) -> str | None:
    """`--resume_from_checkpoint`: None/False = start fresh; True, "", "latest" or "true" = the newest complete
    checkpoint of output_dir; a path = that checkpoint, which must be complete."""
    if resume is None or resume is False or (isinstance(resume, str) and resume.lower() in ("false", "none")):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("", "latest", "true")):
        checkpoint = newest_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(f"--resume_from_checkpoint latest: no complete checkpoint-* in {output_dir}")
        logger.info("resuming from %s", checkpoint)
        return str(checkpoint)
    reason = incomplete_reason(resume)
    if reason is not None:
        newest = newest_complete_checkpoint(Path(resume).parent)
        hint = f"; the newest complete one is {newest}" if newest else ""
        raise ValueError(f"--resume_from_checkpoint {resume} cannot be resumed from: {reason}{hint}")
    return str(resume)


def foreign_checkpoint_reason(checkpoint: str | Path, model: torch.nn.Module) -> str | None:
    """Why `checkpoint`'s weights are not this run's model's, or None when they fit: every key, with its shape. The
    Trainer loads a checkpoint non-strictly: another model's weights (a fine-tune's checkpoint given to a pretraining
    run, another size) load in part, silently for a weights-only checkpoint, or fail later on the optimizer with a
    message that names neither. Sharded (FSDP) checkpoints are left to torch.distributed.checkpoint, which checks
    their keys itself."""
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    shapes = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    if not shapes:
        return None
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    resized = sorted(k for k in expected.keys() & shapes.keys() if expected[k] != shapes[k])
    if not (missing or unexpected or resized):
        return None
    try:  # the saved class, when the checkpoint names it, says most plainly what went wrong
        saved_class = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    except (OSError, ValueError, LookupError, TypeError):
        saved_class = None
    if saved_class is not None and saved_class != type(model).__name__:
        return f"it holds a {saved_class}, this run trains a {type(model).__name__}"
    problems = [
        f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes for", resized))
        if keys
    ]
    return "its weights are another model's: " + "; ".join(problems)


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse to start a fresh run in a directory that holds a previous one, unless `overwrite`; with `overwrite`
    the previous run's checkpoints are removed so that a later `--resume_from_checkpoint latest` cannot pick them,
    and so is its results.json."""
    out = Path(output_dir)
    for partial in out.glob(f"{PARTIAL_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):  # nothing anyone can resume from
        logger.warning("removing %s, left by a save that was interrupted", partial)
        shutil.rmtree(partial, ignore_errors=True)
    found = [name for name in RUN_FILES if (out / name).exists()]
    checkpoints = sorted(p for p in out.glob("checkpoint-*") if checkpoint_step(p) is not None)
    if not found and not checkpoints:
        return
    if not overwrite:
        what = ", ".join(found + [p.name for p in checkpoints[-3:]])
        raise OutputDirExistsError(
            f"output_dir {out} already holds a run ({what}). Pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to replace it, or choose another --output_dir."
        )
    for checkpoint in checkpoints:
        logger.warning("--overwrite_output_dir: removing %s of the previous run", checkpoint)
        shutil.rmtree(checkpoint)
    # the previous run's mark of a finished run: should the new one fail, it must not look finished (to the study,
    # to a rerun) with the old run's results
    (out / "results.json").unlink(missing_ok=True)


def _resume_hint(output_dir: str | Path) -> str:
    checkpoint = newest_finite_checkpoint(output_dir)
    if checkpoint is None:
        return f"No checkpoint with finite weights in {output_dir}: start again with a lower learning rate."
    return f"The newest checkpoint with finite weights is {checkpoint}: resume with --resume_from_checkpoint {checkpoint}."


def _disk_error(error: Exception, path: Path) -> OSError | None:
    """A full disk as an error that says so and names the path (torch.save reports it as `basic_ios::clear` or a
    failed `write`); None for any other error."""
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or any(
        s in text for s in ("No space left", "basic_ios::clear", "unexpected pos", "PytorchStreamWriter failed")
    ):
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        return OSError(
            errno.ENOSPC, f"No space left on device while saving {path} ({free / 2**20:.0f} MiB free): {text}"
        )
    return None


def _nonfinite_gradients(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """1.0 on the device when any gradient the optimizer will apply holds NaN/inf (no host sync)."""
    # FSDP2 (DTensor) gradients: each process checks its own shard; the caller's all-reduce covers the others
    grads = [
        p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None
    ]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)  # fused per device and dtype; a NaN/inf element makes its norm NaN/inf
    total = torch.stack([n.float() for n in norms]).sum()
    return (~torch.isfinite(total)).float()


class _SetDataEpoch(TrainerCallback):
    """Tells the train dataset and the collator which epoch starts, for their per-batch seeds (on resume mid-epoch,
    `state.epoch` is the fraction reached, e.g. 1.6 in epoch 1)."""

    def __init__(self, trainer: MAETrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        for holder in (self.trainer._seeded_train, self.trainer.data_collator):
            if isinstance(holder, EpochSeeded):
                holder.set_epoch(int(state.epoch or 0))


class _SeedEachProcess(TrainerCallback):
    """Each process draws its own mask noise, drop path and Mixup / CutMix, as the official MAE seeds process r with
    `seed + r`: the Trainer seeds every process alike, which gives the images of all processes the same masks at every
    step. Done when training begins: the model is built by then (the same initialisation everywhere) and so is the
    train sampler, which takes the shared seed to shuffle alike on every process. Process 0 keeps the stream of a
    one-process run; a resumed run then restores each process's saved generator states."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.process_index:
            set_seed(args.seed + args.process_index)


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
      batches keep their hard labels;
    - a run resumed from any checkpoint, mid-epoch too, takes the steps the uninterrupted run takes: the train
      dataset is read through `hf_mae.data.seeding.EpochSeededDataset`, so each batch's augmentation is drawn from
      (seed, epoch, its sample indices) and data loading, however far it prefetches, leaves the generators that the
      model's mask noise, drop path and Mixup draw from (and that checkpoints save) untouched. The device data
      path's collator seeds its batches the same way.
    """

    def __init__(self, *args, mixup=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mixup = mixup
        self._seeded_train: EpochSeededDataset | None = None
        self.add_callback(_SetDataEpoch(self))
        self.add_callback(_SeedEachProcess())
        self._model_card_kwargs: dict[str, Any] = {}  # create_model_card's arguments so far
        self._pending_nonfinite: torch.Tensor | None = None  # 1.0 when a loss since the last step was NaN/inf
        self._nonfinite_counts: torch.Tensor | None = None
        self._nonfinite_reported = 0
        self._optimizer_steps = 0
        self._saving_checkpoint = False
        self._sharding_checked = False

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator, then FSDP made real: on CPU processes accelerate would run an FSDP2 launch as
        plain DDP, so its FSDP state is set here; FSDP requested but not set up is a `ValueError`."""
        super().create_accelerator_and_postprocess()
        if enable_fsdp2_on_cpu(self.accelerator, self.args):
            self.is_fsdp_enabled = True
            if self.args.save_only_model and "SHARDED_STATE_DICT" in str(
                self.accelerator.state.fsdp_plugin.state_dict_type
            ):
                # as the Trainer checks on GPUs: such a checkpoint would hold no model at all
                raise ValueError("save_only_model is not compatible with FSDP state dict type 'SHARDED_STATE_DICT'")
        check_fsdp_applied(self.accelerator, self.args)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        dataset = self.train_dataset
        # the device data path's items are bare indices: its collator seeds the batches itself
        if dataset is not None and not isinstance(dataset, (torch.utils.data.IterableDataset, DeviceImageDataset)):
            if self._seeded_train is None or self._seeded_train.dataset is not dataset:
                self._seeded_train = EpochSeededDataset(dataset, self.args.seed)
            dataset = self._seeded_train
        if dataset is None:
            return super().get_train_dataloader()  # its error
        loader = self._get_dataloader(
            dataset=dataset,
            description="Training",
            batch_size=self._train_batch_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )
        # Each DataLoader iterator draws its workers' base seed when it starts. From the global generator, that draw
        # would shift the model's random stream whenever a resumed run starts more iterators than the uninterrupted
        # one did (persistent workers start once per loader, and resuming adds a loader). The batches are seeded by
        # (seed, epoch, indices), so the workers' own seeds do not matter.
        getattr(loader, "base_dataloader", loader).generator = torch.Generator().manual_seed(self.args.seed)
        return loader

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
            # a finite loss can still give NaN/inf gradients (an overflow in backward at a huge learning rate); under
            # a GradScaler (fp16) inf gradients are its business: it skips the step and lowers the scale itself
            bad_grads = None if hasattr(optimizer, "found_inf") else _nonfinite_gradients(optimizer)
            if bad_grads is not None:
                bad = torch.maximum(bad, bad_grads.to(bad.device))
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
                "non-finite loss or gradient: %d optimizer step(s) skipped up to step %d (%d in all, %d in a row at most)",
                skipped - self._nonfinite_reported,
                step,
                skipped,
                longest,
            )
            self._nonfinite_reported = skipped
        limit = getattr(self.args, "max_nonfinite_steps", 0)
        if limit and longest >= limit:
            raise NonFiniteLossError(
                f"Stopping: {longest} steps in a row had a non-finite loss (seen at step {step}; a NaN/inf gradient "
                "counts as one) and were skipped. Lower the learning rate, raise warm-up, or use bf16 instead of fp16. "
                + _resume_hint(self.args.output_dir)
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, but a fresh start never overwrites a previous run in output_dir (unless
        `args.overwrite_output_dir`), and `resume_from_checkpoint=True` / `"latest"` takes the newest *complete*
        checkpoint, skipping (and naming) any that a kill or a full disk left half-written."""
        resume = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume is not None:
            reason = foreign_checkpoint_reason(resume, self.model)
            if reason is not None:
                raise ValueError(f"--resume_from_checkpoint {resume} does not belong to this run: {reason}")
        if resume is None and self.is_world_process_zero():
            check_output_dir(self.args.output_dir, getattr(self.args, "overwrite_output_dir", False))
        self.accelerator.wait_for_everyone()
        return super().train(resume_from_checkpoint=resume, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint`, saved atomically: everything (weights, optimizer, scheduler, scaler, RNG
        states of every process, trainer_state.json) is written to `_partial-checkpoint-<step>`, which the main
        process renames to `checkpoint-<step>` once all processes are done, before the rotation. A kill or a full
        disk during the save leaves no `checkpoint-<step>`, only the partial folder, which resume ignores and the
        next save of that step replaces. A full disk is an `OSError` that says so and names the checkpoint."""
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{PARTIAL_PREFIX}{final.name}"
        try:
            if self.args.should_save and staging.exists():  # an earlier save of this step was interrupted
                shutil.rmtree(staging)
            self.accelerator.wait_for_everyone()
            self._write_checkpoint(staging, final, trial)
            self.accelerator.wait_for_everyone()  # every process wrote its part (its rng_state_<rank>.pth, shards)
            if self.args.should_save:
                if final.exists():  # saved before by a run that was resumed from an earlier checkpoint
                    shutil.rmtree(final)
                staging.rename(final)
            self.accelerator.wait_for_everyone()
        except (OSError, RuntimeError) as error:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # on a full disk, give the space back
            full = _disk_error(error, final)
            if full is None:
                raise
            raise full from error
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _write_checkpoint(self, staging: Path, final: Path, trial) -> None:
        """What `Trainer._save_checkpoint` writes, in its order, into `staging` (the same files as the stock Trainer);
        `best_model_checkpoint` names the final folders."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self._saving_checkpoint = True  # save_model: a checkpoint keeps FSDP's sharded model as it is
        try:
            self.save_model(str(staging), _internal_call=True)
        finally:
            self._saving_checkpoint = False
        best_step = self.state.best_global_step
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and best_step:
            best = final.parent / f"{PREFIX_CHECKPOINT_DIR}-{best_step}"
            if best_step == self.state.global_step or best.exists():
                self.state.best_model_checkpoint = str(best)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(staging))
            self._save_scaler(str(staging))
            self._save_rng_state(str(staging))
        if self.args.should_save:
            # the state of stateful callbacks (early stopping, ...) and of TrainerControl as of this step
            for callback in self.callback_handler.callbacks + [self.control]:
                if isinstance(callback, ExportableState):
                    name = callback.__class__.__name__
                    if isinstance(self.state.stateful_callbacks[name], list):
                        self.state.stateful_callbacks[name].append(callback.state())
                    else:
                        self.state.stateful_callbacks[name] = callback.state()
            self.state.save_to_json(str(staging / TRAINER_STATE_NAME))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as `Trainer.save_model` (checkpoints and the final model go through here), but never weights that
        hold NaN/inf: then raise `NonFiniteWeightsError` on every process and write nothing."""
        model = self.accelerator.unwrap_model(self.model)
        tensors = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in model.state_dict().items()}
        bad = _nonfinite_tensors(tensors)
        flag = torch.tensor(float(bool(bad)), device=self.args.device)
        if self.accelerator.reduce(flag, reduction="sum").item():  # every process agrees, so none waits for another
            target = Path(output_dir or self.args.output_dir)
            if target.name.startswith(PARTIAL_PREFIX):  # a checkpoint: name the folder it would have become
                target = target.with_name(target.name[len(PARTIAL_PREFIX) :])
            shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "") if bad else "on another process"
            raise NonFiniteWeightsError(
                f"Refusing to save {target}: {len(bad) or 'some'} weight tensor(s) hold NaN/inf ({shown}). "
                + _resume_hint(self.args.output_dir)
            )
        try:
            if self._gathers_for_save():
                # the Trainer writes nothing here under FSDP's SHARDED_STATE_DICT (checkpoints get the shards): the
                # final model is gathered (a collective: every process) and saved as a plain save_pretrained dir
                state_dict = self.accelerator.get_state_dict(self.model)  # full on the main process only
                sharded = self.model
                if self.args.should_save:
                    self.model = plain_model(self.accelerator.unwrap_model(sharded), state_dict)
                try:
                    self._save(output_dir, state_dict=state_dict)
                finally:
                    self.model = sharded
                if self.args.push_to_hub and not _internal_call:
                    self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            else:
                super().save_model(output_dir, _internal_call=_internal_call)
        except (OSError, RuntimeError) as error:
            full = _disk_error(error, Path(output_dir or self.args.output_dir))
            if full is None:
                raise
            raise full from error

    def _gathers_for_save(self) -> bool:
        """FSDP with a sharded state dict, saving the model outside a checkpoint."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return (
            self.is_fsdp_enabled
            and not self._saving_checkpoint
            and plugin is not None
            and "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
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
        if self.is_fsdp_enabled and not self._sharding_checked:  # what trains is what the config asked for
            check_model_sharded(model, self.accelerator.state.fsdp_plugin.fsdp_version)
            self._sharding_checked = True
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

    def create_model_card(
        self,
        language: str | list[str] | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write README.md in output_dir through huggingface_hub's `ModelCard` (also what `push_to_hub` uploads):
        metadata, what the run did (pretraining, fine-tuning of `finetuned_from`, linear probe, or training from
        scratch), the architecture, the recipe actually used, the metrics saved with `save_metrics`
        (output_dir/all_results.json) and, for a classifier, their `model-index` entries.

        The arguments are those of `transformers.Trainer.create_model_card`: `language`, `license`, `tags` (metadata);
        `model_name` (title and model-index name, default: output_dir's name); `finetuned_from` (default: where the
        model was loaded from; named in the text, and the metadata's `base_model` when it is a Hub id: the Hub
        refuses a card whose `base_model` is a local path); `tasks` (model-index task, default
        `image-classification`); `dataset_tags` (Hub ids: metadata `datasets` and model-index dataset type),
        `dataset` (names, default the tags), `dataset_args` (model-index dataset config). `license` defaults to the
        license in `finetuned_from`'s own card when that is a local directory. Arguments given once are kept for
        later calls (`push_to_hub` calls this again with `model_name` only)."""
        if not self.is_world_process_zero():
            return
        given = dict(
            language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
            tasks=tasks, dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args,
        )  # fmt: skip
        self._model_card_kwargs.update({k: v for k, v in given.items() if v is not None})
        card = dict.fromkeys(given) | self._model_card_kwargs
        model = self.accelerator.unwrap_model(self.model)
        out = Path(self.args.output_dir)
        base = card["finetuned_from"] or model.name_or_path or None
        names = _listify(card["dataset"]) or _listify(card["dataset_tags"])
        saved = out / "all_results.json"
        results = json.loads(saved.read_text()) if saved.is_file() else {}
        card_data = ModelCardData(
            language=card["language"],
            license=card["license"] or _card_license(base),
            tags=_listify(card["tags"]),
            datasets=_listify(card["dataset_tags"]) or None,
            model_name=card["model_name"] or out.name,
            eval_results=self._eval_results(card, names, results) or None,
        )
        sections = [("Training recipe", markdown_table(self._recipe(), header=("knob", "value")))]
        if results:
            sections.append(("Results", markdown_table(results, header=("metric", "value"))))
        out.mkdir(parents=True, exist_ok=True)
        default_model_card(
            model,
            card_data,
            title=card_data.model_name,
            summary=self._model_card_summary(model, base, names),
            base_model=base,
            sections=[*sections, *self.model_card_sections()],
        ).save(out / "README.md")

    def model_card_sections(self) -> list[tuple[str, str]]:
        """Extra (heading, markdown) sections a subclass adds to the model card."""
        return []

    def _model_card_summary(self, model, base: str | None, datasets: list[str]) -> str:
        """What the run did, in one sentence: a scratch run never claims MAE pretraining."""
        data = f" on {' and '.join(datasets)}" if datasets else ""
        if not isinstance(model, MAEForImageClassification):
            summary = f"Masked Autoencoder (MAE) pretraining{data}, mask ratio {model.config.mask_ratio}"
            return summary + (f", starting from `{base}`." if base else ", from a random initialisation.")
        if getattr(self.args, "linear_probe", False):
            encoder = f"`{base}`" if base else "a randomly initialised model"
            return f"Linear probe{data}: a BatchNorm + linear head trained on the frozen encoder of {encoder}."
        if base:
            return f"Image classifier fine-tuned{data} from `{base}`."
        return f"Image classifier trained from scratch{data}: random initialisation, no pretraining."

    def _recipe(self) -> dict[str, Any]:
        """The RECIPE_FIELDS the run's arguments have and that took effect (Mixup, CutMix, label smoothing and random
        erasing belong to the `full` fine-tuning augmentation only)."""
        recipe = {k: getattr(self.args, k) for k in RECIPE_FIELDS if getattr(self.args, k, None) is not None}
        if recipe.get("finetune_aug", "full") != "full":
            for name in FULL_AUG_FIELDS:
                recipe.pop(name, None)
        return recipe

    def _eval_results(self, card: dict[str, Any], names: list[str], results: dict[str, Any]) -> list[EvalResult]:
        """model-index entries: the classifier's validation accuracies, one per (task, dataset)."""
        accuracies = {k: v for k, v in results.items() if re.fullmatch(r"top\d+", k)}
        types = _listify(card["dataset_tags"]) or names
        if not accuracies or not types:
            return []
        configs = _listify(card["dataset_args"])
        entries = []
        for task in _listify(card["tasks"]) or ["image-classification"]:
            for i, dataset_type in enumerate(types):
                for key, value in accuracies.items():
                    k = int(key[3:])
                    entries.append(
                        EvalResult(
                            task_type=task,
                            dataset_type=dataset_type,
                            dataset_name=names[i] if i < len(names) else dataset_type,
                            dataset_config=configs[i] if i < len(configs) else None,
                            dataset_split="validation",
                            metric_type="accuracy" if k == 1 else f"top{k}_accuracy",
                            metric_name=f"Top-{k} accuracy (%)",
                            metric_value=value,
                        )
                    )
        return entries

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
    metric = load_topk_accuracy()

    def compute_metrics(eval_pred) -> dict[str, float]:
        topk, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(topk, tuple):
            topk = topk[0]
        result = metric.compute(predictions=np.asarray(topk), references=np.asarray(labels), k=k)
        return {"top1": result["top1"], f"top{k}": result[f"top{k}"]}

    return compute_metrics
