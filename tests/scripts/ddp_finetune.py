"""Launched by tests/test_training.py and tests/test_distributed.py: a few deterministic fine-tuning steps with
MAETrainer in one process, or in several (DDP, two "machines", FSDP2), all on CPU.

    python tests/scripts/ddp_finetune.py OUT PER_DEVICE_BATCH NAN_RANK [--save_steps N] [--resume CHECKPOINT]

`NAN_RANK`: the process whose loss is NaN at the third step (-1: none). The whole step must then be skipped on every
process, so the two-process run (NaN on rank 1 only) still ends with the weights of the one-process run (NaN on its
only rank). Each process writes OUT/rank<i>.json (what it saw, including the parameter placements of the model being
trained, read from inside the run); process 0 writes OUT/final.pt (the full weights) and every process then saves
the plain model to OUT/model with `save_model`, and finally checks that a NaN in one process's weights stops
`save_model` on all of them."""

import argparse
import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from hf_mae import MAEConfig, MAEForImageClassification
from hf_mae.training import MAEFinetuningArguments, MAETrainer, NonFiniteWeightsError

NAN_STEP = 2  # the third optimizer step, counted from 0


class Fixed(Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class NaNAtStep(MAEForImageClassification):
    """Its loss is NaN at optimizer step NAN_STEP on process `nan_rank` (the step comes from `StepReporter`, so a
    resumed run injects it at the same step)."""

    nan_rank = 0
    step = 0

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.training and self.step == NAN_STEP and int(os.environ.get("RANK", 0)) == self.nan_rank:
            out.loss = out.loss * float("nan")
        return out


class StepReporter(TrainerCallback):
    """Tells the model its step, and records the distributed setup and parameter placements during the run."""

    def __init__(self, model: NaNAtStep):
        self.model, self.report = model, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.model.step = state.global_step
        if not self.report:
            from torch.distributed.fsdp import FSDPModule

            self.report = {
                "first_step": state.global_step,
                "model_class": type(model).__name__,
                "fsdp_module": isinstance(model, FSDPModule),
                "placements": {
                    name: [repr(p) for p in getattr(param, "placements", ())]
                    for name, param in model.named_parameters()
                },
                "local_shapes": {
                    name: list(param.to_local().shape if hasattr(param, "to_local") else param.shape)
                    for name, param in model.named_parameters()
                },
            }


def main(out: str, per_device_batch: int, nan_rank: int, save_steps: int, resume: str | None):
    torch.manual_seed(0)
    config = MAEConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        num_labels=4,
    )
    model = NaNAtStep(config)
    model.nan_rank = nan_rank
    args = MAEFinetuningArguments(
        output_dir=out,
        per_device_train_batch_size=per_device_batch,
        max_steps=4,
        warmup_steps=1,
        base_learning_rate=None,
        learning_rate=1e-3,
        drop_path_rate=0.0,
        report_to="none",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_drop_last=True,
    )
    reporter = StepReporter(model)
    trainer = MAETrainer(model=model, args=args, train_dataset=Fixed(), callbacks=[reporter])
    trainer.train(resume_from_checkpoint=resume)
    rank = trainer.args.process_index
    Path(out).mkdir(parents=True, exist_ok=True)
    state = trainer.accelerator.get_state_dict(trainer.model)  # full weights; a collective under FSDP
    if trainer.is_world_process_zero():
        torch.save(state, Path(out) / "final.pt")
    trainer.save_model(str(Path(out) / "model"))

    # one process's weights turn NaN: every process refuses to save
    if rank == trainer.args.world_size - 1:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.model.parameters()]
        with torch.no_grad():
            next(p for p in local if p.numel()).view(-1)[0] = float("nan")  # a shard can be empty under FSDP
    try:
        trainer.save_model(str(Path(out) / "nan_model"))
        refused = False
    except NonFiniteWeightsError:
        refused = True
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world_size": trainer.args.world_size,
                "distributed_type": str(trainer.accelerator.distributed_type),
                "steps": trainer.state.global_step,
                "skipped": trainer.nonfinite_steps_skipped,
                "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                "refused_nan_save": refused,
                **reporter.report,
            }
        )
    )
    # a clean gloo shutdown: exiting with the process group alive can abort a rank ("terminate called without an
    # active exception") after all the work is done
    trainer.accelerator.end_training()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("per_device_batch", type=int)
    parser.add_argument("nan_rank", type=int)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    cli = parser.parse_args()
    main(cli.out, cli.per_device_batch, cli.nan_rank, cli.save_steps, cli.resume)
