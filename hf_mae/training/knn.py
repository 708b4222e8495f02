"""A k-NN monitor for pretraining: DINO's weighted k-nearest-neighbour top-1 of the encoder's features.

MAE's pretraining loss says little about the quality of the features (a lower reconstruction error is not a better
encoder); fine-tuning answers that but costs a run. A k-NN classifier on frozen features is the cheap proxy DINO
reports during training: embed a labelled memory bank (a train subset) and queries (a validation subset) with the
encoder, vote among each query's k nearest memory items by cosine similarity, each vote weighted exp(sim / T).

Feature: the **cls token after the encoder's final norm** (`feature="cls"`), the token DINO evaluates and MAE's linear
probe reads; `feature="mean"` averages the final-normed patch tokens instead. The encoder sees every patch
(`mask_ratio=0.0`), in eval mode, without gradients, under the run's bf16/fp16 autocast.

Cost of one evaluation: one unmasked forward pass of the encoder per memory and query image (the k-NN itself, a
[Q, M] similarity and a top-k, takes milliseconds). For the reproduction study's ViT-B/8 at 64 px (85 M parameters,
65 tokens) that is ~11 GFLOP per image, ~17 TFLOP for 1000 memory + 500 queries: a fraction of a second on a GPU,
minutes on a CPU (bf16 autocast halves that where the CPU has bf16 units). Size `knn_eval_steps` and the sample
counts by it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

KNN_FEATURES = ("cls", "mean")


# ----------------------------------------------------------------------------------------------------------------------
# The classifier: pure functions on features
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def knn_votes(
    memory_features: torch.Tensor,
    memory_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class votes [Q, num_classes] of DINO's weighted k-NN: each of a query's `k` most cosine-similar memory items
    votes for its label with weight exp(similarity / temperature).

    Args:
        memory_features: [M, D] features of the labelled memory bank (normalised here).
        memory_labels: [M] int class ids.
        query_features: [Q, D] features to classify (normalised here).
        num_classes: defaults to `memory_labels.max() + 1`.
        k: neighbours per query (clipped to M).
        temperature: T of the exp(sim / T) weighting; DINO uses 0.07.
        chunk_size: queries per similarity matrix, to bound memory.
    """
    if memory_features.shape[0] != memory_labels.shape[0]:
        raise ValueError(f"{memory_features.shape[0]} memory features but {memory_labels.shape[0]} labels")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    memory = F.normalize(memory_features.float(), dim=-1)
    queries = F.normalize(query_features.float(), dim=-1).to(memory.device)
    labels = memory_labels.long().to(memory.device)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, memory.shape[0])
    votes = []
    for chunk in queries.split(chunk_size):
        similarity, neighbours = (chunk @ memory.T).topk(k, dim=1)  # [q, k], most similar first
        weights = (similarity / temperature).exp()
        chunk_votes = torch.zeros(chunk.shape[0], num_classes, device=memory.device)
        votes.append(chunk_votes.scatter_add_(1, labels[neighbours], weights))
    return torch.cat(votes)


def knn_top1(
    memory_features: torch.Tensor,
    memory_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in % of the weighted k-NN classifier of [`knn_votes`]."""
    if num_classes is None:
        num_classes = int(max(memory_labels.max(), query_labels.max())) + 1
    votes = knn_votes(memory_features, memory_labels, query_features, num_classes, k, temperature)
    return (votes.argmax(dim=1).cpu() == query_labels.long().cpu()).float().mean().item() * 100


# ----------------------------------------------------------------------------------------------------------------------
# Arguments and the Trainer callback
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class KNNArguments:
    """Flags of the k-NN monitor (HfArgumentParser-ready; `knn_eval_steps=0` leaves it off)."""

    knn_eval_steps: int = field(default=0, metadata={"help": "k-NN top-1 every N optimizer steps (0 = off)"})
    knn_train_samples: int = field(default=1000, metadata={"help": "memory bank: this many train images"})
    knn_eval_samples: int = field(default=500, metadata={"help": "queries: this many validation images"})
    knn_k: int = field(default=20, metadata={"help": "neighbours (DINO: 20)"})
    knn_temperature: float = field(default=0.07, metadata={"help": "vote weight exp(sim / T) (DINO: 0.07)"})
    knn_feature: str = field(default="cls", metadata={"help": "`cls` (final-normed cls token) or `mean` (patches)"})
    knn_batch_size: int = field(default=256, metadata={"help": "images per encoder forward"})
    knn_at_start: bool = field(default=True, metadata={"help": "also evaluate before the first step"})

    def __post_init__(self):
        if self.knn_eval_steps < 0:
            raise ValueError(f"knn_eval_steps must be >= 0, got {self.knn_eval_steps}")
        if self.knn_feature not in KNN_FEATURES:
            raise ValueError(f"knn_feature must be one of {KNN_FEATURES}, got {self.knn_feature!r}")
        for name in ("knn_train_samples", "knn_eval_samples", "knn_k", "knn_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature must be > 0, got {self.knn_temperature}")


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _stack(dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformed examples -> pixel_values [N, C, H, W] and labels [N]."""
    items = [dataset[i] for i in indices]
    pixels = torch.stack([item["pixel_values"] for item in items])
    labels = torch.tensor([int(item.get("label", item.get("labels"))) for item in items], dtype=torch.long)
    return pixels, labels


class KNNMonitor(TrainerCallback):
    """Logs `knn_top1` (weighted k-NN top-1 in %, [`knn_top1`]) every `every_n_steps` optimizer steps of a Trainer run,
    so it lands in `state.log_history`, `log_history.json` and the curves.

    The caller gives the memory bank and the queries: either `train_dataset` / `eval_dataset` (indexable, items with
    `pixel_values` and `label`), or `load_datasets(image_size, seed) -> (train_dataset, eval_dataset)`, called at the
    start of training with the model's image size and `args.seed` (the image size is the model's, known only then;
    [`KNNMonitor.from_args`] builds one from the `--knn_*` flags). The first `train_samples` / `eval_samples` are
    kept. Pixels are transformed once and cached.

    Guarantees:
    - the training random stream is untouched (torch CPU and current CUDA device via `torch.random.fork_rng`, plus
      Python's and NumPy's generators), so a run with the monitor takes the same steps as one without;
    - every module gets back its own train/eval mode;
    - under DDP every process embeds its contiguous shard of the images with its replica (no gradient, no DDP hook)
      and the features are all-gathered, so all processes stay in step and compute the same value; sharded models
      (FSDP, ZeRO-3) are not supported (their forward needs the wrapper) and are refused with an error;
    - the forward runs under the run's autocast (`args.bf16` / `args.fp16`) and features are compared in fp32.

    Logging: the step is forced to log (`control.should_log`), and `knn_top1` is added to that log entry. Reporting
    integrations (TensorBoard, W&B) are called before user callbacks by transformers, so they do not see it; it
    is in `log_history` and every figure drawn from it.
    """

    def __init__(
        self,
        every_n_steps: int,
        train_dataset=None,
        eval_dataset=None,
        load_datasets: Callable[[int, int], tuple[Any, Any]] | None = None,
        train_samples: int = 1000,
        eval_samples: int = 500,
        k: int = 20,
        temperature: float = 0.07,
        feature: str = "cls",
        batch_size: int = 256,
        at_start: bool = True,
    ):
        if feature not in KNN_FEATURES:
            raise ValueError(f"feature must be one of {KNN_FEATURES}, got {feature!r}")
        if (train_dataset is None) != (eval_dataset is None):
            raise ValueError("give both train_dataset and eval_dataset, or neither (and load_datasets)")
        if train_dataset is None and load_datasets is None:
            raise ValueError("KNNMonitor needs train_dataset + eval_dataset or load_datasets")
        self.every_n_steps = every_n_steps
        self.train_dataset, self.eval_dataset, self.load_datasets = train_dataset, eval_dataset, load_datasets
        self.train_samples, self.eval_samples = train_samples, eval_samples
        self.k, self.temperature, self.feature, self.batch_size = k, temperature, feature, batch_size
        self.at_start = at_start
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._pending: float | None = None
        self.last_seconds = 0.0
        self.history: list[tuple[int, float, float]] = []  # (step, top1, seconds)

    @classmethod
    def from_args(
        cls,
        knn_args: KNNArguments,
        load_datasets: Callable[[int, int], tuple[Any, Any]] | None = None,
    ) -> KNNMonitor | None:
        """The monitor the flags ask for, or None when `knn_eval_steps` is 0. Its data: `load_datasets`, e.g.
        [`hf_mae.training.pipeline.knn_datasets`] (the labelled train / validation splits of a run's
        `DataArguments`, with its evaluation transform)."""
        if not knn_args.knn_eval_steps:
            return None
        return cls(
            knn_args.knn_eval_steps,
            load_datasets=load_datasets,
            train_samples=knn_args.knn_train_samples,
            eval_samples=knn_args.knn_eval_samples,
            k=knn_args.knn_k,
            temperature=knn_args.knn_temperature,
            feature=knn_args.knn_feature,
            batch_size=knn_args.knn_batch_size,
            at_start=knn_args.knn_at_start,
        )

    # -- data ----------------------------------------------------------------------------------------------------------
    def _load(self, model, seed: int) -> None:
        train, val = self.train_dataset, self.eval_dataset
        if train is None:
            train, val = self.load_datasets(_unwrap(model).config.image_size, seed)
        self._cache = {
            "memory": _stack(train, list(range(min(self.train_samples, len(train))))),
            "queries": _stack(val, list(range(min(self.eval_samples, len(val))))),
        }
        logger.info(
            "k-NN monitor: %d memory / %d query images, k=%d, T=%g, feature=%s, every %d steps",
            len(self._cache["memory"][1]),
            len(self._cache["queries"][1]),
            self.k,
            self.temperature,
            self.feature,
            self.every_n_steps,
        )

    # -- features ------------------------------------------------------------------------------------------------------
    def embed(self, model, pixel_values: torch.Tensor, args=None) -> torch.Tensor:
        """Features [N, D] of `pixel_values` (fp32, on the model's device); this process's shard under DDP, gathered."""
        encoder = _encoder(model)
        rank, world = _distributed()
        n = pixel_values.shape[0]
        per_rank = -(-n // world)
        mine = pixel_values[rank * per_rank : (rank + 1) * per_rank]
        if mine.shape[0] < per_rank:  # equal shapes for all_gather; the padding is cut off after
            mine = torch.cat([mine, pixel_values[: per_rank - mine.shape[0]]])
        device = next(encoder.parameters()).device
        dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16
        autocast = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))
        features = []
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            for batch in mine.split(self.batch_size):
                hidden = encoder(batch.to(device), mask_ratio=0.0).last_hidden_state  # [B, 1 + L, D], final-normed
                features.append((hidden[:, 0] if self.feature == "cls" else hidden[:, 1:].mean(dim=1)).float())
        features = torch.cat(features)
        if world > 1:
            gathered = [torch.empty_like(features) for _ in range(world)]
            torch.distributed.all_gather(gathered, features)
            features = torch.cat(gathered)
        return features[:n]

    @torch.no_grad()
    def evaluate(self, model, args=None) -> float:
        """k-NN top-1 (%) of `model`'s encoder now, leaving modes and random generators as they were."""
        if self._cache is None:
            self._load(model, getattr(args, "seed", 0))
        modes = {module: module.training for module in model.modules()}
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        py_state, np_state = random.getstate(), np.random.get_state()
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=cuda):
                model.eval()
                memory = self.embed(model, self._cache["memory"][0], args)
                queries = self.embed(model, self._cache["queries"][0], args)
        finally:
            for module, mode in modes.items():
                module.training = mode
            random.setstate(py_state)
            np.random.set_state(np_state)
        labels, query_labels = self._cache["memory"][1], self._cache["queries"][1]
        num_classes = int(max(labels.max(), query_labels.max())) + 1
        top1 = knn_top1(memory, labels.to(memory.device), queries, query_labels, num_classes, self.k, self.temperature)
        self.last_seconds = time.perf_counter() - start
        return top1

    # -- Trainer events ------------------------------------------------------------------------------------------------
    def _run(self, args, state, model) -> float:
        top1 = self.evaluate(model, args)
        self.history.append((state.global_step, top1, self.last_seconds))
        logger.info("step %d: knn_top1 %.2f (%.1f s)", state.global_step, top1, self.last_seconds)
        return top1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _check_not_sharded(model, args)
        if self.every_n_steps and self.at_start and state.global_step == 0:
            top1 = self._run(args, state, model)
            state.log_history.append({"knn_top1": top1, "epoch": 0.0, "step": 0})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._pending = self._run(args, state, model)
            control.should_log = True  # the Trainer logs this step; on_log adds knn_top1 to that entry
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None:
            return
        if logs is not None:
            logs["knn_top1"] = self._pending
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["knn_top1"] = self._pending
        else:
            state.log_history.append({"knn_top1": self._pending, "epoch": state.epoch, "step": state.global_step})
        self._pending = None


def _unwrap(model):
    """The model inside DDP / DataParallel / DeepSpeed / torch.compile wrappers (accelerate's own unwrapping)."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def _encoder(model):
    """The MAE encoder of a pretraining model (`.mae`) or an encoder itself."""
    model = _unwrap(model)
    encoder = getattr(model, "mae", model)
    if not hasattr(encoder, "random_masking"):
        raise TypeError(f"k-NN monitor: {type(model).__name__} has no MAE encoder (`.mae`)")
    return encoder


def _check_not_sharded(model, args: Any) -> None:
    import os

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        DTensor = ()  # noqa: N806
    params = list(model.parameters())
    sharded = (
        bool(getattr(args, "fsdp", None))
        or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
        or any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in params)  # FSDP2 / DeepSpeed ZeRO-3
    )
    if sharded:
        raise RuntimeError(
            "the k-NN monitor runs the encoder outside the training wrapper, which FSDP / ZeRO-3 sharding does not "
            "allow; use DDP or DeepSpeed ZeRO-2 with it, or leave it off (knn_eval_steps=0)"
        )
