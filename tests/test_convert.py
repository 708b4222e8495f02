"""hf_mae.convert: the CLI end to end, file formats, config inference, and the errors for what cannot be converted."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from hf_mae import (  # noqa: E402
    DMAEConfig,
    DMAEForPreTraining,
    MAEConfig,
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
)
from hf_mae.convert import (  # noqa: E402
    convert_official_checkpoint,
    convert_timm_state_dict,
    convert_transformers_model,
    load_checkpoint_file,
    load_encoder,
    to_official_state_dict,
    to_timm_state_dict,
)
from hf_mae.convert.__main__ import main  # noqa: E402
from hf_mae.image_processing_mae import build_image_processor  # noqa: E402
from hf_mae.modeling_mae import interpolate_pos_embed  # noqa: E402
from hf_mae.training import load_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    image_size=32,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
)
# what the CLI must be told for TINY: the weights cannot say how many heads there are
HEAD_FLAGS = ["--num_attention_heads", "4", "--decoder_num_attention_heads", "2"]


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=g))
    return module.eval()


def official_pretrain_state_dict(seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """Official-named weights of a random tiny MAE (the official layout itself is checked in test_parity.py)."""
    return to_official_state_dict(randomize_(MAEForPreTraining(MAEConfig(**{**TINY, **overrides})), seed))


def timm_vit(**kwargs) -> VisionTransformer:
    spec = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=0) | kwargs
    return randomize_(VisionTransformer(**spec))


def pixels_and_noise(num_patches: int = 64, size: int = 32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, size, size, generator=g), torch.rand(2, num_patches, generator=g)


def assert_same_outputs(a: nn.Module, b: nn.Module, size: int = 32) -> None:
    pixels, noise = pixels_and_noise((size // 4) ** 2, size)
    with torch.no_grad():
        out_a, out_b = a(pixels, noise=noise), b(pixels, noise=noise)
    torch.testing.assert_close(out_a.logits, out_b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_a.loss, out_b.loss, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# --source
# ----------------------------------------------------------------------------------------------------------------------
def test_cli_official_training_checkpoint_with_args(tmp_path):
    sd = official_pretrain_state_dict()
    train_args = argparse.Namespace(model="mae_vit_tiny", norm_pix_loss=True, mask_ratio=0.6, input_size=32, lr=None)
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": sd, "args": train_args, "epoch": 799}, path)
    # the official training checkpoint loads under weights_only, its args allowed
    assert load_checkpoint_file(path)[1] == train_args

    assert main(["--source", "official", str(path), str(tmp_path / "out"), *HEAD_FLAGS]) == 0
    model = AutoModelForPreTraining.from_pretrained(tmp_path / "out")
    assert isinstance(model, MAEForPreTraining)
    assert model.config.norm_pix_loss is True and model.config.mask_ratio == 0.6  # read from args
    assert (model.config.num_attention_heads, model.config.decoder_num_attention_heads) == (4, 2)
    assert_same_outputs(model, convert_official_checkpoint(sd, **dict(TINY, norm_pix_loss=True, mask_ratio=0.6)))
    # flags beat the checkpoint's args
    assert main(["--source", "official", str(path), str(tmp_path / "o2"), *HEAD_FLAGS, "--mask_ratio", "0.5"]) == 0
    assert MAEForPreTraining.from_pretrained(tmp_path / "o2").config.mask_ratio == 0.5


def test_cli_official_finetuned_checkpoint(tmp_path):
    vit = timm_vit(global_pool="avg", fc_norm=True, num_classes=10)  # models_vit.py with global_pool
    torch.save({"model": vit.state_dict()}, tmp_path / "finetuned.pth")
    assert main(["--source", "official", str(tmp_path / "finetuned.pth"), str(tmp_path / "out"), *HEAD_FLAGS]) == 0
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert isinstance(model, MAEForImageClassification)
    assert (model.config.num_labels, model.config.pooling, model.config.head_type) == (10, "mean", "linear")
    pixels, _ = pixels_and_noise()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, vit(pixels), atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_cli_timm_state_dict(tmp_path, suffix):
    vit = timm_vit()
    path = tmp_path / f"vit{suffix}"
    save_file(vit.state_dict(), path) if suffix == ".safetensors" else torch.save(vit.state_dict(), path)
    assert main(["--source", "timm", str(path), str(tmp_path / "out"), "--num_attention_heads", "4"]) == 0
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert isinstance(model, MAEModel) and model.config.num_attention_heads == 4
    pixels, _ = pixels_and_noise()
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixels, mask_ratio=0.0).last_hidden_state, vit.forward_features(pixels), atol=1e-5, rtol=0
        )


def test_cli_transformers_directory(tmp_path):
    config = ViTMAEConfig(
        image_size=32,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        mask_ratio=0.5,
    )
    hf = randomize_(ViTMAEForPreTraining(config))
    hf.save_pretrained(tmp_path / "vitmae")
    assert main(["--source", "transformers", str(tmp_path / "vitmae"), str(tmp_path / "out"), "--norm_pix_loss"]) == 0
    model = AutoModelForPreTraining.from_pretrained(tmp_path / "out")
    assert model.config.layer_norm_eps == 1e-12  # the source's eps, not hf_mae's default
    assert model.config.norm_pix_loss is True and model.config.mask_ratio == 0.5
    hf.config.norm_pix_loss = True
    assert_same_outputs(model, hf)


def test_transformers_v4_checkpoint_names_are_renamed_on_load(tmp_path):
    hf = randomize_(ViTMAEForPreTraining(ViTMAEConfig(**_small_vitmae())))
    hf.save_pretrained(tmp_path / "v4")
    legacy = {  # the names of the released facebook/vit-mae-* checkpoints (transformers v4)
        "vit.layers.": "vit.encoder.layer.",
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    sd = {}
    for key, value in hf.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(new, old)
        sd[key] = value.contiguous()
    assert "decoder.decoder_layers.0.attention.attention.query.weight" in sd
    save_file(sd, tmp_path / "v4" / "model.safetensors", metadata={"format": "pt"})
    assert_same_outputs(convert_transformers_model(tmp_path / "v4"), hf, size=16)


def test_cli_image_size_interpolates_position_embeddings(tmp_path):
    sd = official_pretrain_state_dict()
    torch.save(sd, tmp_path / "mae.pth")
    argv = ["--source", "official", str(tmp_path / "mae.pth"), str(tmp_path / "out"), *HEAD_FLAGS]
    assert main([*argv, "--image_size", "48"]) == 0
    model = MAEForPreTraining.from_pretrained(tmp_path / "out")
    assert model.config.image_size == 48 and model.config.num_patches == 144
    torch.testing.assert_close(model.mae.pos_embed, interpolate_pos_embed(sd["pos_embed"], 12, 12))
    torch.testing.assert_close(model.decoder.pos_embed, interpolate_pos_embed(sd["decoder_pos_embed"], 12, 12))
    torch.testing.assert_close(model.mae.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    pixels, noise = pixels_and_noise(144, 48)
    assert model(pixels, noise=noise).logits.shape == (2, 144, 48)


def test_preset_supplies_heads_and_conflicts_are_errors(tmp_path):
    sd = official_pretrain_state_dict(
        hidden_size=64, num_hidden_layers=4, decoder_hidden_size=32, decoder_num_hidden_layers=2
    )
    model = convert_official_checkpoint(sd, preset="demo-tiny-32")
    assert (model.config.num_attention_heads, model.config.decoder_num_attention_heads) == (4, 4)
    assert model.config.norm_pix_loss is True  # from the preset
    with pytest.raises(ValueError, match="preset 'vit-base-patch16-224' sets hidden_size=768"):
        convert_official_checkpoint(sd, preset="vit-base-patch16-224")
    with pytest.raises(ValueError, match="override sets num_hidden_layers=12"):
        convert_official_checkpoint(sd, num_hidden_layers=12)
    with pytest.raises(ValueError, match="unknown config overrides: num_heads"):
        convert_official_checkpoint(sd, num_heads=4)


def test_default_heads_from_width():
    sd = official_pretrain_state_dict(
        image_size=16, patch_size=8, hidden_size=192, num_attention_heads=3, decoder_hidden_size=512
    )
    model = convert_official_checkpoint(sd)
    assert (model.config.num_attention_heads, model.config.decoder_num_attention_heads) == (3, 16)
    assert model.config.layer_norm_eps == 1e-6
    encoder = convert_timm_state_dict(timm_vit(embed_dim=96, num_heads=1))
    assert encoder.config.num_attention_heads == 1  # 96 // 64


def test_values_not_in_the_weights_are_logged_with_their_origin(tmp_path, caplog):
    """Heads and norm_pix_loss are not in the weights: one line shows each value and whether it was assumed."""

    def logged(convert, *args, **kwargs) -> logging.LogRecord:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_mae.convert"):
            convert(*args, **kwargs)
        [record] = [r for r in caplog.records if "not in the weights" in r.getMessage()]
        return record

    sd = official_pretrain_state_dict()
    record = logged(convert_official_checkpoint, sd)  # TINY is 32 wide: 32 // 64 -> 1 head, a wrong guess
    assert record.levelno == logging.WARNING
    assert "official state dict: " in record.getMessage()
    assert (
        "num_attention_heads=1 (assumed), decoder_num_attention_heads=1 (assumed), norm_pix_loss=False (assumed)"
    ) in record.getMessage()

    torch.save({"model": sd, "args": argparse.Namespace(norm_pix_loss=True)}, tmp_path / "mae.pth")
    record = logged(main, ["--source", "official", str(tmp_path / "mae.pth"), str(tmp_path / "out"), *HEAD_FLAGS])
    assert record.levelno == logging.INFO and str(tmp_path / "mae.pth") in record.getMessage()
    assert (
        "num_attention_heads=4 (given), decoder_num_attention_heads=2 (given), norm_pix_loss=True (checkpoint args)"
    ) in record.getMessage()
    argv = ["--source", "official", str(tmp_path / "mae.pth"), str(tmp_path / "o2"), "--no-norm_pix_loss"]
    record = logged(main, argv)
    assert record.levelno == logging.WARNING and "norm_pix_loss=False (given)" in record.getMessage()
    assert not MAEForPreTraining.from_pretrained(tmp_path / "o2").config.norm_pix_loss

    wide = official_pretrain_state_dict(
        hidden_size=64, num_hidden_layers=4, decoder_hidden_size=32, decoder_num_hidden_layers=2
    )
    record = logged(convert_official_checkpoint, wide, preset="demo-tiny-32", decoder_num_attention_heads=2)
    assert (
        "num_attention_heads=4 (preset 'demo-tiny-32'), decoder_num_attention_heads=2 (given), "
        "norm_pix_loss=True (preset 'demo-tiny-32')"
    ) in record.getMessage()

    # an encoder has no decoder and no loss: only its heads are reported
    message = logged(convert_timm_state_dict, timm_vit()).getMessage()
    assert "num_attention_heads=1 (assumed)" in message and "norm_pix_loss" not in message
    # a transformers config states all three
    record = logged(convert_transformers_model, ViTMAEForPreTraining(ViTMAEConfig(**_small_vitmae())))
    assert record.levelno == logging.INFO
    assert "decoder_num_attention_heads=2 (transformers config), norm_pix_loss=False" in record.getMessage()


# ----------------------------------------------------------------------------------------------------------------------
# --target
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def hf_mae_dir(tmp_path):
    model = randomize_(MAEForPreTraining(MAEConfig(**TINY, norm_pix_loss=True)))
    model.save_pretrained(tmp_path / "hf_mae")
    return tmp_path / "hf_mae", model


def test_cli_target_transformers(tmp_path, hf_mae_dir):
    directory, model = hf_mae_dir
    assert main(["--target", "transformers", str(directory), str(tmp_path / "vitmae")]) == 0
    hf = ViTMAEForPreTraining.from_pretrained(tmp_path / "vitmae")
    assert hf.config.norm_pix_loss and hf.config.layer_norm_eps == 1e-6 and hf.config.intermediate_size == 128
    assert_same_outputs(model, hf)
    # the image processor goes with the weights (`pipeline(model=dir)` needs one), the source's own when it has one
    assert AutoImageProcessor.from_pretrained(tmp_path / "vitmae").crop_size == {"height": 32, "width": 32}
    build_image_processor(32, crop_pct=1.0).save_pretrained(directory)
    assert main(["--target", "transformers", str(directory), str(tmp_path / "vitmae2")]) == 0
    assert AutoImageProcessor.from_pretrained(tmp_path / "vitmae2").size == {"shortest_edge": 32}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_cli_target_timm(tmp_path, hf_mae_dir, suffix):
    directory, model = hf_mae_dir
    out = tmp_path / f"timm{suffix}"
    assert main(["--target", "timm", str(directory), str(out)]) == 0
    sd = load_file(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=0).eval()
    vit.load_state_dict(sd, strict=True)
    pixels, _ = pixels_and_noise()
    with torch.no_grad():
        expected = model.mae(pixels, mask_ratio=0.0).last_hidden_state
        torch.testing.assert_close(vit.forward_features(pixels), expected, atol=1e-5, rtol=0)


def test_a_dmae_student_converts_and_loads_as_the_mae_it_is(tmp_path):
    # its projector maps into its own teacher's space: dropped, the rest is an MAE (and teaches the next student)
    config = DMAEConfig(**TINY, norm_pix_loss=True, projector="mlp", teacher_hidden_size=48)
    student = randomize_(DMAEForPreTraining(config))
    student.save_pretrained(tmp_path / "dmae")
    pixels, noise = pixels_and_noise()
    with torch.no_grad():
        expected = student.mae(pixels, noise=noise, output_hidden_states=True).hidden_states[-1]
    for loaded in (load_encoder(tmp_path / "dmae", freeze=True), load_teacher(tmp_path / "dmae")):
        assert type(loaded.config) is MAEConfig and not hasattr(loaded.config, "projector")
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            got = loaded(pixels, noise=noise, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert main(["--target", "transformers", str(tmp_path / "dmae"), str(tmp_path / "vitmae")]) == 0
    assert_same_outputs(student, ViTMAEForPreTraining.from_pretrained(tmp_path / "vitmae"))
    assert main(["--target", "official", str(tmp_path / "dmae"), str(tmp_path / "official.pth")]) == 0
    assert "projector.weight" not in torch.load(tmp_path / "official.pth")["model"]


def test_cli_target_official_round_trip(tmp_path, hf_mae_dir):
    directory, model = hf_mae_dir
    assert main(["--target", "official", str(directory), str(tmp_path / "mae.pth")]) == 0
    checkpoint = torch.load(tmp_path / "mae.pth", weights_only=True)
    assert set(checkpoint) == {"model"} and "decoder_pred.weight" in checkpoint["model"]
    back = convert_official_checkpoint(tmp_path / "mae.pth", **TINY, norm_pix_loss=True)
    assert_same_outputs(model, back)


def test_cli_subprocess_end_to_end(tmp_path):
    save_file(timm_vit().state_dict(), tmp_path / "vit.safetensors")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hf_mae.convert", "--source", "timm", str(tmp_path / "vit.safetensors"), str(out)]
    result = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Converted timm checkpoint" in result.stderr  # logging, not print
    assert json.loads((out / "config.json").read_text())["model_type"] == "hf_mae"
    assert isinstance(AutoModel.from_pretrained(out), MAEModel)


def test_cli_rejects_config_flags_with_target_and_both_directions(tmp_path, hf_mae_dir):
    directory, _ = hf_mae_dir
    with pytest.raises(SystemExit):
        main(["--target", "timm", str(directory), str(tmp_path / "x.pth"), "--preset", "demo-tiny-32"])
    with pytest.raises(SystemExit):
        main(["--source", "timm", "--target", "timm", str(directory), str(tmp_path / "x.pth")])


def test_cli_reports_conversion_errors(tmp_path, caplog):
    sd = official_pretrain_state_dict()
    del sd["blocks.1.norm2.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with caplog.at_level(logging.ERROR, logger="hf_mae.convert"):
        assert main(["--source", "official", str(tmp_path / "broken.pth"), str(tmp_path / "out"), *HEAD_FLAGS]) == 1
    assert "blocks.1.norm2.weight" in caplog.text
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Errors: never a silent partial load
# ----------------------------------------------------------------------------------------------------------------------
def _drop(sd, key):
    del sd[key]


def _add(sd, key):
    sd[key] = torch.zeros(3)


def _reshape(sd, key):
    sd[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:])


@pytest.mark.parametrize(
    "edit, key, message",
    [
        (_drop, "blocks.1.norm2.weight", "missing keys"),
        (_drop, "decoder_blocks.0.attn.qkv.bias", "missing keys"),
        (_add, "blocks.0.attn.extra", "unexpected keys"),
        (_add, "decoder_extra", "unexpected keys"),
        (_add, "some_other_model.weight", "no hf_mae counterpart"),
        (_reshape, "blocks.1.mlp.fc1.weight", "wrong shapes"),
        (_reshape, "decoder_pred.bias", "wrong shapes"),
    ],
)
def test_official_bad_keys_are_named(edit, key, message):
    sd = official_pretrain_state_dict()
    edit(sd, key)
    with pytest.raises(ValueError, match=message) as error:
        convert_official_checkpoint(sd, **TINY)
    assert key in str(error.value)


def test_unknown_layouts(tmp_path):
    with pytest.raises(ValueError, match="lacks keys: cls_token, pos_embed, patch_embed.proj.weight"):
        convert_official_checkpoint({"conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not tensors: epoch"):
        convert_official_checkpoint({"epoch": 3, "optimizer": {}})
    with pytest.raises(ValueError, match="MAE decoder keys"):
        convert_timm_state_dict(official_pretrain_state_dict())
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        convert_transformers_model(ViTMAEForPreTraining(ViTMAEConfig(hidden_act="relu", **_small_vitmae())))

    torch.save({"model": {}, "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only"):
        convert_official_checkpoint(tmp_path / "evil.pth")


class Payload:
    """An arbitrary pickled object: loading it must be refused, never executed."""


def _small_vitmae() -> dict:
    return dict(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )


@pytest.mark.parametrize(
    "kwargs, keys",
    [
        (dict(init_values=1e-5), "blocks.0.ls1.gamma"),
        (dict(qk_norm=True), "blocks.0.attn.q_norm.weight"),
        (dict(reg_tokens=2), "reg_token"),
        (dict(class_token=False, global_pool="avg"), "cls_token"),
        (dict(no_embed_class=True), "pos_embed of shape (1, 64, 32) has no class-token slot"),
        (dict(img_size=(32, 16)), "pos_embed of shape (1, 33, 32) is not 1 + a square grid"),
        (dict(pre_norm=True), "norm_pre.weight"),
        (dict(global_pool="avg", fc_norm=True), "fc_norm.weight"),
    ],
)
def test_timm_layouts_we_cannot_represent(kwargs, keys):
    with pytest.raises(ValueError) as error:
        convert_timm_state_dict(timm_vit(**kwargs).state_dict())
    assert keys in str(error.value)


def test_hf_mae_strict_from_pretrained_rejects_unexpected_keys(tmp_path):
    model = MAEModel(MAEConfig(**TINY))
    model.save_pretrained(tmp_path / "enc")
    weights = tmp_path / "enc" / "model.safetensors"
    sd = load_file(weights)
    sd["blocks.0.attn.extra_bias"] = torch.zeros(4)
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.extra_bias"):
        MAEModel.from_pretrained(tmp_path / "enc")
    # an encoder directory is not a pretraining checkpoint either
    MAEModel(MAEConfig(**TINY)).save_pretrained(tmp_path / "enc2")
    with pytest.raises(ValueError, match="missing keys: decoder"):
        MAEForPreTraining.from_pretrained(tmp_path / "enc2")


# ----------------------------------------------------------------------------------------------------------------------
# load_encoder
# ----------------------------------------------------------------------------------------------------------------------
def test_load_encoder_detects_every_kind(tmp_path, hf_mae_dir):
    directory, model = hf_mae_dir
    torch.save({"model": to_official_state_dict(model)}, tmp_path / "official.pth")
    save_file(to_timm_state_dict(model), tmp_path / "timm.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "hf_mae.safetensors")
    main(["--target", "transformers", str(directory), str(tmp_path / "vitmae")])
    pixels, noise = pixels_and_noise()
    with torch.no_grad():
        expected = model.mae(pixels, noise=noise, output_hidden_states=True).hidden_states[-1]
    heads = dict(num_attention_heads=4, decoder_num_attention_heads=2)
    for source, overrides in [
        (directory, {}),
        (tmp_path / "vitmae", {}),
        (tmp_path / "official.pth", heads),
        (tmp_path / "timm.safetensors", heads),
        (tmp_path / "hf_mae.safetensors", heads),
    ]:
        teacher = load_encoder(source, freeze=True, **overrides)
        assert isinstance(teacher, MAEModel) and not teacher.training, source
        assert not any(p.requires_grad for p in teacher.parameters()), source
        with torch.no_grad():
            got = teacher(pixels, noise=noise, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=str(source))
    # the DMAE teacher at another resolution: every kind interpolates its position table
    for source in (directory, tmp_path / "vitmae", tmp_path / "official.pth"):
        teacher = load_encoder(source, image_size=16, **({} if source != tmp_path / "official.pth" else heads))
        assert teacher.pos_embed.shape == (1, 17, 32) and teacher.config.image_size == 16
    with pytest.raises(ValueError, match="override sets num_attention_heads=8"):
        load_encoder(directory, num_attention_heads=8)
