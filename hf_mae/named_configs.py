"""The config files that ship inside the package, addressable by name.

- **recipes** (`hf_mae/recipes/*.yaml`): one training command each, the reproduction study's exact settings
  (`hf-mae pretrain --config pretrain_mask90`);
- **study grids** (`hf_mae/recipes/study_<name>.yaml`): `hf-mae study --grid seed`; they sit next to the recipes
  because a grid names its runs' config files relative to itself;
- **accelerate configs** (`hf_mae/accelerate_configs/*.yaml`):
  `accelerate launch --config_file $(hf-mae accelerate-config multi_gpu) -m hf_mae pretrain ...`.

In a checkout, `examples/configs` and `accelerate_configs` are symlinks to these folders: one copy of each file.

A name is a file's stem (`pretrain_mask90`; `pretrain_mask90.yaml` works too; a grid's name drops `study_`). A value
with a folder in it, or naming a file that exists, is a path and is used as is. A name that is neither is a
`FileNotFoundError` listing the names there are.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
ACCELERATE_CONFIGS_DIR = PACKAGE_DIR / "accelerate_configs"
GRID_PREFIX = "study_"
CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def _stems(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.iterdir() if p.suffix in CONFIG_FILE_SUFFIXES)


def recipe_names() -> list[str]:
    """The training recipes shipped with hf_mae (the study grids excluded)."""
    return [n for n in _stems(RECIPES_DIR) if not n.startswith(GRID_PREFIX)]


def grid_names() -> list[str]:
    """The study grids shipped with hf_mae, by the name `--grid` takes (`seed` for `study_seed.yaml`)."""
    return [n[len(GRID_PREFIX) :] for n in _stems(RECIPES_DIR) if n.startswith(GRID_PREFIX)]


def accelerate_config_names() -> list[str]:
    """The accelerate configs shipped with hf_mae."""
    return _stems(ACCELERATE_CONFIGS_DIR)


def _resolve(value: str | Path, folder: Path, names: list[str], what: str, prefix: str = "") -> Path:
    path = Path(value)
    if path.is_file():
        return path
    text = str(value)
    if "/" not in text and "\\" not in text:
        stem = path.stem if path.suffix in CONFIG_FILE_SUFFIXES else text
        stem = stem[len(prefix) :] if prefix and stem.startswith(prefix) else stem
        if stem in names:
            return next(
                folder / f"{prefix}{stem}{s}"
                for s in CONFIG_FILE_SUFFIXES
                if (folder / f"{prefix}{stem}{s}").is_file()
            )
        raise FileNotFoundError(f"no {what} named {text!r} (and no such file); {what}s: {', '.join(names)}")
    raise FileNotFoundError(f"{what} file {text} not found; or give the name of one shipped: {', '.join(names)}")


def recipe_path(value: str | Path) -> Path:
    """The file of a recipe: a shipped recipe's name (`pretrain_mask90`) or any YAML / JSON path."""
    return _resolve(value, RECIPES_DIR, recipe_names(), "recipe")


def grid_path(value: str | Path) -> Path:
    """The file of a study grid: a shipped grid's name (`seed`, or `study_seed`) or any grid YAML path."""
    return _resolve(value, RECIPES_DIR, grid_names(), "study grid", prefix=GRID_PREFIX)


def accelerate_config_path(value: str | Path) -> Path:
    """The file of an accelerate config: a shipped config's name (`multi_gpu`) or any path."""
    return _resolve(value, ACCELERATE_CONFIGS_DIR, accelerate_config_names(), "accelerate config")


__all__ = [
    "ACCELERATE_CONFIGS_DIR",
    "RECIPES_DIR",
    "accelerate_config_names",
    "accelerate_config_path",
    "grid_names",
    "grid_path",
    "recipe_names",
    "recipe_path",
]
