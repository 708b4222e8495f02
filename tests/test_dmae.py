"""Distilled MAE: loss math, config and argument checks, the student, the frozen truncated teacher the trainer holds,
the grid adapter, training and the run."""

import copy
import json
import os
import runpy
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForPreTraining

from hf_mae import DMAEConfig, DMAEForPreTraining, MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel
from hf_mae.convert import to_official_state_dict, to_timm_state_dict, to_transformers
from hf_mae.losses import feature_distillation_loss
from hf_mae.modeling_mae import interpolate_pos_embed
from hf_mae.training import (
    DataArguments,
    DMAETeacher,
    DMAETrainer,
    DMAETrainingArguments,
    MAEPretrainingArguments,
    ModelArguments,
    load_teacher,
    run_distillation,
)
from hf_mae.training.teacher import teacher_layout

ROOT = Path(__file__).resolve().parents[1]
# student: 16 px / patch 4 = 4 x 4 grid; teacher: patch 8, native 48 px = 6 x 6 grid, so it sees 32 px
STUDENT = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    norm_pix_loss=True,
)
TEACHER = dict(image_size=48, patch_size=8, hidden_size=48, num_hidden_layers=4, num_attention_heads=4)
# the teacher saved in the four formats: 2 heads, which is what an official / timm file of this width is read with
SAVED_TEACHER = dict(
    TEACHER, hidden_size=128, num_attention_heads=2, decoder_hidden_size=16, decoder_num_hidden_layers=1,
    decoder_num_attention_heads=1,
)  # fmt: skip


def make_teacher(seed: int = 1, **overrides) -> MAEModel:
    torch.manual_seed(seed)
    return MAEModel(MAEConfig(**{**TEACHER, **overrides})).eval().requires_grad_(False)


def make_student(seed: int = 0, **overrides) -> DMAEForPreTraining:
    torch.manual_seed(seed)
    return DMAEForPreTraining(DMAEConfig(**{**STUDENT, "teacher_hidden_size": 48, **overrides}))


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"pixel_values": torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i))}


def make_trainer(model, teacher, tmp_path: Path, **overrides) -> DMAETrainer:
    args = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=4,
        warmup_steps=1, logging_steps=2, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
        base_learning_rate=None, learning_rate=1e-3,
    )  # fmt: skip
    args = DMAETrainingArguments(**{**args, **overrides})
    return DMAETrainer(model=model, args=args, teacher=teacher, train_dataset=_Images(), eval_dataset=_Images())


@pytest.fixture(scope="module")
def teacher_sources(tmp_path_factory) -> dict[str, Path]:
    """One tiny MAE saved as each source a teacher can come from: an hf_mae directory, a transformers ViTMAE
    directory, an official .pth and a timm file."""
    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    mae = MAEForPreTraining(MAEConfig(**SAVED_TEACHER))
    mae.save_pretrained(path / "hf_mae")
    to_transformers(mae).save_pretrained(path / "transformers")
    torch.save({"model": to_official_state_dict(mae)}, path / "mae_pretrain_vit_tiny.pth")
    save_file(to_timm_state_dict(mae), path / "vit_tiny.safetensors")
    return {
        "hf_mae": path / "hf_mae",
        "transformers": path / "transformers",
        "official": path / "mae_pretrain_vit_tiny.pth",
        "timm": path / "vit_tiny.safetensors",
    }


@pytest.fixture(scope="module")
def teacher_dir(teacher_sources) -> Path:
    """The teacher of the runs, saved with save_pretrained."""
    return teacher_sources["hf_mae"]


# ----------------------------------------------------------------------------------------------------------------------
# The loss function
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["l1", "smooth_l1", "mse"])
def test_feature_loss_zero_symmetric_and_scale_invariant(loss_type):
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for normalize in (True, False):
        assert feature_distillation_loss(a, a.clone(), normalize, loss_type) == 0
        ab = feature_distillation_loss(a, b, normalize, loss_type)
        assert ab > 0 and torch.equal(ab, feature_distillation_loss(b, a, normalize, loss_type))
    # normalised features ignore each token's (positive) scale; raw ones do not
    scale = torch.rand(2, 5, 1) * 10 + 0.1
    for normalize, invariant in ((True, True), (False, False)):
        scaled = feature_distillation_loss(a * scale, b, normalize, loss_type)
        assert torch.allclose(scaled, feature_distillation_loss(a, b, normalize, loss_type)) == invariant


def test_feature_loss_hand_checked_values():
    s, t = torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[4.0, 3.0]]])
    # normalised: (0.6, 0.8) vs (0.8, 0.6), differences 0.2 each
    assert feature_distillation_loss(s, t, True, "l1").item() == pytest.approx(0.2)
    assert feature_distillation_loss(s, t, True, "mse").item() == pytest.approx(0.04)
    assert feature_distillation_loss(s, t, True, "smooth_l1").item() == pytest.approx(0.5 * 0.04)
    # raw: differences 1 each; Huber with beta 1 at |d| = 1 is 1 - 0.5
    assert feature_distillation_loss(s, t, False, "l1").item() == pytest.approx(1.0)
    assert feature_distillation_loss(s, t, False, "mse").item() == pytest.approx(1.0)
    assert feature_distillation_loss(s, t, False, "smooth_l1").item() == pytest.approx(0.5)
    # bf16 inputs are compared in fp32
    assert feature_distillation_loss(s.bfloat16(), t.bfloat16(), True).dtype == torch.float32
    with pytest.raises(ValueError, match="differ in shape"):
        feature_distillation_loss(s, t[..., :1])
    with pytest.raises(ValueError, match="loss_type"):
        feature_distillation_loss(s, t, loss_type="cosine")


# ----------------------------------------------------------------------------------------------------------------------
# Config, arguments, layout: one home per setting
# ----------------------------------------------------------------------------------------------------------------------
def test_defaults_are_three_quarters_of_each_depth_and_official_dmae(tmp_path):
    config = DMAEConfig.from_preset("seed-vit-b8-64", teacher_hidden_size=1024)
    assert config.model_type == "hf_mae_dmae" and config.student_layer == 9 and config.projector == "linear"
    vit_large = MAEConfig.from_preset("vit-large-patch16-224")
    assert teacher_layout(vit_large, config) == (18, 128)  # block 18 of 24; an 8 x 8 grid of 16 px patches
    assert DMAEConfig.from_dict(config.to_dict()).teacher_hidden_size == 1024
    args = DMAETrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert (args.distill_loss, args.normalize_features, args.distill_weight) == ("l1", True, 1.0)
    assert (args.teacher_kind, args.teacher_pos_embed, args.teacher_layer) == ("auto", "interpolate", None)
    assert args.student_layer is None and args.projector is None  # the student's config decides
    # the saved model holds only what it needs: the teacher and the loss are training settings
    assert not {"teacher_path", "teacher_layer", "distill_weight", "normalize_features"} & set(config.to_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(projector="conv"), "DMAEConfig.projector must be one of"),
        (dict(student_layer=0), "DMAEConfig.student_layer must be a positive integer, got 0"),
        (dict(student_layer=5), "DMAEConfig.student_layer=5 is beyond the student's depth num_hidden_layers=4"),
        (dict(teacher_hidden_size=0), "DMAEConfig.teacher_hidden_size must be a positive integer, got 0"),
        (dict(projector="none", teacher_hidden_size=48), "projector='none' needs equal widths"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMAEConfig(**STUDENT, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(distill_loss="kl"), "distill_loss must be one of"),
        (dict(teacher_kind="onnx"), "teacher_kind must be one of"),
        (dict(teacher_pos_embed="zeros"), "teacher_pos_embed must be one of"),
        (dict(teacher_layer=0), "teacher_layer must be a positive integer, got 0"),
        (dict(teacher_image_size=0), "teacher_image_size must be a positive integer, got 0"),
        (dict(distill_weight=-1.0), "distill_weight must be a number >= 0"),
        (dict(student_layer=0), "DMAETrainingArguments.student_layer must be a positive integer, got 0"),
        (dict(projector="conv"), "DMAETrainingArguments.projector must be one of"),
    ],
)
def test_arguments_reject_bad_values(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        DMAETrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layer=5), "teacher_layer=5 is beyond the teacher's depth 4"),
        (dict(image_size=40), r"teacher_image_size=40 cannot give the teacher \(patch 8\) the student's 4x4 grid"),
        (dict(pos_embed="zeros"), "teacher_pos_embed must be one of"),
    ],
)
def test_teacher_layout_rejects_what_cannot_fit(kwargs, match):
    with pytest.raises(ValueError, match=match):
        teacher_layout(MAEConfig(**TEACHER), DMAEConfig(**STUDENT, teacher_hidden_size=48), **kwargs)
    with pytest.raises(ValueError, match="the teacher is 48 wide but the student's projector .* gives 64"):
        teacher_layout(MAEConfig(**TEACHER), DMAEConfig(**STUDENT, teacher_hidden_size=64))


# ----------------------------------------------------------------------------------------------------------------------
# The student: an MAE + projector that never sees a teacher
# ----------------------------------------------------------------------------------------------------------------------
def test_student_forward_is_mae_plus_projected_features():
    model = make_student().eval()
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    out = model(x, noise=noise)
    assert list(out.keys()) == ["loss", "student_features", "logits", "mask", "ids_restore"]
    mae_only = MAEForPreTraining.forward(model, x, noise=noise, output_hidden_states=True)
    assert torch.equal(out.loss, mae_only.loss) and torch.equal(out.ids_restore, mae_only.ids_restore)
    assert out.student_features.shape == (2, 1 + 4, 48)  # cls + 4 visible tokens, projected to the teacher width
    assert torch.equal(out.student_features, model.projector(mae_only.hidden_states[3]))  # block 3 of 4
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {"mae", "decoder", "projector"}


def test_projector_inits_follow_their_papers():
    linear = make_student(projector="linear").projector  # official: nn.Linear's own init
    bound = 1 / 32**0.5
    assert linear.weight.abs().max() <= bound and linear.bias.abs().max() > 0
    mlp = make_student(projector="mlp").projector  # the seed: MAE's xavier init, zero biases
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear"] and mlp[2].weight.shape == (48, 48)
    assert all(layer.bias.abs().max() == 0 for layer in (mlp[0], mlp[2]))
    assert mlp[0].weight.abs().max() > bound  # xavier bound sqrt(6 / (32 + 48)) = 0.27 > 1 / sqrt(32) = 0.18
    with pytest.raises(ValueError, match="teacher_hidden_size is None, so the 'linear' projector cannot be built"):
        DMAEForPreTraining(DMAEConfig(**STUDENT))


# ----------------------------------------------------------------------------------------------------------------------
# The teacher: frozen, truncated, fitted to the student's grid, on the student's visible patches
# ----------------------------------------------------------------------------------------------------------------------
def test_teacher_runs_teacher_layer_blocks_on_the_student_visible_patches():
    encoder = make_teacher()
    reference = copy.deepcopy(encoder)  # full depth, untouched
    model = make_student().eval()
    teacher = DMAETeacher(encoder, model.config)
    assert teacher.layer == 3 and len(teacher.blocks) == 3 and not hasattr(teacher, "norm")
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    seen, calls = [], []
    teacher.patch_embed.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    for block in teacher.blocks:
        block.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    out = model(x, noise=noise)
    # the student's ids_restore as the teacher's noise keeps the student's patches, in the same order
    features = teacher(x, noise=out.ids_restore.float(), mask_ratio=0.75)
    assert seen == [torch.Size([2, 3, 32, 32])]  # 16 px / patch 4 -> 4 x 4 grid -> 4 x 8 = 32 px for the teacher
    assert calls == [torch.Size([2, 5, 48])] * 3  # 3 = teacher_layer blocks, on cls + 4 visible tokens
    assert torch.equal(features, teacher(x, noise=noise, mask_ratio=0.75))
    # the same image, resized, through the full teacher: block 3's output (before the final norm) on the same patches
    resized = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    ref = reference(resized, noise=noise, mask_ratio=0.75, interpolate_pos_encoding=True, output_hidden_states=True)
    assert torch.allclose(features, ref.hidden_states[3], atol=1e-5)
    kept = model.mae(x, noise=noise).ids_keep
    assert torch.equal(ref.ids_keep, kept)
    assert torch.equal(reference(resized, noise=out.ids_restore.float(), interpolate_pos_encoding=True).ids_keep, kept)
    # the encoder is left as it was: one loaded teacher serves several students
    assert len(encoder.blocks) == 4 and isinstance(encoder.norm, torch.nn.LayerNorm)
    assert torch.equal(encoder.pos_embed, reference.pos_embed)
    other = DMAETeacher(encoder, make_student(projector="mlp").config, layer=2, pos_embed="center_crop")
    assert len(other.blocks) == 2 and other.blocks[0] is teacher.blocks[0]  # shared, not copied
    assert torch.equal(teacher(x, noise=noise, mask_ratio=0.75), features)  # the first fit is unaffected


def test_grid_adapter_seed_case_center_crop_and_interpolate():
    # the seed: 64 px / patch 8 student, a patch-16 teacher made for 224 px (14 x 14) sees 128 px as 8 x 8 tokens
    student = DMAEConfig(**dict(STUDENT, image_size=64, patch_size=8, num_hidden_layers=2), teacher_hidden_size=32)
    native = make_teacher(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    table = native.pos_embed.detach().clone()
    tables = {}
    for mode in ("center_crop", "interpolate"):
        teacher = DMAETeacher(native, student, pos_embed=mode)
        assert teacher.image_size == 128
        seen = []
        handle = teacher.patch_embed.register_forward_hook(
            lambda m, args, out, seen=seen: seen.append((args[0].shape, out.shape))
        )
        features = teacher(torch.randn(2, 3, 64, 64), noise=torch.rand(2, 64), mask_ratio=0.75)
        handle.remove()
        assert seen == [(torch.Size([2, 3, 128, 128]), torch.Size([2, 64, 32]))] and features.shape == (2, 17, 32)
        tables[mode] = teacher.pos_embed.detach()
    grid = table[:, 1:].reshape(14, 14, 32)
    assert torch.equal(tables["center_crop"][:, 1:].reshape(8, 8, 32), grid[3:11, 3:11])  # pad 48 px = 3 patches
    assert torch.equal(tables["interpolate"], interpolate_pos_embed(table, 8, 8))
    assert torch.equal(tables["center_crop"][:, :1], table[:, :1])
    assert torch.equal(native.pos_embed, table)  # the encoder's own table is untouched
    # a student grid larger than the teacher's native table cannot be cropped out of it
    with pytest.raises(ValueError, match=r"center_crop.*cannot cut the student's 8x8 grid out of .* 6x6"):
        DMAETeacher(make_teacher(), DMAEConfig(**dict(STUDENT, image_size=64, patch_size=8), teacher_hidden_size=48),
                    pos_embed="center_crop")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# The trainer: holds the teacher, orchestrates the loss
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant",
    [
        dict(projector="linear", normalize_features=True, teacher_pos_embed="interpolate"),  # official DMAE
        dict(projector="mlp", normalize_features=False, teacher_pos_embed="center_crop"),  # the seed
    ],
)
def test_loss_is_reconstruction_plus_weighted_distillation_on_the_same_patches(variant, tmp_path):
    model = make_student(projector=variant["projector"]).eval()
    trainer = make_trainer(
        model, make_teacher(), tmp_path, distill_weight=0.5, normalize_features=variant["normalize_features"],
        teacher_pos_embed=variant["teacher_pos_embed"],
    )  # fmt: skip
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(5)
    loss, out = trainer.compute_loss(model, {"pixel_values": x}, return_outputs=True)
    torch.manual_seed(5)
    noise = torch.rand(2, 16)  # the noise the student drew
    mae_only = MAEForPreTraining.forward(model, x, noise=noise, output_hidden_states=True)
    student = model.projector(mae_only.hidden_states[3])
    assert torch.equal(out.loss, mae_only.loss) and torch.equal(out.student_features, student)
    target = trainer.teacher(x, noise=noise, mask_ratio=0.75)  # the teacher on the patches the student kept
    expected = feature_distillation_loss(student, target, normalize=variant["normalize_features"], loss_type="l1")
    assert expected > 0 and torch.allclose(loss, mae_only.loss + 0.5 * expected)


@pytest.mark.parametrize("normalize", [True, False])
def test_self_distillation_with_identity_projector_is_zero(normalize, tmp_path):
    # the teacher is a copy of the student's own encoder: identical features at the same block, distance 0
    model = make_student(projector="none", teacher_hidden_size=None).eval()
    teacher = MAEModel(MAEConfig(**STUDENT))
    teacher.load_state_dict(model.mae.state_dict())
    trainer = make_trainer(model, teacher, tmp_path, normalize_features=normalize, teacher_layer=3)
    loss, out = trainer.compute_loss(model, {"pixel_values": torch.randn(2, 3, 16, 16)}, return_outputs=True)
    parts = trainer._reduce_loss_parts("eval")
    assert parts["distillation_loss"] == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(loss, out.loss, atol=1e-6)


def test_trainer_keeps_teacher_frozen_outside_the_student_and_logs_both_losses(tmp_path):
    model = make_student()
    trainer = make_trainer(
        model, make_teacher(), tmp_path, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
        bf16=True,
    )  # fmt: skip
    teacher = trainer.teacher
    assert teacher.pos_embed.dtype == torch.bfloat16 and teacher.pos_embed.device == trainer.args.device
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    assert sorted(k for k in model.state_dict() if not k.startswith(("mae.", "decoder."))) == [
        "projector.bias",
        "projector.weight",
    ]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = model.mae.blocks[0].mlp.fc1.weight.detach().clone()
    model.train()
    assert not teacher.training
    modes = []  # (student, teacher or any of its blocks) in training mode, at each teacher call
    teacher.register_forward_pre_hook(
        lambda m, args: modes.append((model.training, m.training or any(b.training for b in m.modules())))
    )
    trainer.train()
    assert (True, False) in modes and not any(teacher_mode for _, teacher_mode in modes)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not torch.equal(model.mae.blocks[0].mlp.fc1.weight, student_before)  # the student did learn
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & teacher_ids and id(model.projector.weight) in optimized
    # the checkpoint holds the student alone
    checkpoint = tmp_path / "checkpoint-4"
    assert set(load_file(checkpoint / "model.safetensors")) == set(model.state_dict())
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]
    assert len(optimizer_state) == sum(p.requires_grad for p in model.parameters())
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(train_logs) == 2
    for entry in train_logs:
        assert entry["reconstruction_loss"] > 0 and entry["distillation_loss"] > 0
    metrics = trainer.evaluate()
    parts = metrics["eval_reconstruction_loss"] + metrics["eval_distillation_loss"]  # weight 1
    assert metrics["eval_loss"] == pytest.approx(parts, rel=2e-2)  # bf16 autocast
    assert any("eval_distillation_loss" in e for e in trainer.state.log_history[:-1])  # the in-training eval


def test_trainer_takes_the_teacher_as_a_model_or_a_path_and_needs_one(tmp_path, teacher_dir):
    model = make_student(teacher_hidden_size=128)
    from_path = make_trainer(model, None, tmp_path, teacher_path=str(teacher_dir)).teacher
    from_model = make_trainer(model, load_teacher(teacher_dir), tmp_path).teacher
    assert from_path.layer == from_model.layer == 3 and from_path.hidden_size == 128
    assert torch.equal(from_path.blocks[0].attn.qkv.weight, from_model.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="DMAETrainer needs a teacher: pass teacher="):
        make_trainer(model, None, tmp_path)
    with pytest.raises(TypeError, match="the teacher must be an hf_mae MAEModel"):
        make_trainer(model, torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match="the teacher is 48 wide but the student's projector"):
        make_trainer(model, make_teacher(), tmp_path)
    args = MAEPretrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="DMAETrainer needs DMAETrainingArguments"):
        DMAETrainer(model=model, args=args, teacher=make_teacher())


def test_trainer_compiles_the_teacher_with_torch_compile(tmp_path):
    # --torch_compile compiles the teacher as the accelerator compiles the student
    torch._dynamo.reset()
    model = make_student().eval()
    trainer = make_trainer(model, make_teacher(), tmp_path, torch_compile=True, torch_compile_backend="aot_eager")
    assert trainer.teacher._compiled_call_impl is not None
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        eager = trainer.teacher.forward(x, noise=noise, mask_ratio=0.75)
        compiled = trainer.teacher(x, noise=noise, mask_ratio=0.75)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1 and torch.allclose(compiled, eager, atol=1e-6)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------------
def test_save_and_reload_student_without_teacher(tmp_path):
    model = make_student(projector="mlp")
    model.save_pretrained(tmp_path / "dmae")
    keys = set(load_file(tmp_path / "dmae" / "model.safetensors"))
    assert {k.split(".")[0] for k in keys} == {"mae", "decoder", "projector"}
    config = json.loads((tmp_path / "dmae" / "config.json").read_text())
    assert config["model_type"] == "hf_mae_dmae" and config["teacher_hidden_size"] == 48
    assert not {k for k in config if k.startswith("teacher_") and k != "teacher_hidden_size"}
    assert config["auto_map"]["AutoModelForPreTraining"] == "modeling_dmae.DMAEForPreTraining"
    reloaded = AutoModelForPreTraining.from_pretrained(tmp_path / "dmae")
    assert isinstance(reloaded, DMAEForPreTraining)
    assert torch.equal(reloaded.projector[2].weight, model.projector[2].weight)
    # a DMAE student can teach the next one: its encoder is the teacher
    chained = load_teacher(tmp_path / "dmae")
    assert (
        type(chained) is MAEModel and not chained.training and not any(p.requires_grad for p in chained.parameters())
    )
    assert torch.equal(chained.blocks[0].attn.qkv.weight, model.mae.blocks[0].attn.qkv.weight)
    # an MAE checkpoint starts a DMAE student: the projector is new
    MAEForPreTraining(MAEConfig(**STUDENT)).save_pretrained(tmp_path / "mae")
    from_mae = DMAEForPreTraining.from_pretrained(tmp_path / "mae", config=copy.deepcopy(model.config))
    assert from_mae.projector[0].weight.abs().sum() > 0
    # a DMAE model loads its own projector strictly: another projector type is an error, not a silent re-init
    with pytest.raises(ValueError, match=r"unexpected keys: projector\.0\.bias"):
        DMAEForPreTraining.from_pretrained(tmp_path / "dmae", projector="linear")


def test_student_loads_into_encoder_and_classifier_like_an_mae(tmp_path, caplog):
    model = make_student()
    model.save_pretrained(tmp_path / "dmae")
    with caplog.at_level("INFO", logger="hf_mae.modeling_mae"):
        classifier = MAEForImageClassification.from_pretrained(tmp_path / "dmae", num_labels=3)
        encoder = MAEModel.from_pretrained(tmp_path / "dmae")
    assert torch.equal(classifier.mae.blocks[0].attn.qkv.weight, model.mae.blocks[0].attn.qkv.weight)
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, model.mae.blocks[0].attn.qkv.weight)
    assert any("dropped" in r.message and "projector" in r.message for r in caplog.records)
    # strict otherwise: a key that is not a declared head still fails, and an MAE checkpoint declares no projector
    weights = load_file(tmp_path / "dmae" / "model.safetensors")
    save_file({**weights, "extra.weight": torch.zeros(2)}, tmp_path / "dmae" / "model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.weight"):
        MAEModel.from_pretrained(tmp_path / "dmae")
    mae = MAEForPreTraining(MAEConfig(**STUDENT))
    mae.save_pretrained(tmp_path / "mae")
    save_file({**load_file(tmp_path / "mae" / "model.safetensors"), "projector.weight": torch.zeros(2)},
              tmp_path / "mae" / "model.safetensors", {"format": "pt"})  # fmt: skip
    with pytest.raises(ValueError, match=r"unexpected keys: projector\.weight"):
        MAEModel.from_pretrained(tmp_path / "mae")


def test_config_saved_with_the_old_teacher_fields_still_loads(tmp_path, caplog):
    model = make_student()
    model.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    old = json.loads(path.read_text())
    old.update(
        teacher_path="/gone/mae_pretrain_vit_large.pth", teacher_kind="official", teacher_layer=3,
        teacher_num_hidden_layers=4, teacher_patch_size=8, teacher_image_size=None, teacher_pos_embed="center_crop",
        normalize_features=False, distill_loss="l1", distill_weight=1.0,
    )  # fmt: skip
    path.write_text(json.dumps(old))
    with caplog.at_level("INFO", logger="hf_mae.configuration_dmae"):
        reloaded = DMAEForPreTraining.from_pretrained(tmp_path / "old")
    assert any("ignoring teacher_path, teacher_kind" in r.message for r in caplog.records)
    assert not hasattr(reloaded.config, "teacher_path") and not hasattr(reloaded.config, "distill_weight")
    assert torch.equal(reloaded.projector.weight, model.projector.weight)
    reloaded.save_pretrained(tmp_path / "new")
    assert "teacher_path" not in json.loads((tmp_path / "new" / "config.json").read_text())
    classifier = MAEForImageClassification.from_pretrained(tmp_path / "old", num_labels=3)
    assert torch.equal(classifier.mae.blocks[0].attn.qkv.weight, model.mae.blocks[0].attn.qkv.weight)


def test_remote_code_ships_only_model_files_and_loads_without_hf_mae(tmp_path):
    model = make_student().eval()
    model.save_pretrained(tmp_path / "dmae")
    code = {p.name for p in (tmp_path / "dmae").glob("*.py")}
    assert code == {
        "configuration_dmae.py",
        "configuration_mae.py",
        "image_processing_mae.py",
        "modeling_dmae.py",
        "modeling_mae.py",
        "losses.py",
    }
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    torch.save({"x": x, "noise": noise}, tmp_path / "inputs.pt")
    expected = model(x, noise=noise)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_mae"] = None  # any `import hf_mae` now fails: an environment without it
        import torch
        from transformers import AutoModelForPreTraining
        model = AutoModelForPreTraining.from_pretrained({str(tmp_path / "dmae")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        out = model(inputs["x"], noise=inputs["noise"])
        torch.save({{"loss": out.loss, "features": out.student_features}}, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert torch.allclose(got["loss"], expected.loss, atol=1e-6)
    assert torch.allclose(got["features"], expected.student_features, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------
RUN_FLAGS = [
    "--dataset_name", "digits", "--preset", "demo-tiny-32", "--report_to", "none", "--disable_tqdm", "true",
    "--per_device_train_batch_size", "16", "--max_train_samples", "64", "--max_eval_samples", "16",
    "--max_steps", "4", "--warmup_steps", "1", "--logging_steps", "2", "--eval_strategy", "steps",
    "--eval_steps", "4", "--save_strategy", "no", "--num_reconstructions", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def example_runs(teacher_sources, tmp_path_factory) -> dict[str, Path]:
    """examples/run_distill.py on digits with the same teacher from each of the four sources."""
    tmp = tmp_path_factory.mktemp("runs")
    # the example's own main() in this process (a subprocess would add ~5 s of imports)
    example = runpy.run_path(str(ROOT / "examples" / "run_distill.py"), run_name="example")
    runs = {}
    for source, path in teacher_sources.items():
        runs[source] = tmp / source
        figure = [] if source == "hf_mae" else ["--num_reconstructions", "0"]  # the PNG once is enough
        example["main"]([*RUN_FLAGS, *figure, "--teacher_path", str(path), "--output_dir", str(runs[source])])
    return runs


def test_run_distill_example_on_digits(example_runs):
    out = example_runs["hf_mae"]
    logs = json.loads((out / "log_history.json").read_text())
    assert all(e["distillation_loss"] > 0 and e["reconstruction_loss"] > 0 for e in logs if "loss" in e)
    assert any("eval_distillation_loss" in e for e in logs)
    config = json.loads((out / "config.json").read_text())
    assert config["student_layer"] == 3 and config["teacher_hidden_size"] == 128 and config["projector"] == "linear"
    assert {k.split(".")[0] for k in load_file(out / "model.safetensors")} == {"mae", "decoder", "projector"}
    card = (out / "README.md").read_text()
    assert "## Distillation" in card and "| teacher_layer | 3 of 4 |" in card and "| teacher_patch_size | 8 |" in card
    assert (out / "reconstructions.png").exists()


@pytest.mark.parametrize("source", ["transformers", "official", "timm"])
def test_run_distill_example_with_each_teacher_source(example_runs, teacher_sources, source):
    # the same teacher read from another format: the same run, step for step
    expected = json.loads((example_runs["hf_mae"] / "log_history.json").read_text())
    logs = json.loads((example_runs[source] / "log_history.json").read_text())
    for key in ("loss", "distillation_loss", "eval_distillation_loss"):
        got, want = [e[key] for e in logs if key in e], [e[key] for e in expected if key in e]
        assert len(got) == len(want) > 0 and got == pytest.approx(want, rel=1e-4), key
    card = (example_runs[source] / "README.md").read_text()
    assert f"| teacher_path | {teacher_sources[source]} |" in card and "| teacher_hidden_size | 128 |" in card


def _arguments(tmp_path: Path, config_overrides: str | None = None, **training) -> tuple:
    training = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_steps=4, warmup_steps=1,
        logging_steps=2, eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, **training,
    )  # fmt: skip
    data = DataArguments(dataset_name="digits", max_train_samples=64, max_eval_samples=16, num_reconstructions=0)
    model = ModelArguments(preset="demo-tiny-32", config_overrides=config_overrides)
    return model, data, DMAETrainingArguments(**training)


@pytest.fixture(scope="module")
def official_run(tmp_path_factory, teacher_sources) -> Path:
    """The seed's variant (MLP head, raw L1, center-cropped teacher table, mask 0.9) with an official-format teacher."""
    tmp = tmp_path_factory.mktemp("official")
    results = run_distillation(*_arguments(
        tmp, teacher_path=str(teacher_sources["official"]), projector="mlp", normalize_features=False,
        teacher_pos_embed="center_crop", mask_ratio=0.9, config_overrides="image_size=16"))  # fmt: skip
    assert results["train_loss"] > 0 and results["eval_distillation_loss"] > 0
    return tmp / "out"


def test_run_distillation_with_official_checkpoint_teacher(official_run):
    logs = json.loads((official_run / "log_history.json").read_text())
    assert [e["step"] for e in logs if "distillation_loss" in e] == [2, 4]
    config = json.loads((official_run / "config.json").read_text())
    assert config["projector"] == "mlp" and config["mask_ratio"] == 0.9 and config["teacher_hidden_size"] == 128
    card = (official_run / "README.md").read_text()
    assert "| teacher_pos_embed | center_crop |" in card and "| normalize_features | False |" in card
    assert "| teacher_layer | 3 of 4 |" in card and "| teacher_image_size | 32 |" in card


def test_distilled_student_loads_into_classifier(official_run):
    classifier = MAEForImageClassification.from_pretrained(official_run, num_labels=10)
    student = load_file(official_run / "model.safetensors")
    assert torch.equal(classifier.mae.blocks[0].attn.qkv.weight, student["mae.blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_two_cpu_processes_log_the_same_averaged_parts(tmp_path, teacher_dir):
    # gloo, world size 2 (accelerate_configs/cpu_2proc.yaml): the reduce in log() / evaluation_loop must not hang
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml",
        "--main_process_port", str(_free_port()), "examples/run_distill.py", *RUN_FLAGS,
        "--per_device_train_batch_size", "8", "--teacher_path", str(teacher_dir), "--output_dir", str(tmp_path / "ddp"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    result = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = json.loads((tmp_path / "ddp" / "log_history.json").read_text())
    train = [e for e in logs if "loss" in e]
    assert len(train) == 2 and all(e["distillation_loss"] > 0 for e in train)
    for entry in train:  # weight 1: the parts add up to the loss both are averaged like
        assert entry["loss"] == pytest.approx(entry["reconstruction_loss"] + entry["distillation_loss"], rel=1e-4)
    final = [e for e in logs if "eval_loss" in e][-1]
    assert final["eval_loss"] == pytest.approx(final["eval_reconstruction_loss"] + final["eval_distillation_loss"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------------
# Bad input fails before any data is loaded, with the field named
# ----------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_before_training(tmp_path, teacher_dir, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the bad input was reported")

    monkeypatch.setattr("hf_mae.training.pipeline.load_data", no_data)
    cases = [
        (dict(projector="none"), "projector='none' needs equal widths, but the teacher is 128 wide"),
        (dict(student_layer=5), "student_layer=5 is beyond the student's depth num_hidden_layers=4"),
        (dict(teacher_layer=9), "teacher_layer=9 is beyond the teacher's depth 4"),
        (dict(teacher_path=str(tmp_path / "missing.pth")), "teacher_path=.*missing.pth.* cannot be loaded"),
        (dict(teacher_path=None), "DMAE needs a teacher"),
        # grids the adapter cannot produce: a teacher resolution off the student's grid; the teacher's 6 x 6 table
        # cannot be cropped to the student's 8 x 8
        (dict(teacher_image_size=48), r"teacher_image_size=48 cannot give the teacher \(patch 8\) .* 8x8 grid"),
        (dict(teacher_pos_embed="center_crop"), r"center_crop.*8x8 grid"),
    ]
    for overrides, match in cases:
        with pytest.raises(ValueError, match=match):
            run_distillation(*_arguments(tmp_path, **{"teacher_path": str(teacher_dir), **overrides}))
    # a teacher file of unknown layout: the converter's message reaches the user, naming the path
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"teacher_path=.*odd\.pth.*unknown checkpoint layout"):
        run_distillation(*_arguments(tmp_path, teacher_path=str(tmp_path / "odd.pth")))
    # a DMAE directory to continue from whose projector maps to another width than this teacher's
    make_student().save_pretrained(tmp_path / "dmae48")
    model_args, data_args, training_args = _arguments(tmp_path, teacher_path=str(teacher_dir))
    model_args.model_name_or_path, model_args.preset = str(tmp_path / "dmae48"), None
    with pytest.raises(
        ValueError, match=r"dmae48: the student's projector maps to teacher_hidden_size=48, but .* 128"
    ):
        run_distillation(model_args, data_args, training_args)


# ----------------------------------------------------------------------------------------------------------------------
# Example configs
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples" / "configs").glob("*distill*.yaml")))
def test_example_configs_parse(name):
    import yaml
    from transformers import HfArgumentParser

    from hf_mae.training import MAEFinetuningArguments

    values = yaml.safe_load((ROOT / "examples" / "configs" / name).read_text())
    values["bf16"] = False  # this test machine has no bf16 GPU
    recipe = DMAETrainingArguments if name.startswith("distill") else MAEFinetuningArguments
    model, _, args = HfArgumentParser((ModelArguments, DataArguments, recipe)).parse_dict(values)
    assert not Path(values.get("teacher_path", "checkpoints/x")).is_absolute()
    if name.startswith("distill_seed"):
        assert (args.projector, args.normalize_features, args.teacher_pos_embed) == ("mlp", False, "center_crop")
        assert args.learning_rate == pytest.approx(7.5e-5) and args.teacher_layer == 18 and args.student_layer == 9
        assert args.mask_ratio == (0.9 if "mask90" in name else 0.75)
    elif name.startswith("distill_official"):
        assert (args.projector, args.normalize_features, args.teacher_pos_embed) == ("linear", True, "interpolate")
        assert args.num_train_epochs == 100 and args.warmup_epochs == 20
    elif "official" in name:
        assert (args.layer_decay, args.drop_path_rate) == (0.75, 0.15)
    else:
        assert (args.layer_decay, args.drop_path_rate, args.num_train_epochs) == (0.65, 0.1, 300)
        assert model.model_name_or_path.startswith("outputs/distill_seed")


def test_a_weights_file_teachers_heads_can_be_given(teacher_sources, tmp_path, caplog):
    """A timm / official file holds no head count (width / 64 is assumed, and logged): a DMAE run can state it."""
    assert load_teacher(teacher_sources["timm"]).config.num_attention_heads == 2  # 128 / 64
    assert "--teacher_num_attention_heads" in caplog.text
    heads = {k: load_teacher(teacher_sources[k], num_attention_heads=4).config.num_attention_heads
             for k in ("timm", "official")}  # fmt: skip
    assert heads == {"timm": 4, "official": 4}
    with pytest.raises(ValueError, match="num_attention_heads"):  # a directory states its own
        load_teacher(teacher_sources["hf_mae"], num_attention_heads=4)
    trainer = make_trainer(
        make_student(teacher_hidden_size=128), str(teacher_sources["timm"]), tmp_path, teacher_num_attention_heads=8
    )
    assert trainer.teacher.blocks[0].attn.num_heads == 8
    with pytest.raises(ValueError, match="teacher_num_attention_heads=8, but the teacher given has 2 heads"):
        make_trainer(make_student(teacher_hidden_size=128), load_teacher(teacher_sources["timm"]), tmp_path,
                     teacher_num_attention_heads=8)  # fmt: skip
