"""The study on submitit: real jobs on submitit's local executor (dependencies, a preempted job requeued and resumed
from its newest complete checkpoint, failures and blocked runs, the status file and the report), and the sbatch
scripts the Slurm executor submits (dependencies, resources, requeue and signal)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from helpers import process_alive

from hf_mae.study import (
    Job,
    SubmititExecutor,
    build_report,
    load_grid,
    make_job,
    plan_study,
    read_status,
    run_study,
)
from hf_mae.study.cluster import StudyJob, accelerate_launch_end, multinode_command

submitit = pytest.importorskip("submitit")

ROOT = Path(__file__).resolve().parents[1]
FAKE_RUN = ROOT / "tests" / "scripts" / "fake_study_run.py"
sys.path.insert(0, str(FAKE_RUN.parent))
from fake_study_run import write_checkpoint  # noqa: E402

GRID = """
name: sub
resources: {{cpus: 2}}
evaluations:
  small: {{kind: finetune, title: small aug, resources: {{time: 30}}}}
scales:
  demo:
    output_root: {root}
    launcher: {launcher}
    env: {{OMP_NUM_THREADS: "1", HF_HUB_OFFLINE: "1", HF_DATASETS_OFFLINE: "1"}}
    resources: {{time: "02:00:00"}}
    args:
      all: {all_args}
pretraining:
  - name: mae_a
    rows: {{mask ratio: "0.75"}}
    args: {a_args}
    resources: {{mem: 8G}}
    evaluate: [small]
  - name: mae_b
    rows: {{mask ratio: "0.5"}}
    args: {b_args}
    evaluate: [small]
"""


def _study(tmp_path, launcher, all_args="{}", a_args="{}", b_args="{}", only_a=False):
    path = tmp_path / "grid.yaml"
    path.write_text(
        GRID.format(root=tmp_path / "out", launcher=launcher, all_args=all_args, a_args=a_args, b_args=b_args)
    )
    study = plan_study(load_grid(path), "demo")
    if only_a:
        study.runs = [r for r in study.runs if r.variant == "mae_a"]
        study.variants = [v for v in study.variants if v.name == "mae_a"]
    return study


def _log_starts(run_dir: Path) -> list[datetime]:
    """The start time of every process the run's study.log records (`=== <time> <command>` lines)."""
    text = (run_dir / "study.log").read_text()
    return [
        datetime.fromisoformat(line[4:27]) for line in text.splitlines() if line.startswith("=== 2") and " -m " in line
    ]


def _submitit_tasks(folder: Path) -> list[int]:
    """The pids of the submitit task processes running jobs of `folder` (what Slurm signals on preemption)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"submitit.core._submit" in cmdline and str(folder).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def _preempt_when(task_pids, timeout: float = 240.0) -> threading.Thread:
    """In the background: once `task_pids()` names the job's submitit task, send it the preemption signal
    (submitit's USR2), as Slurm does before it preempts a job."""
    sent = []

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            pids = task_pids()
            if pids:
                for pid in pids:
                    os.kill(pid, signal.SIGUSR2)
                    sent.append(pid)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.sent = sent
    thread.start()
    return thread


@pytest.fixture
def worktree_on_path(monkeypatch):
    """submitit's job processes unpickle hf_mae.study.cluster.StudyJob: they must import this tree's hf_mae."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# ----------------------------------------------------------------------------------------------------------------------
# submitit's local executor: real processes
# ----------------------------------------------------------------------------------------------------------------------
def test_local_submitit_study_dependencies_preemption_failures_status_and_report(tmp_path, worktree_on_path):
    """mae_a is preempted after its first complete checkpoint, requeued and resumed from it; its fine-tune starts
    after it finished. mae_b fails: its fine-tune is blocked without starting. Two jobs run at once."""
    launcher = f"{sys.executable} {FAKE_RUN}"
    study = _study(tmp_path, launcher, a_args="{fake_hold: true}", b_args="{fake_fail: true}")
    folder = tmp_path / "submitit"
    executor = SubmititExecutor(folder, cluster="local", max_running=2, poll_s=0.2)
    assert executor.cluster == "local" and executor.holds_dependencies
    pretrain = study.run("mae_a").output_dir
    held = pretrain / "held.json"  # written by the fake run once its checkpoint is complete, with its task's pid
    watcher = _preempt_when(lambda: [json.loads(held.read_text())["task_pid"]] if held.exists() else [])
    status = run_study(study, executor=executor)
    watcher.join(timeout=1)
    assert len(watcher.sent) == 1, "the held run was never preempted"
    assert {n: s["status"] for n, s in status.items()} == {
        "mae_a": "done",
        "mae_a-small": "done",
        "mae_b": "failed",
        "mae_b-small": "blocked",
    }
    # requeued by submitit's checkpoint protocol, resumed from the newest complete checkpoint (not the half-written 5)
    results = json.loads((pretrain / "results.json").read_text())
    assert results["resumed_from"] == "checkpoint-3"
    log = (pretrain / "study.log").read_text()
    assert "preempted or out of time: requeued (resume from checkpoint-3)" in log
    assert log.count("--resume_from_checkpoint latest") == 1 and len(_log_starts(pretrain)) == 2
    # the fine-tune started after its pretraining had finished
    finished = datetime.fromtimestamp((pretrain / "results.json").stat().st_mtime)
    (finetune_start,) = _log_starts(study.run("mae_a-small").output_dir)
    assert finetune_start >= finished
    # the failed run's error and the blocked one, as the local executor records them; the job ids of the jobs
    assert "this run was told to fail" in status["mae_b"]["error"]
    assert "mae_b" in status["mae_b-small"]["error"] and not study.run("mae_b-small").output_dir.exists()
    assert status["mae_a"]["job_id"] != status["mae_a-small"]["job_id"]
    assert read_status(study.output_root) == status
    md = build_report(study).read_text()
    assert "| mask ratio | 0.75 | mae_a |" in md and "| 61.00 / 62.00 |" in md  # top1 = 50 + len("mae_a-small")
    assert "| mae_b | pretrain | failed |" in md and "| mae_b-small | finetune | blocked |" in md
    # the next pass skips the finished runs: nothing is submitted (the retry of a failed run is test_study's)
    again = SubmititExecutor(folder, cluster="local", poll_s=0.2)
    run_study(study, [study.run("mae_a"), study.run("mae_a-small")], executor=again)
    assert not again.start_ready() and read_status(study.output_root)["mae_a"]["job_id"] == status["mae_a"]["job_id"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_terminated_study_command_cancels_its_jobs(tmp_path, worktree_on_path):
    """SIGTERM to the study command (a `kill`; SIGHUP, the terminal closed, is handled alike) stops it as Ctrl-C does:
    its submitit job is cancelled and recorded `interrupted`, not left training unseen beside the next pass's."""
    grid = tmp_path / "grid.yaml"
    launcher = f"{sys.executable} {FAKE_RUN}"
    grid.write_text(GRID.format(root=tmp_path / "out", launcher=launcher, all_args="{}", a_args="{fake_hold: true}",
                                b_args="{}"))  # fmt: skip
    command = [sys.executable, "-m", "hf_mae.study", str(grid), "--scale", "demo", "--only", "mae_a"]
    command += ["--executor", "submitit", "--submitit_cluster", "local"]
    study = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    held, task = tmp_path / "out" / "mae_a" / "held.json", None
    try:
        deadline = time.time() + 120
        while not held.exists():
            assert study.poll() is None and time.time() < deadline, "the held run did not start"
            time.sleep(0.2)
        task = json.loads(held.read_text())["task_pid"]
        study.send_signal(signal.SIGTERM)
        study.wait(timeout=60)
        deadline = time.time() + 30
        while process_alive(task) and time.time() < deadline:
            time.sleep(0.2)
        assert not process_alive(task), "the job outlived the study command that started it"
        assert read_status(tmp_path / "out")["mae_a"]["status"] == "interrupted"
    finally:
        study.kill()
        if task is not None and process_alive(task):
            os.kill(task, signal.SIGKILL)


def test_the_checkpoint_protocol_requeues_the_same_job_resuming(tmp_path):
    out = tmp_path / "run"
    job = Job("r", ["python", "-m", "hf_mae.study", "pretrain", "--output_dir", str(out)], out / "study.log",
              out / "results.json")  # fmt: skip
    out.mkdir()
    delayed = StudyJob().checkpoint(job)  # nothing saved yet: the requeued job starts again, plainly
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, StudyJob) and delayed.args[0].command == job.command
    (out / "checkpoint-4").mkdir()  # half-written: a fresh start would refuse it, so it is replaced explicitly
    assert delayed_command(job)[-2:] == ["--overwrite_output_dir", "true"]
    write_checkpoint(out / "checkpoint-2", 2)
    assert delayed_command(job)[-2:] == ["--resume_from_checkpoint", "latest"]
    assert "requeued (resume from checkpoint-2)" in (out / "study.log").read_text()


def delayed_command(job):
    return StudyJob().checkpoint(job).args[0].command


@pytest.mark.slow
def test_local_submitit_real_training_preempted_and_resumed(tmp_path, worktree_on_path):
    """Real runs: a tiny pretraining on digits, preempted after its first complete checkpoint, requeued, resumed
    from it to the end; then its fine-tune."""
    all_args = (
        "{dataset_name: digits, preset: demo-tiny-32, bf16: false, report_to: none, disable_tqdm: true, "
        "max_train_samples: 256, max_eval_samples: 32, per_device_train_batch_size: 32, warmup_steps: 1, "
        "logging_steps: 5, save_strategy: steps, save_steps: 5, eval_strategy: 'no', num_reconstructions: 2, "
        "dataloader_num_workers: 0}"
    )
    study = _study(tmp_path, "python", all_args=all_args, a_args="{max_steps: 300}", only_a=True)
    study.run("mae_a-small").args.update(max_steps=4)
    folder = tmp_path / "submitit"
    pretrain = study.run("mae_a").output_dir

    def task_once_saved():  # the only job running then: the pretraining's task
        saved = any((p / "trainer_state.json").exists() for p in pretrain.glob("checkpoint-*"))
        return _submitit_tasks(folder) if saved else []

    watcher = _preempt_when(task_once_saved)
    status = run_study(study, executor=SubmititExecutor(folder, cluster="local", poll_s=0.5))
    watcher.join(timeout=1)
    assert len(watcher.sent) == 1
    assert status["mae_a"]["status"] == status["mae_a-small"]["status"] == "done", status
    log = (pretrain / "study.log").read_text()
    assert "--resume_from_checkpoint latest" in log and "resuming from" in log
    state = json.loads((pretrain / "log_history.json").read_text())
    assert max(e["step"] for e in state if "step" in e) == 300  # trained to the end after the requeue
    (finetune_start,) = _log_starts(study.run("mae_a-small").output_dir)
    assert finetune_start >= datetime.fromtimestamp((pretrain / "results.json").stat().st_mtime)


# ----------------------------------------------------------------------------------------------------------------------
# Slurm: the sbatch scripts submitit would submit
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`srun` and `sbatch` on the PATH: sbatch keeps each script and answers with a new job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        f'n=$(ls "{bin_dir}" | grep -c "^job_")\n'
        f'cp "$1" "{bin_dir}/job_$((1000 + n)).sh"\n'
        'echo "Submitted batch job $((1000 + n))"\n'
    )
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


SLURM_GRID = """
name: slurm
resources: {{cpus: 10}}
evaluations:
  small: {{kind: finetune, resources: {{time: 30}}}}
scales:
  full:
    output_root: {root}
    launcher: accelerate launch --config_file single_gpu
    resources: {{gpus: 1, time: "02:00:00"}}
pretraining:
  - name: mae_a
    resources: {{mem: 8G}}
    full: {{resources: {{nodes: 2, gpus: 8, partition: big, account: proj, time: "1-00:00:00"}}}}
    evaluate: [small]
  - name: mae_b
    evaluate: [small]
  - name: dmae
    kind: distill
    teacher: mae_a
    resources: {{qos: high}}
"""


def _submitted(bin_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The sbatch scripts the fake sbatch received, and the job ids it gave, by job name."""
    scripts, ids = {}, {}
    for path in sorted(bin_dir.glob("job_*.sh")):
        text = path.read_text()
        name = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("#SBATCH --job-name="))
        scripts[name], ids[name] = text, path.stem[len("job_") :]
    return scripts, ids


def test_slurm_sbatch_scripts_carry_dependencies_resources_requeue_and_signal(tmp_path, fake_slurm):
    grid = tmp_path / "grid.yaml"
    grid.write_text(SLURM_GRID.format(root=tmp_path / "out"))
    study = plan_study(load_grid(grid), "full")
    executor = SubmititExecutor(tmp_path / "submitit", cluster="auto", signal_delay_s=90)
    assert executor.cluster == "slurm" and not executor.holds_dependencies and executor.max_running is None
    for run in study.runs:
        executor.submit(make_job(study, run, run.command(study.launcher), depends_on=run.depends_on))
    assert executor.start_ready() == [r.name for r in study.runs]  # all at once: Slurm holds the dependent ones
    scripts, job_id = _submitted(fake_slurm)
    assert set(scripts) == {"mae_a", "mae_a-small", "mae_b", "mae_b-small", "dmae"}
    a = scripts["mae_a"]
    for line in ("--nodes=2", "--gpus-per-node=8", "--time=1440", "--partition=big", "--account=proj",
                 "--cpus-per-task=10", "--mem=8GB", "--ntasks-per-node=1", "--requeue", "--signal=USR2@90",
                 "--kill-on-invalid-dep=yes"):  # fmt: skip
        assert f"#SBATCH {line}\n" in a, line
    assert "--dependency" not in a
    assert "srun --unbuffered" in a and "-m submitit.core._submit" in a
    small = scripts["mae_a-small"]
    assert f"#SBATCH --dependency=afterok:{job_id['mae_a']}\n" in small  # a fine-tune after its pretraining
    assert "#SBATCH --time=30\n" in small and "#SBATCH --gpus-per-node=1\n" in small  # the evaluation's time
    assert "--partition" not in small and "--mem" not in small  # the variant's resources are its pretraining's
    assert f"#SBATCH --dependency=afterok:{job_id['mae_b']}\n" in scripts["mae_b-small"]
    assert f"#SBATCH --dependency=afterok:{job_id['mae_a']}\n" in scripts["dmae"]  # a student after its teacher
    assert "#SBATCH --qos=high\n" in scripts["dmae"] and "#SBATCH --time=120\n" in scripts["dmae"]
    assert "#SBATCH --requeue\n" in scripts["mae_b"] and "--dependency" not in scripts["mae_b"]
    assert executor.status("dmae") == "running"


def test_slurm_jobs_are_checked_before_any_is_submitted(tmp_path, fake_slurm):
    executor = SubmititExecutor(tmp_path / "submitit", cluster="slurm")
    out = tmp_path / "run"

    def job(command=("python", "-m", "hf_mae.study", "pretrain"), **fields):
        return Job("r", list(command), out / "study.log", out / "results.json", **fields)

    with pytest.raises(ValueError, match="'r' has no `time` in its resources"):
        executor.submit(job())
    with pytest.raises(ValueError, match="--timeout is for the local executor"):
        executor.submit(job(timeout=60, resources={"time": 10}))
    with pytest.raises(ValueError, match="not `accelerate launch`: it would use one GPU"):
        executor.submit(job(resources={"time": 10, "gpus": 4}))
    single = ROOT / "accelerate_configs" / "single_gpu.yaml"
    launch = ("accelerate", "launch", "--config_file", str(single), "-m", "hf_mae.study", "pretrain")
    with pytest.raises(ValueError, match="asks for 4 GPU.* num_processes: 1"):
        executor.submit(job(launch, resources={"time": 10, "gpus": 4}))
    with pytest.raises(ValueError, match="depends on a, not submitted before it"):
        executor.submit(job(resources={"time": 10}, depends_on=("a",)))
    assert not list(fake_slurm.glob("job_*.sh"))  # nothing reached the queue
    with pytest.raises(ValueError, match="submitit's local executor has one"):
        SubmititExecutor(tmp_path / "local", cluster="local").submit(job(launch, resources={"nodes": 2}))


def test_slurm_without_slurm_is_an_error_saying_what_to_use(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    with pytest.raises(ValueError, match="cannot use cluster='slurm' on this machine.*--submitit_cluster local"):
        SubmititExecutor(tmp_path / "submitit", cluster="slurm")


def test_multinode_command_sets_the_machine_flags():
    command = ["accelerate", "launch", "--config_file", "multi_node.yaml", "-m", "hf_mae.study", "pretrain"]
    assert accelerate_launch_end(command) == 2
    assert multinode_command(command, 2, 1, "node7", 23456, 8) == [
        "accelerate", "launch", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "node7",
        "--main_process_port", "23456", "--num_processes", "16", "--config_file", "multi_node.yaml",
        "-m", "hf_mae.study", "pretrain",
    ]  # fmt: skip
    assert accelerate_launch_end([sys.executable, "-m", "accelerate.commands.launch", "x.py"]) == 3
    with pytest.raises(ValueError, match="needs an `accelerate launch` launcher"):
        multinode_command([sys.executable, "-m", "hf_mae.study", "pretrain"], 2, 0, "h", 1, None)


def test_without_submitit_the_study_says_how_to_install_it(monkeypatch, capsys):
    import builtins

    from hf_mae.study.__main__ import parse_study_args

    real_import = builtins.__import__

    def no_submitit(name, *args, **kwargs):
        if name == "submitit" or name.startswith("submitit."):
            raise ImportError("No module named 'submitit'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    with pytest.raises(SystemExit):
        parse_study_args(["--grid", "seed", "--executor", "submitit"])
    assert 'pip install "hf_mae[slurm]"' in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"hf_mae\[slurm\]"):
        SubmititExecutor("x", cluster="local")
    assert parse_study_args(["--grid", "seed"]).executor == "local"  # the default executor needs no submitit
