"""Data for MAE pretraining and fine-tuning: datasets, augmentations, collators and the saved image processor.

`datasets` is imported lazily by the loaders, so this package imports where it is not installed.
"""

from ..image_processing_mae import build_image_processor
from .image_datasets import encode_image, get_label_names, load_digits_dataset, load_image_dataset, to_rgb
from .tiny_imagenet import TINY_IMAGENET_HUB_ID, load_tiny_imagenet, tiny_imagenet_class_names
from .transforms import (
    FINETUNE_AUGS,
    PRETRAIN_AUGS,
    ClassificationCollator,
    PretrainCollator,
    apply_mixup,
    apply_transform,
    build_eval_transform,
    build_finetune_transform,
    build_mixup,
    build_pretrain_transform,
    eval_resize_size,
    make_transform_fn,
)

__all__ = [
    "FINETUNE_AUGS",
    "PRETRAIN_AUGS",
    "TINY_IMAGENET_HUB_ID",
    "ClassificationCollator",
    "PretrainCollator",
    "apply_mixup",
    "apply_transform",
    "build_eval_transform",
    "build_finetune_transform",
    "build_image_processor",
    "build_mixup",
    "build_pretrain_transform",
    "encode_image",
    "eval_resize_size",
    "get_label_names",
    "load_digits_dataset",
    "load_image_dataset",
    "load_tiny_imagenet",
    "make_transform_fn",
    "tiny_imagenet_class_names",
    "to_rgb",
]
