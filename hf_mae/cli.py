"""The training commands: one function per command, shared by the example scripts, `python -m hf_mae` and the
reproduction study's worker runs.

Each command parses its dataclass arguments (HfArgumentParser flags, after an optional YAML/JSON file that they
override) and runs the matching pipeline; `pretrain` and `distill` also take the flags of
[`~hf_mae.training.knn.KNNArguments`] and pass the k-NN monitor to the run as an extra callback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .training import (
    DataArguments,
    DMAETrainingArguments,
    KNNArguments,
    KNNMonitor,
    MAEFinetuningArguments,
    MAELinearProbeArguments,
    MAEPretrainingArguments,
    ModelArguments,
    parse_args,
    run_distillation,
    run_finetuning,
    run_pretraining,
)
from .training.pipeline import knn_datasets


def _log_level(training_args) -> None:
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)


def _pretrain_like(arguments, run, argv: list[str] | None) -> dict:
    model_args, data_args, training_args, knn_args = parse_args(
        (ModelArguments, DataArguments, arguments, KNNArguments), argv
    )
    _log_level(training_args)
    # --knn_eval_steps N logs k-NN top-1 every N steps, on the run's data and evaluation preprocessing
    monitor = KNNMonitor.from_args(knn_args, data_args, load_datasets=knn_datasets(data_args, model_args))
    return run(model_args, data_args, training_args, extra_callbacks=[monitor] if monitor else None)


def _finetune_like(arguments, argv: list[str] | None) -> dict:
    model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, arguments), argv)
    _log_level(training_args)
    return run_finetuning(model_args, data_args, training_args)


def pretrain(argv: list[str] | None = None) -> dict:
    """MAE pretraining ([`~hf_mae.training.run_pretraining`]) with the optional k-NN monitor."""
    return _pretrain_like(MAEPretrainingArguments, run_pretraining, argv)


def distill(argv: list[str] | None = None) -> dict:
    """DMAE pretraining ([`~hf_mae.training.run_distillation`]) with the optional k-NN monitor."""
    return _pretrain_like(DMAETrainingArguments, run_distillation, argv)


def finetune(argv: list[str] | None = None) -> dict:
    """Fine-tuning of a pretrained encoder, or the same ViT from scratch."""
    return _finetune_like(MAEFinetuningArguments, argv)


def linear_probe(argv: list[str] | None = None) -> dict:
    """Linear probing of a frozen pretrained encoder (the official MAE recipe)."""
    return _finetune_like(MAELinearProbeArguments, argv)


COMMANDS: dict[str, Callable[[list[str] | None], dict]] = {
    "pretrain": pretrain,
    "distill": distill,
    "finetune": finetune,
    "linear_probe": linear_probe,
}


def run_command(name: str, argv: list[str] | None = None) -> dict:
    """Run the command `name` (`pretrain`, `distill`, `finetune`, `linear_probe`; `linear-probe` works too)."""
    key = name.replace("-", "_")
    if key not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {name!r}")
    return COMMANDS[key](argv)


__all__ = ["COMMANDS", "distill", "finetune", "linear_probe", "pretrain", "run_command"]
