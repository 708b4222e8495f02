"""The command line: one function per training command, shared by the example scripts, the study's worker runs and
the `hf-mae` console script (= `python -m hf_mae`), whose dispatcher [`main`] is here too.

Each training command parses its dataclass arguments (HfArgumentParser flags, after an optional YAML/JSON file or
`--config NAME` that they override) and runs the matching pipeline; `pretrain` and `distill` also take the flags of
[`~hf_mae.training.knn.KNNArguments`] and pass the k-NN monitor to the run as an extra callback.

    hf-mae pretrain --config pretrain_mask90 --output_dir outputs/pt      # a shipped recipe, flags win over it
    hf-mae finetune my_recipe.yaml --model_name_or_path outputs/pt        # or a file of your own
    hf-mae study --grid seed --scale demo                                # the reproduction study
    hf-mae convert --source official mae_pretrain_vit_base.pth out/mae-base
    hf-mae recipe [NAME]  /  hf-mae accelerate-config [NAME]             # list the shipped files / print a path
    accelerate launch --config_file $(hf-mae accelerate-config multi_gpu) -m hf_mae pretrain --config ...
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .named_configs import (
    accelerate_config_names,
    accelerate_config_path,
    grid_names,
    grid_path,
    recipe_names,
    recipe_path,
)
from .training import (
    DataArguments,
    DMAETrainingArguments,
    KNNArguments,
    KNNMonitor,
    MAEFinetuningArguments,
    MAELinearProbeArguments,
    MAEPretrainingArguments,
    ModelArguments,
    parse_args,
    run_distillation,
    run_finetuning,
    run_pretraining,
)
from .training.pipeline import knn_datasets, run_main


def _log_level(training_args) -> None:
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)


def _pretrain_like(arguments, run, argv: list[str] | None) -> dict:
    model_args, data_args, training_args, knn_args = parse_args(
        (ModelArguments, DataArguments, arguments, KNNArguments), argv
    )
    _log_level(training_args)
    # --knn_eval_steps N logs k-NN top-1 every N steps, on the run's data and evaluation preprocessing
    monitor = KNNMonitor.from_args(knn_args, knn_datasets(data_args, model_args))
    return run(model_args, data_args, training_args, extra_callbacks=[monitor] if monitor else None)


def _finetune_like(arguments, argv: list[str] | None) -> dict:
    model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, arguments), argv)
    _log_level(training_args)
    return run_finetuning(model_args, data_args, training_args)


def pretrain(argv: list[str] | None = None) -> dict:
    """MAE pretraining ([`~hf_mae.training.run_pretraining`]) with the optional k-NN monitor."""
    return _pretrain_like(MAEPretrainingArguments, run_pretraining, argv)


def distill(argv: list[str] | None = None) -> dict:
    """DMAE pretraining ([`~hf_mae.training.run_distillation`]) with the optional k-NN monitor."""
    return _pretrain_like(DMAETrainingArguments, run_distillation, argv)


def finetune(argv: list[str] | None = None) -> dict:
    """Fine-tuning of a pretrained encoder, or the same ViT from scratch."""
    return _finetune_like(MAEFinetuningArguments, argv)


def linear_probe(argv: list[str] | None = None) -> dict:
    """Linear probing of a frozen pretrained encoder (the official MAE recipe)."""
    return _finetune_like(MAELinearProbeArguments, argv)


COMMANDS: dict[str, Callable[[list[str] | None], dict]] = {
    "pretrain": pretrain,
    "distill": distill,
    "finetune": finetune,
    "linear_probe": linear_probe,
}


def run_command(name: str, argv: list[str] | None = None) -> dict:
    """Run the command `name` (`pretrain`, `distill`, `finetune`, `linear_probe`; `linear-probe` works too)."""
    key = name.replace("-", "_")
    if key not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {name!r}")
    return COMMANDS[key](argv)


def _print_files(names: list[str], resolve: Callable[[str], Path], argv: list[str], what: str) -> int:
    """`hf-mae recipe` / `hf-mae accelerate-config`: the path of the file NAME, or every name and path."""
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(f"usage: hf-mae {what} [NAME]  (prints the file's path; without NAME, lists them)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv:
        print(resolve(argv[0]))  # the command's output: a path for $(...)
    else:
        print("\n".join(f"{name:<40} {resolve(name)}" for name in names))
    return 0


def _recipe_or_grid_path(name: str) -> Path:
    try:
        return recipe_path(name)
    except FileNotFoundError:
        try:
            return grid_path(name)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no recipe or study grid named {name!r}; recipes: {', '.join(recipe_names())}; "
                f"study grids: {', '.join(grid_names())}"
            ) from None


def _recipe(argv: list[str]) -> int:
    names = recipe_names() + [f"study_{g}" for g in grid_names()]
    return _print_files(names, _recipe_or_grid_path, argv, "recipe")


def _accelerate_config(argv: list[str]) -> int:
    return _print_files(accelerate_config_names(), accelerate_config_path, argv, "accelerate-config")


def _study(argv: list[str]) -> int:
    from .study.__main__ import main as study_main

    return run_main(lambda: study_main(argv))


def _convert(argv: list[str]) -> int:
    from .convert.__main__ import main as convert_main  # the converter's own CLI, for `hf-mae convert`

    return convert_main(argv)


def _training(name: str) -> Callable[[list[str]], int]:
    return lambda argv: run_main(lambda: COMMANDS[name](argv))


# the console script's commands: name -> (what it does, entry point taking the remaining argv, returning exit code)
CONSOLE_COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "pretrain": ("MAE pretraining", _training("pretrain")),
    "finetune": ("fine-tuning of a pretrained encoder (or from scratch)", _training("finetune")),
    "linear-probe": ("linear probing of a frozen encoder", _training("linear_probe")),
    "distill": ("DMAE pretraining with a frozen teacher", _training("distill")),
    "study": ("a study grid: its runs (locally or on Slurm), then the report", _study),
    "convert": ("checkpoints from / to the official MAE, timm and transformers", _convert),
    "recipe": ("the shipped recipes and study grids: list them, or print one's path", _recipe),
    "accelerate-config": ("the shipped accelerate configs: list them, or print one's path", _accelerate_config),
}


def _usage() -> str:
    lines = ["usage: hf-mae COMMAND [ARGS]   (also: python -m hf_mae COMMAND [ARGS])", "", "commands:"]
    lines += [f"  {name:<18} {what}" for name, (what, _) in CONSOLE_COMMANDS.items()]
    lines += ["", "`hf-mae COMMAND --help` for a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The `hf-mae` console script and `python -m hf_mae`: dispatch to a command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name = argv[0].replace("_", "-")
    if name not in CONSOLE_COMMANDS:
        print(f"hf-mae: unknown command {argv[0]!r}; commands: {', '.join(CONSOLE_COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return CONSOLE_COMMANDS[name][1](argv[1:])
    except FileNotFoundError as error:  # a name that is no shipped file, from `recipe` / `accelerate-config`
        print(f"hf-mae {name}: {error}", file=sys.stderr)
        return 1


__all__ = ["COMMANDS", "CONSOLE_COMMANDS", "distill", "finetune", "linear_probe", "main", "pretrain", "run_command"]
