"""Trainer, recipe arguments, optimizer groups, and the example runs end to end on the built-in digits."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY as HELPER_TINY
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining
from hf_mae.training import (
    DataArguments,
    MAEFinetuningArguments,
    MAELinearProbeArguments,
    MAEPretrainingArguments,
    MAETrainer,
    ModelArguments,
    NonFiniteLossError,
    param_groups,
    run_finetuning,
    run_pretraining,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = {**HELPER_TINY, "num_hidden_layers": 3}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_param_groups_layer_decay_matches_official_scales():
    model = MAEForImageClassification(MAEConfig(**TINY, num_labels=3))
    groups = param_groups(model, learning_rate=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # official: scale = ld ** (num_layers + 1 - layer_id); stem 0, block i -> i + 1, head num_layers + 1
    assert lr_of[id(named["mae.patch_embed.proj.weight"])] == pytest.approx(0.5**4)
    assert lr_of[id(named["mae.cls_token"])] == pytest.approx(0.5**4)
    for i in range(3):
        assert lr_of[id(named[f"mae.blocks.{i}.attn.qkv.weight"])] == pytest.approx(0.5 ** (3 - i))
    assert lr_of[id(named["classifier.weight"])] == pytest.approx(1.0)
    assert lr_of[id(named["mae.fc_norm.weight"])] == pytest.approx(1.0)
    # no decay on biases, norms, pos/cls embeddings
    assert wd_of[id(named["mae.blocks.0.attn.qkv.bias"])] == 0
    assert wd_of[id(named["mae.blocks.0.norm1.weight"])] == 0
    assert wd_of[id(named["mae.pos_embed"])] == 0 and wd_of[id(named["mae.cls_token"])] == 0
    assert wd_of[id(named["mae.blocks.0.mlp.fc1.weight"])] == 0.05


def test_param_groups_pretraining_skips_frozen_pos_embed():
    model = MAEForPreTraining(MAEConfig(**TINY))
    groups = param_groups(model, learning_rate=2.0, weight_decay=0.05)
    params = {id(p) for g in groups for p in g["params"]}
    assert id(model.mae.pos_embed) not in params and id(model.decoder.pos_embed) not in params
    assert all(g["lr"] == 2.0 for g in groups)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.mae.cls_token) in decayed  # the official pretraining decays the tokens


def test_arguments_scale_lr_and_validate(tmp_path):
    args = MAEPretrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=128, report_to="none")
    assert args.learning_rate == pytest.approx(1.5e-4 * 128 / 256)
    assert args.adam_beta2 == 0.95 and args.weight_decay == 0.05 and not args.remove_unused_columns
    assert args.lr_scheduler_kwargs["min_lr"] == 0.0
    assert args.max_grad_norm == 0.0  # the official recipes never clip (transformers' default would clip at 1.0)
    ft = MAEFinetuningArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=64, gradient_accumulation_steps=4
    )
    assert ft.learning_rate == pytest.approx(5e-4) and ft.layer_decay == 0.65 and ft.max_grad_norm == 0.0
    with pytest.raises(ValueError, match="pretrain_aug"):
        MAEPretrainingArguments(output_dir=str(tmp_path), pretrain_aug="autoaugment")
    with pytest.raises(ValueError, match="warmup_epochs=10 must be shorter"):
        MAEPretrainingArguments(output_dir=str(tmp_path), num_train_epochs=5, warmup_epochs=10)
    with pytest.raises(ValueError, match="layer_decay"):
        MAEFinetuningArguments(output_dir=str(tmp_path), layer_decay=1.5)
    # mask_ratio and drop_path_rate are checked by the config's own validators, naming the arguments class
    with pytest.raises(ValueError, match=r"MAEPretrainingArguments\.mask_ratio must be in \(0, 1\), got 1\.0"):
        MAEPretrainingArguments(output_dir=str(tmp_path), mask_ratio=1.0)
    with pytest.raises(ValueError, match=r"MAEFinetuningArguments\.drop_path_rate must be in \[0, 1\), got 1\.0"):
        MAEFinetuningArguments(output_dir=str(tmp_path), drop_path_rate=1.0)
    assert "(0, 1)" in MAEPretrainingArguments.__dataclass_fields__["mask_ratio"].metadata["help"]


def test_an_explicit_warmup_steps_wins_over_the_recipes_warmup_epochs(tmp_path):
    from hf_mae.training import parse_args

    types = (ModelArguments, DataArguments, MAEPretrainingArguments)
    base = ["--output_dir", str(tmp_path), "--num_train_epochs", "2"]
    default = parse_args(types, [*base, "--warmup_epochs", "1"])[2]
    assert (default.warmup_epochs, default.warmup_steps) == (1, 0)
    for steps in ("0", "5"):  # --warmup_steps 0: no warm-up, not the recipe's 40 epochs (more than the whole run)
        args = parse_args(types, [*base, "--warmup_steps", steps])[2]
        assert args.warmup_epochs is None and args.get_warmup_steps(100) == int(steps)


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return {"pixel_values": torch.randn(3, 16, 16)}


class _NaNAfter(MAEForPreTraining):
    """Returns a NaN loss from the `start`-th forward on (in training mode)."""

    start = 2

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.calls = getattr(self, "calls", 0) + 1
        if self.training and self.calls > self.start:
            out.loss = out.loss * float("nan")
        return out


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, caplog):
    torch.manual_seed(0)
    model = _NaNAfter(MAEConfig(**TINY))
    args = MAEPretrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=20,
        warmup_steps=1,
        report_to="none",
        save_strategy="no",
        max_nonfinite_steps=3,
        disable_tqdm=True,
        base_learning_rate=None,
        learning_rate=1e-3,
    )
    snapshot = {}

    class SnapshotAfterGoodSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:  # the last step with a finite loss
                snapshot.update({k: v.clone() for k, v in model.state_dict().items()})

    trainer = MAETrainer(model=model, args=args, train_dataset=_Images(), callbacks=[SnapshotAfterGoodSteps()])
    # losses are NaN from step 3 on; without a host sync per step the counters are read every 3 steps, so the run
    # stops at the check after step 6, with steps 3-6 skipped
    with pytest.raises(NonFiniteLossError, match="4 steps in a row had a non-finite loss .seen at step 6"):
        trainer.train()
    assert trainer.nonfinite_steps_skipped == 4
    # the skipped steps left every weight (and so the optimizer's effect) untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any("optimizer step(s) skipped" in r.message for r in caplog.records)


def test_each_process_draws_its_own_masks(tmp_path, monkeypatch):
    # the Trainer seeds every process alike; MAETrainer gives process r the official MAE's seed + r, so that the
    # processes of a DDP run do not mask their images alike at every step (process 0 keeps a one-process run's masks)
    masks = {}

    class Recording(MAETrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, True, num_items_in_batch)
            masks.setdefault(self.args.process_index, []).append(out.mask.clone())
            return (loss, out) if return_outputs else loss

    for rank in (0, 1):
        monkeypatch.setattr(MAEPretrainingArguments, "process_index", property(lambda self, r=rank: r))
        torch.manual_seed(0)
        args = MAEPretrainingArguments(output_dir=str(tmp_path / str(rank)), per_device_train_batch_size=4,
                                       max_steps=2, warmup_steps=1, report_to="none", save_strategy="no",
                                       disable_tqdm=True, seed=0)  # fmt: skip
        Recording(model=MAEForPreTraining(MAEConfig(**TINY)), args=args, train_dataset=_Images()).train()
    assert len(masks[0]) == len(masks[1]) == 2
    assert not any(torch.equal(a, b) for a, b in zip(masks[0], masks[1]))


def _run(cmd, timeout=600):
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_pretrain_then_finetune_examples_on_digits(tmp_path):
    common = [
        "--dataset_name", "digits", "--preset", "demo-tiny-32", "--report_to", "none", "--disable_tqdm", "true",
        "--per_device_train_batch_size", "32", "--max_train_samples", "128", "--max_eval_samples", "32",
        "--max_steps", "6", "--warmup_steps", "1", "--logging_steps", "2", "--eval_strategy", "steps",
        "--eval_steps", "6",
    ]  # fmt: skip
    pt, ft = tmp_path / "pt", tmp_path / "ft"
    _run([sys.executable, "examples/run_pretrain.py", *common, "--output_dir", str(pt), "--save_strategy", "no"])
    results = json.loads((pt / "results.json").read_text())
    assert "eval_loss" in results and results["eval_loss"] > 0
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "curves.png",
                 "reconstructions.png"):  # fmt: skip
        assert (pt / name).exists(), name
    assert "Training recipe" in (pt / "README.md").read_text()
    _run([sys.executable, "examples/run_finetune.py", *common, "--output_dir", str(ft), "--save_strategy", "no",
          "--model_name_or_path", str(pt), "--finetune_aug", "full"])  # fmt: skip
    results = json.loads((ft / "results.json").read_text())
    assert 0 <= results["top1"] <= 100 and results["top5"] >= results["top1"]
    # a fine-tuned directory works with transformers' pipeline (image processor saved alongside)
    from PIL import Image
    from transformers import pipeline

    import hf_mae  # noqa: F401

    classify = pipeline("image-classification", model=str(ft))
    predictions = classify(Image.new("RGB", (20, 20), "white"), top_k=3)
    assert len(predictions) == 3 and predictions[0]["label"] in [str(i) for i in range(10)]


def test_linear_probe_trains_only_the_head(tmp_path):
    args = [
        "--dataset_name", "digits", "--preset", "demo-tiny-32", "--report_to", "none", "--disable_tqdm", "true",
        "--per_device_train_batch_size", "32", "--max_train_samples", "64", "--max_eval_samples", "32",
        "--max_steps", "3", "--warmup_steps", "1", "--output_dir", str(tmp_path / "lp"), "--save_strategy", "no",
    ]  # fmt: skip
    _run([sys.executable, "examples/run_linear_probe.py", *args])
    config = json.loads((tmp_path / "lp" / "config.json").read_text())
    assert config["head_type"] == "linear_probe" and config["pooling"] == "cls"


def test_linear_probe_run_leaves_the_encoder_unchanged(tmp_path):
    pretrained = MAEForPreTraining(MAEConfig(**{**TINY, "image_size": 32, "num_labels": 10}))
    pretrained.save_pretrained(tmp_path / "pt")
    args = MAELinearProbeArguments(
        output_dir=str(tmp_path / "lp"), report_to="none", disable_tqdm=True, per_device_train_batch_size=32,
        max_steps=3, warmup_steps=1, save_strategy="no", use_cpu=True,
    )  # fmt: skip
    data = DataArguments(dataset_name="digits", max_train_samples=64, max_eval_samples=32)
    run_finetuning(ModelArguments(model_name_or_path=str(tmp_path / "pt")), data, args)
    before, after = pretrained.state_dict(), load_file(tmp_path / "lp" / "model.safetensors")
    encoder = [k for k in after if k.startswith("mae.")]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)
    model = MAEForImageClassification(MAEConfig(**{**TINY, "image_size": 32, "num_labels": 10}))
    assert all(p.requires_grad for p in model.mae.parameters())  # built directly: nothing frozen


def test_pretraining_figure_and_card_leave_the_model_in_place(tmp_path):
    model = MAEForPreTraining(MAEConfig(**{**TINY, "image_size": 32})).to(torch.bfloat16)
    args = MAEPretrainingArguments(
        output_dir=str(tmp_path), report_to="none", disable_tqdm=True, per_device_train_batch_size=16, max_steps=1,
        warmup_steps=0, save_strategy="steps", save_steps=1, use_cpu=True, bf16=True,
    )  # fmt: skip
    data = DataArguments(
        dataset_name="digits", max_train_samples=16, max_eval_samples=4, num_reconstructions=2, crop_pct=1.0
    )
    results = run_pretraining(ModelArguments(), data, args, model=model)
    assert next(model.parameters()).dtype == torch.bfloat16  # the figure did not cast the trained model
    for path in (tmp_path, tmp_path / "checkpoint-1"):  # the run's image processor (its crop_pct), checkpoints too
        assert json.loads((path / "preprocessor_config.json").read_text())["size"] == {"shortest_edge": 32}, path
    assert (tmp_path / "reconstructions.png").is_file()
    assert json.loads((tmp_path / "results.json").read_text()) == results
    card = (tmp_path / "README.md").read_text()
    assert "## Results" in card and f"| eval_loss | {results['eval_loss']:.6g} |" in card  # via save_metrics


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    # 4 steps per epoch, a checkpoint every 3 steps: killed after checkpoint-3 (epoch 0) and, resumed, after
    # checkpoint-6 (epoch 1), both mid-epoch; the final weights must be the uninterrupted run's
    common = [
        "--dataset_name", "digits", "--preset", "demo-tiny-32", "--report_to", "none", "--disable_tqdm", "true",
        "--per_device_train_batch_size", "16", "--max_train_samples", "64", "--max_steps", "10",
        "--warmup_steps", "2", "--save_steps", "3", "--num_reconstructions", "0", "--eval_strategy", "no",
        "--seed", "3",
    ]  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run([sys.executable, "examples/run_pretrain.py", *common, "--output_dir", str(full)])
    for step, resume in ((3, []), (6, ["--resume_from_checkpoint", str(killed / "checkpoint-3")])):
        result = subprocess.run(
            [sys.executable, "tests/scripts/sigkill_after_save.py", "pretrain", str(step), *common,
             "--output_dir", str(killed), *resume],
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == -9, result.stderr[-3000:]  # really killed by SIGKILL
        assert (killed / f"checkpoint-{step}").is_dir() and not (killed / "model.safetensors").exists()
    _run(
        [sys.executable, "examples/run_pretrain.py", *common, "--output_dir", str(killed), "--resume_from_checkpoint"]
    )
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_match_one_process_at_same_global_batch(tmp_path):
    # step 3's loss is NaN on the only process of the first run and on rank 1 only of the second: both skip step 3
    script = "tests/scripts/ddp_finetune.py"
    _run([sys.executable, script, str(tmp_path / "one"), "16", "0"])
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml",
        "--main_process_port", str(_free_port()), script, str(tmp_path / "two"), "8", "1",
    ]  # fmt: skip
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finished = all((tmp_path / "two" / name).exists() for name in ("rank0.json", "rank1.json", "final.pt"))
    # gloo on CPU sometimes aborts a rank while tearing down after all work is written ("terminate called without
    # an active exception"); that is not a training failure, anything else is
    teardown_abort = finished and "terminate called without an active exception" in result.stderr
    assert result.returncode == 0 or teardown_abort, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 and r["steps"] == 4 for r in ranks)
    assert [r["skipped"] for r in ranks] == [1, 1]  # rank 0's loss was finite, and it skipped the step all the same
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert single["skipped"] == 1
    # the logged loss is the mean over the global batch, not multiplied by the number of processes (step 3 aside: it
    # logs 0 for the skipped process)
    for step in (0, 1, 3):
        assert ranks[0]["losses"][step] == pytest.approx(single["losses"][step], rel=1e-5)
    one = torch.load(tmp_path / "one" / "final.pt")
    two = torch.load(tmp_path / "two" / "final.pt")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), key


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("lars", [False, True], ids=["adamw", "lars"])
def test_gradient_accumulation_matches_the_full_batch(tmp_path, lars):
    # a mean loss over the batch: 2 x 8 accumulated must give the gradient (and logged loss) of one batch of 16
    runs = {}
    for batch, accumulation in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        model = MAEForImageClassification(MAEConfig(**TINY, num_labels=3, drop_path_rate=0.0))
        args = MAEFinetuningArguments(
            output_dir=str(tmp_path / f"ga{accumulation}"), per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, max_steps=2, warmup_epochs=1, logging_steps=1, lars=lars,
            base_learning_rate=None, learning_rate=1e-2, report_to="none", save_strategy="no", disable_tqdm=True,
            finetune_aug="small", seed=0,
        )  # fmt: skip
        trainer = MAETrainer(model=model, args=args, train_dataset=_Labelled())
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        runs[accumulation] = (model.state_dict(), losses)
    (full, full_losses), (accumulated, accumulated_losses) = runs[1], runs[2]
    assert accumulated_losses == pytest.approx(full_losses, rel=1e-5)
    for key in full:
        assert torch.allclose(full[key], accumulated[key], atol=1e-6), key


def test_push_to_hub_passes_through_with_recipe_card(tmp_path, monkeypatch):
    from unittest import mock

    from huggingface_hub import HfApi

    from hf_mae.training import DataArguments, ModelArguments, run_pretraining

    uploads = []

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        readme = Path(folder_path) / "README.md"
        uploads.append(readme.read_text() if readme.exists() else "")
        return mock.MagicMock()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: mock.MagicMock(repo_id="user/tiny-mae"))
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    args = MAEPretrainingArguments(
        output_dir=str(tmp_path / "pt"), per_device_train_batch_size=32, max_steps=2, warmup_steps=1, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, push_to_hub=True, hub_model_id="user/tiny-mae",
        hub_token="hf_fake", hub_strategy="end",
    )  # fmt: skip
    data = DataArguments(dataset_name="digits", max_train_samples=64, max_eval_samples=16, num_reconstructions=2)
    run_pretraining(ModelArguments(preset="demo-tiny-32"), data, args)
    repo, files = uploads[-2]
    assert repo == "user/tiny-mae"
    assert {"model.safetensors", "config.json", "README.md", "curves.png", "reconstructions.png"} <= set(files)
    assert "Training recipe" in uploads[-1] and "eval_loss" in uploads[-1]
