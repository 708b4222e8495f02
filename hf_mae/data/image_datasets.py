"""Image classification datasets as `datasets.DatasetDict`s with an `image` and a `label` column.

Every loader here returns the same two columns, so the transforms, collators and trainers never look at where the
data came from. `datasets` is imported inside the functions: GPU images often lack it and `import hf_mae.data` must
still work there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

# Bump when the stored format changes so stale caches are not reused.
CACHE_VERSION = 1
_VALIDATION_ALIASES = ("validation", "valid", "val")
# the columns looked for when --image_column_name / --label_column_name are not given (run_mae.py takes image or img)
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
# Every extension PIL can open; other files in an image folder (.txt, .DS_Store, ...) are ignored, as imagefolder does.
_IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image (L, LA, P, RGBA, CMYK, 16-bit, ...) to RGB.

    Transparent pixels are composited onto white: `convert("RGB")` alone drops alpha and shows whatever colour the
    transparent pixels happen to store (often black). 16-bit grayscale is rescaled, where `convert` would clip it.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        array = np.asarray(image, dtype=np.float32)
        scale = 257.0 if array.max() > 255 else 1.0
        return Image.fromarray(np.clip(array / scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def encode_image(data: bytes, name: str) -> dict[str, Any] | None:
    """Check that encoded image bytes decode fully and return them as a `datasets.Image` value.

    RGB and L images keep their original bytes (the `Image(mode="RGB")` feature turns L into RGB when decoding);
    other modes are converted with [`to_rgb`] and re-encoded as PNG, so they decode the same everywhere.

    Returns:
        `{"bytes", "path"}`, or `None` (with a warning naming `name`) when the file is not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            # load() decodes every pixel: a truncated file fails here (PIL's LOAD_TRUNCATED_IMAGES is left False)
            # and not later inside a DataLoader worker.
            image.load()
            if image.mode in ("RGB", "L"):
                return {"bytes": data, "path": name}
            rgb = to_rgb(ImageOps.exif_transpose(image))
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": name}
    # PIL's decoders raise many exception types (OSError, SyntaxError, DecompressionBombError, struct.error, ...):
    # any of them means "not a usable image", so skip the file and name it.
    except Exception as err:
        logger.warning("Skipping unreadable image %s: %s: %s", name, type(err).__name__, err)
        return None


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable parts, used to name caches."""
    payload = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def log_skipped(num_files: int, num_kept: int, where: str) -> None:
    """One summary line after the per-file warnings of [`encode_image`]."""
    if num_kept < num_files:
        logger.warning(
            "Skipped %d of %d files in %s that are not readable images.", num_files - num_kept, num_files, where
        )
    else:
        logger.info("Read %d images from %s.", num_kept, where)


def check_class_coverage(labels: Sequence[int], class_folders: Sequence[str], where: str, required: bool) -> None:
    """Report the classes with no image among `labels`, naming their folders.

    Each class folder is a label: an empty one still counts in `num_labels`, and the model gets a class it never
    sees. In a training split (`required`) that is a `ValueError` (almost always a failed copy or extraction); in a
    validation split a warning (its accuracy then leaves those classes out).
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_folders))
    empty = [folder for folder, count in zip(class_folders, counts) if count == 0]
    if not empty:
        return
    shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    if required:
        raise ValueError(
            f"{len(empty)} class folder(s) of {where} hold no readable image: {shown}. Each class folder is a label: "
            "add images to it or remove it."
        )
    logger.warning("%d class folder(s) of %s hold no readable image: %s.", len(empty), where, shown)


def generate_examples(
    members: list[str], labels: list[int], names: list[str], archive: str | None = None
) -> Iterator[dict[str, Any]]:
    """Yield `{"image", "label"}` for every readable image; `Dataset.from_generator` shards these lists over workers.

    Args:
        members: file paths, or member names inside the zip file `archive`.
        labels: class ids; -1 for unlabelled data (no `label` is yielded).
        names: the path stored with each image and named in warnings.
    """
    with zipfile.ZipFile(archive) if archive else contextlib.nullcontext() as zip_file:
        for member, label, name in zip(members, labels, names):
            try:
                data = zip_file.read(member) if zip_file else Path(member).read_bytes()
            except (OSError, KeyError, zipfile.BadZipFile) as err:
                logger.warning("Skipping unreadable file %s: %s", name, err)
                continue
            image = encode_image(data, name)
            if image is not None:
                yield {"image": image, "label": label} if label >= 0 else {"image": image}


def build_dataset(
    members: list[str],
    labels: list[int],
    names: list[str],
    class_names: Sequence[str],
    cache_key: str,
    cache_dir: str | None,
    where: str,
    archive: str | None = None,
    num_proc: int | None = None,
    class_folders: Sequence[str] | None = None,
    require_every_class: bool = False,
) -> Dataset:
    """Decode and check every file once and store the (embedded) image bytes in an Arrow dataset.

    `cache_key` names the `datasets` cache entry: it must change whenever the files do. `where` names the source in
    the summary log line and in the error when no file is a readable image. With `class_names`, a class left with no
    readable image is reported by [`check_class_coverage`] (an error when `require_every_class`, as for a training
    split), naming its entry of `class_folders` (default: the class name).
    """
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    # Written as a plain struct, then cast to Image: Image's encoder would store only the path of a file that
    # exists and drop the bytes, leaving the dataset pointing into the user's folder.
    features = Features({"image": {"bytes": Value("binary"), "path": Value("string")}})
    if class_names:
        features["label"] = ClassLabel(names=list(class_names))
    try:
        dataset = Dataset.from_generator(
            generate_examples,
            features=features,
            gen_kwargs={"members": members, "labels": labels, "names": names, "archive": archive},
            cache_dir=cache_dir,
            fingerprint=cache_key,
            num_proc=num_proc if num_proc and len(members) >= num_proc else None,
        )
    except ValueError as err:  # datasets' words for an empty split: 'Instruction "train" corresponds to no data!'
        if "corresponds to no data" not in str(err):
            raise
        raise ValueError(
            f"No readable image in {where}: none of its {len(members)} image file(s) could be decoded (each is "
            "named in a warning above)."
        ) from None
    log_skipped(len(members), len(dataset), where)
    if class_names:
        folders = list(class_folders) if class_folders is not None else list(class_names)
        check_class_coverage(dataset["label"], folders, where, require_every_class)
    return dataset.cast_column("image", ImageFeature(mode="RGB"))


def _list_image_files(root: Path, class_names: Sequence[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """Files of an imagefolder-style tree `root/<class>/**/<file>`, or of a flat folder (no labels, label -1)."""
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist.")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = found if class_names is None else list(class_names)
    if class_names is not None and (not found or set(found) - set(names)):
        raise ValueError(f"Class folders {found} in {root} do not match the training classes {names}.")
    groups = [(root / name, index) for index, name in enumerate(names)] if found else [(root, -1)]
    paths, labels = [], []
    for folder, label in groups:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in _IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file():
                paths.append(str(path))
                labels.append(label)
    if found and class_names is None and paths:  # a training tree: before decoding anything, an empty class folder
        check_class_coverage(labels, [str(folder) for folder, _ in groups], str(root), required=True)
    return paths, labels, names if found else []


def _folder_dataset(root: str, class_names: Sequence[str] | None, cache_dir: str | None) -> Dataset:
    paths, labels, names = _list_image_files(Path(root).expanduser(), class_names)
    if not paths:
        raise ValueError(f"No image files found in {root}.")
    # The cache is keyed by every file's path, size and mtime, so an edited folder is read again.
    stats = [(p, (st := os.stat(p)).st_size, st.st_mtime_ns) for p in paths]
    folders = [str(Path(root).expanduser() / name) for name in names]
    return build_dataset(paths, labels, paths, names, fingerprint("folder", stats, names), cache_dir, root,
                         class_folders=folders, require_every_class=class_names is None)  # fmt: skip


def load_dataset_options(trust_remote_code: bool = False, **options: Any) -> dict[str, Any]:
    """`datasets.load_dataset`'s keyword arguments: `options`, plus `trust_remote_code` only where datasets still
    runs loading scripts (< 4). Later versions run none and log an error for `trust_remote_code=True`, which
    `--trust_remote_code` also sets for an image processor's code."""
    from datasets import __version__

    if trust_remote_code and int(__version__.split(".")[0]) < 4:
        options["trust_remote_code"] = True
    return options


def column_renames(
    columns: Sequence[str], image_column_name: str | None, label_column_name: str | None, source: str
) -> dict[str, str]:
    """The renames that give the data of `source` (its `columns`) the `image` (and `label`) columns the trainers use:
    from the columns named, or the first of `IMAGE_COLUMNS` / `LABEL_COLUMNS` there is. A named column that is not
    there, or no image column at all, is a `ValueError` listing the columns."""

    def pick(name: str | None, candidates: tuple[str, ...], flag: str) -> str | None:
        if name is None:
            return next((c for c in candidates if c in columns), None)
        if name not in columns:
            raise ValueError(f"{source} has no column {name!r} (--{flag}); its columns: {list(columns)}")
        return name

    image = pick(image_column_name, IMAGE_COLUMNS, "image_column_name")
    if image is None:
        raise ValueError(
            f"No image column ({' or '.join(IMAGE_COLUMNS)}) in {source}; its columns: {list(columns)}. "
            "Set --image_column_name."
        )
    label = pick(label_column_name, LABEL_COLUMNS, "label_column_name")
    return {old: new for old, new in ((image, "image"), (label, "label")) if old is not None and old != new}


def rename_columns(dataset, renames: dict[str, str]):
    """`dataset` (a `Dataset(Dict)` or its iterable kind) with `renames` applied; a column already holding a new name
    (`label` beside the `fine_label` asked for) is dropped first."""
    taken = [new for new in renames.values() if new in (dataset["train"].column_names or [])]
    if taken:
        dataset = dataset.remove_columns(taken)
    return dataset.rename_columns(renames) if renames else dataset


def rename_validation_split(dataset: DatasetDict) -> DatasetDict:
    """Name the first of the `valid` / `val` splits `validation`, as the trainers expect."""
    from datasets import DatasetDict

    alias = next((name for name in _VALIDATION_ALIASES if name in dataset), None)
    if alias in (None, "validation"):
        return dataset
    return DatasetDict({("validation" if key == alias else key): split for key, split in dataset.items()})


def split_validation(dataset: DatasetDict, validation_split_percentage: float, seed: int) -> DatasetDict:
    """Carve a `validation` split out of `train` when there is none (stratified by `label` when it is a ClassLabel)."""
    from datasets import ClassLabel, DatasetDict

    if "validation" in dataset or not validation_split_percentage:
        return dataset
    if not 0 < validation_split_percentage < 100:
        raise ValueError(f"validation_split_percentage must be in (0, 100), got {validation_split_percentage}.")
    train = dataset["train"]
    stratify = "label" if isinstance(train.features.get("label"), ClassLabel) else None
    kwargs = dict(test_size=validation_split_percentage / 100, seed=seed)
    try:
        split = train.train_test_split(stratify_by_column=stratify, **kwargs)
    except ValueError as err:  # too few examples of some class to stratify
        logger.warning("Stratified validation split failed (%s); using a random split.", err)
        split = train.train_test_split(**kwargs)
    logger.info("Made a %g%% validation split from train (seed %d).", validation_split_percentage, seed)
    return DatasetDict({**dataset, "train": split["train"], "validation": split["test"]})


def load_image_dataset(
    dataset_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    validation_split_percentage: float = 10,
    seed: int = 0,
    cache_dir: str | None = None,
    dataset_config_name: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
) -> DatasetDict:
    """Load an image classification dataset as a `DatasetDict` with `train` and `validation` splits.

    Like transformers' `run_image_classification.py`: either a dataset from the Hub / a local path understood by
    `datasets.load_dataset`, or imagefolder-style folders `class_name/**/*.ext`. Folder images are decoded once
    while building the dataset; unreadable ones (truncated, empty, not an image, decompression bombs) are skipped
    with a warning naming each file and a summary count; every other mode (L, P, RGBA, CMYK, 16-bit) becomes RGB.
    A folder without class sub-folders gives an unlabelled dataset (enough for MAE pretraining).

    Args:
        dataset_name (`str`, *optional*):
            Hub id or local path passed to `datasets.load_dataset`.
        train_dir (`str`, *optional*):
            Training image folder, used when `dataset_name` is not given.
        validation_dir (`str`, *optional*):
            Validation image folder with the same class folders as `train_dir`.
        image_column_name (`str`, *optional*):
            Image column of `dataset_name`, renamed to `image` (default: `image`, else `img`, as run_mae.py).
        label_column_name (`str`, *optional*):
            Label column of `dataset_name`, renamed to `label` (default: `label`, else `labels`, if any).
        validation_split_percentage (`float`, defaults to 10):
            Percentage of `train` held out as `validation` when there is no validation split (0 to skip).
        seed (`int`, defaults to 0):
            Seed of that split.
        cache_dir (`str`, *optional*):
            `datasets` cache directory.
        dataset_config_name (`str`, *optional*), token (`str` or `bool`, *optional*), trust_remote_code (`bool`):
            `load_dataset`'s `name`, `token` and `trust_remote_code` for `dataset_name`.

    Returns:
        `datasets.DatasetDict` with columns `image` (and `label`, a `ClassLabel`, when the data has labels).
    """
    from datasets import DatasetDict, load_dataset

    if dataset_name is not None:
        hub = load_dataset_options(trust_remote_code, cache_dir=cache_dir, token=token)
        dataset = rename_validation_split(load_dataset(dataset_name, dataset_config_name, **hub))
        columns = dataset["train"].column_names
        dataset = rename_columns(dataset, column_renames(columns, image_column_name, label_column_name, dataset_name))
    elif train_dir is not None:
        train = _folder_dataset(train_dir, None, cache_dir)
        dataset = DatasetDict({"train": train})
        if validation_dir is not None:
            dataset["validation"] = _folder_dataset(validation_dir, get_label_names(train) or None, cache_dir)
    else:
        raise ValueError("Pass dataset_name or train_dir.")
    return split_validation(dataset, validation_split_percentage, seed)


def load_digits_dataset(image_size: int = 32, seed: int = 0) -> DatasetDict:
    """scikit-learn's bundled digits (1797 8x8 images, 10 classes) as a small offline image dataset.

    The built-in demo data: no download, built in about a second. Pixel counts 0..16 become white strokes on black
    (as MNIST), upscaled with bicubic interpolation because the 8x8 images are 4x4 block averages of smooth pen
    strokes: bicubic restores round strokes where nearest would draw blocks.

    Args:
        image_size (`int`, defaults to 32):
            Side of the square RGB images.
        seed (`int`, defaults to 0):
            Seed of the fixed stratified 80 / 20 train / validation split.

    Returns:
        `datasets.DatasetDict` with `train` (1437) and `validation` (360) splits, columns `image` and `label`
        (`ClassLabel` with names "0".."9").
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = [Image.fromarray(p, "L").resize((image_size, image_size), Image.BICUBIC).convert("RGB") for p in pixels]
    train_idx, val_idx = train_test_split(
        np.arange(len(images)), test_size=0.2, stratify=digits.target, random_state=seed
    )
    features = Features({"image": ImageFeature(mode="RGB"), "label": ClassLabel(names=[str(i) for i in range(10)])})

    def subset(indices: np.ndarray) -> Dataset:
        return Dataset.from_dict(
            {"image": [images[i] for i in indices], "label": digits.target[indices].tolist()}, features=features
        )

    return DatasetDict({"train": subset(train_idx), "validation": subset(val_idx)})


def get_label_names(dataset: Dataset | DatasetDict, label_column: str = "label") -> list[str]:
    """Class names of a `ClassLabel` column (of the `train` split for a `DatasetDict`); `[]` when unlabelled."""
    from datasets import ClassLabel, DatasetDict

    split = dataset["train"] if isinstance(dataset, DatasetDict) else dataset
    feature = split.features.get(label_column)
    return list(feature.names) if isinstance(feature, ClassLabel) else []
