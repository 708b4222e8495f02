"""The fast path's promises that a CPU can check: no host sync inside a training step, non-finite steps skipped on
the device, and models that torch.compile traces as one graph with static shapes."""

from unittest import mock

import pytest
import torch
from helpers import TINY
from torch.overrides import TorchFunctionMode
from transformers import TrainerCallback

from hf_mae import DMAEConfig, DMAEForPreTraining, MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel
from hf_mae.data import build_mixup
from hf_mae.data.device_data import DeviceAugmentCollator, DeviceImageDataset
from hf_mae.training import (
    DMAETeacher,
    DMAETrainer,
    DMAETrainingArguments,
    MAEFinetuningArguments,
    MAEPretrainingArguments,
    MAETrainer,
)

# Tensor methods that wait for the device (on a GPU) to hand a value to Python
SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero", "masked_select"}


class SyncCounter(TorchFunctionMode):
    """Records every tensor call in `SYNCS` (and boolean-mask indexing) made while it is active."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS or (
            name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        ):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class CountSyncsPerStep(TrainerCallback):
    """Counts host syncs from the start of each optimizer step (forward, backward, clipping, optimizer, scheduler)
    to its end, before the Trainer's logging / saving / evaluation."""

    def __init__(self):
        self.per_step: dict[int, list[str]] = {}
        self._counter = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._counter = SyncCounter()
        self._counter.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self._counter.__exit__(None, None, None)
        self.per_step[state.global_step] = self._counter.calls


def _device_pretraining_data(n: int = 32):
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 3
    dataset = DeviceImageDataset(images, labels)
    return dataset, DeviceAugmentCollator(dataset, image_size=16, seed=0)


def _common_args(tmp_path, **overrides) -> dict:
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, warmup_steps=1, logging_steps=100,
        save_strategy="no", report_to="none", disable_tqdm=True, base_learning_rate=None, learning_rate=1e-3,
        max_nonfinite_steps=4, dataloader_num_workers=0,
    )  # fmt: skip
    return {**defaults, **overrides}


def _run(task: str, tmp_path, **overrides) -> tuple[CountSyncsPerStep, MAETrainer]:
    torch.manual_seed(0)
    dataset, collator = _device_pretraining_data()
    counter = CountSyncsPerStep()
    mixup = None
    if task == "pretrain":
        model = MAEForPreTraining(MAEConfig(**TINY))
        args = MAEPretrainingArguments(**_common_args(tmp_path, **overrides))
        trainer_cls = MAETrainer
    elif task == "finetune":
        model = MAEForImageClassification(MAEConfig(**TINY, num_labels=3, drop_path_rate=0.1))
        args = MAEFinetuningArguments(**_common_args(tmp_path, layer_decay=0.75, **overrides))
        mixup = build_mixup("full", num_classes=3)
        trainer_cls = MAETrainer
    else:
        model = DMAEForPreTraining(DMAEConfig(**TINY, teacher_hidden_size=24))
        args = DMAETrainingArguments(**_common_args(tmp_path, **overrides))
        trainer_cls = DMAETrainer
    kwargs = {"mixup": mixup} if mixup is not None else {}
    if task == "distill":
        kwargs["teacher"] = MAEModel(MAEConfig(image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=2,
                                               num_attention_heads=4))  # fmt: skip
    trainer = trainer_cls(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[counter], **kwargs
    )
    trainer.train()
    return counter, trainer


@pytest.mark.parametrize("task", ["pretrain", "finetune", "distill"])
def test_training_steps_make_no_host_sync(task, tmp_path):
    counter, trainer = _run(task, tmp_path)
    assert trainer.optimizer.defaults.get("fused")  # transformers' default optimizer, which can skip on the device
    assert sorted(counter.per_step) == [1, 2, 3, 4, 5, 6]
    # the only one: reading the non-finite counters back every max_nonfinite_steps=4 optimizer steps
    assert counter.per_step[4] == ["tolist"]
    assert all(calls == [] for step, calls in counter.per_step.items() if step != 4), counter.per_step


def test_sync_counter_sees_the_trainer_nan_filter(tmp_path):
    # the counter is not blind: transformers' own per-step NaN filter of the logged loss is a sync on every step
    counter, _ = _run("pretrain", tmp_path, logging_nan_inf_filter=True, max_nonfinite_steps=0)
    assert all(calls.count("__bool__") >= 1 for calls in counter.per_step.values()), counter.per_step


class _NaNOnCalls(MAEForPreTraining):
    """Multiplies the training loss by NaN on the forward calls (1-based) listed in `bad`."""

    bad: tuple[int, ...] = ()

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.calls = getattr(self, "calls", 0) + 1
        if self.training and self.calls in self.bad:
            out.loss = out.loss * float("nan")
        return out


class _Snapshots(TrainerCallback):
    def __init__(self, model):
        self.model, self.weights = model, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = {k: v.clone() for k, v in self.model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="fused-adamw"),
        pytest.param({"optim": "adamw_torch"}, id="foreach-adamw"),
        pytest.param({"lars": True}, id="lars"),
        pytest.param({"gradient_accumulation_steps": 2}, id="accumulation"),
    ],
)
def test_nonfinite_step_is_skipped_and_training_goes_on(overrides, tmp_path):
    torch.manual_seed(0)
    model = _NaNOnCalls(MAEConfig(**TINY))
    accumulation = overrides.get("gradient_accumulation_steps", 1)
    # optimizer step 3 gets one NaN micro-batch (its last one when accumulating: the gradient is spoilt all the same)
    model.bad = (3 * accumulation,)
    snapshots = _Snapshots(model)
    dataset, collator = _device_pretraining_data()
    args = MAEPretrainingArguments(**_common_args(tmp_path, max_nonfinite_steps=2, logging_steps=3, **overrides))
    trainer = MAETrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[snapshots])
    trainer.train()
    assert trainer.nonfinite_steps_skipped == 1
    assert _same(snapshots.weights[2], snapshots.weights[3])  # step 3 changed nothing
    assert not _same(snapshots.weights[3], snapshots.weights[4])  # and training went on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = trainer.optimizer.state[model.mae.blocks[0].mlp.fc1.weight]
    if "step" in state:  # Adam's step count ignores the skipped step, so its bias correction stays right
        assert int(state["step"]) == 5
    assert any(e.get("nonfinite_steps_skipped") == 1 for e in trainer.state.log_history)


@pytest.mark.parametrize("task", ["pretrain", "finetune", "distill"])
def test_models_compile_to_one_graph_without_recompiling(task):
    torch.manual_seed(0)
    torch._dynamo.reset()
    if task == "pretrain":
        model = MAEForPreTraining(MAEConfig(**TINY))
        inputs = {}
    elif task == "finetune":
        model = MAEForImageClassification(MAEConfig(**TINY, num_labels=3, drop_path_rate=0.1))
        inputs = {"labels": torch.tensor([0, 2])}
    else:
        model = DMAEForPreTraining(DMAEConfig(**TINY, teacher_hidden_size=24))
        encoder = MAEModel(MAEConfig(image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=2,
                                     num_attention_heads=4))  # fmt: skip
        # the frozen teacher DMAETrainer runs next to the student, on the student's patches
        teacher = torch.compile(DMAETeacher(encoder, model.config), backend="aot_eager", fullgraph=True, dynamic=False)
        inputs = {}
    model.train()
    # fullgraph: any graph break raises; error_on_recompile: new random masks must not retrace
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            x = torch.randn(2, 3, 16, 16)
            out = compiled(pixel_values=x, **inputs)
            out.loss.backward()
            if task == "distill":
                with torch.no_grad():
                    assert teacher(x, out.ids_restore.float(), 0.75).shape == out.student_features.shape
    assert torch.isfinite(out.loss)


def test_pinned_batches_are_copied_without_blocking_on_cuda(tmp_path):
    # a blocking host-to-device copy waits for the previous step to finish: one host sync per batch
    cuda = (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.set_device"),
        mock.patch("torch.cuda.device_count", return_value=1),
    )
    with cuda[0], cuda[1], cuda[2]:
        args = MAEPretrainingArguments(output_dir=str(tmp_path), report_to="none")
        assert args.dataloader_pin_memory and args.accelerator_config.non_blocking
        chosen = MAEPretrainingArguments(
            output_dir=str(tmp_path), report_to="none", accelerator_config={"non_blocking": False}
        )
        assert not chosen.accelerator_config.non_blocking  # the user's explicit choice stands
        unpinned = MAEPretrainingArguments(output_dir=str(tmp_path), report_to="none", dataloader_pin_memory=False)
        assert not unpinned.accelerator_config.non_blocking  # pageable memory cannot be copied asynchronously
    on_cpu = MAEPretrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert not on_cpu.dataloader_pin_memory and not on_cpu.accelerator_config.non_blocking


def test_guard_composes_with_a_grad_scaler(tmp_path):
    # fp16 on CUDA: GradScaler sets the optimizer's found_inf itself; the guard must add its own flag to it, not drop it
    torch.manual_seed(0)
    model = MAEForPreTraining(MAEConfig(**TINY))
    args = MAEPretrainingArguments(**_common_args(tmp_path))
    trainer = MAETrainer(model=model, args=args, train_dataset=_device_pretraining_data()[0])
    optimizer = trainer.create_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    pixels = torch.randn(4, 3, 16, 16)

    def step(loss_was_finite: bool, inf_gradient: bool) -> bool:
        """One scaled step; True when it changed the weights."""
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scaler.scale(model(pixel_values=pixels).loss).backward()
        if inf_gradient:
            model.mae.blocks[0].mlp.fc1.weight.grad[0, 0] = float("inf")
        trainer._pending_nonfinite = torch.tensor(0.0 if loss_was_finite else 1.0)  # what training_step records
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        assert not hasattr(optimizer, "found_inf")  # the scaler's attribute was handed back for it to delete
        return not _same(before, model.state_dict())

    assert not step(loss_was_finite=True, inf_gradient=True)  # the scaler's flag alone skips
    assert not step(loss_was_finite=False, inf_gradient=False)  # the guard's flag alone skips
    assert step(loss_was_finite=True, inf_gradient=False)
    assert trainer.nonfinite_steps_skipped == 1


def test_trainer_with_torch_compile_saves_plain_weights(tmp_path):
    # --torch_compile: the Trainer trains the compiled module and still saves and reloads the plain model
    torch.manual_seed(0)
    model = MAEForPreTraining(MAEConfig(**TINY))
    dataset, collator = _device_pretraining_data()
    args = MAEPretrainingArguments(
        **_common_args(tmp_path, torch_compile=True, torch_compile_backend="aot_eager", max_steps=4, logging_steps=2)
    )
    trainer = MAETrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    before = model.mae.blocks[0].attn.qkv.weight.detach().clone()
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert not torch.equal(before, model.mae.blocks[0].attn.qkv.weight)  # the compiled module trained these weights
    trainer.save_model(str(tmp_path / "final"))
    reloaded = MAEForPreTraining.from_pretrained(tmp_path / "final")
    assert _same(model.state_dict(), reloaded.state_dict())
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [2, 4]
