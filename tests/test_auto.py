"""Every HF convention on a saved directory: each Auto class that fits (also without hf_mae, through remote code),
deterministic whole-image features and pooled features, the image processor every directory carries."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import TINY as HELPER_TINY
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, BitImageProcessor, pipeline

from hf_mae import DMAEConfig, DMAEForPreTraining, MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel
from hf_mae.data import build_image_processor

# 32 px / patch 4: 64 patches, so the encoder's output has 65 tokens (as the seed's 64 px / patch 8)
TINY = {**HELPER_TINY, "image_size": 32, "norm_pix_loss": True}
TOKENS = 1 + (32 // 4) ** 2
LABELS = {0: "cat", 1: "dog", 2: "owl"}
MAE_FILE = "modeling_mae"
EXPECTED_AUTO_MAP = {
    "pretrain": {
        "AutoConfig": "configuration_mae.MAEConfig",
        "AutoModel": f"{MAE_FILE}.MAEModel",
        "AutoModelForPreTraining": f"{MAE_FILE}.MAEForPreTraining",
        "AutoModelForImageClassification": f"{MAE_FILE}.MAEForImageClassification",
    },
    "finetuned": {
        "AutoConfig": "configuration_mae.MAEConfig",
        "AutoModel": f"{MAE_FILE}.MAEModel",
        "AutoModelForImageClassification": f"{MAE_FILE}.MAEForImageClassification",
    },
    "encoder": {
        "AutoConfig": "configuration_mae.MAEConfig",
        "AutoModel": f"{MAE_FILE}.MAEModel",
        "AutoModelForImageClassification": f"{MAE_FILE}.MAEForImageClassification",
    },
    "dmae": {
        "AutoConfig": "configuration_dmae.DMAEConfig",
        "AutoModel": "modeling_dmae.DMAEModel",
        "AutoModelForPreTraining": "modeling_dmae.DMAEForPreTraining",
    },
}


def _randomize_norms(model: torch.nn.Module) -> None:
    """LayerNorms start at 1 / 0; move them so a pooled feature that skips or doubles a norm shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """One directory of each kind the library writes, and the models that wrote them."""
    root = tmp_path_factory.mktemp("auto")
    torch.manual_seed(0)
    pretrain = MAEForPreTraining(MAEConfig(**TINY)).eval()
    _randomize_norms(pretrain)
    pretrain.save_pretrained(root / "pretrain")
    finetuned = MAEForImageClassification.from_pretrained(root / "pretrain", id2label=LABELS).eval()
    _randomize_norms(finetuned)
    with torch.no_grad():
        finetuned.classifier.weight.normal_(std=0.5)
    finetuned.save_pretrained(root / "finetuned")
    pretrain.mae.save_pretrained(root / "encoder")
    dmae = DMAEForPreTraining(DMAEConfig(**TINY, teacher_hidden_size=48)).eval()
    dmae.save_pretrained(root / "dmae")
    models = {"pretrain": pretrain, "finetuned": finetuned, "encoder": pretrain.mae, "dmae": dmae}
    return root, models


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8))


def test_auto_map_lists_every_class_that_fits_and_ships_its_code(dirs):
    root, _ = dirs
    for kind, expected in EXPECTED_AUTO_MAP.items():
        auto_map = json.loads((root / kind / "config.json").read_text())["auto_map"]
        # the fine-tuned config came from the pretraining one: its AutoModelForPreTraining entry must not survive
        assert auto_map == expected, kind
        for reference in auto_map.values():
            assert (root / kind / f"{reference.split('.')[0]}.py").is_file(), (kind, reference)


def test_every_auto_class_loads_without_hf_mae(dirs, tmp_path):
    """In a process where `import hf_mae` fails and the tree is not on the path: trust_remote_code only."""
    root, models = dirs
    torch.manual_seed(1)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        expected = {
            "pretrain_features": models["pretrain"].mae(x).last_hidden_state,
            "pretrain_loss": models["pretrain"](x, noise=noise).loss,
            "finetuned_logits": models["finetuned"](x).logits,
            "dmae_features": models["dmae"].mae(x).last_hidden_state,
            "dmae_projector": models["dmae"].projector.weight,
        }
    torch.save({"x": x, "noise": noise, **expected}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_mae"] = None  # any `import hf_mae` fails: an environment without it
        import json
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining, pipeline

        root = {str(root)!r}
        data = torch.load({str(tmp_path / "inputs.pt")!r})
        x = data["x"]
        results = {{}}

        def load(auto, kind):
            model = auto.from_pretrained(f"{{root}}/{{kind}}", trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            return model

        def close(a, b):
            return a.shape == b.shape and torch.allclose(a, b, atol=1e-5)

        with torch.no_grad():
            encoder = load(AutoModel, "pretrain")
            results["pretrain/AutoModel"] = [type(encoder).__name__, close(encoder(x).last_hidden_state,
                                                                           data["pretrain_features"])]
            model = load(AutoModelForPreTraining, "pretrain")
            loss = model(x, noise=data["noise"]).loss
            results["pretrain/AutoModelForPreTraining"] = [type(model).__name__, close(loss, data["pretrain_loss"])]
            model = load(AutoModelForImageClassification, "pretrain")
            results["pretrain/AutoModelForImageClassification"] = [type(model).__name__, model(x).logits.shape[1] == 2]
            encoder = load(AutoModel, "finetuned")
            classifier = load(AutoModelForImageClassification, "finetuned")
            pooled = classifier.classifier(encoder(x).pooler_output)
            results["finetuned/AutoModel"] = [type(encoder).__name__, close(pooled, data["finetuned_logits"])]
            results["finetuned/AutoModelForImageClassification"] = [
                type(classifier).__name__, close(classifier(x).logits, data["finetuned_logits"])
            ]
            encoder = load(AutoModel, "dmae")
            results["dmae/AutoModel"] = [type(encoder).__name__, close(encoder(x).last_hidden_state,
                                                                       data["dmae_features"])]
            student = load(AutoModelForPreTraining, "dmae")
            same = close(student.mae(x).last_hidden_state, data["dmae_features"])
            results["dmae/AutoModelForPreTraining"] = [
                type(student).__name__, same and close(student.projector.weight, data["dmae_projector"])
            ]
        features = pipeline("image-feature-extraction", model=f"{{root}}/pretrain", trust_remote_code=True)
        results["pipeline"] = [len(features(Image.new("RGB", (50, 40)))[0]), True]
        print("RESULTS" + json.dumps(results))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # hf_mae must not be importable at all
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.split("RESULTS")[1])
    assert results == {
        "pretrain/AutoModel": ["MAEModel", True],
        "pretrain/AutoModelForPreTraining": ["MAEForPreTraining", True],
        "pretrain/AutoModelForImageClassification": ["MAEForImageClassification", True],
        "finetuned/AutoModel": ["MAEModel", True],
        "finetuned/AutoModelForImageClassification": ["MAEForImageClassification", True],
        "dmae/AutoModel": ["DMAEModel", True],
        "dmae/AutoModelForPreTraining": ["DMAEForPreTraining", True],
        "pipeline": [TOKENS, True],
    }
    # the remote classifier on a pretraining directory says its head is random, naming the directory
    assert f"{root / 'pretrain'} holds no classification head" in result.stderr


def test_feature_extraction_pipeline_is_whole_and_deterministic(dirs):
    root, models = dirs
    # the processor is given here so this checks the model alone (the saved one: test_every_saved_dir_carries_...)
    extractor = pipeline(
        "image-feature-extraction",
        model=str(root / "pretrain"),
        image_processor=build_image_processor(32),
        device="cpu",
    )
    first, second = torch.tensor(extractor(image())), torch.tensor(extractor(image()))
    assert first.shape == (1, TOKENS, 32)  # every patch + cls, not the 1 + 16 a 75 % mask leaves
    assert torch.equal(first, second)
    pixels = extractor.image_processor(image(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = models["pretrain"].mae(pixels)
    assert torch.allclose(first, expected.last_hidden_state, atol=1e-5)
    # pool=True: the pretraining encoder's pooled feature is its final-normed cls token (MAE's linear probe)
    pooled = torch.tensor(extractor(image(), pool=True))
    assert torch.allclose(pooled, expected.last_hidden_state[:, 0], atol=1e-5)


def test_finetuned_dir_as_automodel_gives_the_recipe_feature(dirs):
    root, models = dirs
    encoder = AutoModel.from_pretrained(root / "finetuned").eval()
    assert isinstance(encoder, MAEModel) and encoder.fc_norm is not None
    assert isinstance(encoder.norm, torch.nn.Identity)  # MAE's fine-tuned ViT has no final norm
    x = torch.randn(2, 3, 32, 32)
    finetuned = models["finetuned"]
    with torch.no_grad():
        out = encoder(x)
        assert torch.allclose(finetuned.classifier(out.pooler_output), finetuned(x).logits, atol=1e-5)
        # ... which is fc_norm of the mean patch token, not the cls token
        assert torch.allclose(out.pooler_output, finetuned.mae.fc_norm(out.last_hidden_state[:, 1:].mean(1)))
    extractor = pipeline("image-feature-extraction", model=str(root / "finetuned"), device="cpu")
    pixels = extractor.image_processor(image(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = finetuned.mae(pixels).pooler_output
    assert torch.allclose(torch.tensor(extractor(image(), pool=True)), expected, atol=1e-5)


def test_classification_pipeline_warns_on_a_random_head(dirs, caplog):
    root, _ = dirs
    with caplog.at_level(logging.WARNING, logger="hf_mae.modeling_mae"):
        classifier = pipeline(
            "image-classification",
            model=str(root / "pretrain"),
            image_processor=build_image_processor(32),
            device="cpu",
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(root / "pretrain") in m and "random" in m for m in warnings), warnings
    assert len(classifier(image())) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_mae.modeling_mae"):
        classifier = pipeline("image-classification", model=str(root / "finetuned"), device="cpu")
    assert not [r for r in caplog.records if "classification head" in r.getMessage()]
    assert {p["label"] for p in classifier(image())} == set(LABELS.values())


def test_every_saved_dir_carries_an_image_processor(dirs, tmp_path):
    root, _ = dirs
    # a bare save after building from a preset, as a user would do first
    MAEForPreTraining(MAEConfig.from_preset("demo-tiny-32")).save_pretrained(tmp_path / "preset")
    for path, size in [*((root / kind, 32) for kind in EXPECTED_AUTO_MAP), (tmp_path / "preset", 32)]:
        processor = AutoImageProcessor.from_pretrained(path)
        # transformers' own class: loads without hf_mae, resize to size / 0.875 then center crop, as evaluation
        assert type(processor).__name__.startswith("BitImageProcessor"), path
        assert processor.crop_size == {"height": size, "width": size}
        assert processor.size == {"shortest_edge": int(size / 0.875)}
        task = "image-classification" if path.name == "finetuned" else "image-feature-extraction"
        assert pipeline(task, model=str(path), device="cpu")(image()) is not None


def test_save_keeps_a_matching_processor_and_replaces_a_stale_one(tmp_path, caplog):
    model = MAEModel(MAEConfig(**TINY))
    build_image_processor(32, crop_pct=1.0).save_pretrained(tmp_path / "run")  # a run with its own crop_pct
    model.save_pretrained(tmp_path / "run")
    assert BitImageProcessor.from_pretrained(tmp_path / "run").size == {"shortest_edge": 32}
    build_image_processor(224).save_pretrained(tmp_path / "stale")
    with caplog.at_level(logging.WARNING, logger="hf_mae.modeling_mae"):
        model.save_pretrained(tmp_path / "stale")
    assert BitImageProcessor.from_pretrained(tmp_path / "stale").crop_size == {"height": 32, "width": 32}
    assert any("replacing preprocessor_config.json" in r.getMessage() for r in caplog.records)
    # hf_mae's preprocessing is RGB: a model on other channel counts says it saves none, rather than a wrong one
    with caplog.at_level(logging.WARNING, logger="hf_mae.modeling_mae"):
        MAEModel(MAEConfig(**TINY, num_channels=1)).save_pretrained(tmp_path / "gray")
    assert not (tmp_path / "gray" / "preprocessor_config.json").exists()
    assert any("no image processor saved" in r.getMessage() for r in caplog.records)


def test_automodel_on_classifier_head_keys_only_drops_the_head(dirs, caplog):
    """The encoder of a fine-tuned directory loads strictly: only the classifier is dropped, logged."""
    root, _ = dirs
    with caplog.at_level(logging.INFO, logger="hf_mae.modeling_mae"):
        AutoModel.from_pretrained(root / "finetuned")
    assert any("dropped" in r.getMessage() and "classifier" in r.getMessage() for r in caplog.records)
    assert isinstance(AutoModelForImageClassification.from_pretrained(root / "finetuned"), MAEForImageClassification)


def test_encoder_dir_starts_a_classifier(dirs):
    """A bare encoder's directory (keys without the `mae.` prefix) lists AutoModelForImageClassification: a mean-pooling
    classifier drops its final norm (as from a pretraining directory), a cls-pooling one loads it."""
    root, models = dirs
    for pooling in ("mean", "cls"):
        classifier = AutoModelForImageClassification.from_pretrained(root / "encoder", num_labels=3, pooling=pooling)
        assert isinstance(classifier, MAEForImageClassification)
        assert torch.equal(classifier.mae.blocks[-1].mlp.fc2.weight, models["encoder"].blocks[-1].mlp.fc2.weight)
    assert torch.equal(classifier.mae.norm.weight, models["encoder"].norm.weight)
