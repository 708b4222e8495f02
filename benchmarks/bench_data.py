"""Data-path throughput: the standard datasets + transforms path against the device data path.

Standard: a `datasets.Dataset` of JPEG bytes, `hf_mae.data.apply_transform` with the MAE pretraining transform
(RandomResizedCrop 0.2-1 bicubic + flip + normalise, PIL), `PretrainCollator`, a DataLoader with N workers, and the
copy of each batch to the device. Device: `hf_mae.data.device_data` (the split decoded once into a uint8 tensor on
the device, crop + flip + normalise batched there), through the same DataLoader API with 0 workers. The data are
synthetic Tiny-ImageNet-shaped images (smooth random 64 x 64 RGB, JPEG quality 90), built in memory.

    python benchmarks/bench_data.py                        # 10k images, batch 128, workers 0 and 2
    python benchmarks/bench_data.py --device cuda --workers 0,8 --batches 50

Without `datasets` installed (bare GPU images) only the device path runs, on random uint8 tensors. Prints figures,
never asserts; `--json PATH` also writes them.
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import default_device, finish_run, host_syncs, machine_info, sync  # noqa: E402

from hf_mae.data.device_data import DeviceAugmentCollator, DeviceImageDataset, decode_images  # noqa: E402


def synthetic_jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Smooth random images (bicubic upsampling of 8 x 8 noise plus grain), closer to photos than pure noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        image = np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def build_dataset(n: int, size: int):
    from datasets import Dataset, Features, Image

    images = [{"bytes": data, "path": None} for data in synthetic_jpegs(n, size)]
    return Dataset.from_dict({"image": images}, features=Features({"image": Image()}))


def measure(loader, batches: int, warmup: int, device: torch.device) -> float:
    """Images per second over `batches` batches after `warmup` batches (cycling over epochs)."""
    stream = itertools.chain.from_iterable(itertools.repeat(loader))
    for _ in range(warmup):
        batch = next(stream)["pixel_values"].to(device, non_blocking=True)
    sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(stream)["pixel_values"].to(device, non_blocking=True)
        images += batch.shape[0]
    sync(device)
    return images / (time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device(), help="where batches are needed (default: cuda if any)")
    parser.add_argument("--num_images", type=int, default=10_000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128, help="the seed's pretraining batch")
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts (standard path)")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.getLogger("hf_mae").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info(device)
    print(
        f"{info['device']}, torch threads {info['torch_threads']}, load average {info['load_average']}, "
        f"fp32 matmul {info['matmul_fp32_gflops']} GFLOP/s"
    )
    print(f"{args.num_images} synthetic {args.image_size} px images, batch {args.batch}, {args.batches} timed batches")
    rows = []
    try:
        import datasets  # noqa: F401
    except ImportError:
        dataset = None
        print("datasets is not installed: standard path skipped, device path on random uint8 tensors")
    else:
        dataset = build_dataset(args.num_images, args.image_size)
        from hf_mae.data import PretrainCollator, apply_transform, build_pretrain_transform

        train = apply_transform(dataset, build_pretrain_transform(args.image_size))
        for workers in (int(w) for w in args.workers.split(",")):
            loader = torch.utils.data.DataLoader(
                train,
                batch_size=args.batch,
                shuffle=True,
                num_workers=workers,
                collate_fn=PretrainCollator(),
                pin_memory=device.type == "cuda",
                persistent_workers=workers > 0,
                drop_last=True,
            )
            rate = measure(loader, args.batches, args.warmup, device)
            rows.append(dict(path="standard (PIL transforms, DataLoader)", workers=workers, images_per_s=rate))
            print(f"standard path, {workers} workers: {rate:,.0f} images/s")
            del loader

    start = time.perf_counter()
    if dataset is not None:
        images, _ = decode_images(dataset, args.image_size, label_column=None)
    else:
        shape = (args.num_images, 3, args.image_size, args.image_size)
        images = torch.randint(0, 256, shape, dtype=torch.uint8)
    device_dataset = DeviceImageDataset(images, device=device)
    sync(device)
    setup_s = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(
        device_dataset,
        batch_size=args.batch,
        shuffle=True,
        num_workers=0,
        collate_fn=DeviceAugmentCollator(device_dataset, args.image_size, seed=0),
        drop_last=True,
    )
    rate = measure(loader, args.batches, args.warmup, device)
    syncs = host_syncs(lambda: next(iter(loader))) if device.type == "cuda" else None
    rows.append(
        dict(
            path="device (uint8 on device, batched crop)",
            workers=0,
            images_per_s=rate,
            setup_s=setup_s,
            host_syncs_per_batch=syncs,
        )
    )
    if syncs is not None:
        print(f"device path host syncs per batch: {syncs}")
    print(
        f"device path: {rate:,.0f} images/s (one-off decode + upload of {len(device_dataset)} images: {setup_s:.1f} s)"
    )
    standard = [r["images_per_s"] for r in rows if r["path"].startswith("standard")]
    if standard:
        print(f"device path / best standard configuration: {rate / max(standard):.1f}x")
    return finish_run(info, args, rows, device)


if __name__ == "__main__":
    main()
