"""Launched by tests/test_training.py: a few deterministic fine-tuning steps with MAETrainer, one or two processes.

`nan_rank`: the process whose loss is NaN at step 3. The whole step must then be skipped on every process, so the
two-process run (NaN on rank 1 only) still ends with the weights of the one-process run (NaN on its only rank)."""

import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from hf_mae import MAEConfig, MAEForImageClassification
from hf_mae.training import MAEFinetuningArguments, MAETrainer


class Fixed(Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class NaNAtStep3(MAEForImageClassification):
    nan_rank = 0

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.calls = getattr(self, "calls", 0) + 1
        if self.training and self.calls == 3 and int(os.environ.get("RANK", 0)) == self.nan_rank:
            out.loss = out.loss * float("nan")
        return out


def main(out: str, per_device_batch: int, nan_rank: int):
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
    model = NaNAtStep3(config)
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
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_drop_last=True,
    )
    trainer = MAETrainer(model=model, args=args, train_dataset=Fixed())
    trainer.train()
    rank = trainer.args.process_index
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world_size": trainer.args.world_size,
                "steps": trainer.state.global_step,
                "skipped": trainer.nonfinite_steps_skipped,
                "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            }
        )
    )
    if trainer.is_world_process_zero():
        torch.save(trainer.accelerator.unwrap_model(trainer.model).state_dict(), Path(out) / "final.pt")
    # a clean gloo shutdown: exiting with the process group alive can abort a rank ("terminate called without an
    # active exception") after all the work is done
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
