"""Launched by tests/test_distributed.py: pretrain a tiny MAE on a streamed local parquet folder (`--streaming`, the
pipeline's own loading, transforms and Trainer) and write, per process, the sample ids of every batch it trained on.

    python tests/scripts/stream_ids.py DATA_DIR OUT MAX_STEPS PER_DEVICE_BATCH

DATA_DIR holds train-*.parquet files with columns `image` and `id` (streamed with `id` as the label column, so the
transform passes it through). Writes OUT/rank<i>.json: {"rank", "world_size", "batches": [[ids], ...], "validation"}."""

import json
import sys
from pathlib import Path

import torch

from hf_mae import MAEForPreTraining
from hf_mae.data import PretrainCollator, apply_transform, build_pretrain_transform
from hf_mae.data.streaming import prepare_training_for_stream
from hf_mae.training import DataArguments, MAEPretrainingArguments, MAETrainer
from hf_mae.training.pipeline import load_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import tiny_config  # noqa: E402


class IdCollator(PretrainCollator):
    """The pretraining batch, plus the ids of its images (taken off again before the model sees the batch)."""

    def __call__(self, examples):
        return {**super().__call__(examples), "ids": torch.tensor([e["label"] for e in examples])}


class RecordingTrainer(MAETrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches.append(inputs.pop("ids").tolist())
        return super().training_step(model, inputs, num_items_in_batch)


def main(data_dir: str, out: str, max_steps: int, batch: int):
    data_args = DataArguments(dataset_name=data_dir, streaming=True, label_column_name="id")
    args = MAEPretrainingArguments(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_steps=max_steps,
        warmup_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=2,
        seed=0,
    )
    prepare_training_for_stream(args)
    config = tiny_config()
    ds = load_data(data_args, config.image_size, args.seed)
    train = apply_transform(ds["train"], build_pretrain_transform(config.image_size))
    trainer = RecordingTrainer(
        model=MAEForPreTraining(config), args=args, train_dataset=train, data_collator=IdCollator()
    )
    trainer.train()
    Path(out).mkdir(parents=True, exist_ok=True)
    report = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "batches": trainer.batches,
        "validation": sorted(ds["validation"]["label"]) if "validation" in ds else None,
    }
    (Path(out) / f"rank{args.process_index}.json").write_text(json.dumps(report))
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
