"""Train-step throughput of hf_mae against transformers on the same model, batch and precision.

Pretraining: `MAEForPreTraining` vs transformers' `ViTMAEForPreTraining`. Fine-tuning: `MAEForImageClassification`
(pooling="cls") vs transformers' `ViTForImageClassification`, which only pools the cls token (it has no global-pool
option), both without stochastic depth (transformers' ViT has none). The transformers models get hf_mae's weights
(`hf_mae.convert.to_transformers`), so both do the same arithmetic; the script checks that their fp32 outputs
agree before timing. A step is forward + loss + backward + AdamW (fused, the Trainer's default) + zero_grad; the
contenders run alternately (A, B, A, B, ...) in one process so that machine load hits both alike.

    python benchmarks/bench_train_step.py                          # seed config, fp32, default batch
    python benchmarks/bench_train_step.py --dtype bf16 --compile   # both models bf16 autocast + torch.compile
    python benchmarks/bench_train_step.py --best                   # hf_mae's best settings vs transformers' defaults
    python benchmarks/bench_train_step.py --device cpu --batch 16 --steps 6 --warmup 2 --threads 2

img/s is the batch over the median step time; "best" over the fastest round. On a shared CPU, where other
processes' bursts slow multi-threaded steps several-fold, the best rounds are the uncontended figure (and the
fp32 matmul GFLOP/s printed before and after shows how much of the machine the run had). Prints figures, never
asserts. `--json PATH` also writes them.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    PeakMemory,
    cpu_flags,
    default_device,
    finish_run,
    fmt,
    host_syncs,
    paired_ratio,
    peak_flops,
    print_machine_info,
    time_alternating,
)

from hf_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining  # noqa: E402
from hf_mae.convert import to_transformers  # noqa: E402

TASKS = ("pretrain", "finetune")


def best_settings(device: torch.device) -> dict:
    """hf_mae's fastest settings on `device`, as measured with this script (BENCHMARKS.md): bf16 autocast +
    torch.compile on GPUs and on CPUs with bf16 matmul instructions (AVX512-BF16, AMX); elsewhere bf16 is emulated
    and slower than fp32, so fp32 + compile there (not measured)."""
    if device.type == "cpu" and not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return dict(dtype="fp32", compile=True)
    return dict(dtype="bf16", compile=True)


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    dtype: str
    compile: bool
    inputs: dict[str, torch.Tensor]
    compile_mode: str | None = None
    optimizer: torch.optim.Optimizer = field(init=False)
    step: Callable[[], None] = field(init=False)

    def __post_init__(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        # The Trainer's default optimizer (adamw_torch_fused) with MAE's betas and weight decay.
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
        forward = torch.compile(self.model, mode=self.compile_mode) if self.compile else self.model
        device_type = next(self.model.parameters()).device.type

        def step():
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
                loss = forward(**self.inputs).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        self.step = step

    @property
    def settings(self) -> str:
        if not self.compile:
            return f"{self.dtype} eager"
        return f"{self.dtype} compile" + (f" ({self.compile_mode})" if self.compile_mode else "")

    def flops_per_image(self, batch: int) -> float:
        """Forward + backward FLOPs (matmuls, convolutions, attention) of one image, from torch's flop counter."""
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(self.inputs["pixel_values"].device.type, torch.bfloat16, enabled=self.dtype == "bf16"):
                loss = self.model(**self.inputs).loss
            loss.backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops() / batch


def build_pretraining(preset: str, batch: int, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    hf = MAEForPreTraining(MAEConfig.from_preset(preset))
    tf = to_transformers(hf, attn_implementation="sdpa")
    config = hf.config
    inputs = {
        "pixel_values": torch.randn(batch, config.num_channels, config.image_size, config.image_size, device=device),
        "noise": torch.rand(batch, config.num_patches, device=device),  # same mask for both models
    }
    return hf.to(device), tf.to(device), inputs


def build_finetuning(preset: str, batch: int, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    from transformers import ViTConfig, ViTForImageClassification

    num_labels = 200  # Tiny ImageNet
    config = MAEConfig.from_preset(preset, num_labels=num_labels, pooling="cls", drop_path_rate=0.0)
    hf = MAEForImageClassification(config)
    tc = ViTConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=int(config.hidden_size * config.mlp_ratio),
        hidden_act="gelu",
        qkv_bias=config.qkv_bias,
        layer_norm_eps=config.layer_norm_eps,
        num_labels=num_labels,
    )
    tc._attn_implementation = "sdpa"
    tf = ViTForImageClassification(tc)
    # ViTMAEModel and ViTModel share their parameter names
    state = {f"vit.{k}": v for k, v in to_transformers(hf.mae).state_dict().items()}
    state.update({f"classifier.{k}": v for k, v in hf.classifier.state_dict().items()})
    tf.load_state_dict(state, strict=True)
    inputs = {
        "pixel_values": torch.randn(batch, config.num_channels, config.image_size, config.image_size, device=device),
        "labels": torch.randint(0, num_labels, (batch,), device=device),
    }
    return hf.to(device), tf.to(device), inputs


def graph_breaks(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int | None:
    """Graph breaks torch.compile would hit in the forward + loss (torch._dynamo.explain), None if tracing fails."""
    try:
        explanation = torch._dynamo.explain(model)(**inputs)
    except Exception as err:  # report, do not stop the benchmark
        print(f"torch._dynamo.explain failed: {type(err).__name__}: {err}")
        return None
    finally:
        torch._dynamo.reset()
    return explanation.graph_break_count


@torch.no_grad()
def max_output_difference(hf: torch.nn.Module, tf: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Largest |difference| of loss and logits in fp32 eval mode on two images: proof the work is the same."""
    small = {k: v[:2] for k, v in inputs.items()}
    hf.eval(), tf.eval()
    a, b = hf(**small), tf(**small)
    hf.train(), tf.train()
    return max((a.loss - b.loss).abs().item(), (a.logits - b.logits).abs().max().item())


def run_task(task: str, args: argparse.Namespace, device: torch.device) -> dict:
    build = build_pretraining if task == "pretrain" else build_finetuning
    torch.manual_seed(0)
    hf, tf, inputs = build(args.preset, args.batch, device)
    difference = max_output_difference(hf, tf, inputs)
    hf_settings = best_settings(device) if args.best else dict(dtype=args.dtype, compile=args.compile)
    tf_settings = dict(dtype="fp32", compile=False) if args.best else dict(dtype=args.dtype, compile=args.compile)
    mode = args.compile_mode
    contenders = [
        Contender(f"hf_mae {type(hf).__name__}", hf.train(), inputs=inputs, compile_mode=mode, **hf_settings),
        Contender(f"transformers {type(tf).__name__}", tf.train(), inputs=inputs, compile_mode=mode, **tf_settings),
    ]
    times = time_alternating({c.name: c.step for c in contenders}, args.steps, args.warmup, device)
    peak = peak_flops(device)
    rows = []
    for c in contenders:
        with PeakMemory(device) as memory:
            c.step()
        syncs = host_syncs(c.step) if device.type == "cuda" else None
        flops = c.flops_per_image(args.batch)
        images_per_s = args.batch / statistics.median(times[c.name])
        rows.append(
            dict(
                name=c.name,
                settings=c.settings,
                images_per_s=images_per_s,
                images_per_s_best_round=args.batch / min(times[c.name]),
                step_s=times[c.name],
                peak_mib=memory.peak_mib,
                step_delta_mib=memory.delta_mib,
                gflop_per_image=flops / 1e9,
                mfu=flops * images_per_s / peak if peak else None,
                host_syncs_per_step=syncs,
            )
        )
    ours, theirs = rows
    result = dict(
        task=task,
        batch=args.batch,
        max_output_difference_fp32=difference,
        hf_mae_graph_breaks=graph_breaks(hf, inputs),
        contenders=rows,
        speedup=ours["images_per_s"] / theirs["images_per_s"],
        speedup_best_round=ours["images_per_s_best_round"] / theirs["images_per_s_best_round"],
        paired_speedup=paired_ratio(theirs["step_s"], ours["step_s"]),
    )
    print_task(result, device)
    del contenders, hf, tf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def print_task(result: dict, device: torch.device) -> None:
    print(
        f"\n{result['task']}: batch {result['batch']}, fp32 max |hf_mae - transformers| output difference "
        f"{result['max_output_difference_fp32']:.2e}"
    )
    print(
        f"{'contender':<48} {'settings':<14} {'img/s':>8} {'best':>8} {'step s':>7} {'peak MiB':>9} {'Δ MiB':>7} "
        f"{'GFLOP/img':>9} {'MFU':>6}"
    )
    for row in result["contenders"]:
        mfu = fmt(None if row["mfu"] is None else 100 * row["mfu"], ".1f") + ("%" if row["mfu"] else "")
        print(
            f"{row['name']:<48} {row['settings']:<14} {row['images_per_s']:>8.2f} "
            f"{row['images_per_s_best_round']:>8.2f} "
            f"{statistics.median(row['step_s']):>7.3f} {fmt(row['peak_mib'], '.0f'):>9} "
            f"{fmt(row['step_delta_mib'], '.0f'):>7} {row['gflop_per_image']:>9.2f} {mfu:>6}"
        )
    syncs = ", ".join(f"{r['name'].split()[0]} {r['host_syncs_per_step']}" for r in result["contenders"])
    print(
        f"torch.compile graph breaks in hf_mae's forward + loss: {result['hf_mae_graph_breaks']}; "
        f"host syncs per step: {syncs if device.type == 'cuda' else 'n/a (CPU)'}"
    )
    print(
        f"speed-up hf_mae / transformers: {result['speedup']:.2f}x on medians, "
        f"{result['speedup_best_round']:.2f}x on best rounds, {result['paired_speedup']:.2f}x median per-round ratio"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device(), help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, fp32 weights")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--best",
        action="store_true",
        help="hf_mae with its best settings for the device (bf16 + compile) vs transformers fp32 eager",
    )
    parser.add_argument(
        "--compile_mode",
        default=None,
        help="torch.compile mode of the compiled contenders, e.g. reduce-overhead (CUDA graphs), max-autotune",
    )
    parser.add_argument("--task", choices=(*TASKS, "both"), default="both")
    parser.add_argument("--preset", default="seed-vit-b8-64", help="hf_mae MAEConfig preset")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on GPU (the seed's), 16 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default: 30 GPU, 6 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 5 GPU, 2 CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.getLogger("hf_mae").setLevel(logging.WARNING)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (128 if gpu else 16)
    args.steps = args.steps or (30 if gpu else 6)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = print_machine_info(device)
    mode = f"best hf_mae settings {best_settings(device)} vs transformers fp32 eager" if args.best else ""
    print(f"preset {args.preset}, batch {args.batch}, {args.warmup} warm-up + {args.steps} timed rounds {mode}")
    tasks = TASKS if args.task == "both" else (args.task,)
    results = [run_task(task, args, device) for task in tasks]
    return finish_run(info, args, results, device)


if __name__ == "__main__":
    main()
