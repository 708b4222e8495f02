"""A data path for small-image datasets that never leaves the training device.

The decoded train split is kept as one uint8 tensor [N, C, S, S] on the device (Tiny ImageNet's 100k 64 px images
are 1.23 GB), and every batch is cropped, resized, flipped and normalised there in a few batched calls: the
`RandomResizedCrop` boxes are drawn for the whole batch at once (torchvision's algorithm, vectorised), and one
`grid_sample` call crops, resizes and flips all of them. No DataLoader workers, no PIL, no host-to-device copies
of pixels: on a GPU the data path costs well under a millisecond per batch.

How it plugs into `Trainer`: [`DeviceImageDataset`] is a map-style dataset whose items are just their indices, so
the Trainer's sampler shuffles (seeded) and, with several processes, accelerate shards the indices between them as
for any dataset; [`DeviceAugmentCollator`] turns a list of indices into a ready `{"pixel_values"[, "labels"]}` batch
on the device. Batches of ordinary examples (the evaluation split, still transformed on the CPU) are passed to a
fallback collator. Limits:

- `dataloader_num_workers=0` and `dataloader_pin_memory=False` ([`device_train_data`] sets both): CUDA tensors
  cannot be pinned or built in forked workers.
- Every process holds the whole split on its own device; only the indices are sharded.
- Crop + flip only, i.e. MAE's pretraining augmentation (`pretrain_aug="standard"`) and the `small` fine-tuning one
  (Mixup / CutMix, which `MAETrainer` already applies on the device, work too); RandAugment, random erasing and the
  3-Augment colour operations run on the CPU path.
- The resampling is `grid_sample`'s bicubic (a = -0.75, torch's convention) or bilinear, computed in fp32 and
  clamped to [0, 255] before normalisation; the CPU path resizes with PIL's bicubic (a = -0.5, results rounded to
  uint8). Both follow torchvision's box sampling, but the random streams differ, so runs are not bit-identical to
  the CPU path. Images are stored at the training resolution, so crops are only ever upsampled; `grid_sample` does
  not antialias, which matters only when shrinking.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .seeding import EpochSeeded
from .transforms import ClassificationCollator, PretrainCollator, _decode

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import TrainingArguments

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("bicubic", "bilinear")
# The recipes of hf_mae.data.transforms this path reproduces, with their RandomResizedCrop scale.
DEVICE_AUGS = {"standard": (0.2, 1.0), "small": (0.08, 1.0)}
# torchvision's RandomResizedCrop draws up to 10 boxes per image before falling back to a centre crop
_ATTEMPTS = 10


def decode_images(
    dataset: Dataset,
    image_size: int,
    image_column: str = "image",
    label_column: str | None = "label",
    batch_size: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode a `datasets` image column once into uint8 [N, 3, image_size, image_size] (+ int64 labels [N]).

    Images of another size are resized (shortest side, bicubic) and centre-cropped to `image_size`; Tiny ImageNet's
    are 64 x 64 already and are kept as they are. Labels are `None` when `label_column` is None or absent.
    """
    from datasets import Image as ImageFeature
    from PIL import Image
    from tqdm.auto import tqdm

    raw = dataset.cast_column(image_column, ImageFeature(decode=False))
    images = np.empty((len(raw), image_size, image_size, 3), dtype=np.uint8)
    position = 0
    for batch in tqdm(raw.iter(batch_size=batch_size), total=math.ceil(len(raw) / batch_size), desc="decoding"):
        for value in batch[image_column]:
            image = _decode(value, position)
            if image.size != (image_size, image_size):
                scale = image_size / min(image.size)
                size = (max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale)))
                image = image.resize(size, Image.BICUBIC)
                left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
                image = image.crop((left, top, left + image_size, top + image_size))
            images[position] = np.asarray(image)
            position += 1
    labels = None
    if label_column is not None and label_column in raw.column_names:
        labels = torch.as_tensor(np.asarray(raw[label_column]), dtype=torch.long)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """torchvision's `RandomResizedCrop.get_params` for a whole batch at once, without host syncs.

    Each image draws up to 10 (area fraction in `scale`, log-uniform aspect ratio in `ratio`) boxes and keeps the
    first that fits; when none fits it takes the centre crop with the aspect ratio clamped to `ratio`.

    Returns:
        float [batch, 4] boxes `(left, top, width, height)` in pixels, integer-valued.
    """
    shape = (batch, _ATTEMPTS)
    area = height * width

    def uniform(low: float, high: float, size: tuple[int, ...]) -> torch.Tensor:
        return low + (high - low) * torch.rand(size, device=device, generator=generator)

    target_area = area * uniform(scale[0], scale[1], shape)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), shape))
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first box that fits (0 when none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # a uniform integer offset in [0, side - box], as torch.randint(0, side - box + 1)
    left = torch.floor(uniform(0, 1, (batch,)) * (width - w + 1))
    top = torch.floor(uniform(0, 1, (batch,)) * (height - h + 1))
    # torchvision's fallback: the whole image, its aspect ratio clamped into `ratio`, centred
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    # built on the host and sent without blocking: a plain torch.tensor(..., device="cuda") would sync the stream
    fallback = torch.tensor([(width - fw) // 2, (height - fh) // 2, fw, fh], dtype=w.dtype).to(
        w.device, non_blocking=True
    )
    boxes = torch.stack([left, top, w, h], dim=1)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback)


def resized_crop_flip(
    images: torch.Tensor,
    boxes: torch.Tensor,
    flip: torch.Tensor,
    size: int,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Crop every image to its box, resize it to `size` x `size` and mirror it where `flip`, in one `grid_sample`.

    Args:
        images: [B, C, H, W], any dtype (computed in fp32).
        boxes: [B, 4] `(left, top, width, height)` in pixels.
        flip: bool [B], horizontal flips.
        interpolation: "bicubic" or "bilinear".

    Returns:
        float32 [B, C, size, size] in the input's value range (bicubic overshoot clamped to the input's min / max
        for integer inputs).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    _, _, height, width = images.shape
    left, top, w, h = boxes.float().unbind(1)
    # Output pixel centres in [-1, 1] (align_corners=False) mapped linearly onto the box in the input's [-1, 1]
    # coordinates, so they land where a half-pixel resize of the box puts them; a flip reverses the x map.
    centres = (2 * torch.arange(size, device=images.device, dtype=torch.float32) + 1) / size - 1  # [S]
    sx = torch.where(flip, -w, w) / width
    gx = ((2 * left + w) / width - 1)[:, None] + sx[:, None] * centres  # [B, S]
    gy = ((2 * top + h) / height - 1)[:, None] + (h / height)[:, None] * centres
    grid = torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], dim=-1)
    out = F.grid_sample(images.float(), grid, mode=interpolation, padding_mode="border", align_corners=False)
    if not images.dtype.is_floating_point:
        info = torch.iinfo(images.dtype)
        out = out.clamp_(info.min, info.max)
    return out


class DeviceImageDataset(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] (and optional int64 labels [N]) held on one device. Item `i` is the index `i`
    itself: [`DeviceAugmentCollator`] fetches and augments the whole batch at once."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, device: torch.device | str | None = None
    ):
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        device = images.device if device is None else torch.device(device)
        self.images = images.to(device)
        self.labels = None if labels is None else labels.to(device=device, dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> int:
        return index


class DeviceAugmentCollator(EpochSeeded):
    """Indices from a [`DeviceImageDataset`] -> `{"pixel_values": float32 [B, C, S, S]}` (+ `"labels"`) on its
    device: RandomResizedCrop(`scale`, `ratio`), horizontal flip with probability `flip_prob`, normalisation.

    Args:
        dataset: the images (and labels) to draw from.
        image_size: output side S.
        scale, ratio: RandomResizedCrop's area and aspect-ratio ranges (MAE pretraining: (0.2, 1); the `small`
            fine-tuning augmentation: (0.08, 1)).
        interpolation: "bicubic" (MAE's choice) or "bilinear".
        mean, std: normalisation, ImageNet's by default.
        seed: the crops and flips of a batch are drawn from a generator of this collator's own on the device,
            seeded with `batch_seed(seed, epoch, indices)` (hf_mae.data.seeding): they depend on the batch alone, not
            on how many batches came before, so a run resumed mid-epoch draws what the uninterrupted one drew.
            `None` draws from torch's global generator instead (seeded by `set_seed`).
        fallback: collator for batches of ordinary examples (dicts), e.g. the evaluation split that the Trainer
            collates with the same `data_collator`. Default: stack `pixel_values` (+ `label` when the dataset has
            labels).
    """

    def __init__(
        self,
        dataset: DeviceImageDataset,
        image_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        seed: int | None = None,
        fallback: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.dataset = dataset
        self.image_size = image_size
        self.scale, self.ratio, self.flip_prob, self.interpolation = scale, ratio, flip_prob, interpolation
        device = dataset.device
        channels = dataset.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values, got {len(mean)} and {len(std)}")
        # (x / 255 - mean) / std folded into one multiply-add
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) / std_t
        super().__init__(seed)
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        if fallback is None:
            fallback = PretrainCollator() if dataset.labels is None else ClassificationCollator()
        self.fallback = fallback

    def augment(self, indices: torch.Tensor) -> torch.Tensor:
        """Normalised, augmented float32 [B, C, S, S] for `indices` (a long tensor on the dataset's device)."""
        images = self.dataset.images.index_select(0, indices)
        batch, _, height, width = images.shape
        device = images.device
        boxes = sample_crop_boxes(batch, height, width, self.scale, self.ratio, device, self.generator)
        flip = torch.rand(batch, device=device, generator=self.generator) < self.flip_prob
        pixels = resized_crop_flip(images, boxes, flip, self.image_size, self.interpolation)
        return torch.addcmul(self._shift, pixels, self._scale)

    def __call__(self, examples: list) -> dict[str, torch.Tensor]:
        if examples and isinstance(examples[0], dict):
            return self.fallback(examples)
        if torch.utils.data.get_worker_info() is not None and self.dataset.device.type != "cpu":
            raise RuntimeError("DeviceAugmentCollator runs in the main process only: set dataloader_num_workers=0")
        if self.generator is not None:
            self.generator.manual_seed(self.batch_seed(examples))  # host-side: no sync with the device
        indices = torch.as_tensor(examples, dtype=torch.long).to(self.dataset.device, non_blocking=True)
        batch = {"pixel_values": self.augment(indices)}
        if self.dataset.labels is not None:
            batch["labels"] = self.dataset.labels.index_select(0, indices)
        return batch


def device_train_data(
    train: Dataset,
    image_size: int,
    args: TrainingArguments,
    aug: str,
    with_labels: bool = False,
    image_column: str = "image",
    label_column: str = "label",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> tuple[DeviceImageDataset, DeviceAugmentCollator]:
    """Decode `train` onto `args.device` and build its collator for `Trainer`; switches `args` to
    `dataloader_num_workers=0` and `dataloader_pin_memory=False`, which this path needs.

    Args:
        aug: the recipe's augmentation, one of `DEVICE_AUGS`: pretraining `standard` (crop scale 0.2-1) or
            fine-tuning `small` (0.08-1), both bicubic crop + flip as in `hf_mae.data.transforms`.
        with_labels: also keep the labels (fine-tuning).
        mean, std: normalisation, ImageNet's by default.

    The collator seeds each batch from `args.seed`, the epoch and the batch's indices; processes read different
    indices, so they draw different crops.
    """
    if aug not in DEVICE_AUGS:
        raise ValueError(
            f"the device data path does crop + flip only (augmentation {', '.join(map(repr, DEVICE_AUGS))}), "
            f"not {aug!r}: drop --device_data to run it on the CPU path"
        )
    images, labels = decode_images(train, image_size, image_column, label_column if with_labels else None)
    if with_labels and labels is None:
        raise ValueError(f"the train split has no {label_column!r} column")
    dataset = DeviceImageDataset(images, labels, device=args.device)
    if args.dataloader_num_workers:
        logger.info("device data path: dataloader_num_workers %d -> 0", args.dataloader_num_workers)
    args.dataloader_num_workers = 0
    args.dataloader_pin_memory = False
    if getattr(args.accelerator_config, "non_blocking", False):
        args.accelerator_config.non_blocking = False  # batches are born on the device: nothing to copy
    logger.info("device data path: %d images, %.2f GB uint8 on %s", len(dataset), images.numel() / 1e9, dataset.device)
    collator = DeviceAugmentCollator(dataset, image_size, scale=DEVICE_AUGS[aug], seed=args.seed, mean=mean, std=std)
    return dataset, collator


__all__ = [
    "DEVICE_AUGS",
    "DeviceAugmentCollator",
    "DeviceImageDataset",
    "decode_images",
    "device_train_data",
    "resized_crop_flip",
    "sample_crop_boxes",
]
