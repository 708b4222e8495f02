"""The study's command line.

    # a whole study: plan, run (skipping finished runs, resuming interrupted ones), report
    python -m hf_mae.study GRID.yaml --scale demo
    python -m hf_mae.study GRID.yaml --scale full --dry-run            # the runs and their exact commands only
    python -m hf_mae.study GRID.yaml --scale demo --only 'mae_mask*'   # these runs and the runs they need
    python -m hf_mae.study GRID.yaml --scale demo --report_only
    # one run of a study, in this process (the command every job executes)
    python -m hf_mae.study {pretrain,distill,finetune,linear_probe} --flags ...

`examples/run_study.py` is the same command with the reproduction study's grid as the default.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from .execute import format_plan, run_one, run_study
from .plan import RUN_KINDS, load_grid, plan_study, select_runs
from .report import build_report


def parse_study_args(argv: list[str] | None, default_grid: str | Path | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hf_mae.study",
        description="Run a study grid (pretraining variants, their evaluations, the report), or one run of it: "
        f"python -m hf_mae.study {{{','.join(RUN_KINDS)}}} --flags",
    )
    parser.add_argument(
        "grid",
        nargs="?" if default_grid else None,
        default=str(default_grid) if default_grid else None,
        help="study grid YAML" + (f" (default: {default_grid})" if default_grid else ""),
    )
    parser.add_argument("--scale", default="demo", help="a scale of the grid, e.g. demo (CPU) or full (the paper)")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="list the runs and their commands only")
    parser.add_argument("--only", nargs="+", metavar="GLOB", help="run these runs (and the runs they need) only")
    parser.add_argument("--output_root", help="overrides the scale's output_root")
    parser.add_argument(
        "--launcher", help="overrides the scale's launcher, e.g. 'accelerate launch --config_file ...'"
    )
    parser.add_argument("--timeout", type=float, help="seconds per run before it is stopped and marked failed")
    parser.add_argument("--report_only", "--report-only", action="store_true", help="rebuild the report only")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep checkpoint-* of finished runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, default_grid: str | Path | None = None) -> Path | None:
    """Run the command line `argv` (default: `sys.argv[1:]`); returns the report's `results.md`, or None for a dry
    run or a single run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in RUN_KINDS:
        run_one(argv[0], argv[1:])
        return None
    args = parse_study_args(argv, default_grid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    study = plan_study(load_grid(args.grid), args.scale, args.output_root)
    if args.launcher:
        study.launcher = shlex.split(args.launcher)
    runs = select_runs(study, args.only)
    if args.dry_run:
        print(format_plan(study, runs))  # the command's output, for the terminal or a file
        return None
    if not args.report_only:
        run_study(study, runs, timeout=args.timeout, keep_checkpoints=args.keep_checkpoints)
    report = build_report(study)
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
