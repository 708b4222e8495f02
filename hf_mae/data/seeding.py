"""Augmentation randomness as a function of (seed, epoch, the batch's sample indices).

A training run that is killed and resumed from a checkpoint must draw the same crops, flips, RandAugment ops and
erasing boxes as the run that was never interrupted. A running random stream cannot promise that: accelerate's
data loader fetches one batch ahead and DataLoader workers prefetch several, so the generator state a checkpoint
saves already holds the draws of batches that were never trained on, and on resume the skipped batches are never
fetched at all (and land on other workers). Seeding each batch from what identifies it makes its augmentation
independent of when, where and after what it is fetched, and keeps data loading off the global generators that the
model's own randomness (mask noise, drop path, Mixup) draws from and the Trainer checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


def batch_seed(seed: int, epoch: int, indices: Sequence[int]) -> int:
    """A 63-bit seed that depends on `seed`, `epoch` and the ordered sample `indices` of one batch, and on nothing
    else (not on the process, the worker, or how many batches came before).

    Within an epoch the sampler never repeats a batch, and the epoch keeps a batch of the same samples in another
    epoch (a batch of one, an unshuffled loader) from getting the same augmentation again.
    """
    key = np.asarray([seed, epoch], dtype=np.int64).tobytes()
    digest = hashlib.blake2b(np.asarray(indices, dtype=np.int64).tobytes(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded_host_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, Python's `random` and NumPy's global generator (what torchvision and timm
    transforms draw from) with `seed`, and give them back their states on exit. Accelerator generators are left
    alone: the model's mask noise may draw from them."""
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class EpochSeeded:
    """The epoch, shared with DataLoader workers (persistent ones included: it lives in shared memory), and the
    seed of a batch in it. [`MAETrainer`] calls `set_epoch` at every epoch start on its train dataset and collator."""

    def __init__(self, seed: int):
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def batch_seed(self, indices: Sequence[int]) -> int:
        return batch_seed(self.seed, self.epoch, indices)


class EpochSeededDataset(EpochSeeded, torch.utils.data.Dataset):
    """A map-style dataset whose random transforms (applied when items are read, e.g. `datasets`' `with_transform`)
    draw from [`batch_seed`]`(seed, epoch, indices)` for each batch the DataLoader reads. [`MAETrainer`] wraps its
    train dataset in this.

    Args:
        dataset: any map-style dataset (`__getitem__` and `__len__`; `__getitems__` is used when it has one).
        seed: the run's seed.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        super().__init__(seed)
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        with seeded_host_rng(self.batch_seed(indices)):
            if hasattr(self.dataset, "__getitems__"):
                return self.dataset.__getitems__(indices)
            return [self.dataset[i] for i in indices]

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]


__all__ = ["EpochSeeded", "EpochSeededDataset", "batch_seed", "seeded_host_rng"]
