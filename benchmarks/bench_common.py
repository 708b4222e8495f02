"""Helpers shared by the benchmark scripts: machine description, device peaks, timing and peak memory.

Needs only torch (psutil when installed, for CPU memory), so the scripts run on a bare CUDA training image.
"""

from __future__ import annotations

import ctypes
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# Run from a checkout without `pip install -e .` (a bare GPU image): import hf_mae from this repository.
if importlib.util.find_spec("hf_mae") is None:
    sys.path.append(str(Path(__file__).resolve().parents[1]))

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets. MFU is always quoted against
# these, also for fp32 runs, so that figures compare across precisions; CPUs have no entry and print n/a.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    flags = cpu_flags()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{cpu_model()} ({os.cpu_count()} cores{', ' + ', '.join(isa) if isa else ''})"


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the device, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "transformers", "timm", "datasets", "hf_mae"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def matmul_gflops(device: torch.device, seconds: float = 0.5) -> float:
    """fp32 throughput of a 1024^3 matmul loop: on a shared machine, how much of it this process gets right now."""
    a = torch.randn(1024, 1024, device=device)
    a @ a
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        count += 1
    sync(device)
    return count * 2 * 1024**3 / (time.perf_counter() - start) / 1e9


def machine_info(device: torch.device) -> dict[str, Any]:
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "matmul_fp32_gflops": round(matmul_gflops(device), 1),
        "versions": versions(),
    }


class PeakMemory:
    """Peak memory of the code run inside the block, in MiB.

    CUDA: `torch.cuda.max_memory_allocated` (reset on entry), the allocator's peak. CPU: the process's resident set
    sampled every millisecond by a thread (psutil), reported as the peak above the RSS on entry (`delta_mib`: the
    step's activations, gradients and workspaces) and as the absolute peak (`peak_mib`: everything the process
    holds, other models included); freed heap memory is handed back to the OS on entry (glibc `malloc_trim`) so that
    the delta is not hidden by memory kept from earlier steps. Without psutil only the process's lifetime peak
    (ru_maxrss) is known.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib: float | None = None
        self.delta_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            import psutil
        except ImportError:
            self._process = None
            return self
        self._process = psutil.Process()
        _malloc_trim()
        self._start = self._max = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        mib = 2.0**20
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_mib, self.delta_mib = peak / mib, (peak - self._start) / mib
        elif self._process is None:
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._process.memory_info().rss)
            self.peak_mib, self.delta_mib = self._max / mib, (self._max - self._start) / mib


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def time_alternating(
    steps: dict[str, Callable[[], None]], num_steps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Run every step function `warmup` times, then `num_steps` rounds of A, B, A, B, ... and return each one's
    step times in seconds. Alternating spreads drifting machine load evenly over the contenders."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(num_steps):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def host_syncs(step: Callable[[], Any]) -> int | None:
    """CUDA: synchronising operations in one step, as counted by torch.cuda's sync debug mode (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def paired_ratio(slow: Sequence[float], fast: Sequence[float]) -> float:
    """Median over rounds of slow_time / fast_time: robust to load changing between rounds."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def fmt(value: float | None, spec: str = ".1f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def print_machine_info(device) -> dict:
    """`machine_info` plus the two header lines every benchmark prints."""
    info = machine_info(device)
    print(
        f"{info['device']}, torch threads {info['torch_threads']}, load average {info['load_average']}, "
        f"fp32 matmul {info['matmul_fp32_gflops']} GFLOP/s"
    )
    print(" ".join(f"{k} {v}" for k, v in info["versions"].items()))
    return info


def write_json(path: Path | None, out: dict) -> None:
    """`--json PATH`: the figures as JSON (nothing when PATH is None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))


def finish_run(info: dict, args, results: list, device) -> dict:
    """The closing of every benchmark: the machine's load after the run (printed and kept), then the figures as a
    dict, also written to `args.json`."""
    after = machine_info(device)
    info["load_average_after"], info["matmul_fp32_gflops_after"] = after["load_average"], after["matmul_fp32_gflops"]
    print(f"after: load average {info['load_average_after']}, fp32 matmul {info['matmul_fp32_gflops_after']} GFLOP/s")
    out = dict(machine=info, args={k: str(v) for k, v in vars(args).items()}, results=results)
    write_json(args.json, out)
    return out
