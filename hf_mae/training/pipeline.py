"""The runs behind every example, the demo and the study: build config, model and data, hand them to a Trainer,
then write the model, its image processor, curves, reconstructions and a model card. One code path for all."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from transformers import HfArgumentParser, TrainerCallback, set_seed

from ..configuration_mae import MAEConfig
from ..data import (
    TINY_IMAGENET_HUB_ID,
    ClassificationCollator,
    PretrainCollator,
    apply_transform,
    build_eval_transform,
    build_finetune_transform,
    build_image_processor,
    build_mixup,
    build_pretrain_transform,
    get_label_names,
    load_digits_dataset,
    load_image_dataset,
    load_tiny_imagenet,
)
from ..data.device_data import device_train_data
from ..data.image_datasets import split_validation
from ..data.streaming import (
    check_shards,
    load_streaming_dataset,
    materialize,
    prepare_training_for_stream,
    shuffle_stream,
)
from ..modeling_mae import MAEForImageClassification, MAEForPreTraining
from ..named_configs import CONFIG_FILE_SUFFIXES, recipe_names, recipe_path
from ..visualize import plot_training_curves, reconstruct, reconstruction_figure, save_figure
from .arguments import MAEFinetuningArguments, MAEPretrainingArguments, MAETrainingArguments
from .trainer import (
    PARTIAL_PREFIX,
    MAETrainer,
    NonFiniteLossError,
    NonFiniteWeightsError,
    build_compute_metrics,
    topk_predictions,
)

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ("digits", "tiny-imagenet")


@dataclass
class ModelArguments:
    """Which model, config and image processor a run starts from, and how to reach them on the Hub (the flags of
    transformers' `run_mae.py` / `run_image_classification.py`)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "pretraining: an hf_mae checkpoint to start from; fine-tuning: the pretrained MAE/DMAE directory "
            "or Hub id (None = from scratch)"
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "config (directory or Hub id holding config.json) when not the one of --model_name_or_path; "
            "wins over --model_name_or_path's config and over --preset"
        },
    )
    preset: str = field(
        default="seed-vit-b8-64",
        metadata={"help": "MAEConfig preset for a model built from scratch (without --config_name)"},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated key=value MAEConfig overrides, e.g. decoder_num_hidden_layers=1,image_size=32"
        },
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": "image processor (directory or Hub id) to use instead of hf_mae's resize + center crop: it "
            "preprocesses the evaluation images, its mean / std normalise the training images, and it is saved with "
            "the model; its output size must be the model's image_size"
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "where models, image processors and datasets downloaded from the Hub are stored (and where a "
            "--tiny_imagenet_source folder or zip is converted to)"
        },
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "branch, tag or commit of --model_name_or_path, --config_name and --image_processor_name"},
    )
    token: str | None = field(
        default=None,
        metadata={
            "help": "Hub token for private models and datasets (default: the one `hf auth login` stored, if any)"
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "run code from the Hub that --image_processor_name or --dataset_name ship (hf_mae's own models "
            "never need it; datasets >= 4 refuses loading scripts whatever this says). Only for repositories you "
            "trust and have read"
        },
    )

    def hub_kwargs(self) -> dict[str, Any]:
        """What every `from_pretrained` of a run gets: `cache_dir`, `revision`, `token`."""
        return {"cache_dir": self.cache_dir, "revision": self.model_revision, "token": self.token}


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="tiny-imagenet",
        metadata={
            "help": "`digits` (built-in), `tiny-imagenet` (Hub copy, or --tiny_imagenet_source), or any Hub id / "
            "local path that datasets.load_dataset takes"
        },
    )
    dataset_config_name: str | None = field(
        default=None,
        metadata={"help": "configuration of --dataset_name (datasets.load_dataset's `name`)"},
    )
    tiny_imagenet_source: str | None = field(
        default=None, metadata={"help": "tiny-imagenet-200 folder, its zip, or a folder of parquet files"}
    )
    train_dir: str | None = field(default=None, metadata={"help": "imagefolder-style class_name/*.jpg folder"})
    validation_dir: str | None = field(default=None)
    train_val_split: float | None = field(
        default=0.15,
        metadata={
            "help": "fraction of train held out as validation when the data has no validation split (0 or none = "
            "no split)"
        },
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "image column of --dataset_name (default: image, else img)"}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "label column of --dataset_name (default: label, else labels)"}
    )
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    crop_pct: float = field(default=0.875, metadata={"help": "eval: resize to size / crop_pct, then center crop"})
    num_reconstructions: int = field(default=8, metadata={"help": "validation images in the reconstruction PNG"})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "read the train split as training goes (a datasets IterableDataset: a Hub id or local data folder "
            "given as --dataset_name, never downloaded whole), each process its own files; needs --max_steps and "
            "warm-up / eval / save in steps. --max_train_samples then takes the stream's first examples; the "
            "validation split (its first --max_eval_samples) is read once into the cache"
        },
    )
    device_data: bool = field(
        default=False,
        metadata={
            "help": "keep the decoded uint8 train split on the training device and crop / flip / normalise batches "
            "there (hf_mae.data.device_data): pretraining `standard` and fine-tuning `small` augmentation only"
        },
    )

    def __post_init__(self):
        if self.train_val_split is not None and not 0 <= self.train_val_split < 1:
            raise ValueError(f"train_val_split must be in [0, 1), got {self.train_val_split}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or not given, for all of them), got {value}")


def parse_overrides(text: str | None) -> dict[str, Any]:
    """`"a=1,b=0.5,c=true"` -> {"a": 1, "b": 0.5, "c": True} (values parsed as JSON where possible)."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"config_overrides item {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    unknown = sorted(set(overrides) - set(MAEConfig().to_dict()))
    if unknown:
        raise ValueError(f"config_overrides names unknown MAEConfig fields: {', '.join(unknown)}")
    return overrides


def load_data(data_args: DataArguments, image_size: int, seed: int = 0, model_args: ModelArguments | None = None):
    """DatasetDict {train, validation} with `image` and (when labelled) `label` columns. `model_args` gives the Hub
    access (`cache_dir`, `token`, `trust_remote_code`); a validation split is carved out of train with
    `train_val_split` when the data has none. With `--streaming` the train split is a shuffled `IterableDataset`
    (hf_mae.data.streaming)."""
    hub = model_args or ModelArguments()
    builtin = data_args.dataset_name in BUILTIN_DATASETS or data_args.tiny_imagenet_source
    if data_args.dataset_config_name and (data_args.train_dir or data_args.validation_dir or builtin):
        raise ValueError(
            f"dataset_config_name={data_args.dataset_config_name!r} names a configuration of a dataset that "
            "datasets.load_dataset loads (--dataset_name), not of --train_dir / digits / tiny-imagenet"
        )
    if data_args.streaming:
        if (
            data_args.train_dir
            or data_args.validation_dir
            or data_args.dataset_name == "digits"
            or data_args.device_data
        ):
            raise ValueError(
                "--streaming reads a Hub dataset or a local data folder given as --dataset_name; it does not combine "
                "with --train_dir / --validation_dir, the built-in digits or --device_data"
            )
        name = data_args.dataset_name
        if name == "tiny-imagenet":
            name = data_args.tiny_imagenet_source or TINY_IMAGENET_HUB_ID
        streams = load_streaming_dataset(
            name,
            data_args.image_column_name,
            data_args.label_column_name,
            hub.cache_dir,
            name=data_args.dataset_config_name,
            token=hub.token,
            trust_remote_code=hub.trust_remote_code,
        )
        ds = {"train": shuffle_stream(streams["train"], seed, data_args.max_train_samples)}
        check_shards(ds["train"], PartialState().num_processes)
        if "validation" in streams:
            ds["validation"] = materialize(streams["validation"], data_args.max_eval_samples, hub.cache_dir)
        return ds
    if data_args.train_dir or data_args.validation_dir:
        ds = load_image_dataset(
            train_dir=data_args.train_dir,
            validation_dir=data_args.validation_dir,
            validation_split_percentage=0,
            seed=seed,
            cache_dir=hub.cache_dir,
        )
    elif data_args.dataset_name == "digits":
        ds = load_digits_dataset(image_size=image_size, seed=seed)
    elif data_args.dataset_name == "tiny-imagenet" or data_args.tiny_imagenet_source:
        ds = load_tiny_imagenet(
            data_args.tiny_imagenet_source or TINY_IMAGENET_HUB_ID, cache_dir=hub.cache_dir, token=hub.token
        )
    else:
        ds = load_image_dataset(
            dataset_name=data_args.dataset_name,
            dataset_config_name=data_args.dataset_config_name,
            image_column_name=data_args.image_column_name,
            label_column_name=data_args.label_column_name,
            validation_split_percentage=0,
            seed=seed,
            cache_dir=hub.cache_dir,
            token=hub.token,
            trust_remote_code=hub.trust_remote_code,
        )
    if "validation" in ds:
        if data_args.train_val_split:
            logger.info("the data has a validation split: train_val_split %g not used", data_args.train_val_split)
    elif data_args.train_val_split:
        ds = split_validation(ds, 100 * data_args.train_val_split, seed)
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None and split in ds and len(ds[split]) > limit:
            ds[split] = ds[split].shuffle(seed=seed).select(range(limit))
    return ds


def knn_datasets(data_args: DataArguments, model_args: ModelArguments | None = None) -> Callable[[int, int], tuple]:
    """For [`KNNMonitor`]: `(image_size, seed) -> (memory, queries)`, the labelled train and validation splits that
    `data_args` name, each shuffled with `seed`, with the run's evaluation transform ([`build_eval_preprocessing`])."""

    def load(image_size: int, seed: int) -> tuple:
        if data_args.streaming:
            raise ValueError(
                "the k-NN monitor indexes its memory images, which a stream cannot: with --streaming give the "
                "monitor its data (KNNMonitor(train_dataset=..., eval_dataset=...)) or leave --knn_eval_steps 0"
            )
        ds = load_data(data_args, image_size, seed, model_args)
        if "validation" not in ds or "label" not in ds["train"].column_names:
            raise ValueError("the k-NN monitor needs a labelled dataset with train and validation splits")
        _, transform = build_eval_preprocessing(model_args or ModelArguments(), image_size, data_args.crop_pct)
        return (
            apply_transform(ds["train"].shuffle(seed=seed), transform),
            apply_transform(ds["validation"].shuffle(seed=seed), transform),
        )

    return load


class ProcessorTransform:
    """An image processor as a transform: RGB PIL image -> the [C, H, W] tensor the processor gives at inference
    (a module-level class, so DataLoader workers started with `spawn` can pickle it)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def build_eval_preprocessing(model_args: ModelArguments, image_size: int, crop_pct: float) -> tuple[Any, Callable]:
    """The run's image processor (saved with the model) and evaluation transform: hf_mae's bicubic resize to
    `image_size / crop_pct` + center crop, or the processor that `--image_processor_name` names, applied as such."""
    if not model_args.image_processor_name:
        return build_image_processor(image_size, crop_pct), build_eval_transform(image_size, crop_pct)
    from PIL import Image
    from transformers import AutoImageProcessor

    name = model_args.image_processor_name
    processor = AutoImageProcessor.from_pretrained(
        name, trust_remote_code=model_args.trust_remote_code, **model_args.hub_kwargs()
    )
    transform = ProcessorTransform(processor)
    size = tuple(transform(Image.new("RGB", (97, 131))).shape[-2:])  # what it makes of an odd-sized image
    if size != (image_size, image_size):
        raise ValueError(
            f"image_processor_name {name}: its images are {size[0]}x{size[1]}, the model takes {image_size}x{image_size}"
        )
    return processor, transform


def image_statistics(processor) -> tuple[list[float], list[float]]:
    """The mean and std a processor normalises with (none: 0 and 1), for the training augmentation."""
    if not getattr(processor, "do_normalize", True):
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return list(processor.image_mean), list(processor.image_std)


class _LogHistoryWriter(TrainerCallback):
    """Keep each run's `log_history` on disk as it grows, so curves survive an interrupted run."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            self.path.write_text(json.dumps(state.log_history, indent=1))


def _finish(trainer: MAETrainer, results: dict, title: str, card: dict[str, Any]) -> None:
    """Curves, the Trainer's metrics files and the model card built from them (main process; `card`:
    `create_model_card`'s arguments), the final save (model and the run's image processor, the Trainer's
    `processing_class`), then results.json, and the push of everything in output_dir when --push_to_hub is set.

    results.json comes last because it marks the run finished (the study skips such runs, a rerun refuses to
    overwrite them): a final save that fails (weights holding NaN, a full disk) or is killed leaves an unfinished
    run, which resumes from its checkpoints."""
    out = Path(trainer.args.output_dir)
    trainer.save_metrics("final", results)  # final_results.json + all_results.json, which the model card reads
    if trainer.is_world_process_zero():
        plot_training_curves(trainer.state.log_history, out / "curves.png", title=title)
        trainer.create_model_card(**card)
    trainer.save_model(_internal_call=True)  # no push yet: results.json belongs in it
    if trainer.is_world_process_zero():
        partial = out / f"{PARTIAL_PREFIX}results.json"
        partial.write_text(json.dumps(results, indent=1))
        partial.replace(out / "results.json")  # atomic: never a half-written marker
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message="Model save", revision=trainer.args.hub_revision)


def _build_trainer(
    trainer_cls: type[MAETrainer],
    model: torch.nn.Module,
    training_args: MAETrainingArguments,
    train,
    eval_ds,
    collator,
    extra_callbacks: list | None = None,
    **kwargs: Any,
) -> MAETrainer:
    """The Trainer of every run: output_dir created, log_history.json kept on disk as it grows. Pass the run's image
    processor as `processing_class`: the Trainer saves it with the model and in every checkpoint."""
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=eval_ds,
        data_collator=collator,
        callbacks=[_LogHistoryWriter(out / "log_history.json"), *(extra_callbacks or [])],
        **kwargs,
    )


def _save_reconstructions(trainer: MAETrainer, eval_ds, num_images: int, seed: int) -> None:
    """The reconstruction PNG, computed where the model already is (no in-place move or cast before it is saved),
    also logged as an image to TensorBoard when the run reports there. Called on every process: under FSDP each
    forward gathers the shards from all of them; the main process draws and writes."""
    if not (trainer.is_world_process_zero() or trainer.is_fsdp_enabled):
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = model.config
    param = next(model.parameters())
    n = min(num_images, len(eval_ds))
    images = torch.stack([eval_ds[i]["pixel_values"] for i in range(n)]).to(param.device)
    noise = torch.rand(n, config.num_patches, generator=torch.Generator().manual_seed(seed)).to(param.device)
    was_training = model.training
    low_precision = param.dtype != torch.float32
    with torch.no_grad(), torch.autocast(param.device.type, dtype=param.dtype, enabled=low_precision):
        if not trainer.is_world_process_zero():
            reconstruct(model, images, noise)  # the same forward, for its share of FSDP's all-gathers
            model.train(was_training)
            return
        figure = reconstruction_figure(model, images, noise=noise, title=f"mask ratio {config.mask_ratio}")
    model.train(was_training)
    _log_figure_to_tensorboard(trainer, "reconstructions", figure)
    save_figure(figure, Path(trainer.args.output_dir) / "reconstructions.png")


def _log_figure_to_tensorboard(trainer: MAETrainer, tag: str, figure) -> None:
    """`figure` as an image in the run's TensorBoard log, at the current step; nothing when it does not report there.

    The TensorBoard callback closes its writer when training ends (an evaluation afterwards reopens it): without an
    open one, a writer on the callback's own log dir adds the image to the same run.
    """
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if callback is None:
        return
    writer = callback.tb_writer or SummaryWriter(log_dir=callback.logging_dir)
    writer.add_figure(tag, figure, global_step=trainer.state.global_step, close=False)
    writer.flush()
    if writer is not callback.tb_writer:
        writer.close()


def freeze_for_linear_probe(model: MAEForImageClassification) -> MAEForImageClassification:
    """Only the head learns, as in MAE's linear probing: encoder and `fc_norm` get `requires_grad=False`."""
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model


def load_config(config_cls: type[MAEConfig], model_args: ModelArguments, overrides: dict[str, Any]) -> MAEConfig:
    """The run's config: `--config_name`, else the config of `--model_name_or_path`, else `--preset`; with
    `overrides` applied (and validated) on top."""
    source = model_args.config_name or model_args.model_name_or_path
    if source:
        return config_cls.from_pretrained(source, **model_args.hub_kwargs(), **overrides)
    return config_cls.from_preset(model_args.preset, **overrides)


def pretraining_overrides(model_args: ModelArguments, training_args: MAEPretrainingArguments) -> dict[str, Any]:
    """`--config_overrides`, then the pretraining flags that override a config field (`--mask_ratio`,
    `--norm_pix_loss` / `--no_norm_pix_loss`), which win."""
    overrides = parse_overrides(model_args.config_overrides)
    for name in ("mask_ratio", "norm_pix_loss"):
        if getattr(training_args, name) is not None:
            overrides[name] = getattr(training_args, name)
    return overrides


def build_pretraining_config(model_args: ModelArguments, training_args: MAEPretrainingArguments) -> MAEConfig:
    return load_config(MAEConfig, model_args, pretraining_overrides(model_args, training_args))


def model_card_dataset(data_args: DataArguments) -> dict[str, str]:
    """`create_model_card`'s dataset arguments for the data of a run: its name, plus its Hub id and configuration
    when it comes from the Hub (the Hub refuses a card whose `datasets` lists a local path)."""
    if data_args.train_dir or data_args.validation_dir:
        return {"dataset": f"image folder {data_args.train_dir or data_args.validation_dir}"}
    if data_args.dataset_name == "digits":
        return {"dataset": "scikit-learn digits (8x8, upscaled)"}
    tiny = data_args.dataset_name == "tiny-imagenet" or data_args.tiny_imagenet_source
    source = (data_args.tiny_imagenet_source or TINY_IMAGENET_HUB_ID) if tiny else data_args.dataset_name
    name = "Tiny ImageNet" if tiny else source
    if Path(source).expanduser().exists():
        return {"dataset": name}
    card = {"dataset": name, "dataset_tags": source}
    if data_args.dataset_config_name:
        card["dataset_args"] = data_args.dataset_config_name
    return card


def run_pretraining(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: MAEPretrainingArguments,
    model: MAEForPreTraining | None = None,
    trainer_cls: type[MAETrainer] = MAETrainer,
    extra_callbacks: list | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Pretrain an MAE (or, with `model` / `trainer_cls` / `trainer_kwargs={"teacher": ...}` from
    hf_mae.training.dmae, a DMAE student)."""

    set_seed(training_args.seed)
    if model is None:
        config = build_pretraining_config(model_args, training_args)
        model = (
            MAEForPreTraining.from_pretrained(model_args.model_name_or_path, config=config, **model_args.hub_kwargs())
            if model_args.model_name_or_path
            else MAEForPreTraining(config)
        )
    config = model.config
    processor, eval_transform = build_eval_preprocessing(model_args, config.image_size, data_args.crop_pct)
    mean, std = image_statistics(processor)
    if data_args.streaming:
        prepare_training_for_stream(training_args)
    ds = load_data(data_args, config.image_size, training_args.seed, model_args)
    aug = training_args.pretrain_aug
    if data_args.device_data:
        train, collator = device_train_data(ds["train"], config.image_size, training_args, aug, mean=mean, std=std)
    else:
        train = apply_transform(ds["train"], build_pretrain_transform(config.image_size, aug, mean=mean, std=std))
        collator = PretrainCollator()
    eval_ds = None
    if "validation" in ds:
        eval_ds = apply_transform(ds["validation"], eval_transform)
    trainer = _build_trainer(
        trainer_cls,
        model,
        training_args,
        train,
        eval_ds,
        collator,
        extra_callbacks,
        processing_class=processor,
        **(trainer_kwargs or {}),
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    results = {"train_loss": train_result.training_loss}
    if eval_ds is not None:
        results.update(trainer.evaluate())
    if eval_ds is not None and data_args.num_reconstructions > 0:
        _save_reconstructions(trainer, eval_ds, data_args.num_reconstructions, training_args.seed)
    _finish(trainer, results, "pretraining", model_card_dataset(data_args))
    logger.info("pretraining results: %s", results)
    return results


def run_finetuning(
    model_args: ModelArguments, data_args: DataArguments, training_args: MAEFinetuningArguments
) -> dict[str, float]:
    """Fine-tune (or linear-probe) an image classifier from a pretrained MAE/DMAE directory, or from scratch."""

    set_seed(training_args.seed)
    overrides = parse_overrides(model_args.config_overrides)
    probe = training_args.linear_probe
    head = dict(head_type="linear_probe", pooling="cls") if probe else {}
    config = load_config(MAEConfig, model_args, overrides)
    processor, eval_transform = build_eval_preprocessing(model_args, config.image_size, data_args.crop_pct)
    mean, std = image_statistics(processor)
    if data_args.streaming:
        prepare_training_for_stream(training_args)
    ds = load_data(data_args, config.image_size, training_args.seed, model_args)
    if "label" not in (ds["train"].column_names or []):
        raise ValueError(
            f"fine-tuning needs a labelled dataset: the train split of {data_args.train_dir or data_args.dataset_name}"
            " has no label column (label or labels: set --label_column_name; an image folder is labelled by its "
            "class sub-folders)"
        )
    if "validation" not in ds:
        raise ValueError(
            "fine-tuning needs a validation split: give --validation_dir, or a train_val_split > 0 to hold one out"
        )
    names = get_label_names(ds["train"])
    if not names:
        raise ValueError(
            "fine-tuning needs the class names: the train split's `label` column is not a datasets ClassLabel"
        )
    if len(names) < 2:  # one class trains to loss 0 and 100% accuracy: a result that means nothing
        where = f" of {data_args.train_dir}" if data_args.train_dir else ""
        raise ValueError(
            f"fine-tuning needs at least 2 classes, the train split{where} has {len(names)} ({', '.join(names)}); "
            "an image folder holds one subfolder of images per class (train_dir/<class>/<image>)"
        )
    config.update(
        dict(
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            drop_path_rate=training_args.drop_path_rate,
            **head,
        )
    )
    if model_args.model_name_or_path:
        model = MAEForImageClassification.from_pretrained(
            model_args.model_name_or_path, config=config, **model_args.hub_kwargs()
        )
    else:
        model = MAEForImageClassification(config)
    if probe:
        freeze_for_linear_probe(model)
    aug = training_args.finetune_aug  # `small` for a linear probe (MAEFinetuningArguments sees to it)
    if data_args.device_data:
        train, collator = device_train_data(
            ds["train"], config.image_size, training_args, aug, with_labels=True, mean=mean, std=std
        )
    else:
        transform = build_finetune_transform(
            config.image_size, aug, mean=mean, std=std, re_prob=training_args.random_erasing
        )
        train = apply_transform(ds["train"], transform)
        collator = ClassificationCollator()
    eval_ds = apply_transform(ds["validation"], eval_transform)
    mixup = build_mixup(
        aug,
        len(names),
        mixup=training_args.mixup,
        cutmix=training_args.cutmix,
        label_smoothing=training_args.label_smoothing,
        switch_prob=training_args.mixup_switch_prob,
    )
    trainer = _build_trainer(
        MAETrainer,
        model,
        training_args,
        train,
        eval_ds,
        collator,
        processing_class=processor,
        compute_metrics=build_compute_metrics(k=min(5, len(names))),
        preprocess_logits_for_metrics=topk_predictions,
        mixup=mixup,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    final = trainer.evaluate()
    k = min(5, len(names))
    evals = [e for e in trainer.state.log_history if "eval_top1" in e]
    results = {
        "top1": final["eval_top1"],
        f"top{k}": final[f"eval_top{k}"],
        "best_top1": max(e["eval_top1"] for e in evals) if evals else final["eval_top1"],
        "eval_loss": final.get("eval_loss", math.nan),
    }
    title = "linear probe" if probe else f"fine-tuning ({aug} aug)"
    _finish(trainer, results, title, model_card_dataset(data_args))
    logger.info("fine-tuning results: %s", results)
    return results


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` without prefix abbreviations (`--mask 0.9` is not `--mask_ratio`), and where an optional
    bool field (default None = keep the config's value) takes `--flag`, `--flag false` and `--no_flag`, as a bool
    field with default True does."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)

    @staticmethod
    def _parse_dataclass_field(parser, field) -> None:
        HfArgumentParser._parse_dataclass_field(parser, field)
        if field.default is None and field.type == bool | None:
            flag = parser._option_string_actions[f"--{field.name}"]
            flag.nargs, flag.const = "?", True
            parser.add_argument(
                f"--no_{field.name}",
                f"--no-{field.name.replace('_', '-')}",
                action="store_false",
                dest=field.name,
                default=None,
                help=f"sets {field.name} to false",
            )


def _did_you_mean(name: str, known: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def parse_args(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """HfArgumentParser over flags, optionally after a YAML / JSON file given as the first argument: the file sets
    the values, checked key by key ([`check_file_values`]), and every flag after it wins over the file
    (`run_finetune.py finetune_full.yaml --model_name_or_path outputs/pt --no_norm_pix_loss`). A key or a flag
    that no dataclass has is a ValueError naming it.

    `--config NAME_OR_PATH`, anywhere among the flags, is the same file: the name of a recipe shipped with hf_mae
    (`--config pretrain_mask90`, see [`~hf_mae.named_configs`]) or a path; the other flags win over it as well."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = _pop_config_flag(argv)
    has_file = bool(argv) and argv[0].endswith(CONFIG_FILE_SUFFIXES) and not argv[0].startswith("-")
    if config is not None:
        if has_file:
            raise ValueError(f"an argument file ({argv[0]}) and --config {config}: give one of them")
        argv.insert(0, str(recipe_path(config)))
    elif has_file:
        argv[0] = str(recipe_path(argv[0]))  # a path, or the file name of a shipped recipe
    for i, arg in enumerate(argv):  # a bare --resume_from_checkpoint means the newest complete checkpoint
        if arg == "--resume_from_checkpoint" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "latest")
            break
    parser = ArgumentParser(dataclass_types)
    # listed in --help only: it was taken out of argv above, and SUPPRESS keeps it out of the parsed namespace
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="NAME_OR_PATH",
        help=f"a recipe file, or the name of one shipped with hf_mae ({', '.join(recipe_names())}); flags win over it",
    )
    if argv and argv[0].endswith(CONFIG_FILE_SUFFIXES) and not argv[0].startswith("-"):
        path = Path(argv.pop(0)).resolve()
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"{path}: cannot be read as YAML / JSON: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}")
        values = check_file_values(values, dataclass_types, path)
        # the file's values become the parser's defaults, so only flags actually given on the command line replace them
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    _, remaining = parser.parse_known_args(argv)  # unknown flags first, before any dataclass checks its values
    if remaining:
        flags = [arg for arg in remaining if arg.startswith("-")]
        known = [option for action in parser._actions for option in action.option_strings]
        if not flags:
            raise ValueError(
                f"unexpected argument(s) {' '.join(remaining)}: an argument file must come first, flags after it"
            )
        names = ", ".join(f"{flag}{_did_you_mean(flag.split('=')[0], known)}" for flag in flags)
        raise ValueError(
            f"unknown argument(s) {names}: no field of {', '.join(t.__name__ for t in dataclass_types)} (see --help)"
        )
    return parser.parse_args_into_dataclasses(args=argv)


def _pop_config_flag(argv: list[str]) -> str | None:
    """Remove `--config X` / `--config=X` from `argv` and return X (None when absent)."""
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 == len(argv) or argv[i + 1].startswith("-"):
                raise ValueError(f"--config needs a recipe name or a file; recipes: {', '.join(recipe_names())}")
            value = argv[i + 1]
            del argv[i : i + 2]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
            del argv[i]
        else:
            continue
        if _pop_config_flag(argv) is not None:
            raise ValueError("--config is given twice")
        return value
    return None


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def check_file_values(values: dict[str, Any], dataclass_types: tuple, origin: str | Path) -> dict[str, Any]:
    """The values of a YAML / JSON argument file with the types their fields declare, as the command line would
    parse them (`"3"` -> 3, `"yes"` -> True); a value of another type, or a key that no dataclass has, is a
    ValueError naming the key."""
    hints: dict[str, Any] = {}
    for dtype in dataclass_types:
        hints.update(typing.get_type_hints(dtype))
    fields = {f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if f.init}
    unknown = [key for key in values if key not in fields]
    if unknown:
        names = ", ".join(f"{key!r}{_did_you_mean(str(key), fields)}" for key in unknown)
        raise ValueError(
            f"{origin}: unknown key(s) {names}: no field of {', '.join(t.__name__ for t in dataclass_types)}"
        )
    checked = {}
    for key, value in values.items():
        hint = hints.get(key)
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        checked[key] = value
        if value is None:
            if not optional and base in (bool, int, float):
                raise ValueError(f"{origin}: {key} must be a {base.__name__}, got null")
        elif base is bool:
            text = str(value).strip().lower() if not isinstance(value, bool) else None
            if text is not None and text not in _TRUE + _FALSE:
                raise ValueError(f"{origin}: {key} must be true or false, got {value!r}")
            checked[key] = value if text is None else text in _TRUE
        elif base in (int, float) or (isinstance(base, type) and issubclass(base, float)):
            try:
                if isinstance(value, bool) or (base is int and isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                checked[key] = int(str(value)) if base is int and isinstance(value, str) else base(value)
            except (TypeError, ValueError):
                kind = "an integer" if base is int else "a number"
                raise ValueError(f"{origin}: {key} must be {kind}, got {value!r}") from None
        elif hint is str or (
            typing.get_origin(hint) in (typing.Union, types.UnionType) and set(args) == {str, type(None)}
        ):
            if isinstance(value, (dict, list)):
                raise ValueError(f"{origin}: {key} must be a string, got {value!r}")
            checked[key] = str(value)  # as the command line reads it: `model_revision: 1234` is "1234"
    return checked


def run_main(main: Callable[[], Any]) -> int:
    """Run an entry point's `main()`; an error the user can act on (a bad value, a file, a run that stopped on
    non-finite values) is logged as one message and gives exit code 1 instead of a traceback. Then the distributed
    process group ends, as `Trainer.end()` ends it at the end of a script: left to the interpreter's exit, gloo's
    threads can abort a process whose work is all written ("terminate called without an active exception"), and
    the launch, or the study's run, fails after all."""
    try:
        main()
    except (ValueError, OSError, NonFiniteLossError, NonFiniteWeightsError) as error:
        logging.basicConfig(format="%(levelname)s %(message)s")
        logger.error("%s: %s", type(error).__name__, error)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
