"""Tests of hf_mae.data: every dataset is built in tmp_path, nothing touches the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import io  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageFile  # noqa: E402

datasets = pytest.importorskip("datasets")

from hf_mae.data import (  # noqa: E402
    PRETRAIN_AUGS,
    ClassificationCollator,
    PretrainCollator,
    apply_transform,
    build_eval_transform,
    build_finetune_transform,
    build_image_processor,
    build_mixup,
    build_pretrain_transform,
    get_label_names,
    load_digits_dataset,
    load_image_dataset,
    load_tiny_imagenet,
    make_transform_fn,
    tiny_imagenet_class_names,
    to_rgb,
)
from hf_mae.data import tiny_imagenet as tiny_imagenet_module  # noqa: E402

WNIDS = ["n02", "n01", "n03"]  # deliberately not sorted: labels must follow wnids.txt order
# val image -> wnid, with the label deliberately unrelated to the file order
VAL = {f"val_{i}.JPEG": WNIDS[(i * 2) % 3] for i in range(6)}


def _jpeg(rng: np.random.Generator, size: int = 64, mode: str = "RGB") -> bytes:
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, format="JPEG")
    return buffer.getvalue()


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A miniature tiny-imagenet-200: 3 wnids x 4 train images, 6 val images, a test image, the text files."""
    root = tmp_path_factory.mktemp("src") / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        (root / "train" / wnid / "images").mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(4):
            mode = "L" if i == 0 else "RGB"  # Tiny ImageNet has some grayscale JPEGs
            (root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(rng, mode=mode))
    (root / "val" / "images").mkdir(parents=True)
    for name in VAL:
        (root / "val" / "images" / name).write_bytes(_jpeg(rng))
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in VAL.items()))
    (root / "test" / "images").mkdir(parents=True)
    (root / "test" / "images" / "test_0.JPEG").write_bytes(_jpeg(rng))
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("n00001\tentity\nn01\tgoldfish, Carassius auratus\nn02\ttabby, cat\nn03\tlion\n")
    return root


def _check_tiny(dataset) -> None:
    assert set(dataset) == {"train", "validation"}
    assert dataset["train"].num_rows == 12 and dataset["validation"].num_rows == 6
    assert get_label_names(dataset) == WNIDS
    assert dataset["train"].features["image"].mode == "RGB"
    image = dataset["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (64, 64)
    assert sorted(dataset["train"]["label"]) == [0] * 4 + [1] * 4 + [2] * 4  # wnids.txt order, 4 per class
    # Validation labels come from val_annotations.txt, not from the "images" folder name.
    undecoded = dataset["validation"].cast_column("image", datasets.Image(decode=False))
    labels = {Path(row["image"]["path"]).name: row["label"] for row in undecoded}
    assert labels == {name: WNIDS.index(wnid) for name, wnid in VAL.items()}
    assert undecoded[0]["image"]["bytes"]  # bytes are embedded, not paths to the user's files


def test_tiny_imagenet_folder_cached_and_untouched(tiny_root, tmp_path, monkeypatch, caplog):
    before = _listing(tiny_root.parent)
    caplog.set_level(logging.INFO, logger="hf_mae")
    dataset = load_tiny_imagenet(str(tiny_root), cache_dir=str(tmp_path / "cache"))
    _check_tiny(dataset)
    assert "Converting Tiny ImageNet" in caplog.text
    assert _listing(tiny_root.parent) == before  # nothing moved, created or modified in the user's folder

    # The second load reads the cache: converting again would raise.
    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(tiny_imagenet_module, "_convert", fail)
    caplog.clear()
    _check_tiny(load_tiny_imagenet(str(tiny_root.parent), cache_dir=str(tmp_path / "cache")))  # parent dir works too
    assert "from the cache" in caplog.text
    assert _listing(tiny_root.parent) == before


def test_tiny_imagenet_zip_and_parquet(tiny_root, tmp_path):
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zip_file:
        for path in sorted(tiny_root.rglob("*")):
            zip_file.write(path, path.relative_to(tiny_root.parent))
    zip_stat = archive.stat()
    dataset = load_tiny_imagenet(str(archive), cache_dir=str(tmp_path / "cache"))
    _check_tiny(dataset)
    assert archive.stat().st_mtime_ns == zip_stat.st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "tiny-imagenet-200.zip"]  # nothing extracted

    parquet = tmp_path / "parquet" / "data"
    parquet.mkdir(parents=True)
    dataset["train"].to_parquet(str(parquet / "train-00000-of-00001.parquet"))
    dataset["validation"].to_parquet(str(parquet / "valid-00000-of-00001.parquet"))
    _check_tiny(load_tiny_imagenet(str(parquet.parent), cache_dir=str(tmp_path / "hf_cache")))
    assert tiny_imagenet_class_names(str(archive)) == {"n02": "tabby", "n01": "goldfish", "n03": "lion"}


def test_tiny_imagenet_hub_source_renames_valid(monkeypatch):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=WNIDS)})
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    split = datasets.Dataset.from_dict({"image": [rgba], "label": [1]}, features=features)
    fake = datasets.DatasetDict({"train": split, "valid": split})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: fake)
    dataset = load_tiny_imagenet("zh-plus/tiny-imagenet")
    assert set(dataset) == {"train", "validation"}
    assert dataset["validation"][0]["image"].mode == "RGB"
    assert tiny_imagenet_class_names("zh-plus/tiny-imagenet") == {}


@pytest.mark.parametrize("missing", ["wnids.txt", "val/val_annotations.txt"])
def test_tiny_imagenet_missing_file(tiny_root, tmp_path, missing):
    copy = tmp_path / "tiny-imagenet-200"
    shutil.copytree(tiny_root, copy)
    (copy / missing).unlink()
    with pytest.raises(FileNotFoundError, match=Path(missing).name):
        load_tiny_imagenet(str(copy), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tiny_imagenet(str(tmp_path / "nowhere"))


def _write_bad_folder(root: Path) -> set[str]:
    """Class folders `cat` and `dog` with the awkward cases; returns the files that must be skipped."""
    rng = np.random.default_rng(1)
    images = {
        "cat/good.jpg": Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)),
        "cat/gray.png": Image.new("L", (16, 16), 128),
        "cat/cmyk.jpg": Image.new("CMYK", (16, 16), (0, 255, 255, 0)),
        "cat/rgba.png": Image.new("RGBA", (16, 16), (255, 0, 0, 0)),  # fully transparent -> white
        "dog/palette.png": Image.new("RGB", (16, 16), (0, 0, 255)).convert("P"),
        "dog/tiny.png": Image.new("RGB", (1, 1), (1, 2, 3)),
        "dog/huge.png": Image.new("RGB", (300, 300)),  # a "decompression bomb" under the test's small pixel limit
        "dog/deep16.png": Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)),
    }
    for name, image in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    jpeg = _jpeg(rng, size=32)
    (root / "dog" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image, ignored")
    return {"truncated.jpg", "empty.jpg", "huge.png"}


def test_image_folder_bad_files(tmp_path, monkeypatch, caplog):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    skipped = _write_bad_folder(tmp_path / "train")
    # 300 x 300 is over twice this limit: PIL raises DecompressionBombError, as for a giant image in real data.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)
    before = _listing(tmp_path / "train")
    caplog.set_level(logging.INFO, logger="hf_mae")
    dataset = load_image_dataset(
        train_dir=str(tmp_path / "train"), validation_split_percentage=20, seed=0, cache_dir=str(tmp_path / "c")
    )
    assert _listing(tmp_path / "train") == before
    for name in skipped:
        assert any(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), name
    assert "Skipped 3 of 10 files" in caplog.text
    assert get_label_names(dataset) == ["cat", "dog"]
    assert dataset["train"].num_rows + dataset["validation"].num_rows == 7
    rows = {}
    for split in dataset.values():
        undecoded = split.cast_column("image", datasets.Image(decode=False))
        for row, raw in zip(split, undecoded):
            assert row["image"].mode == "RGB" and raw["image"]["bytes"]  # embedded, not a path into the folder
            rows[Path(raw["image"]["path"]).name] = row
    assert rows["rgba.png"]["image"].getpixel((0, 0)) == (255, 255, 255)
    assert rows["palette.png"]["image"].getpixel((0, 0)) == (0, 0, 255)
    assert rows["deep16.png"]["image"].getpixel((0, 0)) == (255, 255, 255)
    assert rows["tiny.png"]["image"].size == (1, 1)
    assert rows["cmyk.jpg"]["label"] == 0 and rows["tiny.png"]["label"] == 1

    # Every kept image, even the 1x1 one, goes through every transform.
    for transform in [build_eval_transform(16), build_finetune_transform(16, "full"), build_pretrain_transform(16)]:
        batch = apply_transform(dataset["train"], transform)[:]
        assert all(x.shape == (3, 16, 16) for x in batch["pixel_values"])


def test_image_dataset_validation_dir_and_hub_columns(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    for split, count in (("train", 3), ("val", 1)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                (tmp_path / split / name / f"{i}.jpg").write_bytes(_jpeg(rng, size=8))
    dataset = load_image_dataset(
        train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"), cache_dir=str(tmp_path / "c")
    )
    assert (dataset["train"].num_rows, dataset["validation"].num_rows) == (6, 2)
    assert get_label_names(dataset["validation"]) == ["a", "b"]

    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["x", "y"])})
    train = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (4, 4))] * 10, "fine_label": [0, 1] * 5}, features=features
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({"train": train}))
    dataset = load_image_dataset(
        "some/dataset", image_column_name="img", label_column_name="fine_label", validation_split_percentage=20
    )
    assert dataset["train"].column_names == ["image", "label"]
    assert dataset["validation"].num_rows == 2 and sorted(dataset["validation"]["label"]) == [0, 1]  # stratified


def test_dataset_columns_are_found_as_run_mae_finds_them_and_named_ones_must_exist(monkeypatch):
    features = datasets.Features({"img": datasets.Image(), "labels": datasets.ClassLabel(names=["x", "y"])})
    train = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (4, 4))] * 4, "labels": [0, 1] * 2}, features=features
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({"train": train}))
    # no flags: img (as run_mae.py) and labels
    assert load_image_dataset("cifar-like", validation_split_percentage=0)["train"].column_names == ["image", "label"]
    # a column named that is not there is an error, never a silent fall-back to another one
    with pytest.raises(ValueError, match=r"cifar-like has no column 'fine_label' \(--label_column_name\); its col"):
        load_image_dataset("cifar-like", label_column_name="fine_label")
    with pytest.raises(ValueError, match=r"has no column 'picture' \(--image_column_name\)"):
        load_image_dataset("cifar-like", image_column_name="picture")
    unlabelled = datasets.Dataset.from_dict({"pixels": [Image.new("RGB", (4, 4))] * 2})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({"train": unlabelled}))
    with pytest.raises(ValueError, match=r"No image column \(image or img\) in x; its columns: \['pixels'\]"):
        load_image_dataset("x")
    assert load_image_dataset("x", image_column_name="pixels", validation_split_percentage=0)[
        "train"
    ].column_names == ["image"]
    # the label column asked for replaces one already called `label`
    both = train.add_column("label", [1, 1, 1, 1])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({"train": both}))
    chosen = load_image_dataset("x", label_column_name="labels", validation_split_percentage=0)["train"]
    assert sorted(chosen.column_names) == ["image", "label"] and chosen["label"] == [0, 1, 0, 1]


def test_digits_fixed_split():
    first, second = load_digits_dataset(image_size=32), load_digits_dataset(image_size=32)
    assert (first["train"].num_rows, first["validation"].num_rows) == (1437, 360)
    assert list(first["validation"]["label"]) == list(second["validation"]["label"])
    assert np.array_equal(np.asarray(first["train"][5]["image"]), np.asarray(second["train"][5]["image"]))
    assert get_label_names(first) == [str(i) for i in range(10)]
    assert np.bincount(list(first["validation"]["label"])).min() >= 35  # stratified: ~36 per class
    image = first["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)


BUILDERS = {"pretrain": build_pretrain_transform, "finetune": build_finetune_transform}


@pytest.mark.parametrize(
    "kind, aug",
    [("pretrain", aug) for aug in PRETRAIN_AUGS] + [("finetune", "small"), ("finetune", "full"), ("eval", None)],
)
def test_transform_output(kind, aug):
    transform = build_eval_transform(32) if kind == "eval" else BUILDERS[kind](32, aug)
    for mode in ("RGB", "L", "RGBA", "P", "CMYK"):
        out = transform(to_rgb(Image.new(mode, (48, 40))))
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_transform_errors_and_recipes():
    with pytest.raises(ValueError, match="'bogus'.*'standard'"):
        build_pretrain_transform(32, "bogus")
    with pytest.raises(ValueError, match="'medium'"):
        build_finetune_transform(32, "medium")
    with pytest.raises(ValueError, match="'medium'"):
        build_mixup("medium", 10)
    # Seed's solarize threshold 0 inverts everything; DeiT III's 128 keeps dark pixels.
    seed_ops = build_pretrain_transform(32, "3augment_seed").transforms[4].transforms
    assert seed_ops[1].threshold == 0
    deit = build_pretrain_transform(32, "3augment").transforms
    assert deit[3].transforms[1].threshold == 128 and any("ColorJitter" in type(t).__name__ for t in deit)


def test_posterize_patch_applied_where_randaugment_is_built():
    import subprocess
    import sys

    # importing hf_mae leaves timm alone ...
    code = "import hf_mae.data, hf_mae.training; from timm.data import auto_augment as a; "
    code += "assert a.NAME_TO_OP['PosterizeIncreasing'] is a.posterize"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    # ... building the `full` transform routes posterize to the 0-bit-safe version, which gives a black image
    ops = build_finetune_transform(32, "full").transforms[2].ops
    posterize = [op for op in ops if op.name == "PosterizeIncreasing"]
    assert posterize and posterize[0].aug_fn(Image.new("RGB", (4, 4), "white"), 0).getextrema() == ((0, 0),) * 3


def test_eval_transform_resize_then_crop():
    transform = build_eval_transform(64, crop_pct=0.875)
    resize, crop = transform.transforms[:2]
    assert resize.size == [73] and crop.size == (64, 64)
    image = Image.new("RGB", (64, 64))
    assert resize(image).size == (73, 73) and transform(image).shape == (3, 64, 64)


def _examples(n: int, label: bool = True) -> list[dict]:
    return [{"pixel_values": torch.randn(3, 16, 16), **({"label": i % 5} if label else {})} for i in range(n)]


def test_collators():
    assert PretrainCollator()(_examples(3, label=False))["pixel_values"].shape == (3, 3, 16, 16)
    batch = ClassificationCollator()(_examples(4))
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [0, 1, 2, 3]
    assert build_mixup("small", 5) is None
    collator = ClassificationCollator(build_mixup("full", 5))
    for n in (1, 4, 7):  # odd batches must not crash timm's Mixup
        batch = collator(_examples(n))
        assert batch["pixel_values"].shape == (n, 3, 16, 16)
        assert batch["labels"].shape == (n, 5) and batch["labels"].dtype == torch.float32
        torch.testing.assert_close(batch["labels"].sum(-1), torch.ones(n))
    # The unmixed last sample of an odd batch gets the smoothed one-hot target: 0.9 + 0.1 / 5.
    assert batch["labels"][-1].max().item() == pytest.approx(0.92)


def test_transform_fn_and_undecodable_image():
    fn = make_transform_fn(build_eval_transform(8))
    out = fn({"image": [Image.new("RGBA", (10, 10)), Image.new("L", (9, 12))], "label": [1, 0]})
    assert [x.shape for x in out["pixel_values"]] == [(3, 8, 8)] * 2 and out["label"] == [1, 0]
    with pytest.raises(ValueError, match="broken.jpg"):
        fn({"image": [{"bytes": b"\xff\xd8garbage", "path": "class/broken.jpg"}], "label": [0]})


def test_image_processor_round_trip(tmp_path):
    from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification, pipeline

    processor = build_image_processor(64)
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert loaded.size == {"shortest_edge": 73} and loaded.crop_size == {"height": 64, "width": 64}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pixels = loaded(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    # On Tiny ImageNet's 64 px images the processor and the evaluation transform agree up to resize rounding.
    # (For other sizes a center crop with an odd margin can differ by a pixel: torchvision rounds, transformers floors.)
    assert (pixels[0] - build_eval_transform(64)(image)).abs().mean() < 0.05

    config = ViTConfig(
        image_size=64,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"},
        label2id={"a": 0, "b": 1, "c": 2},
    )
    ViTForImageClassification(config).save_pretrained(tmp_path)
    predictions = pipeline("image-classification", model=str(tmp_path), device="cpu")(image.convert("L"))
    assert {p["label"] for p in predictions} <= {"a", "b", "c"}
