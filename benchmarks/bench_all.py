"""The whole benchmark suite in one command; writes `summary.json`, `summary.md` and each run's log under --out.

    python benchmarks/bench_all.py --device cuda --out "$OUT"           # GPU: ~8-10 min (budget 10 min)
    python benchmarks/bench_all.py --device cuda --out "$OUT" --quick   # GPU: the first five runs, ~5 min
    python benchmarks/bench_all.py --device cpu                         # CPU, batch 16: ~15 min on 2 cores

On a machine with several GPUs the suite also measures DDP scaling (bench_scaling.py: MAETrainer images/s on one GPU
against all of them, and the scaling efficiency); with one GPU that entry says it was skipped and why.

Each benchmark runs in its own process with a time limit, so one failure or hang costs only its own entry, and the
summary is rewritten after every run, so an interrupted suite keeps what it measured. Runs that would not finish
before `--budget` seconds are skipped. Needs torch, transformers and timm only (`datasets` is optional: without it
the data benchmark times the device path alone), so it runs on a bare CUDA training image from the repository
root, with or without `pip install -e .`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import default_device, machine_info  # noqa: E402


def scaling_run(gpus: int, preset: str) -> tuple[str, list[str] | str, int]:
    """The multi-GPU entry: DDP scaling over all `gpus`, or (one GPU) the reason it is skipped instead of a command."""
    if gpus < 2:
        return "ddp_scaling", f"{gpus} GPU on this machine: DDP scaling needs at least two", 0
    command = [sys.executable, str(HERE / "bench_scaling.py"), "--device", "cuda", "--processes", str(gpus)]
    return "ddp_scaling", [*command, "--preset", preset, "--timeout", "200"], 420


def suite(device: str, quick: bool, preset: str, gpus: int | None = None) -> list[tuple[str, list[str] | str, int]]:
    """(name, command line, time limit in seconds), most important first; a run that cannot be made on this machine
    has the reason in place of its command."""
    py = [sys.executable]
    step = [*py, str(HERE / "bench_train_step.py"), "--device", device, "--preset", preset]
    if device == "cuda":
        scaling = scaling_run(torch.cuda.device_count() if gpus is None else gpus, preset)
        runs = [
            ("train_step_bf16", [*step, "--dtype", "bf16"], 150),
            ("train_step_best", [*step, "--best"], 300),
            ("train_step_fp32", [*step, "--dtype", "fp32"], 150),
            (
                "data",
                [*py, str(HERE / "bench_data.py"), "--device", "cuda", "--workers", "0,8", "--batches", "50"],
                150,
            ),
            ("trainer_bf16", [*py, str(HERE / "bench_trainer.py"), "--device", "cuda", "--dtype", "bf16"], 180),
            # past the seed's batch: what the GPU does when launches are amortised (lr follows the batch by MAE's rule)
            ("train_step_best_b512", [*step, "--best", "--task", "pretrain", "--batch", "512"], 200),
            ("dmae_bf16", [*py, str(HERE / "bench_dmae.py"), "--device", "cuda", "--dtype", "bf16"], 150),
            (
                "train_step_best_cudagraphs",
                [*step, "--best", "--task", "pretrain", "--compile_mode", "reduce-overhead"],
                240,
            ),
            ("train_step_bf16_compile", [*step, "--dtype", "bf16", "--compile"], 400),
        ]
        return [*runs[:5], scaling] if quick else [*runs[:5], scaling, *runs[5:]]
    cpu = [*step, "--batch", "16", "--steps", "5", "--warmup", "1"]
    runs = [
        ("train_step_fp32", [*cpu, "--dtype", "fp32"], 900),
        ("train_step_bf16", [*cpu, "--dtype", "bf16"], 900),
        ("data", [*py, str(HERE / "bench_data.py"), "--device", "cpu"], 300),
        ("train_step_best", [*cpu, "--best"], 1500),
        ("trainer_bf16", [*py, str(HERE / "bench_trainer.py"), "--device", "cpu", "--preset", preset], 900),
    ]
    return runs[:3] if quick else runs


def display(command: list[str]) -> str:
    """The command as typed from the repository root."""
    return " ".join(command).replace(sys.executable, "python").replace(f"{HERE.parent}{os.sep}", "")


def markdown(summary: dict) -> str:
    m = summary["machine"]
    lines = [
        f"# Benchmark suite, {m['date']}",
        "",
        f"{m['device']}; torch threads {m['torch_threads']}; load average at start {m['load_average']}; "
        f"fp32 matmul {m['matmul_fp32_gflops']} GFLOP/s",
        "",
        " ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
        "| run | task | contender | settings | batch | img/s | img/s best round | peak / step MiB | GFLOP/img | MFU | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in summary["runs"].items():
        for result in (run.get("data") or {}).get("results", []):
            if "contenders" in result:
                for i, c in enumerate(result["contenders"]):
                    mfu = "n/a" if c["mfu"] is None else f"{100 * c['mfu']:.1f}%"
                    peak = "n/a" if c["peak_mib"] is None else f"{c['peak_mib']:.0f}"
                    if c.get("step_delta_mib") is not None:
                        peak += f" / {c['step_delta_mib']:.0f}"
                    speedup = f"{result['speedup']:.2f}x ({result['speedup_best_round']:.2f}x)" if i == 0 else ""
                    lines.append(
                        f"| {name} | {result['task']} | {c['name']} | {c['settings']} | {result['batch']} | "
                        f"{c['images_per_s']:.1f} | {c['images_per_s_best_round']:.1f} | {peak} | "
                        f"{c['gflop_per_image']:.2f} | {mfu} | {speedup} |"
                    )
            else:
                workers = f", {result['workers']} workers" if "workers" in result else ""
                if result.get("host_syncs_per_step") is not None:
                    workers += f" (host syncs per step: {result['host_syncs_per_step']})"
                lines.append(f"| {name} | | {result['path']}{workers} | | | {result['images_per_s']:,.0f} | | | | | |")
    lines += [
        "",
        "img/s: batch / median step; best round: batch / fastest step; speed-up: hf_mae / transformers on medians "
        "(on best rounds); MFU against the dense bf16 peak; peak MiB: the process (both models, CPU RSS or CUDA "
        "allocated), step MiB: what one training step adds to it.",
        "",
        "| run | status | seconds | load average before -> after | fp32 matmul GFLOP/s before -> after |",
        "|---|---|---|---|---|",
    ]
    for name, run in summary["runs"].items():
        machine = (run.get("data") or {}).get("machine", {})
        load = f"{machine.get('load_average', '')} -> {machine.get('load_average_after', '')}" if machine else ""
        gflops = (
            f"{machine.get('matmul_fp32_gflops', '')} -> {machine.get('matmul_fp32_gflops_after', '')}"
            if machine
            else ""
        )
        lines.append(f"| {name} | {run['status']} | {run.get('seconds', 0):.0f} | {load} | {gflops} |")
    lines += ["", "Commands (each run's output is in <run>.log):", ""]
    lines += [f"- {name}: `{display(run['command'])}`" for name, run in summary["runs"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<device>-<date>")
    parser.add_argument("--quick", action="store_true", help="skip the slowest runs (DMAE, both models compiled)")
    parser.add_argument(
        "--preset", default="seed-vit-b8-64", help="model of the train-step runs (a smoke test: demo-tiny-32)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds (default: 600 on GPU, 3600 on CPU); runs that would not fit are skipped",
    )
    args = parser.parse_args(argv)
    info = machine_info(torch.device(args.device))
    budget = args.budget or (600 if args.device == "cuda" else 3600)
    out = args.out or HERE / "results" / f"{args.device}-{info['date']}"
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    summary = {"machine": info, "runs": {}}
    start = time.monotonic()
    for name, command, limit in suite(args.device, args.quick, args.preset):
        if isinstance(command, str):  # not possible on this machine: say so in the summary
            print(f"[{time.monotonic() - start:5.0f} s] {name}: skipped ({command})", flush=True)
            summary["runs"][name] = {"command": [], "status": f"skipped ({command})"}
            continue
        left = budget - (time.monotonic() - start)
        if left < min(limit, 120):
            summary["runs"][name] = {"command": command, "status": "skipped (budget)"}
            continue
        json_path = out / f"{name}.json"
        full = [*command, "--json", str(json_path)]
        print(f"[{time.monotonic() - start:5.0f} s] {name}: {display(full)}", flush=True)
        run_start = time.monotonic()
        with open(out / f"{name}.log", "w") as log:
            try:
                code = subprocess.run(
                    full, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=min(limit, left)
                ).returncode
                status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                status = "timed out"
        data = json.loads(json_path.read_text()) if json_path.exists() else None
        summary["runs"][name] = {
            "command": command,
            "status": status,
            "seconds": time.monotonic() - run_start,
            "data": data,
        }
        print(f"    {status} in {time.monotonic() - run_start:.0f} s", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        (out / "summary.md").write_text(markdown(summary))
    print((out / "summary.md").read_text())
    return summary


if __name__ == "__main__":
    main()
