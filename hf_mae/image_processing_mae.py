"""The image processor that travels with every saved model, so `pipeline(model=dir)` and `AutoImageProcessor` work.

It is transformers' own `BitImageProcessor` (RGB conversion, bicubic resize of the shortest edge, center crop,
rescale, normalize) with MAE's evaluation sizes and ImageNet statistics: its `preprocessor_config.json` loads without
hf_mae installed and without remote code. This module imports only transformers, so the model files can use it and
`save_pretrained` ships it with them.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import BitImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

DEFAULT_CROP_PCT = 0.875


def eval_resize_size(image_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Shortest side before the center crop: `int(image_size / crop_pct)`, 64 -> 73, 224 -> 256."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    return int(image_size / crop_pct)


def build_image_processor(
    image_size: int,
    crop_pct: float = DEFAULT_CROP_PCT,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> BitImageProcessor:
    """A transformers image processor doing what `hf_mae.data.build_eval_transform` does.

    Args:
        image_size (`int`):
            Side of the center crop fed to the model.
        crop_pct (`float`, defaults to 0.875):
            The shortest edge is first resized to `int(image_size / crop_pct)` (64 -> 73).
        mean (`Sequence[float]`), std (`Sequence[float]`):
            Normalization, ImageNet's by default (the statistics every hf_mae recipe trains with).
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


__all__ = ["DEFAULT_CROP_PCT", "build_image_processor", "eval_resize_size"]
