"""Train-step time of DMAE against MAE in the seed's setup; prints figures, never asserts.

The student is the seed's ViT-B/8 at 64 px (decoder 512 x 8, mask 0.75: 16 of 64 patches + cls = 17 encoder tokens).
The DMAE step adds the seed's distillation, computed by `DMAETrainer.compute_loss` itself: a ViT-L/16 teacher on the
same 17 tokens up to block 18 (no grad, its weights in the run's dtype as the trainer casts them), the 128 px
resize, and the MLP projector 768 -> 1024 -> 1024. A step is forward + loss + backward + AdamW (fused, the Trainer's
default) + zero_grad; the two run alternately (MAE, DMAE, MAE, ...) in one process so that machine load hits both
alike. The FLOP floor of the DMAE / MAE ratio is ~1.41 (`--flops` counts it).

    python benchmarks/bench_dmae.py                                      # CPU: batch 8, 6 rounds, ~2-3 min
    python benchmarks/bench_dmae.py --device cuda --batch 128 --dtype bf16 --steps 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import default_device, machine_info, paired_ratio, time_alternating, write_json  # noqa: E402

from hf_mae import DMAEConfig, DMAEForPreTraining, MAEConfig, MAEForPreTraining, MAEModel  # noqa: E402
from hf_mae.training import DMAETrainer, DMAETrainingArguments  # noqa: E402
from hf_mae.training.optim import param_groups  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LossFn = Callable[[torch.Tensor], torch.Tensor]


def build_losses(
    mask_ratio: float, device: torch.device, dtype: torch.dtype, output_dir: str
) -> tuple[dict[str, torch.nn.Module], dict[str, LossFn], DMAETrainer]:
    """The seed's MAE student, and the same student with the seed's DMAE head, distilled by a `DMAETrainer` from a
    ViT-L/16 teacher to block 18; each with the loss its training step computes."""
    torch.manual_seed(0)
    mae = MAEForPreTraining(MAEConfig.from_preset("seed-vit-b8-64", mask_ratio=mask_ratio))
    teacher = MAEModel(MAEConfig.from_preset("vit-large-patch16-224"))  # random weights time as the released ones
    config = DMAEConfig.from_preset(
        "seed-vit-b8-64", mask_ratio=mask_ratio, student_layer=9, projector="mlp", teacher_hidden_size=1024
    )
    dmae = DMAEForPreTraining(config)
    args = DMAETrainingArguments(
        output_dir=output_dir, report_to="none", use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, teacher_layer=18, teacher_pos_embed="center_crop", normalize_features=False,
    )  # fmt: skip
    trainer = DMAETrainer(model=dmae, args=args, teacher=teacher)  # fits, moves and casts the teacher
    models = {"MAE": mae.to(device).train(), "DMAE": dmae.to(device).train()}
    losses = {
        "MAE": lambda x: mae(x).loss,
        "DMAE": lambda x: trainer.compute_loss(dmae, {"pixel_values": x}),
    }
    return models, losses, trainer


def make_step(model: torch.nn.Module, loss_fn: LossFn, pixel_values: torch.Tensor, dtype: torch.dtype):
    device = pixel_values.device
    # the Trainer's default optimizer (adamw_torch_fused) with MAE's groups and betas
    optimizer = torch.optim.AdamW(param_groups(model, 7.5e-5, 0.05), betas=(0.9, 0.95), fused=True)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(pixel_values)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def flops_per_image(model: torch.nn.Module, loss_fn: LossFn, device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_fn(torch.randn(1, 3, 64, 64, device=device)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on GPU (the seed's), 8 on CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default: 30 on GPU, 6 on CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--flops", action="store_true", help="also count FLOPs per image (one batch-1 step each)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch = args.batch or (128 if on_gpu else 8)
    steps = args.steps or (30 if on_gpu else 6)
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = DTYPES[dtype_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    with tempfile.TemporaryDirectory() as output_dir:
        models, losses, trainer = build_losses(args.mask_ratio, device, dtype, output_dir)
    config, teacher = models["DMAE"].config, trainer.teacher
    info = machine_info(device)
    print(f"{info['device']}, {info['torch_threads']} threads, load average {info['load_average']}")
    print(
        f"batch {batch}, {dtype_name}, {steps} timed rounds, {1 + config.num_patches - config.num_masked} encoder "
        f"tokens, teacher {len(teacher.blocks)} ViT-L/16 blocks at {teacher.image_size} px"
    )
    if args.flops:
        f_mae, f_dmae = (flops_per_image(models[name], losses[name], device) for name in ("MAE", "DMAE"))
        print(
            f"FLOPs per image (fwd+bwd): MAE {f_mae / 1e9:.2f} G, DMAE {f_dmae / 1e9:.2f} G, ratio {f_dmae / f_mae:.3f}"
        )

    pixel_values = torch.randn(batch, 3, 64, 64, device=device)
    steps_by_name = {name: make_step(models[name], losses[name], pixel_values, dtype) for name in models}
    times = time_alternating(steps_by_name, steps, args.warmup, device)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        spread = f"{min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f}"
        print(f"{name:5s} step: median {value * 1e3:8.1f} ms ({spread} ms), {batch / value:8.1f} images/s")
    ratio, paired = medians["DMAE"] / medians["MAE"], paired_ratio(times["DMAE"], times["MAE"])
    print(
        f"DMAE / MAE step time: {ratio:.3f} (ratio of medians), {paired:.3f} (median of per-round ratios); "
        f"target <= 1.5, FLOP floor ~1.41; load average now {machine_info(device)['load_average']}"
    )
    if args.json:
        results = [
            dict(path=f"{name} step, {dtype_name}, batch {batch}", images_per_s=batch / value)
            for name, value in medians.items()
        ]
        results[-1]["path"] += f" (DMAE / MAE step time {ratio:.3f}, paired {paired:.3f})"
        write_json(
            args.json,
            dict(machine=info, args={k: str(v) for k, v in vars(args).items()}, results=results, ratio=ratio),
        )


if __name__ == "__main__":
    main()
