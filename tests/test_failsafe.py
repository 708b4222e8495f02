"""Fail-safe training: non-finite gradients never reach the weights, non-finite weights are never saved, a killed run
resumes exactly, bad input is a clear error."""

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from helpers import TINY
from test_fast_path import _common_args, _device_pretraining_data, _same, _Snapshots
from transformers import TrainerCallback

from hf_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining
from hf_mae.data import (
    ClassificationCollator,
    PretrainCollator,
    apply_transform,
    build_finetune_transform,
    build_mixup,
    build_pretrain_transform,
)
from hf_mae.data.device_data import DeviceAugmentCollator, DeviceImageDataset
from hf_mae.training import (
    DataArguments,
    MAEFinetuningArguments,
    MAEPretrainingArguments,
    MAETrainer,
    ModelArguments,
    NonFiniteWeightsError,
    newest_finite_checkpoint,
    parse_args,
)
from hf_mae.training.trainer import (
    OutputDirExistsError,
    foreign_checkpoint_reason,
    incomplete_reason,
    resolve_resume_checkpoint,
)


class _InfGradOnCalls(MAEForPreTraining):
    """Keeps the loss finite but makes the cls token's gradient inf on the forward calls (1-based) in `bad`: the
    huge-learning-rate failure where the loss stays finite and backward overflows."""

    bad: tuple[int, ...] = ()

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.calls = getattr(self, "calls", 0) + 1
        if self.training and self.calls in self.bad:
            z = self.mae.cls_token.sum()
            out.loss = out.loss + torch.sqrt(z - z.detach())  # adds exactly 0; d sqrt(x)/dx at 0 is inf
        return out


@pytest.mark.parametrize("overrides", [{}, {"optim": "adamw_torch"}, {"max_grad_norm": 1.0}], ids=str)
def test_nonfinite_gradient_with_finite_loss_is_skipped(overrides, tmp_path):
    torch.manual_seed(0)
    model = _InfGradOnCalls(MAEConfig(**TINY))
    model.bad = (3,)
    snapshots = _Snapshots(model)
    dataset, collator = _device_pretraining_data()
    args = MAEPretrainingArguments(**_common_args(tmp_path, max_nonfinite_steps=2, logging_steps=3, **overrides))
    trainer = MAETrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[snapshots])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(torch.isfinite(torch.tensor(losses)))  # the loss never showed the problem
    assert trainer.nonfinite_steps_skipped == 1
    assert _same(snapshots.weights[2], snapshots.weights[3])  # step 3 changed nothing
    assert not _same(snapshots.weights[3], snapshots.weights[4])  # and training went on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_weights_are_never_saved(tmp_path):
    torch.manual_seed(0)
    model = MAEForPreTraining(MAEConfig(**TINY))
    dataset, collator = _device_pretraining_data()
    args = MAEPretrainingArguments(**_common_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=4))
    trainer = MAETrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    assert newest_finite_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    with torch.no_grad():
        model.mae.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    target = tmp_path / "final"
    with pytest.raises(NonFiniteWeightsError, match=r"(?s)Refusing to save .*final.*mae\.blocks\.0\.mlp\.fc1\.weight"
                       r".*checkpoint-4"):  # fmt: skip
        trainer.save_model(str(target))
    assert not (target / "model.safetensors").exists()
    # a checkpoint holding NaN is not offered for resuming
    nan_checkpoint = tmp_path / "checkpoint-6"
    MAEForPreTraining.save_pretrained(model, nan_checkpoint, safe_serialization=True)
    assert newest_finite_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    with pytest.raises(NonFiniteWeightsError, match="checkpoint-4"):
        trainer.save_model()


def _pretrain_args(tmp_path, **overrides) -> MAEPretrainingArguments:
    return MAEPretrainingArguments(**_common_args(tmp_path, save_strategy="steps", save_steps=2, **overrides))


def _trainer(args, **kwargs) -> MAETrainer:
    torch.manual_seed(0)
    dataset, collator = _device_pretraining_data()
    return MAETrainer(model=MAEForPreTraining(MAEConfig(**TINY)), args=args, train_dataset=dataset,
                      data_collator=collator, **kwargs)  # fmt: skip


def test_a_finished_run_is_not_overwritten_without_the_flag(tmp_path):
    trainer = _trainer(_pretrain_args(tmp_path, max_steps=4))
    trainer.train()
    trainer.save_model()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(
        OutputDirExistsError, match=r"already holds a run .*model\.safetensors.*--overwrite_output_dir"
    ):
        _trainer(_pretrain_args(tmp_path, max_steps=4)).train()
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}  # nothing touched
    # the explicit opt-in replaces it; the old checkpoints go, so `latest` cannot mix the two runs
    (tmp_path / "results.json").write_text("{}")  # the previous run's mark of a finished run
    _trainer(_pretrain_args(tmp_path, max_steps=2, overwrite_output_dir=True)).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / "results.json").exists()  # a replacement that fails before its end is no finished run


def test_resume_latest_skips_incomplete_checkpoints(tmp_path, caplog):
    _trainer(_pretrain_args(tmp_path, max_steps=4)).train()
    # a kill while saving checkpoint-6: weights half written, no trainer_state.json yet
    (tmp_path / "checkpoint-6").mkdir()
    data = (tmp_path / "checkpoint-4" / "model.safetensors").read_bytes()
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert incomplete_reason(tmp_path / "checkpoint-6") is not None
    assert resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-4")
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    # a complete-looking checkpoint whose weights are truncated is incomplete too
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text(
        (tmp_path / "checkpoint-4" / "trainer_state.json").read_text().replace('"global_step": 4', '"global_step": 8')
    )
    (tmp_path / "checkpoint-8" / "model.safetensors").write_bytes(data[:100])
    assert "unreadable" in incomplete_reason(tmp_path / "checkpoint-8")
    with pytest.raises(
        ValueError, match=r"checkpoint-8 cannot be resumed from.*newest complete one is .*checkpoint-4"
    ):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-8"), tmp_path)
    trainer = _trainer(_pretrain_args(tmp_path, max_steps=6))
    trainer.train(resume_from_checkpoint="latest")
    assert trainer.state.global_step == 6
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume_checkpoint(True, tmp_path / "empty")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 4-step pretraining run with checkpoint-2 and checkpoint-4 (not to be changed: copy it)."""
    out = tmp_path_factory.mktemp("finished")
    _trainer(_pretrain_args(out, max_steps=4)).train()
    return out


@pytest.mark.parametrize(
    "damage, reason",
    [
        (("optimizer.pt", "delete"), "optimizer.pt missing"),
        (("scheduler.pt", "delete"), "scheduler.pt missing"),
        (("rng_state.pth", "delete"), "rng_state.pth missing"),
        (("optimizer.pt", "truncate"), "optimizer.pt is unreadable"),
        (("scheduler.pt", "truncate"), "scheduler.pt is unreadable"),
        (("rng_state.pth", "truncate"), "rng_state.pth is unreadable"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, tuple) else None,
)
def test_a_checkpoint_missing_its_training_state_is_incomplete(finished_run, tmp_path, caplog, damage, reason):
    """The Trainer would resume without a missing optimizer / scheduler / RNG file (a fresh optimizer: silently not
    the interrupted run) and fails with a raw error on a truncated one: such a checkpoint is skipped and named."""
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    name, how = damage
    path = tmp_path / "checkpoint-4" / name
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert reason in incomplete_reason(tmp_path / "checkpoint-4")
    assert resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-2")
    assert f"skipping incomplete checkpoint {tmp_path / 'checkpoint-4'}: {reason}" in caplog.text
    # a save_only_model checkpoint holds no training state at all: it resumes (the weights), as with the Trainer
    for state in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (tmp_path / "checkpoint-2" / state).unlink()
    assert incomplete_reason(tmp_path / "checkpoint-2") is None


class _Killed(BaseException):
    """Stands for SIGKILL in-process: no `except Exception` and no cleanup handler of the trainer sees it."""


def test_a_checkpoint_of_another_model_is_refused_naming_it(finished_run, tmp_path):
    """The Trainer loads a checkpoint non-strictly: a fine-tune resumed from a pretraining checkpoint failed on the
    optimizer with a message naming neither, and a weights-only checkpoint of another size loaded in part, silently."""
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(finished_run / "checkpoint-4", checkpoint)
    classifier = MAEForImageClassification(MAEConfig(**TINY, num_labels=3))
    trainer = MAETrainer(model=classifier, args=MAEFinetuningArguments(**_common_args(tmp_path / "ft")))
    with pytest.raises(ValueError, match=r"checkpoint-4 does not belong to this run: it holds a MAEForPreTraining"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    # the same weights in a subclass (a user's own forward) are this run's: the keys and shapes decide, not the name
    assert foreign_checkpoint_reason(checkpoint, _InfGradOnCalls(MAEConfig(**TINY))) is None
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):  # as --save_only_model writes it
        (checkpoint / name).unlink()
    wider = MAEForPreTraining(MAEConfig(**{**TINY, "decoder_hidden_size": 2 * TINY["decoder_hidden_size"]}))
    trainer = MAETrainer(model=wider, args=_pretrain_args(tmp_path / "pt"))
    with pytest.raises(ValueError, match=r"checkpoint-4 does not belong .*another model's: other shapes for decoder"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_a_kill_during_a_save_leaves_no_checkpoint_that_looks_complete(tmp_path, caplog, monkeypatch):
    from transformers.trainer_utils import get_last_checkpoint

    save_rng_state = MAETrainer._save_rng_state

    def killed_at_step_4(self, output_dir):  # weights, optimizer and scheduler of checkpoint-4 are written by now
        if self.state.global_step == 4:
            raise _Killed
        save_rng_state(self, output_dir)

    monkeypatch.setattr(MAETrainer, "_save_rng_state", killed_at_step_4)
    with pytest.raises(_Killed):
        _trainer(_pretrain_args(tmp_path, max_steps=6)).train()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["_partial-checkpoint-4", "checkpoint-2"]
    assert (tmp_path / "_partial-checkpoint-4" / "model.safetensors").is_file()  # the kill came mid-save
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")  # for transformers' own lookup too
    assert resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-2")
    assert "_partial-checkpoint-4: the save of that checkpoint was interrupted" in caplog.text
    trainer = _trainer(_pretrain_args(tmp_path, max_steps=6, save_total_limit=2))
    trainer.train(resume_from_checkpoint="latest")
    assert trainer.state.global_step == 6
    # the interrupted save was redone, and rotation kept the newest two
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-4", "checkpoint-6"]
    assert all(incomplete_reason(tmp_path / name) is None for name in ("checkpoint-4", "checkpoint-6"))


def test_atomic_checkpoints_hold_what_the_stock_trainer_writes(tmp_path, monkeypatch):
    """The same files, rotation and best-model tracking as `transformers.Trainer._save_checkpoint`, whose steps
    MAETrainer._write_checkpoint repeats: this fails if a transformers release writes something more."""
    import json

    import transformers

    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    eval_images = [{"pixel_values": image, "label": 0} for image in images]
    best = dict(eval_strategy="steps", eval_steps=2, save_total_limit=1, load_best_model_at_end=True,
                metric_for_best_model="loss", greater_is_better=True)  # fmt: skip
    runs = {}
    for name in ("stock", "atomic"):
        if name == "stock":
            monkeypatch.setattr(MAETrainer, "_save_checkpoint", transformers.Trainer._save_checkpoint)
        trainer = _trainer(_pretrain_args(tmp_path / name, max_steps=6, **best), eval_dataset=eval_images)
        trainer.train()
        monkeypatch.undo()
        checkpoints = sorted(p for p in (tmp_path / name).iterdir() if p.is_dir())
        state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
        runs[name] = (
            [(p.name, sorted(f.name for f in p.iterdir())) for p in checkpoints],
            Path(state["best_model_checkpoint"]).name,
            {k: v for k, v in state.items() if k not in ("best_model_checkpoint", "log_history")},
        )
    assert runs["atomic"] == runs["stock"]
    # rotation and the end of training (save_total_limit=1 with load_best_model_at_end) kept the best checkpoint only
    assert [name for name, _ in runs["stock"][0]] == [runs["stock"][1]]


def test_a_run_whose_final_save_fails_is_not_marked_finished(tmp_path, monkeypatch):
    """results.json marks a run finished (the study skips it, a rerun refuses to replace it): it must not exist
    when the final model was refused (NaN weights) or its save was killed half-way."""
    from hf_mae.study import is_finished
    from hf_mae.training.pipeline import _finish

    trainer = _trainer(_pretrain_args(tmp_path, max_steps=2))
    trainer.train()
    run = type("Run", (), {"output_dir": tmp_path})
    with torch.no_grad():
        trainer.model.mae.cls_token.fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError):
        _finish(trainer, {"eval_loss": float("nan")}, "pretraining", {})
    assert not is_finished(run)
    with torch.no_grad():
        trainer.model.mae.cls_token.fill_(0.0)

    def killed_while_saving(self, output_dir=None, _internal_call=False):
        (Path(self.args.output_dir) / "model.safetensors").write_bytes(b"half")
        raise _Killed

    monkeypatch.setattr(MAETrainer, "save_model", killed_while_saving)
    with pytest.raises(_Killed):
        _finish(trainer, {"eval_loss": 1.0}, "pretraining", {})
    assert not is_finished(run)
    monkeypatch.undo()
    _finish(trainer, {"eval_loss": 1.0}, "pretraining", {})
    assert is_finished(run) and (tmp_path / "model.safetensors").stat().st_size > 100


def test_full_disk_says_no_space_and_names_the_path(tmp_path, monkeypatch):
    trainer = _trainer(_pretrain_args(tmp_path, max_steps=2))

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 123 vs 456: basic_ios::clear")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"No space left on device while saving .*checkpoint-2"):
        trainer.train()


def test_an_explicit_learning_rate_wins_and_blr_takes_none(tmp_path):
    out = ["--output_dir", str(tmp_path), "--report_to", "none", "--per_device_train_batch_size", "64"]
    types = (ModelArguments, DataArguments, MAEPretrainingArguments)
    assert parse_args(types, out)[2].learning_rate == pytest.approx(1.5e-4 * 64 / 256)  # the recipe's blr
    args = parse_args(types, [*out, "--learning_rate", "3e-3"])[2]
    assert args.learning_rate == 3e-3 and args.base_learning_rate is None
    args = parse_args(types, [*out, "--base_learning_rate", "none"])[2]
    assert args.base_learning_rate is None and args.learning_rate == 5e-5  # transformers' default
    args = parse_args(types, [*out, "--base_learning_rate", "1e-3"])[2]
    assert args.learning_rate == pytest.approx(1e-3 * 64 / 256)
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path}\nreport_to: none\nbase_learning_rate: none\nlearning_rate: 0.002\n")
    assert parse_args(types, [str(config)])[2].learning_rate == 0.002
    with pytest.raises(ValueError, match="base_learning_rate must be a number or none, got 'fast'"):
        MAEPretrainingArguments(output_dir=str(tmp_path), base_learning_rate="fast")


def test_warmup_epochs_take_effect_in_a_plain_trainer(tmp_path):
    import transformers

    dataset, collator = _device_pretraining_data()  # 32 images, batch 8: 4 steps per epoch
    args = MAEPretrainingArguments(**_common_args(tmp_path, max_steps=-1, num_train_epochs=4, warmup_epochs=2,
                                                  warmup_steps=None))  # fmt: skip
    trainer = transformers.Trainer(model=MAEForPreTraining(MAEConfig(**TINY)), args=args, train_dataset=dataset,
                                   data_collator=collator)  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=16)
    lrs = []
    for _ in range(10):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs[8] == pytest.approx(args.learning_rate) and lrs[4] == pytest.approx(args.learning_rate / 2)
    capped = MAEPretrainingArguments(**_common_args(tmp_path, max_steps=10, warmup_epochs=1, warmup_steps=None))
    with pytest.raises(ValueError, match="MAETrainer"):
        capped.get_warmup_steps(10)


def test_bare_resume_flag_means_latest(tmp_path):
    types = (ModelArguments, DataArguments, MAEPretrainingArguments)
    base = ["--output_dir", str(tmp_path), "--report_to", "none"]
    assert parse_args(types, [*base, "--resume_from_checkpoint"])[2].resume_from_checkpoint == "latest"
    args = parse_args(types, ["--resume_from_checkpoint", *base])[2]
    assert args.resume_from_checkpoint == "latest" and args.output_dir == str(tmp_path)
    assert parse_args(types, base)[2].resume_from_checkpoint is None


def test_config_overrides_on_a_saved_model_are_validated(tmp_path):
    MAEForPreTraining(MAEConfig(**TINY)).save_pretrained(tmp_path / "pt")
    for overrides, field in (({"mask_ratio": 1.5}, "mask_ratio"), ({"pooling": "max"}, "pooling"),
                             ({"num_attention_heads": 5}, "num_attention_heads")):  # fmt: skip
        with pytest.raises(ValueError, match=f"MAEConfig.{field}"):
            MAEConfig.from_pretrained(tmp_path / "pt", **overrides)
        with pytest.raises(ValueError, match=f"MAEConfig.{field}"):
            MAEConfig(**TINY).update(overrides)


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_steps: three\n", r"max_steps must be an integer, got 'three'"),
        ("bf16: 'maybe'\n", r"bf16 must be true or false, got 'maybe'"),
        ("learning_rate: fast\n", r"learning_rate must be a number, got 'fast'"),
        ("- output_dir\n- x\n", r"expected a mapping .* got list"),
        ("42\n", r"expected a mapping .* got int"),
        ("model_name_or_path: {a: 1}\n", r"model_name_or_path must be a string, got \{'a': 1\}"),
        ("resume_from_checkpoint: [out/checkpoint-2]\n", r"resume_from_checkpoint must be a string, got \["),
    ],
)
def test_bad_yaml_values_name_the_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(f"output_dir: {tmp_path}\n" + text if text[0].isalpha() else text)
    with pytest.raises(ValueError, match=message):
        parse_args((ModelArguments, DataArguments, MAEPretrainingArguments), [str(path)])


def test_yaml_strings_take_their_field_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"output_dir: {tmp_path}\nreport_to: none\nmax_steps: '7'\nbf16: 'no'\nmask_ratio: '0.6'\n"
                    "model_revision: 1234\nresume_from_checkpoint: true\n")  # fmt: skip
    model_args, _, args = parse_args((ModelArguments, DataArguments, MAEPretrainingArguments), [str(path)])
    assert args.max_steps == 7 and args.bf16 is False and args.mask_ratio == 0.6
    assert model_args.model_revision == "1234"  # a string, as on the command line
    with pytest.raises(ValueError, match="latest: no complete checkpoint"):  # `true` means the newest checkpoint
        resolve_resume_checkpoint(args.resume_from_checkpoint, tmp_path)


def test_example_rerun_into_a_finished_run_stops_with_a_message(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    command = [sys.executable, "examples/run_pretrain.py", "--dataset_name", "digits", "--preset", "demo-tiny-32",
               "--output_dir", str(tmp_path), "--report_to", "none", "--max_steps", "1", "--max_train_samples", "32",
               "--per_device_train_batch_size", "16", "--warmup_steps", "0"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "OutputDirExistsError" in result.stderr and "--overwrite_output_dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_checkpoint_file_names_the_file(tmp_path, suffix):
    from safetensors.torch import save_file

    from hf_mae.convert import load_checkpoint_file, load_encoder, to_timm_state_dict

    state = to_timm_state_dict(MAEForPreTraining(MAEConfig(**TINY)))
    path = tmp_path / f"vit{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path}.*truncated or corrupt"):
        load_checkpoint_file(path)
    with pytest.raises(ValueError, match=rf"{path}.*truncated or corrupt"):
        load_encoder(path, kind="timm")


def test_from_pretrained_with_truncated_weights_names_the_directory(tmp_path):
    MAEForPreTraining(MAEConfig(**TINY)).save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{tmp_path}: a \*\.safetensors weights file is truncated or corrupt"):
        MAEForPreTraining.from_pretrained(tmp_path)


@pytest.mark.parametrize("text, message", [("{not json", "is not a valid JSON file"), ("[1, 2]", "holds a list")])
def test_a_config_json_that_is_no_json_object_names_the_file(tmp_path, text, message):
    from hf_mae.training import load_teacher

    MAEForPreTraining(MAEConfig(**TINY)).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{tmp_path}.*{message}"):
        load_teacher(str(tmp_path))
    with pytest.raises((ValueError, OSError), match=rf"{tmp_path}.*(config.json|{message})"):
        MAEConfig.from_pretrained(tmp_path)


# -- exact resume mid-epoch ------------------------------------------------------------------------------------------


class _StopAfterSave(TrainerCallback):
    """Ends the process's run right after checkpoint `step` is written, as a kill would (tests/scripts/
    sigkill_after_save.py kills for real)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Stopped


class _Stopped(Exception):
    pass


@functools.cache
def _image_dataset(n: int = 40):
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)


def _resume_run(out, task: str, device_data: bool, stop_at=None, resume=None, **overrides) -> dict:
    """8 steps of 8 images from 40 (5 steps per epoch), a checkpoint every 3: steps 3 and 6 are mid-epoch."""
    transformers.set_seed(0)
    data = _image_dataset()
    args = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=8, warmup_steps=2, save_steps=3,
                save_strategy="steps", logging_steps=100, report_to="none", disable_tqdm=True, seed=0,
                base_learning_rate=None, learning_rate=1e-3, dataloader_num_workers=0)  # fmt: skip
    args.update(overrides)
    if device_data:
        images = torch.stack([torch.tensor(np.asarray(image)).permute(2, 0, 1) for image in data["image"]])
        train = DeviceImageDataset(images, torch.tensor(data["label"]))
        collator = DeviceAugmentCollator(train, 16, seed=0)
    mixup = None
    if task == "pretrain":
        model = MAEForPreTraining(MAEConfig(**TINY))
        args = MAEPretrainingArguments(**args)
        if not device_data:
            train, collator = apply_transform(data, build_pretrain_transform(16)), PretrainCollator()
    else:  # MAE's full fine-tuning recipe: RandAugment, random erasing, Mixup / CutMix, drop path
        model = MAEForImageClassification(MAEConfig(**TINY, num_labels=3, drop_path_rate=0.1))
        args = MAEFinetuningArguments(**args)
        if not device_data:
            train = apply_transform(data, build_finetune_transform(16, "full", re_prob=0.5))
            collator = ClassificationCollator()
        mixup = build_mixup("full", 3)
    callbacks = [_StopAfterSave(stop_at)] if stop_at else []
    trainer = MAETrainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=callbacks,
                         mixup=mixup)  # fmt: skip
    try:
        trainer.train(resume_from_checkpoint=resume)
    except _Stopped:
        return {}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "task, device_data, overrides",
    [
        pytest.param("pretrain", False, {}, id="pretrain"),
        pytest.param("finetune", False, {}, id="finetune-randaugment-mixup-droppath"),
        pytest.param("pretrain", True, {}, id="pretrain-device-data"),
        pytest.param("finetune", True, {}, id="finetune-device-data-mixup", marks=pytest.mark.slow),
        pytest.param(
            "pretrain",
            False,
            {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4},
            id="accumulation",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_resume_mid_epoch_matches_the_uninterrupted_run(task, device_data, overrides, tmp_path):
    # stopped after checkpoint-3 (epoch 0, step 3 of 5), resumed and stopped after checkpoint-6 (epoch 1, step 1 of
    # 5), resumed to the end: every augmentation, mask and drop-path draw must be the uninterrupted run's
    full = _resume_run(tmp_path / "full", task, device_data, **overrides)
    killed = tmp_path / "killed"
    _resume_run(killed, task, device_data, stop_at=3, **overrides)
    _resume_run(killed, task, device_data, stop_at=6, resume=str(killed / "checkpoint-3"), **overrides)
    resumed = _resume_run(killed, task, device_data, resume="latest", **overrides)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.allclose(full[key], resumed[key], atol=1e-6), key


@pytest.mark.slow
def test_resume_mid_epoch_with_persistent_workers(tmp_path):
    overrides = dict(dataloader_num_workers=2, dataloader_persistent_workers=True)
    full = _resume_run(tmp_path / "full", "finetune", False, **overrides)
    killed = tmp_path / "killed"
    _resume_run(killed, "finetune", False, stop_at=6, **overrides)
    resumed = _resume_run(killed, "finetune", False, resume="latest", **overrides)
    for key in full:
        assert torch.allclose(full[key], resumed[key], atol=1e-6), key


def _epoch_draws(dataset, epochs: int, **loader_kwargs) -> list[torch.Tensor]:
    # a generator of its own for the workers' base seed, as MAETrainer gives its train loader
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, generator=torch.Generator(), **loader_kwargs)
    draws = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        draws.append(torch.cat([batch for batch in loader]))
    return draws


class _RandomItems(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(()) + 10 * i


def test_batch_augmentation_depends_on_seed_epoch_and_indices_only():
    from hf_mae.data.seeding import EpochSeededDataset

    torch.manual_seed(0)
    before = torch.get_rng_state()
    in_process = _epoch_draws(EpochSeededDataset(_RandomItems(), seed=0), 3)
    assert torch.equal(torch.get_rng_state(), before)  # data loading left the global generator alone
    assert not torch.equal(in_process[0], in_process[1]) and not torch.equal(in_process[1], in_process[2])
    # the same draws in (persistent) worker processes, which see each new epoch
    workers = _epoch_draws(EpochSeededDataset(_RandomItems(), seed=0), 3, num_workers=2, persistent_workers=True)
    assert all(torch.equal(a, b) for a, b in zip(in_process, workers))
    assert not torch.equal(in_process[0], _epoch_draws(EpochSeededDataset(_RandomItems(), seed=1), 1)[0])

    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    collator = DeviceAugmentCollator(DeviceImageDataset(images), image_size=16, seed=0)
    first = collator([4, 1])["pixel_values"]
    collator([0, 2])  # what came before does not matter
    assert torch.equal(collator([4, 1])["pixel_values"], first)
    collator.set_epoch(1)
    assert not torch.equal(collator([4, 1])["pixel_values"], first)


# -- data errors a user can act on -----------------------------------------------------------------------------------


def _image_folder(root: Path, files: dict[str, bytes | None]) -> Path:
    """`root/<relative path>`: a real PNG for None, else the given bytes; a path ending in "/" is an empty folder."""
    import io

    from PIL import Image

    for rel, data in files.items():
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
            data = buffer.getvalue()
        path.write_bytes(data)
    return root


def test_a_folder_without_a_readable_image_names_the_folder(tmp_path):
    from hf_mae.data import load_image_dataset

    for layout in ({"cat/a.jpg": b"not an image", "dog/b.png": b"\x89PNG"}, {"a.jpg": b"", "b.png": b"xx"}):
        root = _image_folder(tmp_path / f"train{len(layout)}{next(iter(layout))[0]}", layout)
        with pytest.raises(ValueError, match=rf"No readable image in {root}: none of its 2 image file"):
            load_image_dataset(train_dir=str(root), cache_dir=str(tmp_path / "cache"))


def test_a_train_class_folder_without_images_is_an_error_naming_it(tmp_path, caplog):
    from hf_mae.data import load_image_dataset

    cache = str(tmp_path / "cache")
    train = _image_folder(tmp_path / "train", {"cat/a.png": None, "cat/b.png": None, "dog/": None, "emu/c.png": None})
    with pytest.raises(ValueError, match=rf"1 class folder\(s\) of {train} hold no readable image: {train / 'dog'}\."):
        load_image_dataset(train_dir=str(train), cache_dir=cache)
    # a class whose only files cannot be decoded has no image either (found after decoding)
    (train / "dog" / "broken.jpg").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=rf"hold no readable image: {train / 'dog'}\."):
        load_image_dataset(train_dir=str(train), cache_dir=cache)
    # in a validation folder it is a warning: the classes come from train
    (train / "dog" / "d.png").write_bytes((train / "cat" / "a.png").read_bytes())
    val = _image_folder(tmp_path / "val", {"cat/a.png": None, "dog/": None, "emu/b.png": None})
    dataset = load_image_dataset(train_dir=str(train), validation_dir=str(val), cache_dir=cache)
    assert dataset["train"].features["label"].names == ["cat", "dog", "emu"] and len(dataset["validation"]) == 2
    assert f"1 class folder(s) of {val} hold no readable image: {val / 'dog'}" in caplog.text


def test_a_tiny_imagenet_class_without_train_images_is_an_error_naming_it(tmp_path):
    from hf_mae.data import load_tiny_imagenet

    root = _image_folder(tmp_path / "tiny-imagenet-200", {"train/n01/images/n01_0.JPEG": None,
                                                          "train/n02/images/": None, "val/images/val_0.JPEG": None})  # fmt: skip
    (root / "wnids.txt").write_text("n01\nn02\n")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t7\t7\n")
    with pytest.raises(ValueError, match=r"class folder\(s\) of .*train hold no readable image: .*train/n02/images\."):
        load_tiny_imagenet(str(root), cache_dir=str(tmp_path / "cache"))


def test_fine_tuning_on_a_single_class_is_an_error(tmp_path):
    """One class (or a folder nested one level too deep, whose only "class" is the extra level) trains to loss 0 and
    100% top-1: a result that means nothing."""
    from hf_mae.training import run_finetuning

    args = MAEFinetuningArguments(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1, use_cpu=True)
    for layout in ({"cat/a.png": None, "cat/b.png": None}, {"all/cat/a.png": None, "all/dog/b.png": None}):
        train = _image_folder(tmp_path / f"train{next(iter(layout))[0]}", layout)
        data = DataArguments(train_dir=str(train), validation_dir=str(train))
        with pytest.raises(ValueError, match=rf"at least 2 classes, the train split of {train} has 1 \((cat|all)\)"):
            run_finetuning(ModelArguments(preset="demo-tiny-32"), data, args)
    assert not (tmp_path / "out" / "model.safetensors").exists()
