"""End-to-end pretraining throughput through `MAETrainer` fed by the device data path, against the bare step.

The bare step is bench_train_step's (forward + loss + backward + fused AdamW) on a ready batch; the Trainer run adds
what a real run pays per step: the device data path (crop + flip + normalise on the device), the Trainer loop, its
logging bookkeeping and `MAETrainer`'s non-finite-loss guard. The Trainer runs twice: with hf_mae's defaults (no host
sync inside a step: the guard skips bad steps through fused AdamW's `found_inf`) and with transformers' own
`logging_nan_inf_filter=True` (an `isnan` host sync every step), to show what one sync per step costs. On CUDA a
short extra run of each counts the synchronising calls per step with torch.cuda's sync debug mode.

    python benchmarks/bench_trainer.py --device cuda --dtype bf16
    python benchmarks/bench_trainer.py --device cpu --batch 16 --steps 4 --warmup 1

Prints figures, never asserts; `--json PATH` also writes them.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    default_device,
    finish_run,
    print_machine_info,
    sync,
    time_alternating,
)
from bench_train_step import Contender  # noqa: E402

from hf_mae import MAEConfig, MAEForPreTraining  # noqa: E402
from hf_mae.data.device_data import DeviceAugmentCollator, DeviceImageDataset  # noqa: E402
from hf_mae.training import MAEPretrainingArguments, MAETrainer  # noqa: E402


class _Clock(TrainerCallback):
    """Time from the end of step `start` to the end of training, syncing the device only at those two points."""

    def __init__(self, start: int, device: torch.device):
        self.start_step, self.device = start, device
        self.start = self.end = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.start_step:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.end = time.perf_counter()


class _SyncsPerStep(TrainerCallback):
    """CUDA: synchronising calls inside each optimizer step (forward to lr scheduler), from torch.cuda's sync debug
    mode, which warns once per such call."""

    def __init__(self):
        self.per_step: list[int] = []
        self._catch = self._caught = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._catch = warnings.catch_warnings(record=True)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        self.per_step.append(sum("synchroniz" in str(w.message) for w in self._caught))


def trainer_rate(
    model,
    dataset,
    collator,
    args: argparse.Namespace,
    device: torch.device,
    nan_filter: bool,
    steps: int | None = None,
) -> tuple[float, list[int] | None]:
    """Images/s of `MAETrainer` over `args.steps` steps after `args.warmup`; with `steps`, a short run that counts
    host syncs per step instead (CUDA only)."""
    count = steps is not None
    with tempfile.TemporaryDirectory() as tmp:
        training_args = MAEPretrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=args.batch,
            max_steps=steps if count else args.warmup + args.steps,
            warmup_steps=1,
            bf16=args.dtype == "bf16",
            torch_compile=args.compile,
            use_cpu=device.type == "cpu",
            logging_steps=10**6,
            logging_nan_inf_filter=nan_filter,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        watch = _SyncsPerStep() if count else _Clock(args.warmup, device)
        trainer = MAETrainer(
            model=model, args=training_args, train_dataset=dataset, data_collator=collator, callbacks=[watch]
        )
        trainer.train()
    if count:
        return float("nan"), watch.per_step
    return args.batch * args.steps / (watch.end - watch.start), None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile (Trainer: --torch_compile)")
    parser.add_argument("--preset", default="seed-vit-b8-64")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on GPU, 16 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 GPU, 4 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 GPU, 1 CPU)")
    parser.add_argument("--num_images", type=int, default=10_000, help="synthetic uint8 images on the device")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sync_steps", type=int, default=6, help="CUDA: steps of the sync-counting runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.getLogger("hf_mae").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (128 if gpu else 16)
    args.steps = args.steps or (50 if gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = print_machine_info(device)
    print(f"preset {args.preset}, batch {args.batch}, {args.dtype}, {'compile' if args.compile else 'eager'}")
    config = MAEConfig.from_preset(args.preset)
    torch.manual_seed(0)
    shape = (args.num_images, config.num_channels, config.image_size, config.image_size)
    dataset = DeviceImageDataset(torch.randint(0, 256, shape, dtype=torch.uint8), device=device)
    collator = DeviceAugmentCollator(dataset, config.image_size, seed=0)

    bare = Contender("bare step", MAEForPreTraining(config).to(device).train(), args.dtype, args.compile, {})
    bare.inputs = collator(list(range(args.batch)))
    times = time_alternating({"bare": bare.step}, args.steps, args.warmup, device)["bare"]
    rows = {"bare step (ready batch)": args.batch / statistics.median(times)}
    del bare
    syncs = {}
    for nan_filter in (False, True):
        name = "MAETrainer + device data, " + ("logging_nan_inf_filter=True" if nan_filter else "hf_mae defaults")
        rows[name], _ = trainer_rate(MAEForPreTraining(config), dataset, collator, args, device, nan_filter)
        if gpu:
            model = MAEForPreTraining(config)
            syncs[name] = trainer_rate(model, dataset, collator, args, device, nan_filter, steps=args.sync_steps)[1]
    for name, rate in rows.items():
        counted = f"   host syncs per step {syncs[name]}" if name in syncs else ""
        print(f"{name:<64} {rate:>9.1f} img/s{counted}")
    return finish_run(
        info, args, [dict(path=k, images_per_s=v, host_syncs_per_step=syncs.get(k)) for k, v in rows.items()], device
    )


if __name__ == "__main__":
    main()
