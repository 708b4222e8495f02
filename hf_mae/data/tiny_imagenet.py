"""Tiny ImageNet (200 classes, 100k train / 10k validation images of 64x64) from the Hub, its zip, its folder or parquet.

The original layout keeps validation labels only in `val/val_annotations.txt` (`imagefolder` would label every
validation image "images"), and the reproduction study's loader moved the user's files to fix that. Here the folder
or zip is only read: it is converted once into an Arrow cache (image bytes embedded) and reloaded from there with
`load_from_disk`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from .image_datasets import build_dataset, fingerprint, rename_validation_split

if TYPE_CHECKING:
    from datasets import DatasetDict

logger = logging.getLogger(__name__)

TINY_IMAGENET_HUB_ID = "zh-plus/tiny-imagenet"


def default_cache_dir() -> Path:
    """`$HF_MAE_CACHE/tiny_imagenet`, by default `~/.cache/hf_mae/tiny_imagenet`."""
    return Path(os.environ.get("HF_MAE_CACHE", Path.home() / ".cache" / "hf_mae")).expanduser() / "tiny_imagenet"


class _OriginalLayout:
    """Read-only view of `tiny-imagenet-200/` in a folder or a zip, addressed by paths relative to that root."""

    def __init__(self, path: Path):
        self.path = path.resolve()
        self.archive = str(self.path) if self.path.is_file() else None
        if self.archive:
            with zipfile.ZipFile(self.archive) as zip_file:
                names = [n for n in zip_file.namelist() if not n.endswith("/")]
            wnids = [n for n in names if n == "wnids.txt" or n.endswith("/wnids.txt")]
            if not wnids:
                raise FileNotFoundError(f"No wnids.txt in {self.archive}: not a Tiny ImageNet zip.")
            prefix = min(wnids, key=len)[: -len("wnids.txt")]
            self.members = {n[len(prefix) :]: n for n in names if n.startswith(prefix)}
            self.root = f"{self.archive}:{prefix}"
            # A zip changes as a whole: its size and mtime identify it.
            stat = self.path.stat()
            self.cache_key = fingerprint("tiny-imagenet-zip", str(self.path), stat.st_size, stat.st_mtime_ns)
            return
        root = self.path
        if not (root / "wnids.txt").exists() and (root / "tiny-imagenet-200").is_dir():
            root = root / "tiny-imagenet-200"
        if not (root / "wnids.txt").is_file():
            # Checked before walking the tree: a wrong folder (say $HOME) should fail at once.
            raise FileNotFoundError(f"{root / 'wnids.txt'} not found: not a tiny-imagenet-200 folder.")
        self.root = f"{root}/"
        self.members, stats = {}, []
        for folder, _, files in os.walk(root):
            rel = os.path.relpath(folder, root)
            # A folder's mtime changes when files are added, removed or renamed, so hashing the directories and the
            # text files tracks the content without a stat of each of the 110k images.
            stats.append((rel, os.stat(folder).st_mtime_ns))
            for file in files:
                member = os.path.join(folder, file)
                key = file if rel == "." else f"{rel}/{file}".replace(os.sep, "/")
                self.members[key] = member
                if file.endswith(".txt"):
                    stats.append((key, (st := os.stat(member)).st_size, st.st_mtime_ns))
        self.cache_key = fingerprint("tiny-imagenet-folder", str(root), sorted(stats))

    def read_text(self, rel: str) -> str:
        if rel not in self.members:
            raise FileNotFoundError(f"Tiny ImageNet file {rel!r} not found in {self.root}.")
        if self.archive:
            with zipfile.ZipFile(self.archive) as zip_file:
                return zip_file.read(self.members[rel]).decode()
        return Path(self.members[rel]).read_text()

    def wnids(self) -> list[str]:
        return [line.strip() for line in self.read_text("wnids.txt").splitlines() if line.strip()]

    def splits(self) -> dict[str, tuple[list[str], list[int], list[str]]]:
        """`split -> (members, labels, relative names)`; validation labels come from `val/val_annotations.txt`."""
        wnids = self.wnids()
        label_of = {wnid: i for i, wnid in enumerate(wnids)}
        val_wnid = {}
        for line in self.read_text("val/val_annotations.txt").splitlines():
            fields = line.strip().split("\t")  # filename, wnid, bounding box
            if len(fields) >= 2:
                val_wnid[fields[0]] = fields[1]
        if unknown := sorted({w for w in val_wnid.values() if w not in label_of}):
            raise ValueError(f"val/val_annotations.txt in {self.root} names classes not in wnids.txt: {unknown[:5]}.")
        train, val = [], []
        for rel in sorted(self.members):
            parts = rel.split("/")
            if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and parts[1] in label_of:
                train.append((rel, label_of[parts[1]]))
            elif len(parts) == 3 and parts[:2] == ["val", "images"]:
                if parts[2] in val_wnid:
                    val.append((rel, label_of[val_wnid.pop(parts[2])]))
                else:
                    logger.warning("Skipping %s: not listed in val/val_annotations.txt.", rel)
        if val_wnid:
            logger.warning("%d images listed in val/val_annotations.txt are missing from val/images.", len(val_wnid))
        if not train or not val:
            raise ValueError(f"No images in train/<wnid>/images/ or in val/images/ of {self.root}.")
        return {
            split: ([self.members[rel] for rel, _ in items], [label for _, label in items], [rel for rel, _ in items])
            for split, items in (("train", train), ("validation", val))
        }


def _convert(layout: _OriginalLayout, target: Path, num_proc: int | None) -> None:
    """Write the layout as a `DatasetDict` to `target`, atomically so an interrupted run never looks finished."""
    from datasets import DatasetDict

    logger.info("Converting Tiny ImageNet from %s into %s (once; later loads read the cache).", layout.root, target)
    class_names = layout.wnids()
    splits = layout.splits()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-", ignore_cleanup_errors=True) as tmp:
        dataset = DatasetDict(
            {
                split: build_dataset(
                    *files,
                    class_names,
                    f"{layout.cache_key}-{split}",
                    tmp,
                    f"{layout.root}{split}",
                    layout.archive,
                    num_proc,
                    class_folders=[
                        f"{layout.root}train/{wnid}/images" if split == "train" else f"{layout.root}val ({wnid})"
                        for wnid in class_names
                    ],
                    require_every_class=split == "train",
                )
                for split, files in splits.items()
            }
        )
        dataset.save_to_disk(os.path.join(tmp, "dataset"))
        del dataset
        try:
            os.replace(os.path.join(tmp, "dataset"), target)
        except OSError:
            # Another process (say another rank of a distributed run) finished the same conversion first.
            if not (target / "dataset_dict.json").is_file():
                raise


def _finalize(dataset: DatasetDict, class_names: list[str] | None = None) -> DatasetDict:
    """Check the splits and make the image column decode to RGB (a lazy cast: only the feature changes)."""
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    dataset = rename_validation_split(dataset)
    if missing := sorted({"train", "validation"} - set(dataset)):
        raise ValueError(f"Tiny ImageNet source lacks the split(s) {missing}; found {sorted(dataset)}.")
    dataset = dataset.cast_column("image", ImageFeature(mode="RGB"))
    if not isinstance(dataset["train"].features["label"], ClassLabel):
        if class_names:
            dataset = dataset.cast_column("label", ClassLabel(names=class_names))
        else:
            logger.warning(
                "Tiny ImageNet labels are plain integers (no ClassLabel and no wnids.txt next to the data)."
            )
    return dataset


def _parquet_files(folder: Path) -> dict[str, list[str]]:
    files = sorted(folder.rglob("*.parquet"))
    return {
        "train": [str(f) for f in files if f.name.startswith("train")],
        "validation": [str(f) for f in files if f.name.startswith("valid")],
    }


def load_tiny_imagenet(
    source: str = TINY_IMAGENET_HUB_ID,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    token: str | bool | None = None,
) -> DatasetDict:
    """Load Tiny ImageNet as a `DatasetDict` with `train` and `validation` splits.

    Args:
        source (`str`, defaults to `"zh-plus/tiny-imagenet"`):
            One of: a Hub dataset id; the original `tiny-imagenet-200` folder (or a folder containing it); its `.zip`
            (read in place, never extracted); a folder of parquet files `train-*.parquet` and `valid*-*.parquet`
            (e.g. a download of the Hub copy).
        cache_dir (`str`, *optional*):
            Where a folder or zip is converted to (default [`default_cache_dir`]); the `datasets` cache for the Hub
            and parquet sources.
        num_proc (`int`, *optional*):
            Processes decoding and checking images during the one-time conversion.
        token (`str` or `bool`, *optional*):
            Hub token for a private Hub copy.

    Returns:
        `datasets.DatasetDict` with columns `image` (`Image(mode="RGB")`) and `label` (`ClassLabel`; for the folder
        and zip its names are the wnids in `wnids.txt` order).

    Raises:
        `FileNotFoundError`: a local source, or its `wnids.txt` / `val/val_annotations.txt`, is missing.
    """
    from datasets import load_dataset, load_from_disk

    path = Path(source).expanduser()
    original = (path / "train").is_dir() or (path / "tiny-imagenet-200").is_dir()
    if path.is_dir() and not original and any((parquet := _parquet_files(path)).values()):
        if not parquet["train"] or not parquet["validation"]:
            raise ValueError(f"{source} needs train-*.parquet and valid*-*.parquet files; found {parquet}.")
        wnids = path / "wnids.txt"
        class_names = wnids.read_text().split() if wnids.is_file() else None
        return _finalize(load_dataset("parquet", data_files=parquet, cache_dir=cache_dir), class_names)
    if path.is_dir() or zipfile.is_zipfile(path):
        layout = _OriginalLayout(path)
        target = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        target = target / layout.cache_key
        if not (target / "dataset_dict.json").is_file():
            _convert(layout, target, num_proc)
        else:
            logger.info("Loading Tiny ImageNet from the cache %s.", target)
        return load_from_disk(str(target))
    if path.exists():
        raise ValueError(f"{source} is neither a tiny-imagenet-200 folder, its zip, nor a folder of parquet files.")
    if source.startswith((".", "/", "~")) or source.endswith(".zip"):
        raise FileNotFoundError(f"Tiny ImageNet source {source} does not exist.")
    return _finalize(load_dataset(source, cache_dir=cache_dir, token=token))


def tiny_imagenet_class_names(source: str = TINY_IMAGENET_HUB_ID) -> dict[str, str]:
    """Map each wnid to a readable name (the first synonym in `words.txt`), e.g. `n01443537 -> "goldfish"`.

    Returns an empty dict when `words.txt` is not available (a Hub id, or a parquet folder without it).
    """
    path = Path(source).expanduser()
    try:
        if path.is_dir() and (path / "words.txt").is_file():  # a parquet folder with the text files copied next to it
            words, wnids = (path / "words.txt").read_text(), None
            if (path / "wnids.txt").is_file():
                wnids = (path / "wnids.txt").read_text().split()
        elif path.is_dir() or zipfile.is_zipfile(path):
            layout = _OriginalLayout(path)
            words, wnids = layout.read_text("words.txt"), layout.wnids()
        else:
            return {}
    except (FileNotFoundError, zipfile.BadZipFile) as err:
        logger.info("No Tiny ImageNet class names: %s", err)
        return {}
    names = {}
    for line in words.splitlines():
        wnid, _, synonyms = line.partition("\t")
        names[wnid.strip()] = synonyms.split(",")[0].strip()
    return {wnid: names.get(wnid, wnid) for wnid in wnids} if wnids else names
