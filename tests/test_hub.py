"""HF integration: Auto classes, save/load, push_to_hub, strict loading (remote code: test_auto.py)."""

import json
import os
from unittest import mock

import pytest
import torch
from helpers import TINY as HELPER_TINY
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from hf_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel

TINY = {**HELPER_TINY, "norm_pix_loss": True}


@pytest.fixture
def pretrained_dir(tmp_path):
    torch.manual_seed(0)
    model = MAEForPreTraining(MAEConfig(**TINY))
    model.save_pretrained(tmp_path / "mae")
    return tmp_path / "mae", model


def test_save_writes_safetensors_card_and_code(pretrained_dir):
    path, _ = pretrained_dir
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "README.md", "modeling_mae.py", "configuration_mae.py"} <= files
    assert "preprocessor_config.json" in files
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "hf_mae"
    assert config["auto_map"]["AutoModelForPreTraining"] == "modeling_mae.MAEForPreTraining"
    assert config["auto_map"]["AutoModel"] == "modeling_mae.MAEModel"  # the README's remote-code line
    card = (path / "README.md").read_text()
    assert "library_name: transformers" in card and "mask ratio" in card


def test_auto_classes_round_trip(pretrained_dir):
    path, model = pretrained_dir
    assert isinstance(AutoConfig.from_pretrained(path), MAEConfig)
    reloaded = AutoModelForPreTraining.from_pretrained(path)
    assert isinstance(reloaded, MAEForPreTraining)
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    assert torch.allclose(model.eval()(x, noise=noise).loss, reloaded.eval()(x, noise=noise).loss)
    encoder = AutoModel.from_pretrained(path)
    assert isinstance(encoder, MAEModel)
    assert torch.allclose(encoder(x, noise=noise).last_hidden_state, model.mae(x, noise=noise).last_hidden_state)
    assert torch.allclose(encoder(x).last_hidden_state, model.mae(x).last_hidden_state)


def test_classifier_from_pretraining_checkpoint(pretrained_dir, caplog):
    path, model = pretrained_dir
    with caplog.at_level("INFO", logger="hf_mae.modeling_mae"):
        clf = AutoModelForImageClassification.from_pretrained(path, num_labels=4)
    assert isinstance(clf, MAEForImageClassification)
    assert torch.equal(clf.mae.blocks[1].mlp.fc2.weight, model.mae.blocks[1].mlp.fc2.weight)
    assert any("dropped" in r.message and "decoder" in r.message for r in caplog.records)
    assert clf(torch.randn(2, 3, 16, 16)).logits.shape == (2, 4)


def test_a_new_linear_probe_head_starts_with_a_zero_batch_count(pretrained_dir):
    """BatchNorm's num_batches_tracked is a buffer the checkpoint lacks: it must be initialised, not left as the
    memory it was allocated in (it is saved with every checkpoint)."""
    path, _ = pretrained_dir
    for _ in range(5):  # the allocator hands back different memory; before the fix some of it was never zero
        model = MAEForImageClassification.from_pretrained(path, num_labels=3, head_type="linear_probe")
        assert model.classifier[0].num_batches_tracked.item() == 0


def test_strict_loading_rejects_unexpected_and_missing(tmp_path):
    from safetensors.torch import load_file, save_file

    model = MAEForPreTraining(MAEConfig(**TINY))
    model.save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights["mae.blocks.0.attn.extra"] = torch.zeros(3)
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected keys: mae\.blocks\.0\.attn\.extra"):
        MAEForPreTraining.from_pretrained(tmp_path / "m")
    del weights["mae.blocks.0.attn.extra"], weights["decoder.pred.weight"]
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys: decoder\.pred\.weight"):
        MAEForPreTraining.from_pretrained(tmp_path / "m")
    partial = MAEForPreTraining.from_pretrained(tmp_path / "m", strict=False)
    assert isinstance(partial, MAEForPreTraining)


def test_classifier_saved_with_fc_norm_outside_the_encoder_still_loads(tmp_path):
    """Directories written before `fc_norm` moved into the encoder (key `fc_norm.*`, no `use_fc_norm` in the
    config) load into the classifier and, as its encoder, into AutoModel."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = MAEForImageClassification(MAEConfig(**TINY, num_labels=3)).eval()
    with torch.no_grad():
        model.mae.fc_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "old")
    weights = load_file(tmp_path / "old" / "model.safetensors")
    for name in ("weight", "bias"):
        weights[f"fc_norm.{name}"] = weights.pop(f"mae.fc_norm.{name}")
    save_file(weights, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["use_fc_norm"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    x = torch.randn(2, 3, 16, 16)
    old = AutoModelForImageClassification.from_pretrained(tmp_path / "old").eval()
    assert torch.equal(old(x).logits, model(x).logits)
    encoder = AutoModel.from_pretrained(tmp_path / "old").eval()
    assert torch.allclose(encoder(x).pooler_output, model.mae(x).pooler_output)


def test_push_to_hub_uploads_config_weights_and_card(tmp_path):
    from huggingface_hub import HfApi

    model = MAEForPreTraining(MAEConfig(**TINY))
    uploaded = {}

    def fake_create_commit(self, repo_id, operations, *args, **kwargs):
        for op in operations:
            content = op.path_or_fileobj
            uploaded[op.path_in_repo] = content.read() if hasattr(content, "read") else open(content, "rb").read()
        return mock.MagicMock(commit_url="https://huggingface.co/fake/commit", oid="0" * 40)

    with (
        mock.patch.object(HfApi, "create_repo", return_value=mock.MagicMock(repo_id="user/tiny-mae")),
        mock.patch.object(HfApi, "create_commit", fake_create_commit),
    ):
        model.push_to_hub("user/tiny-mae", token="hf_fake")
    assert {"config.json", "model.safetensors", "README.md", "modeling_mae.py", "preprocessor_config.json"} <= set(
        uploaded
    )
    assert json.loads(uploaded["config.json"])["model_type"] == "hf_mae"
    assert b"hf_mae" in uploaded["README.md"]
