"""The runs behind every example, the demo and the study: build config, model and data, hand them to a Trainer,
then write the model, its image processor, curves, reconstructions and a model card. One code path for all."""

from __future__ import annotations

import json
import logging
import math
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
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
from ..data.streaming import load_streaming_dataset, materialize, prepare_training_for_stream, shuffle_stream
from ..modeling_mae import MAEForImageClassification, MAEForPreTraining
from ..visualize import plot_training_curves, reconstruct, save_reconstruction_grid
from .arguments import MAEFinetuningArguments, MAEPretrainingArguments, MAETrainingArguments
from .trainer import MAETrainer, build_compute_metrics, topk_predictions

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ("digits", "tiny-imagenet")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "pretraining: an hf_mae checkpoint to start from; fine-tuning: the pretrained MAE/DMAE directory "
            "(None = from scratch)"
        },
    )
    preset: str = field(default="seed-vit-b8-64", metadata={"help": "MAEConfig preset for a model built from scratch"})
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated key=value MAEConfig overrides, e.g. decoder_num_hidden_layers=1,image_size=32"
        },
    )


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="tiny-imagenet",
        metadata={
            "help": "`digits` (built-in), `tiny-imagenet` (Hub copy, or --tiny_imagenet_source), or any Hub id / "
            "local path that datasets.load_dataset takes"
        },
    )
    tiny_imagenet_source: str | None = field(
        default=None, metadata={"help": "tiny-imagenet-200 folder, its zip, or a folder of parquet files"}
    )
    train_dir: str | None = field(default=None, metadata={"help": "imagefolder-style class_name/*.jpg folder"})
    validation_dir: str | None = field(default=None)
    image_column_name: str = field(default="image")
    label_column_name: str = field(default="label")
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    crop_pct: float = field(default=0.875, metadata={"help": "eval: resize to size / crop_pct, then center crop"})
    cache_dir: str | None = field(default=None)
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


def load_data(data_args: DataArguments, image_size: int, seed: int = 0):
    """DatasetDict {train, validation} with `image` and (when labelled) `label` columns; with `--streaming` the
    train split is a shuffled `IterableDataset` (hf_mae.data.streaming)."""
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
            name, data_args.image_column_name, data_args.label_column_name, data_args.cache_dir
        )
        ds = {"train": shuffle_stream(streams["train"], seed, data_args.max_train_samples)}
        if "validation" in streams:
            ds["validation"] = materialize(streams["validation"], data_args.max_eval_samples, data_args.cache_dir)
        return ds
    if data_args.train_dir or data_args.validation_dir:
        ds = load_image_dataset(
            train_dir=data_args.train_dir,
            validation_dir=data_args.validation_dir,
            seed=seed,
            cache_dir=data_args.cache_dir,
        )
    elif data_args.dataset_name == "digits":
        ds = load_digits_dataset(image_size=image_size, seed=seed)
    elif data_args.dataset_name == "tiny-imagenet" or data_args.tiny_imagenet_source:
        ds = load_tiny_imagenet(
            data_args.tiny_imagenet_source or "zh-plus/tiny-imagenet", cache_dir=data_args.cache_dir
        )
    else:
        ds = load_image_dataset(
            dataset_name=data_args.dataset_name,
            image_column_name=data_args.image_column_name,
            label_column_name=data_args.label_column_name,
            seed=seed,
            cache_dir=data_args.cache_dir,
        )
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None and split in ds and len(ds[split]) > limit:
            ds[split] = ds[split].shuffle(seed=seed).select(range(limit))
    return ds


def knn_datasets(data_args: DataArguments) -> Callable[[int, int], tuple]:
    """For [`KNNMonitor`]: `(image_size, seed) -> (memory, queries)`, the labelled train and validation splits that
    `data_args` name, each shuffled with `seed`, with the eval transform (resize + center crop)."""

    def load(image_size: int, seed: int) -> tuple:
        if data_args.streaming:
            raise ValueError(
                "the k-NN monitor indexes its memory images, which a stream cannot: with --streaming give the "
                "monitor its data (KNNMonitor(train_dataset=..., eval_dataset=...)) or leave --knn_eval_steps 0"
            )
        ds = load_data(data_args, image_size, seed)
        if "validation" not in ds or "label" not in ds["train"].column_names:
            raise ValueError("the k-NN monitor needs a labelled dataset with train and validation splits")
        transform = build_eval_transform(image_size, data_args.crop_pct)
        return (
            apply_transform(ds["train"].shuffle(seed=seed), transform),
            apply_transform(ds["validation"].shuffle(seed=seed), transform),
        )

    return load


class _LogHistoryWriter(TrainerCallback):
    """Keep each run's `log_history` on disk as it grows, so curves survive an interrupted run."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            self.path.write_text(json.dumps(state.log_history, indent=1))


def _finish(trainer: MAETrainer, results: dict, title: str, image_size: int, crop_pct: float) -> None:
    """Image processor, curves, results.json, the Trainer's metrics files and the model card built from them (main
    process), then the final save, which also pushes everything in output_dir when --push_to_hub is set."""
    out = Path(trainer.args.output_dir)
    trainer.save_metrics("final", results)  # final_results.json + all_results.json, which the model card reads
    if trainer.is_world_process_zero():
        build_image_processor(image_size, crop_pct).save_pretrained(out)
        plot_training_curves(trainer.state.log_history, out / "curves.png", title=title)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        trainer.create_model_card()
    trainer.save_model()


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
    """The Trainer of every run: output_dir created, log_history.json kept on disk as it grows."""
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
    """The reconstruction PNG, computed where the model already is (no in-place move or cast before it is saved).
    Called on every process: under FSDP each forward gathers the shards from all of them; the main process writes."""
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
        if trainer.is_world_process_zero():
            save_reconstruction_grid(
                model, images, Path(trainer.args.output_dir) / "reconstructions.png", noise=noise,
                title=f"mask ratio {config.mask_ratio}",
            )  # fmt: skip
        else:
            reconstruct(model, images, noise)  # the same forward, for its share of FSDP's all-gathers
    model.train(was_training)


def freeze_for_linear_probe(model: MAEForImageClassification) -> MAEForImageClassification:
    """Only the head learns, as in MAE's linear probing: encoder and `fc_norm` get `requires_grad=False`."""
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model


def build_pretraining_config(model_args: ModelArguments, training_args: MAEPretrainingArguments) -> MAEConfig:
    overrides = parse_overrides(model_args.config_overrides)
    if training_args.mask_ratio is not None:
        overrides["mask_ratio"] = training_args.mask_ratio
    if model_args.model_name_or_path:
        return MAEConfig.from_pretrained(model_args.model_name_or_path, **overrides)
    return MAEConfig.from_preset(model_args.preset, **overrides)


def run_pretraining(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: MAEPretrainingArguments,
    model: MAEForPreTraining | None = None,
    trainer_cls: type[MAETrainer] = MAETrainer,
    extra_callbacks: list | None = None,
) -> dict[str, float]:
    """Pretrain an MAE (or, with `model`/`trainer_cls` from hf_mae.training.dmae, a DMAE student)."""

    set_seed(training_args.seed)
    if model is None:
        config = build_pretraining_config(model_args, training_args)
        model = (
            MAEForPreTraining.from_pretrained(model_args.model_name_or_path, config=config)
            if model_args.model_name_or_path
            else MAEForPreTraining(config)
        )
    config = model.config
    if data_args.streaming:
        prepare_training_for_stream(training_args)
    ds = load_data(data_args, config.image_size, training_args.seed)
    if data_args.device_data:
        train, collator = device_train_data(ds["train"], config.image_size, training_args, training_args.pretrain_aug)
    else:
        train = apply_transform(ds["train"], build_pretrain_transform(config.image_size, training_args.pretrain_aug))
        collator = PretrainCollator()
    eval_ds = None
    if "validation" in ds:
        eval_ds = apply_transform(ds["validation"], build_eval_transform(config.image_size, data_args.crop_pct))
    trainer = _build_trainer(trainer_cls, model, training_args, train, eval_ds, collator, extra_callbacks)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    results = {"train_loss": train_result.training_loss}
    if eval_ds is not None:
        results.update(trainer.evaluate())
    if eval_ds is not None and data_args.num_reconstructions > 0:
        _save_reconstructions(trainer, eval_ds, data_args.num_reconstructions, training_args.seed)
    _finish(trainer, results, "pretraining", config.image_size, data_args.crop_pct)
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
    drop_path = 0.0 if probe else training_args.drop_path_rate
    if model_args.model_name_or_path:
        config = MAEConfig.from_pretrained(model_args.model_name_or_path, **overrides)
    else:
        config = MAEConfig.from_preset(model_args.preset, **overrides)
    if data_args.streaming:
        prepare_training_for_stream(training_args)
    ds = load_data(data_args, config.image_size, training_args.seed)
    if "label" not in (ds["train"].column_names or []):
        raise ValueError("fine-tuning needs a labelled dataset: the train split has no `label` column")
    if "validation" not in ds:
        raise ValueError("fine-tuning needs a validation split; the dataset has only train")
    names = get_label_names(ds["train"])
    if not names:
        raise ValueError(
            "fine-tuning needs the class names: the train split's `label` column is not a datasets ClassLabel"
        )
    config.update(
        dict(
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            drop_path_rate=drop_path,
            **head,
        )
    )
    if model_args.model_name_or_path:
        model = MAEForImageClassification.from_pretrained(model_args.model_name_or_path, config=config)
    else:
        model = MAEForImageClassification(config)
    if probe:
        freeze_for_linear_probe(model)
    aug = "small" if probe else training_args.finetune_aug
    if data_args.device_data:
        train, collator = device_train_data(ds["train"], config.image_size, training_args, aug, with_labels=True)
    else:
        train = apply_transform(
            ds["train"], build_finetune_transform(config.image_size, aug, re_prob=training_args.random_erasing)
        )
        collator = ClassificationCollator()
    eval_ds = apply_transform(ds["validation"], build_eval_transform(config.image_size, data_args.crop_pct))
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
    _finish(trainer, results, title, config.image_size, data_args.crop_pct)
    logger.info("fine-tuning results: %s", results)
    return results


def parse_args(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """HfArgumentParser over flags, or over a single YAML / JSON file given as the only argument."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):  # a bare --resume_from_checkpoint means the newest complete checkpoint
        if arg == "--resume_from_checkpoint" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "latest")
            break
    parser = HfArgumentParser(dataclass_types)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv[0]).resolve()
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"{path}: cannot be read as YAML / JSON: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}")
        return parser.parse_dict(check_file_values(values, dataclass_types, path))
    return parser.parse_args_into_dataclasses(args=argv)


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def check_file_values(values: dict[str, Any], dataclass_types: tuple, origin: str | Path) -> dict[str, Any]:
    """The values of a YAML / JSON argument file with the types their fields declare, as the command line would
    parse them (`"3"` -> 3, `"yes"` -> True); a value of another type is a ValueError naming the key and the value."""
    hints: dict[str, Any] = {}
    for dtype in dataclass_types:
        hints.update(typing.get_type_hints(dtype))
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
    return checked


def run_main(main: Callable[[], Any]) -> int:
    """Run an entry point's `main()`; an error the user can act on (a bad value, a file, a run that stopped on
    non-finite values) is logged as one message and gives exit code 1 instead of a traceback."""
    from .trainer import NonFiniteLossError, NonFiniteWeightsError

    try:
        main()
    except (ValueError, OSError, NonFiniteLossError, NonFiniteWeightsError) as error:
        logging.basicConfig(format="%(levelname)s %(message)s")
        logger.error("%s: %s", type(error).__name__, error)
        return 1
    return 0
