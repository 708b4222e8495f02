"""Execution: the scheduler that runs a planned study, the executors it hands runs to, and the worker entry point.

[`run_study`] decides for each run whether it is finished (its `results.json` exists: skipped), resumes from the
newest complete `checkpoint-*`, restarts, fails before starting (a known problem) or is blocked (a run it needs did
not finish); the rest become [`Job`]s submitted to an [`Executor`] with the jobs they wait for. Results are recorded
in `<output_root>/study_status.json` as they arrive, with the tail of the run's log on failure, and the study goes
on. [`LocalExecutor`] runs one job at a time as a subprocess of this machine, so one crash, OOM or NaN stop cannot
take the study down and memory is returned between runs. Another executor implements the same three methods and is
passed as `run_study(..., executor=...)`: [`~hf_mae.study.cluster.SubmititExecutor`] makes each job a Slurm job.

Every job's command is `<launcher> -m hf_mae.study KIND --flags`, which calls [`run_one`] in the new process: the
same command functions as the example scripts (`hf_mae.cli`).
"""

from __future__ import annotations

import abc
import ctypes
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from ..cli import run_command
from ..training.trainer import RUN_FILES, newest_complete_checkpoint
from .plan import RUN_KINDS, Run, Study

logger = logging.getLogger(__name__)

STATUS_FILE = "study_status.json"
RESULTS_FILE = "results.json"  # written by every run at its very end: its presence means finished
LOG_FILE = "study.log"


# ----------------------------------------------------------------------------------------------------------------------
# The state of a run on disk
# ----------------------------------------------------------------------------------------------------------------------
def is_finished(run: Run) -> bool:
    return (run.output_dir / RESULTS_FILE).exists()


def last_checkpoint(run: Run) -> str | None:
    """The newest complete `checkpoint-<step>` folder of an interrupted run (half-written ones are skipped and
    named in the log), or None."""
    if not run.output_dir.is_dir():
        return None
    checkpoint = newest_complete_checkpoint(run.output_dir)
    return None if checkpoint is None else str(checkpoint)


def restart_flags(output_dir: Path) -> tuple[dict[str, Any], str]:
    """The flags that (re)start the unfinished run in `output_dir` now, and what they do: resume from its newest
    complete checkpoint (`resume from checkpoint-<step>`), start again over what it left without one (`restart`,
    said explicitly with `--overwrite_output_dir`), or nothing to add (`run`)."""
    checkpoint = newest_complete_checkpoint(output_dir) if output_dir.is_dir() else None
    if checkpoint is not None:
        return {"resume_from_checkpoint": str(checkpoint)}, f"resume from {checkpoint.name}"
    if any((output_dir / name).exists() for name in RUN_FILES) or any(output_dir.glob("checkpoint-*")):
        # a model, or only half-written checkpoints: the run refuses a fresh start over them unless told to replace
        return {"overwrite_output_dir": True}, "restart"
    return {}, "run"


def prepared_command(study: Study, run: Run) -> tuple[list[str], str]:
    """The command that runs (or resumes) `run` now, and what it will do: `done`, `resume from ...`, `restart` or
    `run` (see [`restart_flags`])."""
    if is_finished(run):
        return run.command(study.launcher), "done"
    flags, state = restart_flags(run.output_dir)
    return replace(run, args={**run.args, **flags}).command(study.launcher), state


def format_plan(study: Study, runs: list[Run] | None = None) -> str:
    """The dry-run listing: name, kind, depends-on, output dir, state, resources (for a cluster; `time` in minutes,
    `mem` in GB) and the exact command of every run."""
    runs = study.runs if runs is None else runs
    lines = [f"study {study.name!r}, scale {study.scale}: {len(runs)} runs into {study.output_root}"]
    if study.env:
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in study.env.items()))
    for i, run in enumerate(runs, 1):
        command, state = prepared_command(study, run)
        state = f"will fail: {run.problem}" if run.problem and state != "done" else state
        resources = ",".join(f"{k}={v}" for k, v in run.resources.items())
        lines += [
            f"[{i}/{len(runs)}] {run.name}  kind={run.kind}  depends_on={','.join(run.depends_on) or '-'}  "
            f"output_dir={run.output_dir}  state={state}" + (f"  resources={resources}" if resources else ""),
            "    " + shlex.join(command),
        ]
    return "\n".join(lines)


def read_status(root: Path) -> dict[str, dict[str, Any]]:
    """The status file of a study (`{}` before its first run)."""
    path = root / STATUS_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete it to start the record afresh") from error


def _write_status(root: Path, status: dict[str, dict[str, Any]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(status, indent=1))
    tmp.replace(root / STATUS_FILE)  # atomic: a study killed while writing keeps the previous record


def log_tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


# ----------------------------------------------------------------------------------------------------------------------
# Executors
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One command for an executor.

    Args:
        name (`str`): the run's name, unique in a study.
        command (`list[str]`): the full command line (launcher, `-m hf_mae.study KIND`, flags).
        log_path (`Path`): where stdout and stderr are appended.
        result_file (`Path`): written by the run when it finishes; the job succeeded when its exit code is 0 and this
            file exists.
        env (`dict[str, str]`): environment added to the executor's own.
        timeout (`float`, *optional*): seconds before the job is stopped and counted as failed.
        depends_on (`tuple[str, ...]`): names of jobs submitted earlier to the same executor that must succeed before
            this one starts; when one does not, this job ends `blocked` without starting.
        resources (`dict[str, Any]`): what the job asks a cluster scheduler for (the grid's `resources`, see
            [`~hf_mae.study.plan`]); an executor that runs jobs on this machine does not use them.
    """

    name: str
    command: list[str]
    log_path: Path
    result_file: Path
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    depends_on: tuple[str, ...] = ()
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        """The run's output directory (where its `results.json` and checkpoints go)."""
        return self.result_file.parent

    def succeeded(self, returncode: int) -> bool:
        return returncode == 0 and self.result_file.exists()

    def failure(self, returncode: int) -> str:
        """Why the job counts as failed, with the tail of its log."""
        why = f"exit code {returncode}" + ("" if returncode else f" but no {self.result_file.name}")
        if returncode < 0:  # Popen's code for a process ended by a signal
            try:
                why += f" (killed by {signal.Signals(-returncode).name})"
            except ValueError:
                pass
        return f"{why}\n{log_tail(self.log_path)}"


@dataclass
class JobResult:
    """How a job ended: `status` is `done`, `failed` or `blocked` (a job it depends on did not succeed); `job_id` is
    the scheduler's id of the job, where it has one."""

    name: str
    status: str
    seconds: float | None = None
    error: str | None = None
    job_id: str | None = None


class Executor(abc.ABC):
    """Where a study's jobs run. The scheduler submits every job of a pass (a job after the jobs it depends on), then
    iterates `wait()`; on `KeyboardInterrupt` it asks `status()` which jobs were cut short.

    Job states: `pending`, `running`, `done`, `failed`, `blocked`, `interrupted`.
    """

    @abc.abstractmethod
    def submit(self, job: Job) -> None:
        """Queue `job`. Raises `ValueError` when it depends on a job not submitted before it."""

    @abc.abstractmethod
    def wait(self) -> Iterator[JobResult]:
        """Yield one result per submitted job, as each ends; the queue is empty afterwards."""

    def __init__(self):
        self._states: dict[str, str] = {}  # job name -> state, kept up to date by the subclass

    def status(self, name: str) -> str:
        """The state of the job called `name`."""
        if name not in self._states:
            raise ValueError(f"no job {name!r} was submitted")
        return self._states[name]


def check_submission(job: Job, submitted: Collection[str]) -> None:
    """`ValueError` for a job submitted twice to an executor, or depending on a job not submitted before it."""
    unknown = [d for d in job.depends_on if d not in submitted]
    if unknown:
        raise ValueError(f"job {job.name!r} depends on {', '.join(unknown)}, not submitted before it")
    if job.name in submitted:
        raise ValueError(f"job {job.name!r} is submitted twice")


Launch = Callable[[list[str], Path, dict[str, str], float | None], int]


def execute_subprocess(command: list[str], log_path: Path, env: dict[str, str], timeout: float | None) -> int:
    """Run `command`, stdout and stderr appended to `log_path` after a `=== <start time> <command>` line; the return
    code (124 on timeout). The command runs in a session of its own, so that a timeout, an interrupt or a preemption
    stops its whole process tree (an `accelerate launch` and its workers), not its first process only. On Linux it
    also gets SIGTERM when this process dies without a chance to stop it (SIGKILL, the OOM killer): a session of its
    own would otherwise keep the run training, unseen, into the output directory that the study then records as
    failed and a rerun resumes in."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {datetime.now().isoformat(sep=' ', timespec='milliseconds')} {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
            preexec_fn=_terminate_with(os.getpid()) if sys.platform.startswith("linux") else None,
        )
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_process_group(process)
            log.write(f"\n=== timed out after {timeout} s\n")
            return 124
        except BaseException:  # KeyboardInterrupt, or the SystemExit of a requeue on preemption
            _stop_process_group(process)
            raise


def _terminate_with(parent: int) -> Callable[[], None]:
    """For `Popen(preexec_fn=...)`, run in the child before its command: SIGTERM to the child when the process that
    started it ends (Linux's PR_SET_PDEATHSIG); it exits at once if that process is already gone."""

    def preexec() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process's group, SIGKILL after `grace` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class LocalExecutor(Executor):
    """One job at a time on this machine, in the order submitted, each through `launch` (default: a subprocess with
    its output in the job's log). A job starts only once `wait()` is iterated."""

    def __init__(self, launch: Launch = execute_subprocess):
        super().__init__()
        self.launch = launch
        self._queue: list[Job] = []

    def submit(self, job: Job) -> None:
        check_submission(job, {j.name for j in self._queue})
        self._queue.append(job)
        self._states[job.name] = "pending"

    def wait(self) -> Iterator[JobResult]:
        try:
            while self._queue:
                yield self._run(self._queue.pop(0))
        finally:  # interrupted or abandoned: what did not start is dropped, not run by a later wait()
            self._queue.clear()

    def _run(self, job: Job) -> JobResult:
        missing = [d for d in job.depends_on if self._states[d] != "done"]
        if missing:
            self._states[job.name] = "blocked"
            return JobResult(job.name, "blocked", error=f"needs {', '.join(missing)} (not finished)")
        self._states[job.name] = "running"
        logger.info("%s: %s", job.name, shlex.join(job.command))
        start = time.time()
        try:
            code = self.launch(job.command, job.log_path, job.env, job.timeout)
        except KeyboardInterrupt:
            self._states[job.name] = "interrupted"
            raise
        seconds = time.time() - start
        if job.succeeded(code):
            self._states[job.name] = "done"
            return JobResult(job.name, "done", seconds)
        self._states[job.name] = "failed"
        return JobResult(job.name, "failed", seconds, job.failure(code))


# ----------------------------------------------------------------------------------------------------------------------
# The scheduler
# ----------------------------------------------------------------------------------------------------------------------
def make_job(
    study: Study, run: Run, command: list[str], timeout: float | None = None, depends_on: tuple[str, ...] = ()
) -> Job:
    """The job that runs `command` for `run`: its log in `<output_dir>/study.log`, the study's environment, the
    run's resources."""
    log_path, result_file = run.output_dir / LOG_FILE, run.output_dir / RESULTS_FILE
    return Job(run.name, command, log_path, result_file, study.env, timeout, depends_on, dict(run.resources))


def run_study(
    study: Study,
    runs: list[Run] | None = None,
    executor: Executor | None = None,
    timeout: float | None = None,
    keep_checkpoints: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run `runs` (default: all) through `executor` (default: [`LocalExecutor`]); finished runs are skipped,
    interrupted ones resumed, failures recorded.

    Returns the status of every run of the study (also in `<output_root>/study_status.json`): `done`, `failed`,
    `blocked` (a run it needs did not finish) or `interrupted`, with the command, seconds and, on failure, the log's
    tail. The `checkpoint-*` folders of a run that finished are deleted unless `keep_checkpoints` (its final model
    is saved next to them; at the paper's scale they hold ~1.3 GB of optimizer state each).
    """
    runs = study.runs if runs is None else runs
    executor = LocalExecutor() if executor is None else executor
    status = read_status(study.output_root)
    entries: dict[str, dict[str, Any]] = {}
    for run in runs:
        command, state = prepared_command(study, run)
        entry = {"kind": run.kind, "output_dir": str(run.output_dir), "command": shlex.join(command)}
        waiting = tuple(d for d in run.depends_on if not is_finished(study.run(d)))
        unreachable = [d for d in waiting if d not in entries]  # neither finished nor submitted in this pass
        if state == "done":
            status[run.name] = {**status.get(run.name, {}), **entry, "status": "done"}
            logger.info("%s: finished earlier, skipped", run.name)
        elif unreachable:
            status[run.name] = {
                **entry,
                "status": "blocked",
                "error": f"needs {', '.join(unreachable)} (not finished)",
            }
            logger.warning("%s: blocked, %s not finished", run.name, ", ".join(unreachable))
        elif run.problem:
            status[run.name] = {**entry, "status": "failed", "error": run.problem}
            logger.error("%s: %s", run.name, run.problem)
        else:
            executor.submit(make_job(study, run, command, timeout, waiting))
            entries[run.name] = entry
            logger.info("%s: %s", run.name, state)
    _write_status(study.output_root, status)
    try:
        for i, result in enumerate(executor.wait(), 1):
            run, entry = study.run(result.name), entries[result.name]
            seconds = {} if result.seconds is None else {"seconds": result.seconds}
            job_id = {} if result.job_id is None else {"job_id": result.job_id}
            status[run.name] = {**entry, "status": result.status, **seconds, **job_id}
            if result.error:
                status[run.name]["error"] = result.error
            where = f"[{i}/{len(entries)}] {run.name}"
            if result.status == "done":
                logger.info("%s: done in %.0f s", where, result.seconds or 0)
                if not keep_checkpoints:
                    for checkpoint in run.output_dir.glob("checkpoint-*"):
                        shutil.rmtree(checkpoint, ignore_errors=True)
            else:
                logger.error("%s: %s (%s); log: %s", where, result.status, result.error, run.output_dir / LOG_FILE)
            _write_status(study.output_root, status)
    except KeyboardInterrupt:
        for name, entry in entries.items():
            if executor.status(name) == "interrupted":
                status[name] = {**entry, "status": "interrupted"}
        _write_status(study.output_root, status)
        raise
    return status


# ----------------------------------------------------------------------------------------------------------------------
# The worker: one run, in this process (what every job's command executes)
# ----------------------------------------------------------------------------------------------------------------------
def run_one(kind: str, argv: list[str]) -> dict[str, float]:
    """Run one study run of `kind` in this process: the same command function as the example script of `kind`."""
    if kind not in RUN_KINDS:
        raise ValueError(f"run kind must be one of {RUN_KINDS}, got {kind!r}")
    return run_command(kind, argv)
