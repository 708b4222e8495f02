"""Augmentations, the `set_transform` hook and the collators for MAE pretraining and fine-tuning.

Built from torchvision.transforms.v2 and timm; only the recipes (which pieces, which values) are written here:
- pretraining `standard`: MAE's RandomResizedCrop(scale 0.2-1, bicubic) + flip;
- pretraining `3augment`: DeiT III's 3-Augment; `3augment_seed`: the variant the reproduction study ran;
- fine-tuning `small`: RandomResizedCrop + flip, no Mixup / CutMix / label smoothing; `full`: MAE's fine-tuning recipe
  (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8, CutMix 1.0, label smoothing 0.1);
- evaluation: resize to `image_size / crop_pct` and center crop (64 px -> 73 -> 64).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.mixup import mixup_target
from torchvision.transforms import InterpolationMode, v2

from ..image_processing_mae import eval_resize_size
from .image_datasets import to_rgb


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, keeping the old Pillow result for 0 bits (a black image).

    RandAugment `inc1` at the top magnitude asks for 0 bits; Pillow >= 11 raises on that, which kills a DataLoader
    worker mid-epoch. Pillow < 11 returned all zeros, which is what the recipe was tuned with.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    """Route timm's RandAugment posterize ops to `_posterize`; called where the RandAugment transform is built (timm
    looks the op up when it builds the transform), so importing hf_mae changes nothing in timm."""
    from timm.data import auto_augment

    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize


if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, IterableDataset

PRETRAIN_AUGS = ("standard", "3augment", "3augment_seed")
STREAM_MAP_BATCH = 32
FINETUNE_AUGS = ("small", "full")
BICUBIC = InterpolationMode.BICUBIC


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_pretrain_transform(
    image_size: int,
    aug: str = "standard",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_scale: tuple[float, float] = (0.2, 1.0),
) -> v2.Compose:
    """Augmentation for MAE pretraining: an RGB PIL image (or uint8 tensor) -> normalized float tensor [3, H, W].

    Args:
        image_size (`int`):
            Output side.
        aug (`str`, defaults to `"standard"`):
            - `"standard"`: RandomResizedCrop(`crop_scale`, bicubic) + horizontal flip, MAE's pretraining augmentation.
            - `"3augment"`: DeiT III's 3-Augment: the same crop + flip, then one of {grayscale, solarize (threshold
              128), gaussian blur} chosen uniformly per image, then ColorJitter(0.3, 0.3, 0.3). The crop keeps MAE's
              scale (0.2, 1) rather than DeiT III's (0.08, 1) so that `standard` vs `3augment` changes only the
              colour operations (pass `crop_scale=(0.08, 1.0)` for DeiT III's crop). The blur's sigma range, DeiT
              III's (0.1, 2) at 224 px, is scaled by `image_size / 224` (as the reproduction study did for 64 px).
            - `"3augment_seed"`: what the reproduction study ran: resize + RandomCrop(padding 4, reflect) (DeiT III's
              "simple random crop") + flip, then one of {grayscale, solarize with threshold 0 (which inverts every
              pixel), gaussian blur (kernel 3, sigma (0.1, 2) / 3.5)}, no colour jitter.
        mean (`Sequence[float]`), std (`Sequence[float]`):
            Normalization, ImageNet's by default.
        crop_scale (`tuple[float, float]`, defaults to `(0.2, 1.0)`):
            Area range of RandomResizedCrop for `standard` and `3augment`.
    """
    _check_choice("aug", aug, PRETRAIN_AUGS)
    flip = v2.RandomHorizontalFlip()
    if aug == "3augment_seed":
        # Geometric ops on the PIL image (PIL's bicubic, as the reference code), colour ops on uint8 tensors.
        return v2.Compose(
            [
                v2.Resize(image_size, interpolation=BICUBIC),
                v2.RandomCrop(image_size, padding=4, padding_mode="reflect"),
                flip,
                v2.ToImage(),
                v2.RandomChoice(
                    [
                        v2.Grayscale(num_output_channels=3),
                        v2.RandomSolarize(threshold=0, p=1.0),
                        v2.GaussianBlur(3, sigma=(0.1 / 3.5, 2.0 / 3.5)),
                    ]
                ),
                *_to_normalized_tensor(mean, std),
            ]
        )
    crop = [v2.RandomResizedCrop(image_size, scale=crop_scale, interpolation=BICUBIC), flip]
    if aug == "standard":
        return v2.Compose([*crop, *_to_normalized_tensor(mean, std)])
    sigma = (0.1 * image_size / 224, 2.0 * image_size / 224)
    return v2.Compose(
        [
            *crop,
            v2.ToImage(),
            v2.RandomChoice(
                [
                    v2.Grayscale(num_output_channels=3),
                    v2.RandomSolarize(threshold=128, p=1.0),
                    # Odd kernel covering +-3 sigma of the widest blur.
                    v2.GaussianBlur(2 * math.ceil(3 * sigma[1]) + 1, sigma=sigma),
                ]
            ),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
            *_to_normalized_tensor(mean, std),
        ]
    )


def build_finetune_transform(
    image_size: int,
    aug: str = "full",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    auto_augment: str = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
) -> Callable[[Any], torch.Tensor]:
    """Augmentation for fine-tuning: an RGB PIL image -> normalized float tensor [3, H, W].

    Args:
        image_size (`int`):
            Output side.
        aug (`str`, defaults to `"full"`):
            `"small"`: RandomResizedCrop(scale 0.08-1, bicubic) + flip (the reproduction study's "small
            augmentation", used without Mixup / CutMix / label smoothing). `"full"`: MAE's recipe through timm's
            `create_transform`: the same crop + flip, RandAugment `auto_augment`, random erasing (`re_prob`, per-pixel
            noise, one box).
        mean (`Sequence[float]`), std (`Sequence[float]`):
            Normalization, ImageNet's by default.
        auto_augment (`str`, defaults to `"rand-m9-mstd0.5-inc1"`):
            timm RandAugment policy of `full`.
        re_prob (`float`, defaults to 0.25):
            Random erasing probability of `full`.
    """
    _check_choice("aug", aug, FINETUNE_AUGS)
    if aug == "small":
        return v2.Compose(
            [
                v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=BICUBIC),
                v2.RandomHorizontalFlip(),
                *_to_normalized_tensor(mean, std),
            ]
        )
    _patch_timm_posterize()
    return create_transform(
        input_size=image_size,
        is_training=True,
        auto_augment=auto_augment,
        interpolation="bicubic",
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(mean),
        std=tuple(std),
    )


def build_eval_transform(
    image_size: int,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """Evaluation transform: bicubic resize of the shortest side to `int(image_size / crop_pct)`, center crop."""
    return v2.Compose(
        [
            v2.Resize(eval_resize_size(image_size, crop_pct), interpolation=BICUBIC),
            v2.CenterCrop(image_size),
            *_to_normalized_tensor(mean, std),
        ]
    )


def build_mixup(
    aug: str,
    num_classes: int,
    mixup: float = 0.8,
    cutmix: float = 1.0,
    label_smoothing: float = 0.1,
    switch_prob: float = 0.5,
) -> Mixup | None:
    """timm `Mixup` (batch mode) for the `full` fine-tuning recipe; `None` for `small` (hard labels, no smoothing).

    Also `None` when `mixup`, `cutmix` and `label_smoothing` are all 0.
    """
    _check_choice("aug", aug, FINETUNE_AUGS)
    if aug == "small" or not (mixup or cutmix or label_smoothing):
        return None
    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        label_smoothing=label_smoothing,
        switch_prob=switch_prob,
        mode="batch",
        num_classes=num_classes,
    )


def apply_mixup(mixup: Mixup, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with timm's `Mixup`, which only accepts even batches (it pairs sample i with sample B-1-i).

    For an odd batch (the last one of an epoch) the largest even prefix is mixed and the last sample stays unmixed
    with the one-hot, label-smoothed target Mixup itself gives at lam = 1, so every row of the targets sums to 1.

    Returns:
        `(pixel_values, targets)` with targets float [B, num_classes].
    """
    even = len(labels) - len(labels) % 2
    rest = mixup_target(labels[even:], mixup.num_classes, lam=1.0, smoothing=mixup.label_smoothing)
    if even == 0:
        return pixel_values, rest
    # Mixup works in place on its input; clone so the caller's tensor is left as it was.
    mixed, targets = mixup(pixel_values[:even].clone(), labels[:even])
    return torch.cat([mixed, pixel_values[even:]]), torch.cat([targets, rest])


@dataclass
class PretrainCollator:
    """Stack transformed examples into `{"pixel_values": float [B, C, H, W]}` (labels, if any, are dropped)."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}


@dataclass
class ClassificationCollator:
    """Stack transformed examples into `{"pixel_values", "labels"}` for the HF Trainer.

    Args:
        mixup (`timm.data.Mixup`, *optional*):
            From [`build_mixup`]. Without it `labels` are int64 class ids [B]; with it, soft targets float
            [B, num_classes] (odd batches handled by [`apply_mixup`]).
    """

    mixup: Mixup | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example.get("label", example.get("labels")) for example in examples], dtype=torch.long)
        if self.mixup is not None:
            pixel_values, labels = apply_mixup(self.mixup, pixel_values, labels)
        return {"pixel_values": pixel_values, "labels": labels}


def _decode(image: Any, position: int) -> Image.Image:
    """PIL image or undecoded `{"bytes", "path"}` value -> RGB PIL image, or an error naming the file."""
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or f"item {position} of the batch"
        data = None
    else:
        name, data = image.get("path") or f"item {position} of the batch", image.get("bytes")
    try:
        if not isinstance(image, Image.Image):
            image = Image.open(io.BytesIO(data) if data is not None else name)
            image.load()
            image = ImageOps.exif_transpose(image)  # as datasets' own decoding does
        return to_rgb(image)
    except Exception as err:
        raise ValueError(f"Cannot decode image {name!r}: {type(err).__name__}: {err}") from err


def _transform_batch(
    batch: dict[str, list], transform: Callable[[Image.Image], torch.Tensor], image_column: str, label_column: str
) -> dict[str, list]:
    output = {"pixel_values": [transform(_decode(image, i)) for i, image in enumerate(batch[image_column])]}
    if label_column in batch:
        output["label"] = batch[label_column]
    return output


def make_transform_fn(
    transform: Callable[[Image.Image], torch.Tensor], image_column: str = "image", label_column: str = "label"
) -> Callable[[dict[str, list]], dict[str, list]]:
    """Function for `Dataset.set_transform` / `with_transform`: batch of images -> `pixel_values` (+ `label`).

    Images are converted to RGB first (L, P, RGBA on white, CMYK, 16-bit). `datasets` decodes an `Image` column
    before calling the function, so for errors that name the file of an undecodable image, and to decode only once,
    use [`apply_transform`], which casts the column to `Image(decode=False)` first. The result is a `partial` of a
    module-level function, not a closure, so DataLoader workers started with `spawn` can pickle it.
    """
    return functools.partial(
        _transform_batch, transform=transform, image_column=image_column, label_column=label_column
    )


def apply_transform(
    dataset: Dataset | DatasetDict | IterableDataset,
    transform: Callable[[Image.Image], torch.Tensor],
    image_column: str = "image",
    label_column: str = "label",
) -> Dataset | DatasetDict | IterableDataset:
    """`dataset.with_transform(make_transform_fn(...))` with the image column left undecoded for the transform; for a
    streamed `IterableDataset` (which has no `with_transform`) the same function is mapped lazily as it is read."""
    from datasets import Image as ImageFeature
    from datasets import IterableDataset

    dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    transform_fn = make_transform_fn(transform, image_column, label_column)
    if isinstance(dataset, IterableDataset):
        # small batches: the transformed images of a whole batch are held at once in each data loader worker
        return dataset.map(
            transform_fn, batched=True, batch_size=STREAM_MAP_BATCH, remove_columns=dataset.column_names
        )
    return dataset.with_transform(transform_fn)
