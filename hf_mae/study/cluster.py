"""The study on a cluster: [`SubmititExecutor`] makes every run a [submitit](https://github.com/facebookincubator/submitit)
job, on Slurm or on submitit's local executor.

- **Slurm**: each job is submitted with `sbatch` when the study starts waiting, its dependencies as Slurm
  dependencies (`--dependency=afterok:<job ids>`: a fine-tune starts after its pretraining succeeded, a DMAE student
  after its teacher; `--kill-on-invalid-dep=yes` removes it from the queue when one failed), its resources from the
  grid (`--gpus-per-node`, `--nodes`, `--time`, `--partition`, `--account`, ...), `--requeue`, and the signal submitit
  asks Slurm to send before the time limit or a preemption (`--signal=USR2@<signal_delay_s>`).
- **local** (submitit's `LocalExecutor`, no scheduler): the jobs are real processes of this machine, but submitit's
  local executor has no dependencies, so this executor holds a job back until the jobs it needs succeeded, and runs
  at most `max_running` at a time.

Each job runs [`StudyJob`]: the run's command in a subprocess (`execute_subprocess`, the same as the local executor),
its output in `<run>/study.log`. StudyJob follows submitit's checkpointing protocol (what
`submitit.helpers.Checkpointable` provides): on the preemption / time-limit signal submitit calls its `checkpoint()`,
which returns the same job with `--resume_from_checkpoint latest` (the newest *complete* `checkpoint-*`; or
`--overwrite_output_dir` when the run had none yet), and submitit requeues it. A job on several nodes runs one task
per node, each its node's `accelerate launch` with `--num_machines`, `--machine_rank`, `--main_process_ip` and
`--main_process_port` set from Slurm's allocation.

The study's scheduler ([`~hf_mae.study.run_study`]) is the same as with the local executor: skip finished runs,
resume interrupted ones, `study_status.json` (with each run's Slurm `job_id`), the report. The study command waits
for its jobs (run it in `tmux` or on a login node); stopping it (Ctrl-C, SIGTERM, SIGHUP) cancels the jobs it
submitted, and the next pass resumes them from their checkpoints.

submitit is an optional dependency (`pip install "hf_mae[slurm]"`): it is imported when the executor is created.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from .execute import Executor, Job, JobResult, check_submission, execute_subprocess, log_tail, restart_flags
from .plan import to_flags

logger = logging.getLogger(__name__)

CLUSTERS = ("auto", "slurm", "local")
SUBMITIT_MISSING = 'the submitit executor needs submitit: pip install "hf_mae[slurm]" (or pip install submitit)'
LOCAL_TIME_MIN = 7 * 24 * 60  # submitit's local executor stops a job after 2 minutes unless told otherwise


def import_submitit():
    """submitit, or an `ImportError` saying how to install it."""
    try:
        import submitit
    except ImportError as error:
        raise ImportError(SUBMITIT_MISSING) from error
    return submitit


# ----------------------------------------------------------------------------------------------------------------------
# What every job runs
# ----------------------------------------------------------------------------------------------------------------------
def accelerate_launch_end(command: list[str]) -> int | None:
    """The index just after `accelerate launch` (or `python -m accelerate.commands.launch`) in `command`, where
    launcher flags go; None when the command does not start with accelerate's launcher."""
    for i, arg in enumerate(command[:4]):
        if arg == "accelerate.commands.launch" or (
            arg == "launch" and i and Path(command[i - 1]).name == "accelerate"
        ):
            return i + 1
    return None


def multinode_command(
    command: list[str], nodes: int, node_rank: int, main_ip: str, port: int, gpus_per_node: int | None
) -> list[str]:
    """`command` (an `accelerate launch` command line) as node `node_rank` of `nodes` runs it: the machine flags
    after `launch` win over the accelerate config's template values (`num_processes` = all GPUs of all nodes)."""
    end = accelerate_launch_end(command)
    if end is None:
        raise ValueError(
            f"a job on {nodes} nodes needs an `accelerate launch` launcher, got {shlex.join(command[:3])}"
        )
    flags = ["--num_machines", str(nodes), "--machine_rank", str(node_rank)]
    flags += ["--main_process_ip", main_ip, "--main_process_port", str(port)]
    if gpus_per_node:
        flags += ["--num_processes", str(nodes * gpus_per_node)]
    return [*command[:end], *flags, *command[end:]]


def _note(log_path: Path, text: str) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {datetime.now().isoformat(sep=' ', timespec='milliseconds')} {text}\n")


class StudyJob:
    """The callable of every submitit job: run one study run's command, return its exit code and seconds.

    It implements submitit's checkpointing protocol: on the signal Slurm sends before a preemption or the time limit,
    submitit calls [`checkpoint`] and requeues what it returns.
    """

    def __call__(self, job: Job) -> dict[str, Any]:
        import submitit

        command, log_path = job.command, job.log_path
        environment = submitit.JobEnvironment()
        if environment.num_nodes > 1:
            # one task per node; a port from the job id, so that two jobs sharing a node do not collide
            port = 20000 + int(environment.raw_job_id) % 20000
            command = multinode_command(
                command,
                environment.num_nodes,
                environment.node,
                environment.hostnames[0],
                port,
                job.resources.get("gpus"),
            )
            if environment.node:
                log_path = log_path.with_name(f"{log_path.stem}.node{environment.node}{log_path.suffix}")
        start = time.time()
        code = execute_subprocess(command, log_path, job.env, None)
        return {"returncode": code, "seconds": time.time() - start}

    def checkpoint(self, job: Job) -> Any:
        """The requeued job: the same command, resuming from the run's newest complete checkpoint (`latest`, resolved
        when it starts again) or, without one, replacing what the run left."""
        from submitit.helpers import DelayedSubmission

        flags, state = restart_flags(job.output_dir)
        if "resume_from_checkpoint" in flags:
            flags = {"resume_from_checkpoint": "latest"}
        requeued = replace(job, command=[*job.command, *to_flags(flags)])
        _note(job.log_path, f"preempted or out of time: requeued ({state})")
        return DelayedSubmission(StudyJob(), requeued)


# ----------------------------------------------------------------------------------------------------------------------
# The executor
# ----------------------------------------------------------------------------------------------------------------------
def _config_file_processes(command: list[str]) -> tuple[str, int] | None:
    """The `--config_file` of an accelerate launcher and its `num_processes`, when both are there."""
    end = accelerate_launch_end(command)
    if end is None:
        return None
    for i, arg in enumerate(command[:-1]):
        if arg == "--config_file" or arg.startswith("--config_file="):
            path = arg.split("=", 1)[1] if "=" in arg else command[i + 1]
            try:
                config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                return None  # accelerate itself says what is wrong with it
            processes = config.get("num_processes") if isinstance(config, dict) else None
            return (path, processes) if isinstance(processes, int) else None
    return None


class SubmititExecutor(Executor):
    """Every job a submitit job, on Slurm or on submitit's local executor (see the module docstring).

    Args:
        folder (`str` or `Path`): where submitit keeps its job files and logs (on Slurm: a folder every node sees,
            e.g. `<output_root>/submitit`).
        cluster (`str`, *optional*, defaults to `"auto"`): `slurm`, `local` (submitit's local executor), or `auto`
            (Slurm when `srun` is on the PATH).
        max_running (`int`, *optional*): jobs running at once with the local executor (default 1: one machine);
            Slurm schedules its queue itself.
        signal_delay_s (`int`, *optional*, defaults to 120): seconds between Slurm's warning signal and the end of
            the job's time, for the requeue.
        max_timeouts (`int`, *optional*, defaults to 3): requeues after running out of time (a preemption is requeued
            every time).
        poll_s (`float`, *optional*): seconds between two looks at the jobs (default 10 on Slurm, 1 locally).
    """

    def __init__(
        self,
        folder: str | Path,
        cluster: str = "auto",
        max_running: int | None = None,
        signal_delay_s: int = 120,
        max_timeouts: int = 3,
        poll_s: float | None = None,
    ):
        super().__init__()
        if cluster not in CLUSTERS:
            raise ValueError(f"cluster must be one of {', '.join(CLUSTERS)}, got {cluster!r}")
        if max_running is not None and max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self._submitit = import_submitit()
        self.folder = Path(folder)
        self.signal_delay_s, self.max_timeouts = signal_delay_s, max_timeouts
        try:  # fails here, not at the first job, when the cluster is not there (no srun for slurm)
            self.cluster = self._new_executor(None if cluster == "auto" else cluster).cluster
        except RuntimeError as error:  # submitit's word for "no Slurm here"
            raise ValueError(
                f"the submitit executor cannot use cluster={cluster!r} on this machine ({error}); without Slurm, "
                "use cluster 'local' (--submitit_cluster local)"
            ) from error
        self.holds_dependencies = self.cluster != "slurm"  # only Slurm knows dependencies
        self.max_running = (1 if self.cluster != "slurm" else None) if max_running is None else max_running
        self.poll_s = (10.0 if self.cluster == "slurm" else 1.0) if poll_s is None else poll_s
        self._jobs: dict[str, Job] = {}
        self._queue: list[str] = []  # submitted to this executor, not yet to submitit
        self._live: dict[str, Any] = {}  # name -> submitit job
        self._ids: dict[str, str] = {}
        logger.info("submitit executor on %s, files in %s", self.cluster, self.folder)

    def _new_executor(self, cluster: str | None):
        # one per job: submitit keeps parameters between update_parameters calls, a job must not inherit another's
        return self._submitit.AutoExecutor(
            folder=self.folder,
            cluster=cluster,
            slurm_max_num_timeout=self.max_timeouts,
            local_max_num_timeout=self.max_timeouts,
        )

    # -- the Executor interface ----------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        check_submission(job, self._jobs)
        self._parameters(job)  # every problem with its resources, before any job reaches the queue
        self._jobs[job.name] = job
        self._queue.append(job.name)
        self._states[job.name] = "pending"

    def wait(self) -> Iterator[JobResult]:
        try:
            while self._queue or self._live:
                yield from self._blocked_results()
                self.start_ready()
                finished = [name for name, handle in self._live.items() if handle.done()]
                for name in finished:
                    yield self._result(name)
                if not finished and (self._queue or self._live):
                    time.sleep(self.poll_s)
        except BaseException:  # interrupted (or abandoned): nothing of this pass keeps running without the study
            for name, handle in self._live.items():
                handle.cancel(check=False)
                self._states[name] = "interrupted"
                logger.warning("%s: cancelled job %s", name, self._ids.get(name))
            self._live.clear()
            raise
        finally:
            self._queue.clear()

    # -- submission ----------------------------------------------------------------------------------------------------
    def start_ready(self) -> list[str]:
        """Hand every queued job that may start now to submitit, and return their names: on Slurm all of them (each
        with its dependencies), locally those whose dependencies succeeded, up to `max_running`. `wait()` calls it."""
        started = []
        for name in list(self._queue):
            job = self._jobs[name]
            if self.holds_dependencies and any(self._states[d] != "done" for d in job.depends_on):
                continue
            if self.max_running is not None and len(self._live) >= self.max_running:
                break
            executor = self._new_executor(self.cluster)
            parameters = self._parameters(job)
            waits_for = [self._ids[d] for d in job.depends_on if self._states[d] != "done"]
            if waits_for:  # Slurm only: locally a job waits here until its dependencies are done
                parameters["slurm_dependency"] = "afterok:" + ":".join(waits_for)
            executor.update_parameters(**parameters)
            handle = executor.submit(StudyJob(), job)
            self._queue.remove(name)
            self._live[name], self._ids[name] = handle, str(handle.job_id)
            self._states[name] = "running"
            after = f" after {', '.join(waits_for)}" if waits_for else ""
            logger.info("%s: submitted as job %s%s", name, handle.job_id, after)
            started.append(name)
        return started

    def _parameters(self, job: Job) -> dict[str, Any]:
        """submitit's parameters for `job` (`ValueError` naming the job for what cannot work)."""
        resources = job.resources
        if job.timeout is not None:
            raise ValueError(
                f"job {job.name!r}: --timeout is for the local executor; with submitit set `time` in the grid's "
                "resources (a job that runs out of it is requeued and resumes from its newest checkpoint)"
            )
        if self.cluster == "slurm" and "time" not in resources:
            raise ValueError(
                f"job {job.name!r} has no `time` in its resources: set it in the grid (e.g. resources: "
                "{time: '24:00:00'}) or with --resources time=..., or Slurm would stop it after submitit's 5 minutes"
            )
        nodes, gpus = resources.get("nodes", 1), resources.get("gpus")
        end = accelerate_launch_end(job.command)
        if (nodes > 1 or (gpus or 0) > 1) and end is None:
            raise ValueError(
                f"job {job.name!r} asks for {nodes} node(s) x {gpus or 0} GPU(s) but its launcher is not "
                "`accelerate launch`: it would use one GPU. Set the scale's launcher, e.g. "
                "`accelerate launch --config_file multi_gpu`"
            )
        found = _config_file_processes(job.command)
        if nodes == 1 and gpus and found and found[1] != gpus:
            raise ValueError(
                f"job {job.name!r} asks for {gpus} GPU(s) but its accelerate config {found[0]} starts "
                f"num_processes: {found[1]}; use a config with num_processes: {gpus} (or set `gpus` to match)"
            )
        parameters: dict[str, Any] = {
            "name": job.name,
            "timeout_min": resources.get("time", LOCAL_TIME_MIN),
            "nodes": nodes,
            "tasks_per_node": 1,  # one task per node runs the launcher, which starts a process per GPU
            "slurm_signal_delay_s": self.signal_delay_s,
            # requeue on preemption / time limit; a job whose dependency failed leaves the queue instead of pending
            "slurm_additional_parameters": {"requeue": True, "kill-on-invalid-dep": "yes"},
        }
        if gpus is not None:
            parameters["gpus_per_node"] = gpus
        if "cpus" in resources:
            parameters["cpus_per_task"] = resources["cpus"]
        if "mem" in resources:
            parameters["mem_gb"] = resources["mem"]
        for key in ("partition", "account", "qos", "constraint"):
            if key in resources:
                parameters[f"slurm_{key}"] = resources[key]
        if self.cluster != "slurm" and nodes > 1:
            raise ValueError(f"job {job.name!r} asks for {nodes} nodes: submitit's local executor has one")
        return parameters

    # -- results -------------------------------------------------------------------------------------------------------
    def _result(self, name: str) -> JobResult:
        job, handle = self._jobs[name], self._live.pop(name)
        job_id = str(handle.job_id)
        try:
            outcome = handle.result()
            code, seconds, error = outcome["returncode"], outcome["seconds"], None
        except Exception as failure:  # the job raised, was cancelled or killed (no result): submitit says which
            code, seconds = None, None
            error = f"submitit job {job_id}: {type(failure).__name__}: {failure}\n{log_tail(job.log_path)}"
        if code is not None and job.succeeded(code):
            self._states[name] = "done"
            return JobResult(name, "done", seconds, job_id=job_id)
        self._states[name] = "failed"
        return JobResult(name, "failed", seconds, error or job.failure(code), job_id=job_id)

    def _blocked_results(self) -> list[JobResult]:
        """The jobs that can no longer run because a job they need failed (or was blocked): taken off the queue or,
        on Slurm, cancelled."""
        results = []
        changed = True
        while changed:
            changed = False
            for name in [*self._queue, *self._live]:
                missing = [d for d in self._jobs[name].depends_on if self._states[d] in ("failed", "blocked")]
                if not missing:
                    continue
                if name in self._live:
                    self._live.pop(name).cancel(check=False)
                else:
                    self._queue.remove(name)
                self._states[name] = "blocked"
                results.append(JobResult(name, "blocked", error=f"needs {', '.join(missing)} (not finished)"))
                changed = True
        return results


__all__ = ["CLUSTERS", "StudyJob", "SubmititExecutor", "accelerate_launch_end", "import_submitit", "multinode_command"]
