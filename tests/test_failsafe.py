"""Fail-safe training: non-finite gradients never reach the weights, non-finite weights are never saved."""

import pytest
import torch
from helpers import TINY
from test_fast_path import _common_args, _device_pretraining_data, _same, _Snapshots

from hf_mae import MAEConfig, MAEForPreTraining
from hf_mae.training import MAEPretrainingArguments, MAETrainer, NonFiniteWeightsError, newest_finite_checkpoint


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
