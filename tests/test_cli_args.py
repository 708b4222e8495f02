"""The example scripts take what transformers' `run_mae.py` / `run_image_classification.py` users type, and an
argument file followed by flags that override it; every flag has its effect (checked on local data and dirs: where
the Hub would be needed, the call that would reach it is recorded)."""

import json
import runpy
from pathlib import Path

import datasets
import pytest
import transformers
from helpers import TINY
from PIL import Image
from transformers import AutoImageProcessor, BitImageProcessor

from hf_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining
from hf_mae.training import (
    DataArguments,
    DMAETrainingArguments,
    KNNArguments,
    MAEFinetuningArguments,
    MAELinearProbeArguments,
    MAEPretrainingArguments,
    ModelArguments,
    parse_args,
    run_finetuning,
)
from hf_mae.training.dmae import build_distillation_config
from hf_mae.training.pipeline import (
    build_eval_preprocessing,
    build_pretraining_config,
    image_statistics,
    load_config,
    load_data,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
PRETRAIN = (ModelArguments, DataArguments, MAEPretrainingArguments, KNNArguments)  # as hf_mae.cli parses them
DISTILL = (ModelArguments, DataArguments, DMAETrainingArguments, KNNArguments)
FINETUNE = (ModelArguments, DataArguments, MAEFinetuningArguments)
LINEAR_PROBE = (ModelArguments, DataArguments, MAELinearProbeArguments)


@pytest.fixture
def bf16_anywhere(monkeypatch):
    """The seed's configs ask for bf16, which TrainingArguments refuses without a GPU: let them parse on CPU."""
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *a, **k: True)


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    """A pretraining dir, a second config, an image processor and a dataset with two configurations (no validation
    split), all on disk."""
    root = tmp_path_factory.mktemp("hub")
    MAEForPreTraining(MAEConfig(**TINY)).save_pretrained(root / "pt")
    MAEConfig(**TINY, layer_norm_eps=1e-5).save_pretrained(root / "other_config")
    BitImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    ).save_pretrained(root / "processor")
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b"])})
    for name, n in (("small", 8), ("large", 20)):
        images = [Image.new("RGB", (20, 20), (12 * i, 255 - 12 * i, 0)) for i in range(n)]
        split = datasets.Dataset.from_dict({"img": images, "fine_label": [i % 2 for i in range(n)]}, features=features)
        split.to_parquet(str(root / "data" / name / "train.parquet"))
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train.parquet\n"
        for name in ("small", "large")
    )
    (root / "data" / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    return root


def _data(local_hub, **kwargs) -> DataArguments:
    return DataArguments(
        dataset_name=str(local_hub / "data"), image_column_name="img", label_column_name="fine_label", **kwargs
    )


def _record(monkeypatch, owner, name: str = "from_pretrained") -> list[dict]:
    """Record the keyword arguments of every call of `owner.name` (a classmethod or a module function), then call it."""
    calls: list[dict] = []
    original = getattr(owner, name)
    if isinstance(owner, type):
        function = original.__func__

        def recorded(cls, *args, **kwargs):
            calls.append(kwargs)
            return function(cls, *args, **kwargs)

        monkeypatch.setattr(owner, name, classmethod(recorded))
    else:

        def recorded(*args, **kwargs):
            calls.append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)
    return calls


# ----------------------------------------------------------------------------------------------------------------------
# An argument file, then flags that win over it
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "types, config, flags, expected",
    [
        (PRETRAIN, "pretrain_mask90.yaml", ["--mask_ratio", "0.6", "--no_norm_pix_loss"],
         {"mask_ratio": 0.6, "norm_pix_loss": False, "num_train_epochs": 500}),
        (DISTILL, "distill_seed_mask75.yaml", ["--teacher_path", "t.pth", "--normalize_features", "--preset", "x"],
         {"teacher_path": "t.pth", "normalize_features": True, "preset": "x", "student_layer": 9}),
        (FINETUNE, "finetune_full.yaml", ["--model_name_or_path", "X", "--finetune_aug", "small"],
         {"model_name_or_path": "X", "finetune_aug": "small", "mixup": 0.8}),
        (LINEAR_PROBE, "linear_probe.yaml", ["--model_name_or_path", "Y", "--dataset_name", "digits", "--bf16", "no"],
         {"model_name_or_path": "Y", "dataset_name": "digits", "bf16": False, "base_learning_rate": 0.1}),
    ],
    ids=["pretrain", "distill", "finetune", "linear_probe"],
)  # fmt: skip
def test_flags_after_an_argument_file_win_over_it(types, config, flags, expected, bf16_anywhere):
    parsed = parse_args(types, [str(CONFIGS / config), *flags])
    values = {key: getattr(args, key) for args in parsed for key in vars(args) if key in expected}
    assert values == expected
    assert parsed[2].output_dir.startswith("outputs/")  # the rest still comes from the file


def test_bool_flags_override_the_file_both_ways(tmp_path):
    on, off = tmp_path / "on.yaml", tmp_path / "off.json"
    on.write_text(f"output_dir: {tmp_path}\nreport_to: none\nnorm_pix_loss: true\nremove_unused_columns: true\n")
    off.write_text(json.dumps({"output_dir": str(tmp_path), "report_to": "none", "norm_pix_loss": False}))
    args = parse_args(PRETRAIN, [str(on)])[2]
    assert args.norm_pix_loss is True and args.remove_unused_columns is True
    args = parse_args(PRETRAIN, [str(on), "--no_norm_pix_loss", "--remove_unused_columns", "false"])[2]
    assert args.norm_pix_loss is False and args.remove_unused_columns is False
    assert parse_args(PRETRAIN, [str(off), "--norm_pix_loss"])[2].norm_pix_loss is True
    assert parse_args(PRETRAIN, [str(off), "--norm-pix-loss", "yes"])[2].norm_pix_loss is True
    assert parse_args(PRETRAIN, ["--output_dir", str(tmp_path)])[2].norm_pix_loss is None  # keep the config's


def test_norm_pix_loss_flag_reaches_the_config_and_wins_over_config_overrides(tmp_path):
    model_args = ModelArguments(preset="demo-tiny-32", config_overrides="norm_pix_loss=true")
    for flag, expected in ((None, True), (False, False)):
        args = MAEPretrainingArguments(output_dir=str(tmp_path), report_to="none", norm_pix_loss=flag)
        assert build_pretraining_config(model_args, args).norm_pix_loss is expected
    args = MAEPretrainingArguments(output_dir=str(tmp_path), report_to="none", norm_pix_loss=True)
    assert build_pretraining_config(ModelArguments(preset="demo-tiny-32"), args).norm_pix_loss is True
    teacher = tmp_path / "teacher"
    MAEForPreTraining(MAEConfig(**{**TINY, "num_hidden_layers": 4})).save_pretrained(teacher)
    dmae = DMAETrainingArguments(
        output_dir=str(tmp_path), report_to="none", teacher_path=str(teacher), norm_pix_loss=False
    )
    assert build_distillation_config(model_args, dmae, teacher_hidden_size=TINY["hidden_size"]).norm_pix_loss is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mask_ration", "0.9"], r"unknown argument\(s\) --mask_ration \(did you mean --mask_ratio\?\)"),
        (["--mask", "0.9"], r"unknown argument\(s\) --mask: no field of ModelArguments"),  # no prefix matching
        (["--linear_probe"], r"unknown argument\(s\) --linear_probe"),  # a fine-tuning flag
        (["second.yaml"], r"unexpected argument\(s\) second.yaml: an argument file must come first"),
    ],
)
def test_unknown_flags_are_errors_naming_them(tmp_path, argv, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path}\nreport_to: none\n")
    with pytest.raises(ValueError, match=message):
        parse_args(PRETRAIN, [str(config), *argv])
    with pytest.raises(ValueError, match=message):
        parse_args(PRETRAIN, ["--output_dir", str(tmp_path), *argv])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be >= 1, got 0"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1, got 0"),
        (["--per_device_eval_batch_size", "-2"], "per_device_eval_batch_size must be >= 1, got -2"),
        (["--weight_decay", "-0.05"], "weight_decay must be >= 0, got -0.05"),
        (["--max_grad_norm", "-1"], "max_grad_norm must be >= 0, got -1.0"),
        (["--max_steps", "0"], "max_steps must be > 0, or -1"),
        (
            ["--num_train_epochs", "-1", "--warmup_epochs", "0"],
            r"num_train_epochs must be > 0 \(or give --max_steps\)",
        ),
        (["--max_train_samples", "0"], "max_train_samples must be >= 1"),
        (["--max_eval_samples", "-5"], "max_eval_samples must be >= 1"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_numbers_transformers_takes_as_they_come_are_checked(tmp_path, flags, message):
    """transformers does not check these: 0 steps of accumulation ends in a ZeroDivisionError, a batch of 0 in
    torch's error about `batch_size`, a negative weight decay is applied, max_steps 0 takes one step."""
    for types in (PRETRAIN, FINETUNE, LINEAR_PROBE):
        with pytest.raises(ValueError, match=message):
            parse_args(types, ["--output_dir", str(tmp_path), "--report_to", "none", *flags])


def test_unknown_keys_in_the_file_are_errors_naming_them(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path}\nmask_ration: 0.9\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown key\(s\) 'mask_ration' \(did you mean mask_ratio\?\)"):
        parse_args(PRETRAIN, [str(config), "--mask_ratio", "0.9"])


def _example(name: str) -> dict:
    """An example script's namespace (its own `main`, run in this process: a subprocess adds ~5 s of imports)."""
    return runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="example")


def test_readme_finetune_command_runs_with_file_and_overrides(tmp_path, local_hub):
    out = tmp_path / "ft"
    _example("run_finetune")["main"]([
        str(CONFIGS / "finetune_full.yaml"), "--model_name_or_path", str(local_hub / "pt"), "--output_dir", str(out),
        "--dataset_name", "digits", "--bf16", "false", "--max_steps", "2", "--per_device_train_batch_size", "16",
        "--max_train_samples", "32", "--max_eval_samples", "16", "--dataloader_num_workers", "0",
        "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--use_cpu", "true",
    ])  # fmt: skip
    assert json.loads((out / "results.json").read_text())["top1"] >= 0
    config = json.loads((out / "config.json").read_text())
    assert config["drop_path_rate"] == 0.1 and len(config["id2label"]) == 10  # the file's recipe, the flags' data


def test_example_script_stops_on_a_typo_with_one_message(tmp_path, caplog):
    from hf_mae.training import run_main

    script = _example("run_pretrain")
    argv = ["--output_dir", str(tmp_path), "--mask_ration", "0.9"]
    with caplog.at_level("ERROR"):
        assert run_main(lambda: script["main"](argv)) == 1
    assert "unknown argument(s) --mask_ration (did you mean --mask_ratio?)" in caplog.text
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------------
# Each flag has its effect
# ----------------------------------------------------------------------------------------------------------------------
def test_dataset_config_name_and_cache_dir_reach_load_dataset(tmp_path, local_hub):
    cache = tmp_path / "cache"
    small = load_data(_data(local_hub, dataset_config_name="small", train_val_split=0), 16)
    large = load_data(_data(local_hub, dataset_config_name="large", train_val_split=0), 16, 0, ModelArguments(cache_dir=str(cache)))  # fmt: skip
    assert (len(small["train"]), len(large["train"])) == (8, 20)
    assert set(large["train"].column_names) == {"image", "label"}
    assert any(cache.rglob("*.arrow"))  # the datasets cache went where --cache_dir said
    with pytest.raises(ValueError, match="dataset_config_name='large' names a configuration"):
        load_data(DataArguments(dataset_name="digits", dataset_config_name="large"), 16)


def test_train_val_split_holds_out_a_fraction_only_without_a_validation_split(local_hub):
    for fraction, sizes in ((0.25, (15, 5)), (0.5, (10, 10))):
        ds = load_data(_data(local_hub, dataset_config_name="large", train_val_split=fraction), 16)
        assert (len(ds["train"]), len(ds["validation"])) == sizes
    assert "validation" not in load_data(_data(local_hub, dataset_config_name="large", train_val_split=0), 16)
    digits = load_data(DataArguments(dataset_name="digits", train_val_split=0.5), 16)
    assert (len(digits["train"]), len(digits["validation"])) == (1437, 360)  # its own split stays
    with pytest.raises(ValueError, match="train_val_split must be in"):
        DataArguments(train_val_split=1.5)


def test_fine_tuning_without_validation_split_says_how_to_get_one(tmp_path, local_hub):
    args = MAEFinetuningArguments(output_dir=str(tmp_path), report_to="none", max_steps=1, use_cpu=True)
    with pytest.raises(ValueError, match="needs a validation split.*train_val_split"):
        run_finetuning(
            ModelArguments(model_name_or_path=str(local_hub / "pt")),
            _data(local_hub, dataset_config_name="large", train_val_split=0),
            args,
        )


def test_config_name_wins_over_the_model_config_and_the_preset(local_hub):
    other = str(local_hub / "other_config")
    assert load_config(MAEConfig, ModelArguments(config_name=other), {}).layer_norm_eps == 1e-5
    both = ModelArguments(config_name=other, model_name_or_path=str(local_hub / "pt"))
    assert load_config(MAEConfig, both, {"mask_ratio": 0.5}).layer_norm_eps == 1e-5
    assert load_config(MAEConfig, ModelArguments(model_name_or_path=str(local_hub / "pt")), {}).layer_norm_eps == 1e-6


def test_image_processor_name_preprocesses_normalises_and_is_checked(local_hub):
    processor, transform = build_eval_preprocessing(
        ModelArguments(image_processor_name=str(local_hub / "processor")), 16, 0.875
    )
    assert image_statistics(processor) == ([0.5] * 3, [0.25] * 3)
    white = transform(Image.new("RGB", (40, 30), (255, 255, 255)))
    assert white.shape == (3, 16, 16) and white.max().item() == pytest.approx(2.0)  # (1 - 0.5) / 0.25
    with pytest.raises(ValueError, match=r"processor: its images are 16x16, the model takes 32x32"):
        build_eval_preprocessing(ModelArguments(image_processor_name=str(local_hub / "processor")), 32, 0.875)


def test_trust_remote_code_lets_a_custom_image_processor_load(tmp_path, local_hub, monkeypatch, caplog):
    remote = tmp_path / "remote_processor"
    AutoImageProcessor.from_pretrained(local_hub / "processor").save_pretrained(remote)
    (remote / "shouting.py").write_text(
        "from transformers import BitImageProcessor\n\n\nclass ShoutingProcessor(BitImageProcessor):\n    pass\n"
    )
    config = json.loads((remote / "preprocessor_config.json").read_text())
    config.update(
        auto_map={"AutoImageProcessor": "shouting.ShoutingProcessor"}, image_processor_type="ShoutingProcessor"
    )
    (remote / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_eval_preprocessing(ModelArguments(image_processor_name=str(remote)), 16, 0.875)
    processor, _ = build_eval_preprocessing(
        ModelArguments(image_processor_name=str(remote), trust_remote_code=True), 16, 0.875
    )
    assert type(processor).__name__ == "ShoutingProcessor"
    calls = _record(monkeypatch, datasets, "load_dataset")
    with caplog.at_level("ERROR"):
        load_data(_data(local_hub, dataset_config_name="small"), 16, 0, ModelArguments(trust_remote_code=True))
    # datasets >= 4 runs no loading script and logs an error for the argument: it goes only to those that do
    assert "trust_remote_code" not in calls[-1] and not caplog.records
    monkeypatch.setattr(datasets, "__version__", "3.6.0")
    load_data(_data(local_hub, dataset_config_name="small"), 16, 0, ModelArguments(trust_remote_code=True))
    assert calls[-1]["trust_remote_code"] is True


def test_hub_flags_reach_every_from_pretrained_and_load_dataset(tmp_path, local_hub, monkeypatch):
    calls = {
        "config": _record(monkeypatch, MAEConfig),
        "model": _record(monkeypatch, MAEForImageClassification),
        "processor": _record(monkeypatch, AutoImageProcessor),
        "dataset": _record(monkeypatch, datasets, "load_dataset"),
    }
    model_args = ModelArguments(
        model_name_or_path=str(local_hub / "pt"), config_name=str(local_hub / "other_config"),
        image_processor_name=str(local_hub / "processor"), cache_dir=str(tmp_path / "cache"), model_revision="v2",
        token="hf_not_a_token",
    )  # fmt: skip
    args = MAEFinetuningArguments(
        output_dir=str(tmp_path / "ft"), report_to="none", max_steps=1, per_device_train_batch_size=4,
        finetune_aug="small", save_strategy="no", eval_strategy="no", disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    run_finetuning(model_args, _data(local_hub, dataset_config_name="large", train_val_split=0.25), args)
    hub = {"cache_dir": str(tmp_path / "cache"), "revision": "v2", "token": "hf_not_a_token"}
    for kind in ("config", "model", "processor"):
        assert calls[kind] and all(hub.items() <= call.items() for call in calls[kind]), (kind, calls[kind])
    dataset = calls["dataset"][-1]
    assert dataset["token"] == "hf_not_a_token" and dataset["cache_dir"] == hub["cache_dir"]
    out = tmp_path / "ft"
    assert json.loads((out / "config.json").read_text())["layer_norm_eps"] == 1e-5  # --config_name's
    assert json.loads((out / "preprocessor_config.json").read_text())["image_std"] == [0.25] * 3  # the processor's
    assert len(json.loads((out / "config.json").read_text())["id2label"]) == 2
