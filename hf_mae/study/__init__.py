"""The reproduction study as one grid: pretraining variants, the evaluations of each encoder, and a Table-1 report.

- `plan`: a grid YAML becomes the runs, each after the runs it needs ([`load_grid`], [`plan_study`],
  [`select_runs`]); its docstring has the grid's schema.
- `execute`: the scheduler ([`run_study`]: skip finished runs, resume interrupted ones, record failures in
  `study_status.json`), the pluggable [`Executor`] (today [`LocalExecutor`]: one subprocess per run) and the worker
  entry point [`run_one`].
- `report`: tables and figures from what the runs left on disk ([`build_report`]).
- `__main__`: the command line, `python -m hf_mae.study GRID --scale demo` (a whole study) and
  `python -m hf_mae.study KIND --flags` (one run, what each job executes).
"""

from .execute import (
    STATUS_FILE,
    Executor,
    Job,
    JobResult,
    LocalExecutor,
    execute_subprocess,
    format_plan,
    is_finished,
    last_checkpoint,
    prepared_command,
    read_status,
    run_one,
    run_study,
)
from .plan import RUN_KINDS, Run, Study, Variant, load_grid, plan_study, select_runs, to_flags
from .report import build_report, collect_results

__all__ = [
    "RUN_KINDS",
    "STATUS_FILE",
    "Executor",
    "Job",
    "JobResult",
    "LocalExecutor",
    "Run",
    "Study",
    "Variant",
    "build_report",
    "collect_results",
    "execute_subprocess",
    "format_plan",
    "is_finished",
    "last_checkpoint",
    "load_grid",
    "plan_study",
    "prepared_command",
    "read_status",
    "run_one",
    "run_study",
    "select_runs",
    "to_flags",
]
