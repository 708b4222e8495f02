"""Distilled MAE: loss math, config checks, the frozen truncated teacher, the grid adapter, training and the run."""

import copy
import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForPreTraining

from hf_mae import DMAEConfig, DMAEForPreTraining, MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel
from hf_mae.convert import to_official_state_dict
from hf_mae.losses import feature_distillation_loss
from hf_mae.modeling_dmae import load_teacher
from hf_mae.modeling_mae import interpolate_pos_embed
from hf_mae.training import DataArguments, DMAETrainer, DMAETrainingArguments, ModelArguments, run_distillation

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


def make_teacher(seed: int = 1, **overrides) -> MAEModel:
    torch.manual_seed(seed)
    return MAEModel(MAEConfig(**{**TEACHER, **overrides})).eval()


def make_student(teacher: MAEModel | None = None, seed: int = 0, **overrides) -> DMAEForPreTraining:
    torch.manual_seed(seed)
    return DMAEForPreTraining(DMAEConfig(**{**STUDENT, **overrides}), teacher=teacher or make_teacher())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny MAE saved with save_pretrained, the teacher of the runs."""
    path = tmp_path_factory.mktemp("teacher") / "mae"
    torch.manual_seed(1)
    MAEForPreTraining(
        MAEConfig(**TEACHER, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2)
    ).save_pretrained(path)
    return path


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
# Config
# ----------------------------------------------------------------------------------------------------------------------
def test_config_defaults_are_three_quarters_of_each_depth():
    config = DMAEConfig.from_preset("seed-vit-b8-64")
    assert config.model_type == "hf_mae_dmae" and config.student_layer == 9 and config.teacher_layer is None
    assert config.projector == "linear" and config.normalize_features and config.distill_loss == "l1"
    config.attach_teacher(hidden_size=1024, num_hidden_layers=24, patch_size=16)
    assert config.teacher_layer == 18 and config.teacher_input_size == 128  # 8 x 8 grid of 16 px patches
    assert DMAEConfig.from_dict(config.to_dict()).teacher_layer == 18


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(projector="conv"), "DMAEConfig.projector must be one of"),
        (dict(distill_loss="kl"), "DMAEConfig.distill_loss must be one of"),
        (dict(teacher_kind="onnx"), "DMAEConfig.teacher_kind must be one of"),
        (dict(teacher_pos_embed="zeros"), "DMAEConfig.teacher_pos_embed must be one of"),
        (dict(student_layer=0), "DMAEConfig.student_layer must be a positive integer, got 0"),
        (dict(student_layer=5), "DMAEConfig.student_layer=5 is beyond the student's depth num_hidden_layers=4"),
        (dict(teacher_layer=25, teacher_num_hidden_layers=24), "DMAEConfig.teacher_layer=25 is beyond"),
        (dict(teacher_layer=0), "DMAEConfig.teacher_layer must be a positive integer, got 0"),
        (dict(projector="none", teacher_hidden_size=48), "projector='none' needs equal widths"),
        (dict(distill_weight=-1.0), "DMAEConfig.distill_weight must be a number >= 0"),
        (dict(teacher_image_size=40, teacher_patch_size=8), r"teacher_image_size=40 cannot give .* 4x4 grid"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMAEConfig(**STUDENT, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# The teacher: outside the module tree, frozen, truncated, on the student's visible patches
# ----------------------------------------------------------------------------------------------------------------------
def test_teacher_is_held_outside_state_dict_parameters_and_train_mode():
    teacher = make_teacher()
    model = make_student(teacher)
    assert model.teacher is teacher and len(teacher.blocks) == 3 and isinstance(teacher.norm, torch.nn.Identity)
    extra = sorted(k for k in model.state_dict() if not k.startswith(("mae.", "decoder.")))
    assert extra == ["projector.bias", "projector.weight"]
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    assert all(not p.requires_grad for p in teacher.parameters())
    model.train()
    assert model.training and not teacher.training
    model.double()  # .to() / .double() / .cpu() carry the teacher along
    assert teacher.pos_embed.dtype == torch.float64
    model.float()
    assert teacher.pos_embed.dtype == torch.float32


def test_teacher_runs_teacher_layer_blocks_on_the_student_visible_patches():
    original = make_teacher()
    reference = copy.deepcopy(original)  # full depth, untouched
    model = make_student(original).eval()
    seen, calls = [], []
    model.teacher.patch_embed.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    for block in model.teacher.blocks:
        block.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    features = model.teacher_features(x, noise)
    assert seen == [torch.Size([2, 3, 32, 32])]  # 16 px / patch 4 -> 4 x 4 grid -> 4 x 8 = 32 px for the teacher
    assert calls == [torch.Size([2, 5, 48])] * 3  # 3 = teacher_layer blocks, on cls + 4 visible tokens
    # the same image, resized, through the full teacher: block 3's output (before the final norm) on the same patches
    resized = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    ref = reference(resized, noise=noise, mask_ratio=0.75, interpolate_pos_encoding=True, output_hidden_states=True)
    assert torch.allclose(features, ref.hidden_states[3], atol=1e-5)
    assert torch.equal(ref.ids_keep, model.mae(x, noise=noise).ids_keep)


def test_teacher_gets_the_forward_noise_when_none_is_given():
    model = make_student().eval()
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(5)
    drawn = model(x)
    torch.manual_seed(5)
    noise = torch.rand(2, 16)
    given = model(x, noise=noise)
    assert torch.equal(drawn.loss, given.loss) and torch.equal(drawn.mask, given.mask)


def test_grid_adapter_seed_case_center_crop_and_interpolate():
    # the seed: 64 px / patch 8 student, a patch-16 teacher made for 224 px (14 x 14) sees 128 px as 8 x 8 tokens
    student = dict(STUDENT, image_size=64, patch_size=8, num_hidden_layers=2)
    native = make_teacher(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    table = native.pos_embed.detach().clone()
    tables = {}
    for mode in ("center_crop", "interpolate"):
        model = make_student(copy.deepcopy(native), teacher_pos_embed=mode, **student).eval()
        assert model.config.teacher_input_size == 128 and model.teacher.config.image_size == 128
        seen = []
        model.teacher.patch_embed.register_forward_hook(
            lambda m, args, out, seen=seen: seen.append((args[0].shape, out.shape))
        )
        features = model.teacher_features(torch.randn(2, 3, 64, 64), torch.rand(2, 64))
        assert seen == [(torch.Size([2, 3, 128, 128]), torch.Size([2, 64, 32]))] and features.shape == (2, 17, 32)
        tables[mode] = model.teacher.pos_embed.detach()
    grid = table[:, 1:].reshape(14, 14, 32)
    assert torch.equal(tables["center_crop"][:, 1:].reshape(8, 8, 32), grid[3:11, 3:11])  # pad 48 px = 3 patches
    assert torch.equal(tables["interpolate"], interpolate_pos_embed(table, 8, 8))
    assert torch.equal(tables["center_crop"][:, :1], table[:, :1])
    # a student grid larger than the teacher's native table cannot be cropped out of it
    with pytest.raises(ValueError, match=r"center_crop.*cannot cut the student's 8x8 grid out of .* 6x6"):
        make_student(make_teacher(), teacher_pos_embed="center_crop", **student)


# ----------------------------------------------------------------------------------------------------------------------
# Loss values of both variants
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant",
    [
        dict(projector="linear", normalize_features=True),  # official DMAE
        dict(projector="mlp", normalize_features=False, teacher_pos_embed="center_crop"),  # the seed
    ],
)
def test_loss_is_reconstruction_plus_weighted_distillation(variant):
    model = make_student(distill_weight=0.5, **variant).eval()
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    out = model(x, noise=noise)
    mae_only = MAEForPreTraining.forward(model, x, noise=noise, output_hidden_states=True)
    assert torch.equal(out.reconstruction_loss, mae_only.loss)
    student = model.projector(mae_only.hidden_states[3])  # block 3 of 4
    target = model.teacher_features(x, noise)
    expected = feature_distillation_loss(student, target, normalize=variant["normalize_features"], loss_type="l1")
    assert torch.allclose(out.distillation_loss, expected)
    assert torch.allclose(out.loss, out.reconstruction_loss + 0.5 * out.distillation_loss)
    assert list(out.keys())[:3] == ["loss", "reconstruction_loss", "distillation_loss"]


@pytest.mark.parametrize("normalize", [True, False])
def test_self_distillation_with_identity_projector_is_zero(normalize):
    # the teacher is a copy of the student's own encoder: identical features at the same block, distance 0
    torch.manual_seed(0)
    config = DMAEConfig(**STUDENT, projector="none", normalize_features=normalize, teacher_layer=3)
    model = DMAEForPreTraining(config)
    teacher = MAEModel(MAEConfig(**STUDENT))
    teacher.load_state_dict(model.mae.state_dict())
    model.set_teacher(teacher)
    out = model.eval()(torch.randn(2, 3, 16, 16))
    assert out.distillation_loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(out.loss, out.reconstruction_loss + out.distillation_loss)


def test_projector_inits_follow_their_papers():
    linear = make_student(projector="linear").projector  # official: nn.Linear's own init
    bound = 1 / 32**0.5
    assert linear.weight.abs().max() <= bound and linear.bias.abs().max() > 0
    mlp = make_student(projector="mlp").projector  # the seed: MAE's xavier init, zero biases
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear"] and mlp[2].weight.shape == (48, 48)
    assert all(layer.bias.abs().max() == 0 for layer in (mlp[0], mlp[2]))
    assert mlp[0].weight.abs().max() > bound  # xavier bound sqrt(6 / (32 + 48)) = 0.27 > 1 / sqrt(32) = 0.18


# ----------------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------------
def test_save_and_reload_student_without_teacher(tmp_path, teacher_dir):
    model = make_student(projector="mlp")
    model.save_pretrained(tmp_path / "dmae")
    keys = set(load_file(tmp_path / "dmae" / "model.safetensors"))
    assert {k.split(".")[0] for k in keys} == {"mae", "decoder", "projector"}
    config = json.loads((tmp_path / "dmae" / "config.json").read_text())
    assert config["model_type"] == "hf_mae_dmae" and config["teacher_hidden_size"] == 48
    assert config["auto_map"]["AutoModelForPreTraining"] == "modeling_dmae.DMAEForPreTraining"
    reloaded = AutoModelForPreTraining.from_pretrained(tmp_path / "dmae")
    assert isinstance(reloaded, DMAEForPreTraining) and not reloaded.has_teacher  # built without the teacher
    assert torch.equal(reloaded.projector[2].weight, model.projector[2].weight)
    # the teacher comes from teacher_path when first needed
    config = DMAEConfig(**STUDENT, teacher_path=str(teacher_dir))
    built = DMAEForPreTraining(config)
    assert built.has_teacher and config.teacher_hidden_size == 48 and config.teacher_layer == 3
    built.save_pretrained(tmp_path / "lazy")
    lazy = DMAEForPreTraining.from_pretrained(tmp_path / "lazy")
    assert not lazy.has_teacher and len(lazy.teacher.blocks) == 3
    # a DMAE student can teach the next one: its encoder is the teacher
    chained = load_teacher(DMAEConfig(**STUDENT, teacher_path=str(tmp_path / "dmae")))
    assert type(chained) is MAEModel and torch.equal(
        chained.blocks[0].attn.qkv.weight, model.mae.blocks[0].attn.qkv.weight
    )
    # an MAE checkpoint starts a DMAE student: the projector is new
    MAEForPreTraining(MAEConfig(**STUDENT)).save_pretrained(tmp_path / "mae")
    from_mae = DMAEForPreTraining.from_pretrained(tmp_path / "mae", config=copy.deepcopy(model.config))
    assert from_mae.projector[0].weight.abs().sum() > 0


def test_student_loads_into_classifier_like_an_mae(tmp_path):
    model = make_student()
    model.save_pretrained(tmp_path / "dmae")
    classifier = MAEForImageClassification.from_pretrained(tmp_path / "dmae", num_labels=3)
    assert torch.equal(classifier.mae.blocks[0].attn.qkv.weight, model.mae.blocks[0].attn.qkv.weight)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"pixel_values": torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i))}


def test_trainer_keeps_teacher_frozen_and_logs_both_losses(tmp_path):
    model = make_student()
    args = DMAETrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=4,
        warmup_steps=1, logging_steps=2, eval_strategy="steps", eval_steps=4, save_strategy="no", report_to="none",
        disable_tqdm=True, bf16=True, use_cpu=True, base_learning_rate=None, learning_rate=1e-3,
    )  # fmt: skip
    trainer = DMAETrainer(model=model, args=args, train_dataset=_Images(), eval_dataset=_Images())
    teacher = model.teacher
    assert teacher.pos_embed.dtype == torch.bfloat16  # cast once to the run's dtype
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = model.mae.blocks[0].mlp.fc1.weight.detach().clone()
    trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not torch.equal(model.mae.blocks[0].mlp.fc1.weight, student_before)  # the student did learn
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert id(model.projector.weight) in optimized
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(train_logs) == 2
    for entry in train_logs:
        assert entry["reconstruction_loss"] > 0 and entry["distillation_loss"] > 0
    metrics = trainer.evaluate()
    parts = metrics["eval_reconstruction_loss"] + metrics["eval_distillation_loss"]  # weight 1
    assert metrics["eval_loss"] == pytest.approx(parts, rel=2e-2)  # bf16 autocast
    assert any("eval_distillation_loss" in e for e in trainer.state.log_history[:-1])  # the in-training eval


RUN_FLAGS = [
    "--dataset_name", "digits", "--preset", "demo-tiny-32", "--report_to", "none", "--disable_tqdm", "true",
    "--per_device_train_batch_size", "16", "--max_train_samples", "64", "--max_eval_samples", "16",
    "--max_steps", "4", "--warmup_steps", "1", "--logging_steps", "2", "--eval_strategy", "steps",
    "--eval_steps", "4", "--save_strategy", "no", "--num_reconstructions", "2",
]  # fmt: skip


def test_run_distill_example_on_digits(tmp_path, teacher_dir):
    out = tmp_path / "dmae"
    # the example's own main() in this process (a subprocess would add ~5 s of imports)
    example = runpy.run_path(str(ROOT / "examples" / "run_distill.py"), run_name="example")
    example["main"]([*RUN_FLAGS, "--teacher_path", str(teacher_dir), "--output_dir", str(out)])
    logs = json.loads((out / "log_history.json").read_text())
    assert all(e["distillation_loss"] > 0 and e["reconstruction_loss"] > 0 for e in logs if "loss" in e)
    assert any("eval_distillation_loss" in e for e in logs)
    config = json.loads((out / "config.json").read_text())
    assert config["teacher_layer"] == 3 and config["student_layer"] == 3 and config["teacher_patch_size"] == 8
    assert {k.split(".")[0] for k in load_file(out / "model.safetensors")} == {"mae", "decoder", "projector"}
    assert (out / "reconstructions.png").exists() and "## Distillation" in (out / "README.md").read_text()


def _official_teacher(path: Path) -> Path:
    """The tiny teacher as the official MAE code saves it: {"model": state_dict with official names}."""
    torch.manual_seed(1)
    mae = MAEForPreTraining(
        MAEConfig(**TEACHER, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2)
    )
    torch.save({"model": to_official_state_dict(mae)}, path)
    return path


def _arguments(tmp_path: Path, config_overrides: str | None = None, **training) -> tuple:
    training = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_steps=4, warmup_steps=1,
        logging_steps=2, eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, **training,
    )  # fmt: skip
    data = DataArguments(dataset_name="digits", max_train_samples=64, max_eval_samples=16, num_reconstructions=0)
    model = ModelArguments(preset="demo-tiny-32", config_overrides=config_overrides)
    return model, data, DMAETrainingArguments(**training)


@pytest.fixture(scope="module")
def official_run(tmp_path_factory) -> Path:
    """The seed's variant (MLP head, raw L1, center-cropped teacher table, mask 0.9) with an official-format teacher."""
    tmp = tmp_path_factory.mktemp("official")
    teacher = _official_teacher(tmp / "mae_pretrain_vit_tiny.pth")
    results = run_distillation(*_arguments(
        tmp, teacher_path=str(teacher), projector="mlp", normalize_features=False, teacher_pos_embed="center_crop",
        mask_ratio=0.9, config_overrides="image_size=16"))  # fmt: skip
    assert results["train_loss"] > 0 and results["eval_distillation_loss"] > 0
    return tmp / "out"


def test_run_distillation_with_official_checkpoint_teacher(official_run):
    logs = json.loads((official_run / "log_history.json").read_text())
    assert [e["step"] for e in logs if "distillation_loss" in e] == [2, 4]
    config = json.loads((official_run / "config.json").read_text())
    assert (
        config["projector"] == "mlp" and config["mask_ratio"] == 0.9 and config["teacher_pos_embed"] == "center_crop"
    )
    assert config["teacher_hidden_size"] == 48 and config["teacher_layer"] == 3


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
# Bad input fails before training, with the field named
# ----------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_before_training(tmp_path, teacher_dir):
    cases = [
        (dict(projector="none"), "projector='none' needs equal widths, but the teacher is 48 wide"),
        (dict(student_layer=5), "student_layer=5 is beyond the student's depth num_hidden_layers=4"),
        (dict(teacher_layer=9), "teacher_layer=9 is beyond the teacher's depth 4"),
        (dict(teacher_path=str(tmp_path / "missing.pth")), "teacher_path=.*missing.pth.* cannot be loaded"),
        (dict(teacher_path=None), "DMAE needs a teacher"),
    ]
    for overrides, match in cases:
        with pytest.raises(ValueError, match=match):
            run_distillation(*_arguments(tmp_path, **{"teacher_path": str(teacher_dir), **overrides}))
    with pytest.raises(ValueError, match="student_layer must be >= 1"):
        DMAETrainingArguments(output_dir=str(tmp_path), student_layer=0, report_to="none")
    # a teacher file of unknown layout: convert.py's message reaches the user, naming the path
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"teacher_path=.*odd\.pth.*unknown checkpoint layout"):
        run_distillation(*_arguments(tmp_path, teacher_path=str(tmp_path / "odd.pth")))
    # grids the adapter cannot produce: a teacher resolution off the student's grid; the teacher's 6 x 6 table
    # cannot be cropped to the student's 8 x 8
    with pytest.raises(ValueError, match=r"teacher_image_size=48 cannot give the teacher \(patch 8\) .* 8x8 grid"):
        run_distillation(*_arguments(tmp_path, teacher_path=str(teacher_dir), teacher_image_size=48))
    with pytest.raises(ValueError, match=r"center_crop.*8x8 grid"):
        run_distillation(*_arguments(tmp_path, teacher_path=str(teacher_dir), teacher_pos_embed="center_crop"))


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
