"""The reproduction study as one grid: pretraining variants, the evaluations of each encoder, and a Table-1 report.

- `plan`: a grid YAML becomes the runs, each after the runs it needs ([`load_grid`], [`plan_study`],
  [`select_runs`]); its docstring has the grid's schema.
- `execute`: the scheduler ([`run_study`]: skip finished runs, resume interrupted ones, record failures in
  `study_status.json`), the pluggable [`Executor`] ([`LocalExecutor`]: one subprocess per run) and the worker
  entry point [`run_one`].
- `cluster`: [`SubmititExecutor`]: every run a submitit job on Slurm (dependencies, resources, requeue on
  preemption) or on submitit's local executor; submitit itself is imported only when one is created.
- `report`: tables and figures from what the runs left on disk ([`build_report`]).
- `__main__`: the command line, `python -m hf_mae.study GRID --scale demo` (a whole study; `hf-mae study`) and
  `python -m hf_mae.study KIND --flags` (one run, what each job executes).
"""

from .cluster import StudyJob, SubmititExecutor
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
    make_job,
    prepared_command,
    read_status,
    restart_flags,
    run_one,
    run_study,
)
from .plan import (
    RESOURCE_KEYS,
    RUN_KINDS,
    Run,
    Study,
    Variant,
    check_resources,
    load_grid,
    plan_study,
    select_runs,
    to_flags,
)
from .report import build_report, collect_results

__all__ = [
    "RESOURCE_KEYS",
    "RUN_KINDS",
    "STATUS_FILE",
    "Executor",
    "Job",
    "JobResult",
    "LocalExecutor",
    "Run",
    "StudyJob",
    "SubmititExecutor",
    "Study",
    "Variant",
    "build_report",
    "check_resources",
    "collect_results",
    "execute_subprocess",
    "format_plan",
    "is_finished",
    "last_checkpoint",
    "load_grid",
    "make_job",
    "plan_study",
    "prepared_command",
    "read_status",
    "restart_flags",
    "run_one",
    "run_study",
    "select_runs",
    "to_flags",
]
