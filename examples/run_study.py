"""Run the seed's study (or any grid) end to end: pretraining variants, their fine-tunings, the report.

    # the whole grid on the built-in digits, on CPU (~37 min), report in outputs/study_demo/report/results.md:
    python examples/run_study.py --scale demo
    # the seed's runs at full scale (Tiny ImageNet, one GPU per run): list them with their exact commands, then run
    python examples/run_study.py --scale full --dry-run
    python examples/run_study.py --scale full
    # some runs only (glob on run names; the runs they need are added), another grid, the report alone:
    python examples/run_study.py --scale demo --only 'mae_mask*'
    python examples/run_study.py my_grid.yaml --scale full --launcher "accelerate launch --config_file accelerate_configs/multi_gpu.yaml"
    python examples/run_study.py --scale demo --report_only

Rerunning skips finished runs (results.json present) and resumes interrupted ones from their last checkpoint; a
failed run is recorded (outputs/<study>/study_status.json, its log in <run>/study.log) and the study goes on.
"""

import argparse
import logging
import shlex
from pathlib import Path

from hf_mae.study import build_report, format_plan, load_grid, plan_study, run_study, select_runs

DEFAULT_GRID = Path(__file__).resolve().parent / "configs" / "study_seed.yaml"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grid", nargs="?", default=str(DEFAULT_GRID), help="study grid YAML (default: the seed's)")
    parser.add_argument("--scale", default="demo", help="a scale of the grid: demo (CPU, digits) or full (the seed)")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="list the runs and their commands only")
    parser.add_argument("--only", nargs="+", metavar="GLOB", help="run these runs (and the runs they need) only")
    parser.add_argument("--output_root", help="overrides the scale's output_root")
    parser.add_argument(
        "--launcher", help="overrides the scale's launcher, e.g. 'accelerate launch --config_file ...'"
    )
    parser.add_argument("--timeout", type=float, help="seconds per run before it is stopped and marked failed")
    parser.add_argument("--report_only", "--report-only", action="store_true", help="rebuild the report only")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep checkpoint-* of finished runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    study = plan_study(load_grid(args.grid), args.scale, args.output_root)
    if args.launcher:
        study.launcher = shlex.split(args.launcher)
    runs = select_runs(study, args.only)
    if args.dry_run:
        print(format_plan(study, runs))
        return None
    if not args.report_only:
        run_study(study, runs, timeout=args.timeout, keep_checkpoints=args.keep_checkpoints)
    report = build_report(study)
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
