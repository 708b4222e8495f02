"""The image processor saved with every model, so `pipeline("image-classification", model=dir)` works."""

from __future__ import annotations

from collections.abc import Sequence

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers import BitImageProcessor
from transformers.image_utils import PILImageResampling

from .transforms import eval_resize_size


def build_image_processor(
    image_size: int,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> BitImageProcessor:
    """A transformers image processor doing what [`build_eval_transform`] does.

    `BitImageProcessor` already has the evaluation recipe (RGB conversion, bicubic resize of the shortest edge,
    center crop, rescale to [0, 1], normalize); only its sizes and statistics are set here.

    Args:
        image_size (`int`):
            Side of the center crop fed to the model.
        crop_pct (`float`, defaults to 0.875):
            The shortest edge is first resized to `int(image_size / crop_pct)` (64 -> 73).
        mean (`Sequence[float]`), std (`Sequence[float]`):
            Normalization, ImageNet's by default.
    """
    return BitImageProcessor(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": eval_resize_size(image_size, crop_pct)},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
    )
