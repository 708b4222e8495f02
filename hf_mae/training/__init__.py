"""Training: recipe arguments, the MAE Trainer, optimizer groups and the runs shared by examples and the study."""

from .arguments import (
    MAEFinetuningArguments,
    MAELinearProbeArguments,
    MAEPretrainingArguments,
    MAETrainingArguments,
)
from .dmae import DMAETrainer, DMAETrainingArguments, run_distillation
from .knn import KNNArguments, KNNMonitor, knn_top1
from .optim import param_groups
from .pipeline import DataArguments, ModelArguments, parse_args, run_finetuning, run_main, run_pretraining
from .teacher import DMAETeacher, load_teacher
from .trainer import (
    MAETrainer,
    NonFiniteLossError,
    NonFiniteWeightsError,
    build_compute_metrics,
    newest_finite_checkpoint,
    topk_predictions,
)

__all__ = [
    "DMAETeacher",
    "DMAETrainer",
    "DMAETrainingArguments",
    "DataArguments",
    "KNNArguments",
    "KNNMonitor",
    "MAEFinetuningArguments",
    "MAELinearProbeArguments",
    "MAEPretrainingArguments",
    "MAETrainer",
    "MAETrainingArguments",
    "ModelArguments",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "build_compute_metrics",
    "knn_top1",
    "load_teacher",
    "newest_finite_checkpoint",
    "param_groups",
    "parse_args",
    "run_distillation",
    "run_finetuning",
    "run_main",
    "run_pretraining",
    "topk_predictions",
]
