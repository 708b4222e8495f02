"""The study's command line (also `hf-mae study ...`).

    # a whole study: plan, run (skipping finished runs, resuming interrupted ones), report
    python -m hf_mae.study --grid seed --scale demo                     # a grid shipped with hf_mae, by name
    python -m hf_mae.study GRID.yaml --scale full --dry-run             # the runs and their exact commands only
    python -m hf_mae.study GRID.yaml --scale demo --only 'mae_mask*'    # these runs and the runs they need
    python -m hf_mae.study GRID.yaml --scale demo --report_only
    # every run a Slurm job (submitit): dependencies, resources from the grid, requeue on preemption
    python -m hf_mae.study --grid seed --scale full --executor submitit --resources partition=gpu account=me
    # one run of a study, in this process (the command every job executes)
    python -m hf_mae.study {pretrain,distill,finetune,linear_probe} --flags ...

`examples/run_study.py` is the same command with the reproduction study's grid as the default.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from ..named_configs import grid_names
from ..training.pipeline import run_main
from .cluster import CLUSTERS, SUBMITIT_MISSING, SubmititExecutor
from .execute import Executor, format_plan, run_one, run_study
from .plan import RESOURCE_KEYS, RUN_KINDS, check_resources, load_grid, parse_launcher, plan_study, select_runs
from .report import build_report

EXECUTORS = ("local", "submitit")


def parse_study_args(argv: list[str] | None, default_grid: str | Path | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hf_mae.study",
        description="Run a study grid (pretraining variants, their evaluations, the report), or one run of it: "
        f"python -m hf_mae.study {{{','.join(RUN_KINDS)}}} --flags",
    )
    grid_help = f"a study grid YAML, or the name of one shipped with hf_mae ({', '.join(grid_names())})"
    parser.add_argument("grid", nargs="?", help=grid_help + (f" (default: {default_grid})" if default_grid else ""))
    parser.add_argument("--grid", dest="grid_option", metavar="GRID", help="the same as the positional GRID")
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
    cluster = parser.add_argument_group("executor (where the runs go)")
    cluster.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local: one subprocess at a time on this machine; submitit: every run a submitit job (Slurm, or "
        "submitit's local executor), dependencies as Slurm dependencies, requeued on preemption "
        '(pip install "hf_mae[slurm]")',
    )
    cluster.add_argument(
        "--submitit_cluster",
        choices=CLUSTERS,
        default="auto",
        help="with --executor submitit: slurm, local, or auto (Slurm when srun is on the PATH)",
    )
    cluster.add_argument(
        "--submitit_folder", help="submitit's job files and logs (default: <output_root>/submitit; shared by nodes)"
    )
    cluster.add_argument("--max_running", type=int, help="with submitit's local executor: jobs at once (default 1)")
    cluster.add_argument(
        "--resources",
        nargs="+",
        metavar="KEY=VALUE",
        help=f"over every run's resources from the grid ({', '.join(RESOURCE_KEYS)}), e.g. partition=gpu",
    )
    args = parser.parse_args(argv)
    if args.grid and args.grid_option:
        parser.error(f"a grid twice: {args.grid} and --grid {args.grid_option}")
    args.grid = args.grid or args.grid_option or (str(default_grid) if default_grid else None)
    if not args.grid:
        parser.error(f"the following arguments are required: grid (a YAML path or --grid {'|'.join(grid_names())})")
    if args.executor == "local":
        given = [f"--{k}" for k in ("submitit_folder", "max_running") if getattr(args, k) is not None]
        given += ["--submitit_cluster"] if args.submitit_cluster != "auto" else []
        if given:
            parser.error(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --executor submitit only")
    else:
        try:
            import submitit  # noqa: F401
        except ImportError:
            parser.error(SUBMITIT_MISSING)
        if args.timeout is not None:
            parser.error(
                "--timeout is for the local executor; with submitit, set `time` in the grid's resources or "
                "--resources time=HH:MM:SS (a job that runs out of it is requeued and resumes)"
            )
    if args.max_running is not None and args.max_running < 1:
        parser.error(f"--max_running takes the jobs to run at once, >= 1; got {args.max_running}")
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout takes the seconds a run may take, > 0; got {args.timeout:g}")
    args.resources = _parse_resources(parser, args.resources)
    return args


def _parse_resources(parser: argparse.ArgumentParser, items: list[str] | None) -> dict:
    resources = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--resources takes KEY=VALUE, got {item!r}")
        resources[key] = int(value) if key in ("gpus", "nodes", "cpus") and value.isdigit() else value
    try:
        return check_resources(resources, "--resources")
    except ValueError as error:
        parser.error(str(error))


def make_executor(args: argparse.Namespace, output_root: Path) -> Executor | None:
    """The executor the command line asks for (None: the local one)."""
    if args.executor == "local":
        return None
    folder = Path(args.submitit_folder) if args.submitit_folder else output_root / "submitit"
    return SubmititExecutor(folder, cluster=args.submitit_cluster, max_running=args.max_running)


@contextlib.contextmanager
def stopped_like_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP (a `kill`, the terminal closed, a scheduler ending the study command) stop the study as
    Ctrl-C does: its executor cancels the jobs it started and the status file records them `interrupted`. Left to
    their default, they end this process at once, and submitit's jobs (processes of their own, or Slurm jobs) train
    on unrecorded, beside the same runs submitted again by the next pass."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    # no SIGHUP on Windows
    numbers = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {number: signal.signal(number, interrupt) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


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
    if args.launcher is not None:
        study.launcher = parse_launcher(args.launcher)
    for run in study.runs:
        run.resources.update(args.resources)
    runs = select_runs(study, args.only)
    if args.dry_run:
        print(format_plan(study, runs))  # the command's output, for the terminal or a file
        return None
    if not args.report_only:
        executor = make_executor(args, study.output_root)
        with stopped_like_ctrl_c():
            run_study(study, runs, executor, timeout=args.timeout, keep_checkpoints=args.keep_checkpoints)
    report = build_report(study)
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # as the example scripts: one message for a bad value, the process group ended
