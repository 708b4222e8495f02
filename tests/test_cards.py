"""Model cards are built with huggingface_hub (`ModelCard` / `ModelCardData` / `EvalResult`) and say what each run
did: read back with `ModelCard.load`, their metadata and body are checked."""

import json

import pytest
from helpers import TINY
from huggingface_hub import ModelCard

from hf_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel
from hf_mae.configuration_dmae import DMAEConfig
from hf_mae.modeling_dmae import DMAEForPreTraining
from hf_mae.training import (
    DataArguments,
    DMAETrainer,
    DMAETrainingArguments,
    MAEFinetuningArguments,
    MAELinearProbeArguments,
    MAEPretrainingArguments,
    MAETrainer,
    ModelArguments,
    run_finetuning,
    run_pretraining,
)

COMMON = dict(
    report_to="none", disable_tqdm=True, per_device_train_batch_size=16, max_steps=2, warmup_steps=0,
    save_strategy="no", eval_strategy="no", use_cpu=True,
)  # fmt: skip
DIGITS = dict(dataset_name="digits", max_train_samples=32, max_eval_samples=16)
FULL_AUG_WORDS = ("mixup", "cutmix", "label_smoothing", "random_erasing")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretraining run, a full-augmentation fine-tuning of it, a small-augmentation scratch baseline and a linear
    probe, all on digits for two steps."""
    root = tmp_path_factory.mktemp("cards")
    model_args = ModelArguments(preset="demo-tiny-32")
    run_pretraining(
        model_args,
        DataArguments(**DIGITS, num_reconstructions=0),
        MAEPretrainingArguments(output_dir=str(root / "pt"), **COMMON),
    )
    pretrained = ModelArguments(model_name_or_path=str(root / "pt"))
    run_finetuning(pretrained, DataArguments(**DIGITS), MAEFinetuningArguments(output_dir=str(root / "ft"), **COMMON))
    run_finetuning(
        model_args,
        DataArguments(**DIGITS),
        MAEFinetuningArguments(output_dir=str(root / "scratch"), finetune_aug="small", **COMMON),
    )
    run_finetuning(pretrained, DataArguments(**DIGITS), MAELinearProbeArguments(output_dir=str(root / "lp"), **COMMON))
    return root


def _card(path) -> ModelCard:
    return ModelCard.load(path / "README.md")


def test_save_pretrained_card_states_only_what_the_config_shows(tmp_path):
    MAEForPreTraining(MAEConfig(**TINY, norm_pix_loss=True)).save_pretrained(tmp_path / "pt")
    MAEForImageClassification(MAEConfig(**TINY, num_labels=3)).save_pretrained(tmp_path / "clf")
    MAEModel(MAEConfig(**TINY)).save_pretrained(tmp_path / "enc")
    pt, clf, enc = (_card(tmp_path / name) for name in ("pt", "clf", "enc"))
    assert pt.data.library_name == "transformers" and pt.data.pipeline_tag == "image-feature-extraction"
    assert {"mae", "masked-autoencoder", "self-supervised"} <= set(pt.data.tags)
    assert "| mask ratio | 0.75 |" in pt.text and "| norm_pix_loss | True |" in pt.text
    assert "AutoModelForPreTraining.from_pretrained" in pt.text
    assert clf.data.pipeline_tag == "image-classification" and "mae" not in clf.data.tags
    assert "Masked Autoencoder" not in clf.text and "mask ratio" not in clf.text
    assert "| head | mean pooling, linear head, 3 classes |" in clf.text
    assert "AutoModelForImageClassification.from_pretrained" in clf.text
    assert "a ViT encoder" in enc.text and "AutoModel.from_pretrained" in enc.text


def test_pretraining_card(runs):
    card = _card(runs / "pt")
    results = json.loads((runs / "pt" / "all_results.json").read_text())
    assert card.data.model_name == "pt" and card.text.lstrip().startswith("# pt")
    assert "Masked Autoencoder (MAE) pretraining on scikit-learn digits" in card.text
    assert "from a random initialisation" in card.text
    assert card.data.eval_results is None and card.data.datasets is None  # digits: no Hub id, no accuracy
    assert f"| eval_loss | {results['eval_loss']:.6g} |" in card.text
    assert "| pretrain_aug | standard |" in card.text and "finetune_aug" not in card.text


def test_fine_tuning_card_names_its_base_and_has_model_index(runs):
    card = _card(runs / "ft")
    results = json.loads((runs / "ft" / "all_results.json").read_text())
    assert f"fine-tuned on scikit-learn digits (8x8, upscaled) from `{runs / 'pt'}`" in card.text
    assert card.data.base_model is None  # a local directory: in the text only (the Hub refuses it as base_model)
    accuracy = {r.metric_type: r for r in card.data.eval_results}
    assert set(accuracy) == {"accuracy", "top5_accuracy"}
    top1 = accuracy["accuracy"]
    assert (top1.task_type, top1.dataset_split, top1.metric_value) == ("image-classification", "validation", results["top1"])  # fmt: skip
    assert "model-index" in card.content and card.data.model_name == "ft"
    for word in ("mixup", "cutmix", "label_smoothing", "random_erasing"):
        assert f"| {word} |" in card.text  # the full augmentation's knobs


def test_scratch_small_aug_card_claims_no_pretraining_and_no_full_aug(runs):
    card = _card(runs / "scratch")
    assert "trained from scratch on scikit-learn digits" in card.text and "no pretraining" in card.text
    assert "Masked Autoencoder" not in card.text and "MAE pretraining" not in card.text
    assert card.data.base_model is None and not {"mae", "self-supervised"} & set(card.data.tags)
    assert "| finetune_aug | small |" in card.text
    assert not any(f"| {word} |" in card.text for word in FULL_AUG_WORDS)


def test_linear_probe_card(runs):
    card = _card(runs / "lp")
    assert f"Linear probe on scikit-learn digits (8x8, upscaled): a BatchNorm + linear head trained on the frozen encoder of `{runs / 'pt'}`" in card.text  # fmt: skip
    assert "| drop_path_rate | 0 |" in card.text and not any(f"| {word} |" in card.text for word in FULL_AUG_WORDS)
    assert "| head | cls pooling, linear_probe head, 10 classes |" in card.text
    # --linear_probe on the fine-tuning arguments runs (and so reports) the probe's small augmentation, no drop path
    args = MAEFinetuningArguments(output_dir=str(runs / "x"), report_to="none", linear_probe=True)
    assert (args.finetune_aug, args.drop_path_rate) == ("small", 0.0)


def test_create_model_card_honours_transformers_arguments(tmp_path):
    model = MAEForImageClassification(MAEConfig(**TINY, num_labels=3))
    args = MAEFinetuningArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = MAETrainer(model=model, args=args)
    (tmp_path / "all_results.json").write_text(json.dumps({"top1": 61.5, "top3": 90.0, "eval_loss": 0.9}))
    trainer.create_model_card(
        model_name="mae-pets", language="en", license="apache-2.0", tags=["pets", "vision"],
        finetuned_from="someone/mae-vit-b8", tasks="image-classification", dataset_tags="someone/pets",
        dataset="Oxford pets", dataset_args="v2",
    )  # fmt: skip
    card = _card(tmp_path)
    data = card.data
    assert (data.model_name, data.language, data.license) == ("mae-pets", "en", "apache-2.0")
    assert data.base_model == "someone/mae-vit-b8" and data.datasets == ["someone/pets"]
    assert {"pets", "vision", "hf_mae"} <= set(data.tags)
    assert card.text.lstrip().startswith("# mae-pets")
    assert "fine-tuned on Oxford pets from `someone/mae-vit-b8`" in card.text
    top = {r.metric_type: r for r in data.eval_results}
    assert set(top) == {"accuracy", "top3_accuracy"} and top["top3_accuracy"].metric_value == 90.0
    entry = top["accuracy"]
    assert (entry.dataset_type, entry.dataset_name, entry.dataset_config) == ("someone/pets", "Oxford pets", "v2")
    assert entry.task_type == "image-classification" and entry.metric_value == 61.5
    trainer.create_model_card(model_name="renamed")  # what push_to_hub does: the other arguments stay
    card = _card(tmp_path)
    assert card.data.model_name == "renamed" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["someone/pets"] and card.data.base_model == "someone/mae-vit-b8"


def test_fine_tune_inherits_the_license_of_a_local_base_card(tmp_path):
    base = MAEForPreTraining(MAEConfig(**TINY))
    base.save_pretrained(tmp_path / "pt")
    card = _card(tmp_path / "pt")
    card.data.license = "cc-by-nc-4.0"
    card.save(tmp_path / "pt" / "README.md")
    model = MAEForImageClassification.from_pretrained(tmp_path / "pt", num_labels=2)
    args = MAEFinetuningArguments(output_dir=str(tmp_path / "ft"), report_to="none", use_cpu=True)
    MAETrainer(model=model, args=args).create_model_card()
    assert _card(tmp_path / "ft").data.license == "cc-by-nc-4.0"


def test_dmae_card_adds_its_distillation_section(tmp_path):
    teacher = MAEModel(MAEConfig(image_size=48, patch_size=8, hidden_size=48, num_hidden_layers=4, num_attention_heads=4))  # fmt: skip
    student = DMAEForPreTraining(DMAEConfig(**{**TINY, "num_hidden_layers": 4}, teacher_hidden_size=48))
    args = DMAETrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    DMAETrainer(model=student, args=args, teacher=teacher).create_model_card()
    card = _card(tmp_path)
    assert "## Distillation" in card.text and "| teacher_layer | 3 of 4 |" in card.text
    assert "DMAE) pretraining (pixel reconstruction + feature distillation from a frozen teacher)" in card.text
    assert "## Training recipe" in card.text and card.data.library_name == "transformers"
