"""The device data path: batched RandomResizedCrop + flip + normalisation on a uint8 tensor, fed to the Trainer."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import TINY
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from hf_mae import MAEConfig, MAEForImageClassification, MAEForPreTraining  # noqa: E402
from hf_mae.data.device_data import (  # noqa: E402
    DeviceAugmentCollator,
    DeviceImageDataset,
    decode_images,
    device_train_data,
    resized_crop_flip,
    sample_crop_boxes,
)
from hf_mae.training import MAEFinetuningArguments, MAEPretrainingArguments, MAETrainer  # noqa: E402

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


def random_images(n: int = 64, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_crop_boxes_respect_scale_ratio_and_bounds():
    size, scale, ratio = 64, (0.2, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(20000, size, size, scale, ratio, generator=torch.Generator().manual_seed(0))
    left, top, w, h = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (left >= 0).all() and (top >= 0).all() and (w >= 1).all() and (h >= 1).all()
    assert (left + w <= size).all() and (top + h <= size).all()
    # w and h are rounded from exact values whose product and ratio lie in the ranges
    area = size * size
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * area).all() and ((w - 0.5) * (h - 0.5) <= area).all()
    assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all() and ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
    # offsets spread over the whole free range, as torchvision's randint(0, side - box + 1)
    assert ((left == 0) & (w < size)).any() and (left + w == size)[w < size].any()


def test_crop_boxes_follow_torchvision_distribution():
    torch.manual_seed(0)
    params = [v2.RandomResizedCrop.get_params(torch.empty(3, 64, 64), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    theirs = torch.tensor([(w * h / 4096, w / h) for _, _, h, w in params])
    boxes = sample_crop_boxes(4000, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = torch.stack([boxes[:, 2] * boxes[:, 3] / 4096, boxes[:, 2] / boxes[:, 3]], 1)
    assert torch.allclose(ours.mean(0), theirs.mean(0), atol=0.02)
    assert torch.allclose(ours.std(0), theirs.std(0), atol=0.02)
    # full-image crops happen as often (area > 1 is rejected, so fallbacks are rare)
    full = (boxes[:, 2] == 64) & (boxes[:, 3] == 64)
    assert abs(full.float().mean().item() - np.mean([w == h == 64 for *_, h, w in params])) < 0.02


def test_crop_boxes_fallback_is_the_centre_crop_with_clamped_ratio():
    # no box of aspect ratio 2-3 covering >= 99 % of a square fits: torchvision falls back to a centred crop
    boxes = sample_crop_boxes(8, 64, 64, scale=(0.99, 1.0), ratio=(2.0, 3.0))
    assert torch.equal(boxes, torch.tensor([[0.0, 16.0, 64.0, 32.0]]).expand(8, 4))


def test_resized_crop_flip_geometry():
    images = random_images(4, 16).float()
    full = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).expand(4, 4)
    no_flip, all_flip = torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    for mode in ("bicubic", "bilinear"):
        assert torch.allclose(resized_crop_flip(images, full, no_flip, 16, mode), images, atol=1e-3)
        assert torch.allclose(resized_crop_flip(images, full, all_flip, 16, mode), images.flip(-1), atol=1e-3)
    # a 2x upscale of the centre 8 x 8 is a half-pixel bilinear resize (equal away from the crop's border, where
    # grid_sample reads the neighbouring pixels and F.interpolate repeats the edge)
    box = torch.tensor([[4.0, 4.0, 8.0, 8.0]]).expand(4, 4)
    ours = resized_crop_flip(images, box, no_flip, 16, "bilinear")
    reference = F.interpolate(images[..., 4:12, 4:12], size=16, mode="bilinear", align_corners=False)
    assert torch.allclose(ours[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], atol=1e-3)
    # uint8 input: bicubic overshoot is clamped to [0, 255]
    out = resized_crop_flip(random_images(4, 16), box, no_flip, 16, "bicubic")
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 255


def test_collator_shapes_dtypes_and_normalised_range():
    labels = torch.arange(64) % 10
    dataset = DeviceImageDataset(random_images(64, 16), labels)
    collator = DeviceAugmentCollator(dataset, image_size=16, seed=0)
    batch = collator([dataset[i] for i in range(0, 64, 2)])
    assert batch["pixel_values"].shape == (32, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["labels"], labels[0::2]) and batch["labels"].dtype == torch.long
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert (batch["pixel_values"] >= low - 1e-5).all() and (batch["pixel_values"] <= high + 1e-5).all()
    # a constant image stays constant through crop, resize and flip: only the normalisation shows
    values = torch.tensor([0, 77, 255], dtype=torch.uint8)
    constant = DeviceImageDataset(values.view(3, 1, 1, 1).expand(3, 3, 16, 16).contiguous())
    out = DeviceAugmentCollator(constant, image_size=16)([0, 1, 2])["pixel_values"]
    expected = (values.float().view(3, 1, 1, 1) / 255 - MEAN) / STD
    assert torch.allclose(out, expected.expand_as(out), atol=1e-5)
    assert "labels" not in DeviceAugmentCollator(constant, image_size=16)([0])


def test_collator_output_size_can_differ_from_stored_size():
    out = DeviceAugmentCollator(DeviceImageDataset(random_images(4, 20)), image_size=12)([0, 1, 2, 3])
    assert out["pixel_values"].shape == (4, 3, 12, 12)


def test_flips_happen_half_the_time():
    # a left-to-right ramp, full-image "crops": a flipped output is the only way its left edge gets brighter
    ramp = torch.linspace(0, 255, 16).round().to(torch.uint8).expand(1, 3, 16, 16).contiguous()
    dataset = DeviceImageDataset(ramp.expand(4000, 3, 16, 16).contiguous())
    collator = DeviceAugmentCollator(dataset, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=0)
    pixels = collator(list(range(4000)))["pixel_values"]
    flipped = pixels[:, 0, 0, 0] > pixels[:, 0, 0, -1]
    assert abs(flipped.float().mean().item() - 0.5) < 0.04
    none = DeviceAugmentCollator(dataset, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)
    assert not (none(list(range(100)))["pixel_values"][:, 0, 0, 0] > 0).any()


def test_deterministic_under_a_seed():
    dataset = DeviceImageDataset(random_images(32, 16))
    first = DeviceAugmentCollator(dataset, 16, seed=3)(list(range(32)))["pixel_values"]
    again = DeviceAugmentCollator(dataset, 16, seed=3)(list(range(32)))["pixel_values"]
    other = DeviceAugmentCollator(dataset, 16, seed=4)(list(range(32)))["pixel_values"]
    assert torch.equal(first, again) and not torch.equal(first, other)
    # without a seed of its own it follows torch's global generator (seeded by the Trainer's set_seed)
    unseeded = DeviceAugmentCollator(dataset, 16)
    torch.manual_seed(0)
    a = unseeded(list(range(32)))["pixel_values"]
    torch.manual_seed(0)
    assert torch.equal(a, unseeded(list(range(32)))["pixel_values"])


def test_evaluation_examples_go_to_the_fallback_collator():
    collator = DeviceAugmentCollator(DeviceImageDataset(random_images(4, 16), torch.arange(4)), 16)
    batch = collator(
        [{"pixel_values": torch.zeros(3, 16, 16), "label": 1}, {"pixel_values": torch.ones(3, 16, 16), "label": 2}]
    )
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].tolist() == [1, 2]


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        DeviceImageDataset(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="labels"):
        DeviceImageDataset(random_images(2, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="scale"):
        DeviceAugmentCollator(DeviceImageDataset(random_images(2, 8)), 8, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="interpolation"):
        DeviceAugmentCollator(DeviceImageDataset(random_images(2, 8)), 8, interpolation="nearest")


def _image_dataset(sizes):
    from datasets import ClassLabel, Dataset, Features, Image

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"])})
    from PIL import Image as PILImage

    data = {"image": [PILImage.fromarray(a) for a in arrays], "label": [i % 3 for i in range(len(sizes))]}
    return Dataset.from_dict(data, features=features), arrays


def test_decode_images_keeps_pixels_and_resizes_other_sizes():
    dataset, arrays = _image_dataset([(16, 16), (16, 16), (20, 32)])
    images, labels = decode_images(dataset, 16)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(images[0], torch.from_numpy(arrays[0]).permute(2, 0, 1))  # PNG round trip is lossless
    assert labels.tolist() == [0, 1, 2]
    assert decode_images(dataset, 16, label_column=None)[1] is None


def test_trainer_steps_on_the_device_path(tmp_path):
    dataset, _ = _image_dataset([(16, 16)] * 24)
    args = MAEPretrainingArguments(
        output_dir=str(tmp_path / "pt"), per_device_train_batch_size=8, max_steps=3, warmup_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=2, seed=0,
    )  # fmt: skip
    train, collator = device_train_data(dataset, 16, args, "standard")
    assert args.dataloader_num_workers == 0 and not args.dataloader_pin_memory
    assert train.images.shape == (24, 3, 16, 16) and train.labels is None
    trainer = MAETrainer(
        model=MAEForPreTraining(MAEConfig(**TINY)), args=args, train_dataset=train, data_collator=collator
    )
    result = trainer.train()
    assert trainer.state.global_step == 3 and math.isfinite(result.training_loss)
    # the Trainer's default optimizer is the fused AdamW kernel
    assert trainer.optimizer.defaults.get("fused") is True

    ft_args = MAEFinetuningArguments(
        output_dir=str(tmp_path / "ft"), per_device_train_batch_size=8, max_steps=2, warmup_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, finetune_aug="small",
    )  # fmt: skip
    with pytest.raises(ValueError, match="crop \\+ flip only"):
        device_train_data(dataset, 16, ft_args, "full")
    train, collator = device_train_data(dataset, 16, ft_args, "small", with_labels=True)
    model = MAEForImageClassification(MAEConfig(**TINY, num_labels=3))
    trainer = MAETrainer(model=model, args=ft_args, train_dataset=train, data_collator=collator)
    assert math.isfinite(trainer.train().training_loss) and trainer.state.global_step == 2


def test_pipeline_switch_runs_pretraining_with_device_data(tmp_path):
    from hf_mae.training import DataArguments, ModelArguments, run_pretraining

    args = MAEPretrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=2, warmup_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    data = DataArguments(
        dataset_name="digits", max_train_samples=32, max_eval_samples=8, num_reconstructions=0, device_data=True
    )
    results = run_pretraining(ModelArguments(preset="demo-tiny-32"), data, args)
    # evaluation batches (CPU-transformed examples) went through the fallback collator
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])
