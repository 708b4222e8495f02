"""Streaming data: train on a dataset read as training goes (a `datasets` IterableDataset), for data that does not
fit on a node's disk. The train split is streamed; the validation split (small) is read once into the cache.

Each process reads its own part of the train stream. Under a multi-process launch the Trainer's accelerate data loader
splits a `datasets` IterableDataset per process with `IterableDataset.shard` (whole files, or parquet row groups, per
process) as long as batches are not dispatched from process 0 (`dispatch_batches=False`, which
[`prepare_training_for_stream`] sets). The split must be made there and only there: a stream split beforehand with
`datasets.distributed.split_dataset_by_node` would be split again by accelerate, and each process would train on a
1 / world_size part of its share. With fewer files than processes, every process reads the whole stream and keeps its
slice of each global batch (accelerate's `IterableDatasetShard`), which is correct but reads everything everywhere;
with more, a number the processes do not divide gives some processes one file fewer, whose examples are then trained
on more often ([`check_shards`] warns): write a multiple of the process count in files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .image_datasets import _VALIDATION_ALIASES, column_renames, load_dataset_options, rename_columns

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset, IterableDatasetDict

logger = logging.getLogger(__name__)

# Examples held by the shuffle buffer of each data loader worker: images stay encoded there (a few kB for 64 px
# JPEGs, ~110 kB for ImageNet), so 10,000 costs ~1 GB per worker at ImageNet sizes.
SHUFFLE_BUFFER_SIZE = 10_000


def load_streaming_dataset(
    dataset_name: str,
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    cache_dir: str | None = None,
    **load_kwargs,
) -> IterableDatasetDict:
    """Open a Hub dataset or a local folder of data files (parquet, images, ...) as a stream.

    Args:
        dataset_name (`str`):
            Hub id or local path, as `datasets.load_dataset` takes it (`streaming=True`).
        image_column_name (`str`, *optional*), label_column_name (`str`, *optional*):
            Renamed to `image` / `label` (default: `image` or `img`, `label` or `labels`).
        cache_dir (`str`, *optional*):
            `datasets` cache directory.
        load_kwargs:
            Passed to `datasets.load_dataset`: the dataset configuration name, `token`, `trust_remote_code`.

    Returns:
        `datasets.IterableDatasetDict` with `train` (and `validation` when the source has a `validation`, `valid` or
        `val` split), columns `image` (and `label`).
    """
    from datasets import IterableDatasetDict, load_dataset

    streams = load_dataset(dataset_name, streaming=True, **load_dataset_options(cache_dir=cache_dir, **load_kwargs))
    if "train" not in streams:
        raise ValueError(f"--streaming: {dataset_name} has no train split; splits: {sorted(streams)}")
    alias = next((name for name in _VALIDATION_ALIASES if name in streams), None)
    streams = IterableDatasetDict(
        {"train": streams["train"], **({"validation": streams[alias]} if alias is not None else {})}
    )
    columns = streams["train"].column_names or []
    renames = column_renames(columns, image_column_name, label_column_name, f"--streaming: {dataset_name}")
    return rename_columns(streams, renames)


def shuffle_stream(
    stream: IterableDataset, seed: int, max_samples: int | None = None, buffer_size: int = SHUFFLE_BUFFER_SIZE
) -> IterableDataset:
    """The train stream as it is trained on: the first `max_samples` examples when given, file order shuffled with
    `seed` and examples through a shuffle buffer. The Trainer calls `set_epoch` every epoch, which reshuffles both
    (`seed + epoch`); the seed is the same on every process, so each process still reads its own files."""
    if max_samples is not None:
        stream = stream.take(max_samples)  # about max_samples in all, split over the processes
    return stream.shuffle(seed=seed, buffer_size=buffer_size)


def check_shards(stream: IterableDataset, num_processes: int) -> None:
    """Warn when the processes of a launch would read unequal parts of `stream`: accelerate gives each process whole
    shards (files, or parquet row groups) once there are at least as many as processes, and each process cycles
    through its own, so with a number of shards that the processes do not divide, the examples of the processes with
    one shard fewer are trained on more often than the others' (2 files against 1: twice as often)."""
    shards = stream.num_shards
    if num_processes > 1 and shards > num_processes and shards % num_processes:
        fewer = shards // num_processes
        logger.warning(
            "--streaming: %d shards (files, or parquet row groups) over %d processes: some processes read %d, others "
            "%d, so the examples of the latter are trained on %.2gx as often; write a multiple of %d files",
            shards,
            num_processes,
            fewer + 1,
            fewer,
            (fewer + 1) / fewer,
            num_processes,
        )


def _examples(stream: IterableDataset, limit: int | None) -> Iterator[dict[str, Any]]:
    yield from stream.take(limit) if limit is not None else stream


def materialize(stream: IterableDataset, limit: int | None = None, cache_dir: str | None = None) -> Dataset:
    """The first `limit` examples of `stream` (all when None) as a map-style `Dataset` written to the `datasets`
    cache: what evaluation, the reconstruction figure and the k-NN monitor index into."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    # images are copied as their encoded bytes, not decoded and encoded again
    images = [name for name, feature in (stream.features or {}).items() if isinstance(feature, ImageFeature)]
    for name in images:
        stream = stream.cast_column(name, ImageFeature(decode=False))
    return Dataset.from_generator(
        _examples,
        features=stream.features,
        gen_kwargs={"stream": stream, "limit": limit},
        cache_dir=cache_dir,
    )


def prepare_training_for_stream(args: Any) -> None:
    """Check that `args` (a `TrainingArguments`) can train on a stream of unknown length, and let every process read
    its own part of it (`accelerator_config.dispatch_batches=False`; accelerate's default for an iterable dataset
    reads it all on process 0 and sends each process its slice).

    Raises:
        `ValueError` naming the argument: no `max_steps`, warm-up or an evaluation / save / logging strategy given in
        epochs (an epoch's length is unknown, and each process ends its epochs at its own step).
    """
    if args.max_steps <= 0:
        raise ValueError(
            "--streaming: the stream's length is unknown, so num_train_epochs cannot end the run; give --max_steps "
            "(optimizer steps)"
        )
    if getattr(args, "warmup_epochs", None) and not args.warmup_steps:
        raise ValueError(
            f"--streaming: warmup_epochs={args.warmup_epochs} needs the length of an epoch, which a stream does not "
            "have; give --warmup_steps (optimizer steps)"
        )
    for name in ("eval_strategy", "save_strategy", "logging_strategy"):
        value = getattr(args, name, None)
        if getattr(value, "value", value) == "epoch":
            raise ValueError(
                f"--streaming: {name}=epoch cannot be used (an epoch has no known length, and each process ends its "
                f"epochs at its own step); use {name}=steps with --{name.split('_')[0]}_steps"
            )
    config = args.accelerator_config
    if config.dispatch_batches is None:
        config.dispatch_batches = False
    elif config.dispatch_batches:
        logger.warning(
            "--streaming with accelerator_config.dispatch_batches=True: process 0 reads the whole stream and sends "
            "each process its batches"
        )
