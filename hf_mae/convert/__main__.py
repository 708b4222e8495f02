"""`python -m hf_mae.convert`: convert MAE checkpoints into hf_mae (`--source`) or out of it (`--target`).

See the package docstring of `hf_mae.convert` for the usage and what the weights decide.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..configuration_mae import PRESETS
from . import (
    SOURCES,
    TARGETS,
    StateDict,
    convert_official_checkpoint,
    convert_timm_state_dict,
    convert_transformers_model,
    load_hf_mae_model,
    timm_model_kwargs,
    to_official_state_dict,
    to_timm_state_dict,
    to_transformers,
)

# named, not __name__: run with -m this module is "__main__", and its messages belong with the converter's
logger = logging.getLogger("hf_mae.convert")

_CONFIG_FLAGS = ("norm_pix_loss", "image_size", "num_attention_heads", "decoder_num_attention_heads", "mask_ratio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_mae.convert",
        description="Convert MAE checkpoints into hf_mae (--source) or out of it (--target).",
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--source", choices=SOURCES, help="format of INPUT; OUTPUT is an hf_mae directory")
    direction.add_argument("--target", choices=TARGETS, help="format of OUTPUT; INPUT is an hf_mae directory")
    parser.add_argument("input", help="checkpoint file or directory")
    parser.add_argument(
        "output", help="directory (hf_mae, transformers) or file (timm: .safetensors/.pth; official: .pth)"
    )
    group = parser.add_argument_group("config for --source (what the weights cannot tell)")
    group.add_argument("--preset", choices=sorted(PRESETS), help="start from this hf_mae preset")
    group.add_argument(
        "--norm_pix_loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the model regresses normalised pixels (default: checkpoint args, preset, or off)",
    )
    group.add_argument("--image_size", type=int, help="interpolate the position embeddings to this resolution")
    group.add_argument("--num_attention_heads", type=int, help="encoder heads (default: ViT table / width // 64)")
    group.add_argument("--decoder_num_attention_heads", type=int, help="decoder heads (default: 16 for width 512)")
    group.add_argument("--mask_ratio", type=float, help="pretraining mask ratio (default: checkpoint args or 0.75)")
    return parser


def _save_state_dict(sd: StateDict, path: Path, wrap: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors" and wrap is None:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    elif path.suffix in (".pth", ".pt", ".bin"):
        torch.save({wrap: sd} if wrap else sd, path)
    else:
        allowed = ".pth/.pt/.bin" if wrap else ".safetensors/.pth/.pt/.bin"
        raise ValueError(f"output {path}: unknown extension {path.suffix!r}, use {allowed}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m hf_mae.convert`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None}
    if args.target and (overrides or args.preset):
        parser.error("--preset and the config flags apply to --source conversions only")
    try:
        _run(args, overrides)
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 1
    return 0


def _run(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    output = Path(args.output)
    if args.source:
        convert = {
            "official": convert_official_checkpoint,
            "timm": convert_timm_state_dict,
            "transformers": convert_transformers_model,
        }[args.source]
        model = convert(args.input, preset=args.preset, **overrides)
        model.save_pretrained(output)
        logger.info("Saved %s to %s", type(model).__name__, output)
        return
    model = load_hf_mae_model(args.input)
    if args.target == "transformers":
        to_transformers(model).save_pretrained(output)
        # the hf_mae directory's image processor (transformers' own class) goes with it, so that
        # `pipeline(model=output)` finds one; the default for the model's image size where it has none
        source_processor = Path(args.input) / "preprocessor_config.json"
        if source_processor.is_file():
            shutil.copyfile(source_processor, output / source_processor.name)
        model._save_image_processor(output)
    elif args.target == "timm":
        _save_state_dict(to_timm_state_dict(model), output)
        shown = {k: v for k, v in timm_model_kwargs(model).items() if k != "norm_layer"}
        logger.info("Build the timm model with VisionTransformer(**%s)", shown)
    else:
        _save_state_dict(to_official_state_dict(model), output, wrap="model")
    logger.info("Saved %s weights to %s", args.target, output)


if __name__ == "__main__":
    raise SystemExit(main())
