"""DDP throughput scaling: `MAETrainer` images/s on one process against all GPUs of the machine, and the efficiency.

    python benchmarks/bench_scaling.py --device cuda                     # 1 GPU vs all GPUs (needs more than one)
    python benchmarks/bench_scaling.py --device cpu --processes 2 --preset demo-tiny-32 --batch 8 --steps 3 \
        --warmup 1                                                       # the plumbing, on two CPU processes (gloo)

Each measurement is `torchrun --nproc_per_node P` of this script as a worker, which runs bench_trainer's Trainer
measurement (`MAETrainer` fed by the device data path, hf_mae defaults) in every process. The per-process batch stays
the same (weak scaling: P processes train a P times larger global batch), so the ideal is P times the images/s of
one process; the efficiency is the measured fraction of that. Both runs go through torchrun, so they pay the same
start-up. Prints figures, never asserts; `--json PATH` also writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import default_device, finish_run, print_machine_info  # noqa: E402


def worker_command(args: argparse.Namespace, processes: int, json_path: Path) -> list[str]:
    """One measurement: torchrun of this script's worker on `processes` processes."""
    forwarded = ["--device", args.device, "--preset", args.preset, "--dtype", args.dtype]
    for name in ("batch", "steps", "warmup"):
        if getattr(args, name) is not None:
            forwarded += [f"--{name}", str(getattr(args, name))]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        str(Path(__file__).resolve()), "--worker", *forwarded, "--json", str(json_path),
    ]  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    """In every process: bench_trainer's Trainer measurement; process 0 writes the images/s of all processes."""
    import logging

    from bench_trainer import trainer_rate

    from hf_mae import MAEConfig, MAEForPreTraining
    from hf_mae.data.device_data import DeviceAugmentCollator, DeviceImageDataset

    logging.getLogger("hf_mae").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (128 if gpu else 16)
    args.steps = args.steps or (50 if gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.compile = False
    config = MAEConfig.from_preset(args.preset)
    torch.manual_seed(0)
    shape = (args.num_images, config.num_channels, config.image_size, config.image_size)
    dataset = DeviceImageDataset(torch.randint(0, 256, shape, dtype=torch.uint8), device=device)
    collator = DeviceAugmentCollator(dataset, config.image_size, seed=0)
    rate, _ = trainer_rate(MAEForPreTraining(config), dataset, collator, args, device, nan_filter=False)
    if rank == 0:  # DDP keeps the processes in step: every one trains `rate` images/s
        args.json.write_text(json.dumps({"processes": world, "images_per_s": rate * world, "batch": args.batch}))


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--processes", type=int, default=None, help="default: every GPU of the machine")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--preset", default="seed-vit-b8-64")
    parser.add_argument("--batch", type=int, default=None, help="per process (default: 128 on GPU, 16 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 GPU, 4 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 GPU, 1 CPU)")
    parser.add_argument("--num_images", type=int, default=10_000, help="synthetic uint8 images on each device")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for each torchrun")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    processes = args.processes or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if processes < 2:
        print(f"DDP scaling: skipped, {processes} {args.device} device(s): nothing to scale to")
        return None
    info = print_machine_info(torch.device(args.device))
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in (1, processes):
            path = Path(tmp) / f"p{count}.json"
            print(f"{count} process(es): {' '.join(worker_command(args, count, path))}", flush=True)
            subprocess.run(worker_command(args, count, path), check=True, timeout=args.timeout)
            rates[count] = json.loads(path.read_text())
    one, many = rates[1]["images_per_s"], rates[processes]["images_per_s"]
    efficiency = many / (processes * one)
    unit, units = ("GPU", "GPUs") if args.device == "cuda" else ("process", "processes")
    print(f"MAETrainer DDP, batch {rates[1]['batch']} per {unit}, {args.preset}, {args.dtype}")
    print(f"  1 {unit}: {one:9.1f} img/s")
    print(f"  {processes} {units}: {many:9.1f} img/s = {many / one:.2f}x, scaling efficiency {100 * efficiency:.1f}%")
    results = [
        dict(path=f"MAETrainer DDP, 1 {unit}", images_per_s=one),
        dict(
            path=f"MAETrainer DDP, {processes} {units} (scaling efficiency {100 * efficiency:.1f}%)",
            images_per_s=many,
            processes=processes,
            scaling_efficiency=efficiency,
        ),
    ]
    return finish_run(info, args, results, torch.device(args.device))


if __name__ == "__main__":
    main()
