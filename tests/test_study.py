"""The study runner: config files, grid planning and dry run, skip / resume / failure logic, the report, and one real
mini-grid (1 pretraining + 1 fine-tuning on digits) end to end."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers.training_args
from helpers import process_alive
from transformers import HfArgumentParser

from hf_mae.study import (
    Executor,
    Job,
    JobResult,
    LocalExecutor,
    build_report,
    collect_results,
    format_plan,
    load_grid,
    plan_study,
    read_status,
    run_study,
    select_runs,
    to_flags,
)
from hf_mae.training import (
    DataArguments,
    MAEFinetuningArguments,
    MAELinearProbeArguments,
    MAEPretrainingArguments,
    ModelArguments,
    parse_args,
)
from hf_mae.training.knn import KNNArguments

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
SEED_GRID = CONFIGS / "study_seed.yaml"
ARGUMENTS = {
    "pretrain": MAEPretrainingArguments,
    "finetune": MAEFinetuningArguments,
    "scratch": MAEFinetuningArguments,
    "linear_probe": MAELinearProbeArguments,
}


@pytest.fixture
def bf16_anywhere(monkeypatch):
    """The seed's configs ask for bf16, which TrainingArguments refuses without a GPU: let them parse on CPU."""
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *a, **k: True)


def _arguments_for(kind: str):
    if kind == "distill":
        dmae = pytest.importorskip("hf_mae.training.dmae")
        return dmae.DMAETrainingArguments
    return ARGUMENTS[kind]


# ----------------------------------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path", sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "study_seed.yaml"), ids=lambda p: p.name
)
def test_every_config_file_parses(path, bf16_anywhere):
    kind = next((k for k in (*ARGUMENTS, "distill") if path.name.startswith(k)), "finetune")
    model_args, data_args, training_args = parse_args(
        (ModelArguments, DataArguments, _arguments_for(kind)), [str(path)]
    )
    assert training_args.output_dir.startswith("outputs/")
    assert data_args.dataset_name == "tiny-imagenet"


@pytest.mark.parametrize(
    "name, mask, depth, width, aug",
    [
        ("pretrain_mask75_dec8x512", 0.75, 8, 512, "standard"),
        ("pretrain_mask50", 0.5, 8, 512, "standard"),
        ("pretrain_mask90", 0.9, 8, 512, "standard"),
        ("pretrain_dec1x512", 0.75, 1, 512, "standard"),
        ("pretrain_dec8x128", 0.75, 8, 128, "standard"),
        ("pretrain_3augment", 0.75, 8, 512, "3augment_seed"),
    ],
)
def test_pretraining_configs_hold_the_seed_recipe(name, mask, depth, width, aug, bf16_anywhere):
    from hf_mae.training.pipeline import build_pretraining_config

    model_args, data_args, args = parse_args(
        (ModelArguments, DataArguments, MAEPretrainingArguments), [str(CONFIGS / f"{name}.yaml")]
    )
    config = build_pretraining_config(model_args, args)
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.image_size) == (768, 12, 8, 64)
    assert (config.decoder_num_hidden_layers, config.decoder_hidden_size, config.mask_ratio) == (depth, width, mask)
    assert config.norm_pix_loss and args.pretrain_aug == aug and args.bf16
    assert (args.num_train_epochs, args.warmup_epochs, args.per_device_train_batch_size) == (500, 50, 128)
    assert args.learning_rate == pytest.approx(7.5e-5) and (args.adam_beta1, args.adam_beta2) == (0.9, 0.95)
    assert args.weight_decay == 0.05 and args.eval_strategy == "epoch" and args.output_dir == f"outputs/{name}"


@pytest.mark.parametrize("name", ["finetune_small", "finetune_full", "scratch_small", "scratch_full"])
def test_finetuning_configs_hold_the_seed_recipe(name, bf16_anywhere):
    model_args, _, args = parse_args(
        (ModelArguments, DataArguments, MAEFinetuningArguments), [str(CONFIGS / f"{name}.yaml")]
    )
    assert (model_args.model_name_or_path is None) == name.startswith("scratch")
    assert args.finetune_aug == name.split("_")[1]
    assert (args.num_train_epochs, args.warmup_epochs, args.base_learning_rate) == (300, 10, 5e-4)
    assert (args.layer_decay, args.drop_path_rate, args.min_learning_rate) == (0.65, 0.1, 1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Planning and dry run
# ----------------------------------------------------------------------------------------------------------------------
def test_seed_grid_has_all_the_seed_runs_at_full_scale():
    study = plan_study(load_grid(SEED_GRID), "full")
    names = {r.name for r in study.runs}
    for variant in ("mae_default", "mae_mask50", "mae_mask90", "mae_dec_depth1", "mae_dec_narrow", "mae_3augment"):
        assert {variant, f"{variant}-small", f"{variant}-full"} <= names
    assert {
        "scratch-small",
        "scratch-full",
        "dmae_mask75",
        "dmae_mask75-full",
        "dmae_mask90",
        "dmae_mask90-full",
    } <= names
    assert "scratch" not in names and "dmae_teacher" not in names  # no scratch pretraining, no demo teacher
    run = study.run
    assert run("mae_mask50").args["mask_ratio"] == 0.5 and run("mae_mask90").args["mask_ratio"] == 0.9
    assert "decoder_num_hidden_layers=1," in run("mae_dec_depth1").args["config_overrides"]
    assert "decoder_hidden_size=128," in run("mae_dec_narrow").args["config_overrides"]
    assert run("mae_3augment").args["pretrain_aug"] == "3augment_seed"
    assert run("mae_mask50-full").args["model_name_or_path"] == str(study.output_root / "mae_mask50")
    assert run("mae_mask50-full").depends_on == ("mae_mask50",)
    assert run("scratch-full").args["model_name_or_path"] is None and run("scratch-full").depends_on == ()
    assert run("dmae_mask90").kind == "distill" and run("dmae_mask90").args["mask_ratio"] == 0.9
    assert run("mae_default").args["knn_eval_steps"] > 0
    assert {r.args.get("seed") for r in study.runs} == {0}
    assert study.launcher[:2] == ["accelerate", "launch"]
    # the table rows of the seed's Table 1 and its extras
    groups = {g for v in study.variants for g in v.rows}
    assert groups == {"decoder depth", "decoder width", "mask ratio", "pretraining augmentation", "scratch",
                      "DMAE (mask ratio)"}  # fmt: skip


def test_demo_scale_keeps_the_relative_variations():
    study = plan_study(load_grid(SEED_GRID), "demo")
    run = study.run
    assert all(r.args["dataset_name"] == "digits" and r.args["bf16"] is False for r in study.runs)
    assert all(r.args.get("preset") == "demo-tiny-32" for r in study.runs)
    # one seed everywhere: on digits it also fixes the train / validation split every run must share
    assert {r.args.get("seed") for r in study.runs} == {0}
    assert "decoder_num_hidden_layers=1," in run("mae_dec_depth1").args["config_overrides"]
    assert "decoder_num_hidden_layers=2,decoder_hidden_size=16" in run("mae_dec_narrow").args["config_overrides"]
    assert "decoder_hidden_size=32" in run("mae_default").args["config_overrides"]
    # the DMAE teacher: a wider and deeper MAE pretrained first in the grid
    teacher = run("dmae_teacher")
    assert "hidden_size=128,num_hidden_layers=6" in teacher.args["config_overrides"]
    assert run("dmae_mask75").depends_on == ("dmae_teacher",)
    assert run("dmae_mask75").args["teacher_path"] == str(teacher.output_dir)
    order = [r.name for r in study.runs]
    assert order.index("dmae_teacher") < order.index("dmae_mask75") < order.index("dmae_mask75-full")
    assert "mae_default-linear" in order and "scratch-linear" not in order  # add_evaluations: pretrained only
    assert study.env["OMP_NUM_THREADS"] == "1" and study.launcher == [sys.executable]


@pytest.mark.parametrize("scale", ["demo", "full"])
def test_every_planned_run_parses_with_its_worker_arguments(scale, bf16_anywhere):
    for run in plan_study(load_grid(SEED_GRID), scale).runs:
        types = [ModelArguments, DataArguments, _arguments_for(run.kind)]
        if run.kind in ("pretrain", "distill"):
            types.append(KNNArguments)
        *_, remaining = HfArgumentParser(types).parse_args_into_dataclasses(
            args=to_flags(run.args), return_remaining_strings=True
        )
        assert remaining == [], (run.name, remaining)


def test_dry_run_lists_name_kind_dependencies_output_and_command(tmp_path):
    study = plan_study(load_grid(SEED_GRID), "full", output_root=tmp_path / "study")
    text = format_plan(study)
    assert f"{len(study.runs)} runs" in text
    for run in study.runs:
        assert f"] {run.name}  kind={run.kind}" in text
        assert f"output_dir={run.output_dir}" in text
    line = next(x for x in text.splitlines() if "-m hf_mae.study finetune" in x and "mae_mask90-small" in x)
    # the grid names a shipped accelerate config; the plan shows the file it resolved to
    assert f"accelerate launch --config_file {ROOT / 'hf_mae' / 'accelerate_configs' / 'single_gpu.yaml'}" in line
    assert f"--model_name_or_path {tmp_path}/study/mae_mask90" in line and "--finetune_aug small" in line
    assert "depends_on=mae_mask90" in text
    assert not (tmp_path / "study").exists()  # a dry run writes nothing


def test_run_study_script_dry_run(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_study", ROOT / "examples" / "run_study.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--scale", "full", "--dry-run", "--output_root", str(tmp_path / "s"), "--only", "mae_mask50-*"])
    text = capsys.readouterr().out
    assert "3 runs" in text and "[1/3] mae_mask50  kind=pretrain" in text and "state=run" in text
    assert not (tmp_path / "s").exists()


def test_python_m_hf_mae_study(tmp_path, capsys):
    # the package's command line, as a user runs it
    command = [sys.executable, "-m", "hf_mae.study", str(SEED_GRID), "--scale", "full", "--dry-run"]
    command += ["--output_root", str(tmp_path / "s"), "--only", "mae_mask90-small"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 runs" in done.stdout and "[2/2] mae_mask90-small  kind=finetune" in done.stdout
    # without the example's default, the grid is required; a run kind goes to the worker
    from hf_mae.study.__main__ import main

    with pytest.raises(SystemExit):
        main(["--scale", "demo"])
    assert "the following arguments are required: grid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["linear_probe", "--help"])
    assert "--knn_eval_steps" not in (text := capsys.readouterr().out) and "--layer_decay" in text


def test_to_flags_and_select_runs():
    assert to_flags({"a": 1, "b": True, "c": None, "d": [1, 2], "e": 1.5e-4}) == [
        "--a", "1", "--b", "true", "--d", "1", "2", "--e", "0.00015"
    ]  # fmt: skip
    study = plan_study(load_grid(SEED_GRID), "demo")
    assert [r.name for r in select_runs(study, ["dmae_mask90-full"])] == [
        "dmae_teacher",
        "dmae_mask90",
        "dmae_mask90-full",
    ]
    with pytest.raises(ValueError, match="no run matches"):
        select_runs(study, ["nope*"])


# ----------------------------------------------------------------------------------------------------------------------
# Skip, resume, failures (mocked runs)
# ----------------------------------------------------------------------------------------------------------------------
MINI_GRID = """
name: mini
evaluations:
  small: {{kind: finetune, title: small aug}}
  full: {{kind: finetune, title: full aug}}
scales:
  demo:
    output_root: {root}
    launcher: python
    env: {{OMP_NUM_THREADS: "1"}}
    args:
      all: {all_args}
pretraining:
  - name: mae_a
    rows: {{mask ratio: "0.75"}}
    paper: {{small: 66.76, full: 72.58}}
    evaluate: [{evaluate}]
  - name: mae_b
    rows: {{mask ratio: "0.5"}}
    args: {{mask_ratio: 0.5}}
    evaluate: [{evaluate}]
  - name: scratch
    kind: none
    rows: {{scratch: "-"}}
    evaluate: [{evaluate}]
"""


def _mini_study(tmp_path, all_args="{}", evaluate="small, full", keep=None):
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(MINI_GRID.format(root=tmp_path / "out", all_args=all_args, evaluate=evaluate))
    study = plan_study(load_grid(grid_path), "demo")
    if keep:
        study.runs = [r for r in study.runs if r.name in keep]
        study.variants = [v for v in study.variants if v.name in {r.variant for r in study.runs}]
        for v in study.variants:
            v.evaluation_runs = {e: n for e, n in v.evaluation_runs.items() if n in keep}
    return study


def _complete_checkpoint(path: Path, step: int) -> None:
    """What the Trainer leaves when a save completes: weights, then trainer_state.json last."""
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"w": torch.zeros(1)}, str(path / "model.safetensors"))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))


class FakeRuns:
    """Executor that pretends to train: writes results.json (+ a log history), or fails / crashes as told."""

    def __init__(self, fail=(), crash=()):
        self.fail, self.crash, self.commands = set(fail), set(crash), []

    def __call__(self, command, log_path, env, timeout):
        self.commands.append(command)
        out = Path(command[command.index("--output_dir") + 1])
        name = out.name
        out.mkdir(parents=True, exist_ok=True)
        if name in self.crash:  # killed after its first checkpoints
            for step in (2, 10):
                _complete_checkpoint(out / f"checkpoint-{step}", step)
            return -9
        if name in self.fail:
            log_path.write_text("Traceback ...\nNonFiniteLossError: 10 steps in a row had a non-finite loss\n")
            return 1
        finetune = "finetune" in command
        top1 = 50.0 + len(name)
        results = {"top1": top1, "best_top1": top1 + 1, "eval_loss": 1.0} if finetune else {"eval_loss": 0.5}
        (out / "results.json").write_text(json.dumps(results))
        history = [{"loss": 2.0 - e / 10, "epoch": e, "step": e} for e in range(1, 4)]
        history += [{"eval_loss": 1.5, "eval_top1": top1 - 3 + e, "epoch": e, "step": e} for e in range(1, 4)]
        history += [] if finetune else [{"knn_top1": 40.0 + e, "epoch": e, "step": e} for e in range(3)]
        (out / "log_history.json").write_text(json.dumps(history))
        return 0


def test_finished_runs_are_skipped_and_failures_recorded(tmp_path):
    study = _mini_study(tmp_path)
    fake = FakeRuns(fail={"mae_b"})
    status = run_study(study, executor=LocalExecutor(fake))
    assert status["mae_a"]["status"] == status["mae_a-full"]["status"] == "done"
    assert status["mae_b"]["status"] == "failed" and "NonFiniteLossError" in status["mae_b"]["error"]
    assert status["mae_b-small"]["status"] == "blocked" and "mae_b" in status["mae_b-small"]["error"]
    assert status["scratch-small"]["status"] == "done"  # the study went on after the failure
    assert len(fake.commands) == 6  # mae_a and its two fine-tunings, mae_b, the two scratch runs
    assert read_status(study.output_root) == status
    # rerun: finished runs are skipped, the failed one is retried, then its fine-tunings run
    again = FakeRuns()
    status = run_study(study, executor=LocalExecutor(again))
    ran = [Path(c[c.index("--output_dir") + 1]).name for c in again.commands]
    assert ran == ["mae_b", "mae_b-small", "mae_b-full"]
    assert all(s["status"] == "done" for s in status.values())
    assert "state=done" in format_plan(study)


def test_interrupted_run_resumes_from_its_latest_checkpoint(tmp_path):
    study = _mini_study(tmp_path, keep={"mae_a"})
    status = run_study(study, executor=LocalExecutor(FakeRuns(crash={"mae_a"})))
    assert status["mae_a"]["status"] == "failed"
    assert "state=resume from checkpoint-10" in format_plan(study)
    fake = FakeRuns()
    status = run_study(study, executor=LocalExecutor(fake))
    (command,) = fake.commands
    assert command[command.index("--resume_from_checkpoint") + 1] == str(study.output_root / "mae_a" / "checkpoint-10")
    assert status["mae_a"]["status"] == "done"
    assert not list((study.output_root / "mae_a").glob("checkpoint-*"))  # a finished run drops its checkpoints


def test_missing_config_fails_the_run_without_starting_it(tmp_path):
    study = _mini_study(tmp_path, keep={"mae_a", "mae_a-small"})
    study.runs[0].problem = "config file x.yaml not found"
    fake = FakeRuns()
    status = run_study(study, executor=LocalExecutor(fake))
    assert fake.commands == [] and status["mae_a"]["status"] == "failed"
    assert status["mae_a-small"]["status"] == "blocked"


class QueueExecutor(Executor):
    """Stands in for a cluster's queue: takes every job first, runs them only when waited on, and reports the results
    in another order than they were submitted."""

    def __init__(self, launch):
        self.launch, self.jobs, self.states, self.submitted = launch, [], {}, []

    def submit(self, job):
        self.jobs.append(job)
        self.submitted.append(job)
        self.states[job.name] = "pending"

    def status(self, name):
        return self.states[name]

    def wait(self):
        results = []
        for job in self.jobs:
            if any(self.states[d] != "done" for d in job.depends_on):
                self.states[job.name] = "blocked"
                results.append(JobResult(job.name, "blocked", error="a dependency failed"))
                continue
            code = self.launch(job.command, job.log_path, job.env, job.timeout)
            self.states[job.name] = "done" if job.succeeded(code) else "failed"
            results.append(JobResult(job.name, self.states[job.name], 1.0, job.failure(code) if code else None))
        self.jobs = []
        yield from reversed(results)


def test_another_executor_gets_every_job_with_its_dependencies(tmp_path):
    study = _mini_study(tmp_path)
    queue = QueueExecutor(FakeRuns(fail={"mae_b"}, crash={"scratch-full"}))
    status = run_study(study, executor=queue, timeout=60)
    jobs = {job.name: job for job in queue.submitted}
    assert list(jobs) == [r.name for r in study.runs] and not queue.jobs
    assert jobs["mae_a-full"].depends_on == ("mae_a",) and jobs["scratch-small"].depends_on == ()
    assert jobs["mae_a"].resources == {} and jobs["mae_a"].output_dir == study.output_root / "mae_a"
    assert jobs["mae_a"].timeout == 60 and jobs["mae_a"].result_file == study.output_root / "mae_a" / "results.json"
    assert status["mae_a-small"]["status"] == status["scratch-small"]["status"] == "done"
    assert status["mae_b"]["status"] == "failed" and "NonFiniteLossError" in status["mae_b"]["error"]
    assert status["mae_b-full"]["status"] == "blocked" and status["scratch-full"]["status"] == "failed"
    assert read_status(study.output_root) == status
    # the next pass: dependencies only on runs of this pass, none on runs finished earlier
    queue = QueueExecutor(FakeRuns())
    run_study(study, executor=queue)
    jobs = {job.name: job for job in queue.submitted}
    assert list(jobs) == ["mae_b", "mae_b-small", "mae_b-full", "scratch-full"]
    assert jobs["mae_b-small"].depends_on == ("mae_b",) and jobs["scratch-full"].depends_on == ()
    assert "--resume_from_checkpoint" in jobs["scratch-full"].command  # resumed from what the crash left
    assert jobs["mae_b"].log_path == study.output_root / "mae_b" / "study.log"
    assert jobs["mae_b"].env == {"OMP_NUM_THREADS": "1"} and jobs["mae_b"].timeout is None
    assert all(s["status"] == "done" for s in read_status(study.output_root).values())


def test_local_executor_refuses_a_dependency_it_has_not_seen(tmp_path):
    executor = LocalExecutor(FakeRuns())
    job = Job("b", ["x"], tmp_path / "b.log", tmp_path / "b.json", depends_on=("a",))
    with pytest.raises(ValueError, match="'b' depends on a, not submitted before it"):
        executor.submit(job)
    with pytest.raises(ValueError, match="no job 'a'"):
        executor.status("a")


def test_an_interrupted_study_records_the_run_it_cut_short(tmp_path):
    study = _mini_study(tmp_path, keep={"mae_a", "mae_b", "mae_b-small"})
    fake = FakeRuns()

    def launch(command, log_path, env, timeout):
        if "mae_b" in command[command.index("--output_dir") + 1]:
            raise KeyboardInterrupt
        return fake(command, log_path, env, timeout)

    with pytest.raises(KeyboardInterrupt):
        run_study(study, executor=LocalExecutor(launch))
    status = read_status(study.output_root)
    assert status["mae_a"]["status"] == "done" and status["mae_b"]["status"] == "interrupted"
    assert "mae_b-small" not in status  # never started: nothing to record
    fake = FakeRuns()
    run_study(study, executor=LocalExecutor(fake))  # the next pass runs what is left, in order
    assert [Path(c[c.index("--output_dir") + 1]).name for c in fake.commands] == ["mae_b", "mae_b-small"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_run_stops_when_its_job_process_is_killed(tmp_path):
    # the process that started the run (a submitit job, the study itself) killed with SIGKILL: the run, in a session
    # of its own, must not train on unseen into the output directory the study records as failed and a rerun resumes
    pid_file, log = tmp_path / "run.pid", tmp_path / "study.log"
    run = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    job = (
        "import sys; from pathlib import Path; from hf_mae.study.execute import execute_subprocess; "
        f"execute_subprocess([sys.executable, '-c', {run!r}], Path({str(log)!r}), {{}}, None)"
    )
    parent = subprocess.Popen([sys.executable, "-c", job], env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = None
    try:
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text()):
            assert parent.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while process_alive(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not process_alive(child), "the run outlived its killed job process"
    finally:
        parent.kill()
        if child is not None and process_alive(child):
            os.kill(child, signal.SIGKILL)
    job = Job("a", [], log, tmp_path / "results.json")
    assert job.failure(-9).startswith("exit code -9 (killed by SIGKILL)")


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------
def test_report_layout_failed_cells_and_figures(tmp_path):
    study = _mini_study(tmp_path)
    fake = FakeRuns(fail={"mae_b-full"})
    run_study(study, executor=LocalExecutor(fake))
    # reconstructions of a pretraining run are collected
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(study.run("mae_a").output_dir / "reconstructions.png", [[0.0, 1.0], [1.0, 0.0]], cmap="gray")
    md_path = build_report(study)
    md = md_path.read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    header = table[0]
    assert "small aug top-1 (final / best)" in header and "full aug top-1 (final / best)" in header
    assert "k-NN top-1" in header and "seed paper (small aug / full aug)" in header
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in table[1:]}
    # mask ratio rows sorted numerically, then scratch; the Table-1 order of groups kept
    assert list(rows)[:3] == [("mask ratio", "0.5"), ("mask ratio", "0.75"), ("scratch", "-")]
    assert "| 61.00 / 62.00 | 60.00 / 61.00 |" in rows[("mask ratio", "0.75")]  # top1 = 50 + len(run name)
    assert "| 66.76 / 72.58 |" in rows[("mask ratio", "0.75")]
    assert "| failed |" in rows[("mask ratio", "0.5")]  # mae_b-full
    assert "42.00" in rows[("mask ratio", "0.75")]  # the last k-NN value of the pretraining
    assert "| scratch (none) | – |" in rows[("scratch", "-")]
    csv_text = (md_path.parent / "results.csv").read_text().splitlines()
    assert csv_text[0].startswith("ablation,setting,variant,pretrain_status,recon_loss,knn_top1,small_status")
    assert any(",failed," in line for line in csv_text)
    runs_csv = (md_path.parent / "runs.csv").read_text()
    assert "mae_b-full,finetune,failed" in runs_csv
    for png in ("finetune_curves.png", "mask_ratio.png", "ablations.png", "pretrain_curves.png",
                "reconstructions.png", "reconstructions/mae_a.png"):  # fmt: skip
        path = md_path.parent / png
        assert path.exists() and path.stat().st_size > 100, png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![finetune_curves.png](finetune_curves.png)" in md
    table_rows = collect_results(study)
    assert [r["evaluations"]["full"].status for r in table_rows] == ["failed", "done", "done"]


def test_report_figures_put_train_and_validation_on_one_axis(tmp_path):
    import matplotlib.pyplot as plt

    from hf_mae.study.report import ablation_bars_figure, finetune_curves_figure, pretrain_curves_figure

    study = _mini_study(tmp_path)
    run_study(study, executor=LocalExecutor(FakeRuns(fail={"mae_b-full"})))
    fig = finetune_curves_figure(study)
    assert [ax.get_title() for ax in fig.axes] == [
        "small aug: loss", "small aug: validation top-1 (%)", "full aug: loss", "full aug: validation top-1 (%)"
    ]  # fmt: skip
    loss = fig.axes[0].get_lines()
    assert len(loss) == 6 and sorted(line.get_linestyle() for line in loss) == ["-"] * 3 + ["--"] * 3
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["mae_a", "mae_b", "scratch", "train", "validation"]
    plt.close(fig)
    fig = pretrain_curves_figure(study)
    assert [ax.get_title() for ax in fig.axes] == ["reconstruction loss", "k-NN top-1 (%)"]
    plt.close(fig)
    table = collect_results(study)
    fig = ablation_bars_figure(study, table)
    assert [ax.get_title() for ax in fig.axes] == ["mask ratio", "scratch"]
    assert "failed" in [t.get_text() for t in fig.axes[0].texts]  # mae_b-full
    plt.close(fig)
    # the seed's grid: six ablation groups in rows of four
    seed = plan_study(load_grid(SEED_GRID), "full", output_root=tmp_path / "seed")
    fig = ablation_bars_figure(seed, collect_results(seed))
    assert len(fig.axes) == 6 and {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes} == {(2, 4)}
    plt.close(fig)


def test_report_of_a_study_that_has_not_run(tmp_path):
    study = _mini_study(tmp_path)
    md = build_report(study).read_text()
    assert "| not run |" in md and not (study.output_root / "report" / "finetune_curves.png").exists()


# ----------------------------------------------------------------------------------------------------------------------
# One real mini-grid, end to end
# ----------------------------------------------------------------------------------------------------------------------
def test_real_mini_grid_end_to_end(tmp_path, monkeypatch):
    all_args = (
        "{dataset_name: digits, preset: demo-tiny-32, report_to: none, disable_tqdm: true, max_train_samples: 64, "
        "max_eval_samples: 32, per_device_train_batch_size: 32, max_steps: 2, warmup_steps: 1, logging_steps: 1, "
        "save_strategy: 'no', eval_strategy: steps, eval_steps: 2, num_reconstructions: 2}"
    )
    study = _mini_study(tmp_path, all_args=all_args, evaluate="small", keep={"mae_a", "mae_a-small"})
    study.run("mae_a").args.update(knn_eval_steps=1, knn_train_samples=32, knn_eval_samples=16)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    status = run_study(study)
    assert [status[n]["status"] for n in ("mae_a", "mae_a-small")] == ["done", "done"], status
    pt, ft = study.run("mae_a").output_dir, study.run("mae_a-small").output_dir
    assert (pt / "model.safetensors").exists() and (pt / "reconstructions.png").exists()
    history = json.loads((pt / "log_history.json").read_text())
    assert [e["step"] for e in history if "knn_top1" in e] == [0, 1, 2]  # the k-NN monitor rode along
    assert 0 <= json.loads((ft / "results.json").read_text())["top1"] <= 100
    assert "study.log" in os.listdir(pt)
    md = build_report(study).read_text()
    assert "| mask ratio | 0.75 | mae_a |" in md and "| failed |" not in md
    # a second pass starts nothing
    fake = FakeRuns()
    run_study(study, executor=LocalExecutor(fake))
    assert fake.commands == []


def test_half_written_checkpoint_is_skipped_and_a_bare_rerun_restarts_explicitly(tmp_path):
    study = _mini_study(tmp_path, keep={"mae_a"})
    run_study(study, executor=LocalExecutor(FakeRuns(crash={"mae_a"})))
    (study.output_root / "mae_a" / "checkpoint-12").mkdir()  # killed while saving: no trainer_state.json
    assert "state=resume from checkpoint-10" in format_plan(study)
    for step in (2, 10, 12):
        shutil.rmtree(study.output_root / "mae_a" / f"checkpoint-{step}")
    assert "state=run" in format_plan(study)  # no checkpoint, no model: a plain new start
    # it left a model (killed in the final evaluation) but nothing to resume from: the study restarts the run and
    # says so with --overwrite_output_dir
    (study.output_root / "mae_a" / "model.safetensors").write_bytes(b"")
    assert "state=restart" in format_plan(study)
    fake = FakeRuns()
    run_study(study, executor=LocalExecutor(fake))
    (command,) = fake.commands
    assert "--overwrite_output_dir" in command and "--resume_from_checkpoint" not in command


def test_only_half_written_checkpoints_restart_explicitly(tmp_path):
    # killed while writing its first checkpoint: nothing to resume from, and a plain start would refuse the folder
    study = _mini_study(tmp_path, keep={"mae_a"})
    (study.output_root / "mae_a" / "checkpoint-4").mkdir(parents=True)
    assert "state=restart" in format_plan(study)
    fake = FakeRuns()
    run_study(study, executor=LocalExecutor(fake))
    (command,) = fake.commands
    assert "--overwrite_output_dir" in command and "--resume_from_checkpoint" not in command


# ----------------------------------------------------------------------------------------------------------------------
# Resources (for a cluster scheduler) and names of shipped files in a grid
# ----------------------------------------------------------------------------------------------------------------------
RESOURCE_GRID = """
name: res
resources: {cpus: 4, account: lab}
evaluations:
  small: {kind: finetune, resources: {time: 90, gpus: 2}}
scales:
  full:
    launcher: accelerate launch --config_file=multi_gpu
    resources: {gpus: 1, time: "12:00:00", mem: 32G}
pretraining:
  - name: big
    resources: {nodes: 2, partition: long}
    full: {resources: {time: "2-00:00:00"}}
    evaluate: [small]
  - name: small_one
    evaluate: [small]
"""


def test_resources_merge_grid_scale_variant_and_evaluation(tmp_path):
    from hf_mae.named_configs import ACCELERATE_CONFIGS_DIR

    path = tmp_path / "grid.yaml"
    path.write_text(RESOURCE_GRID)
    study = plan_study(load_grid(path), "full", output_root=tmp_path / "o")
    assert study.run("big").resources == {
        "cpus": 4, "account": "lab", "gpus": 1, "time": 2880, "mem": 32.0, "nodes": 2, "partition": "long"
    }  # fmt: skip
    assert study.run("small_one").resources == {"cpus": 4, "account": "lab", "gpus": 1, "time": 720, "mem": 32.0}
    assert study.run("big-small").resources == {"cpus": 4, "account": "lab", "gpus": 2, "time": 90, "mem": 32.0}
    assert study.launcher[-1] == f"--config_file={ACCELERATE_CONFIGS_DIR / 'multi_gpu.yaml'}"


@pytest.mark.parametrize(
    "resources, message",
    [
        ("{gpu: 1}", r"scale 'full': unknown resources \['gpu'\]; known: gpus, nodes"),
        ("{nodes: 0}", r"resources.nodes must be an integer >= 1, got 0"),
        ("{gpus: two}", r"resources.gpus must be an integer >= 0, got 'two'"),
        ("{time: '25 hours'}", r"resources.time must be minutes or '\[D-\]HH:MM:SS', got '25 hours'"),
        ("{time: 0}", r"resources.time must be positive"),
        ("{mem: lots}", r"resources.mem must be GB"),
        ("{partition: ''}", r"resources.partition must be a non-empty string"),
        ("[1, 2]", r"resources must be a mapping"),
    ],
)
def test_bad_resources_are_errors_naming_where_and_what(tmp_path, resources, message):
    path = tmp_path / "grid.yaml"
    path.write_text(RESOURCE_GRID.replace('{gpus: 1, time: "12:00:00", mem: 32G}', resources))
    with pytest.raises(ValueError, match=message):
        plan_study(load_grid(path), "full")


def test_time_and_memory_formats():
    from hf_mae.study.plan import check_resources, parse_minutes

    assert [parse_minutes(v, "t") for v in (90, 1.5, "02:00:00", "1-00:00:00", "1-02:30", "30:00", "00:00:30")] == [
        90, 2, 120, 1440, 1590, 30, 1
    ]  # fmt: skip
    assert check_resources({"mem": "512M"}, "x") == {"mem": 0.5}
    assert check_resources({"mem": "1T", "qos": " high "}, "x") == {"mem": 1024.0, "qos": "high"}


def test_a_launcher_naming_no_shipped_accelerate_config_lists_them(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(RESOURCE_GRID.replace("--config_file=multi_gpu", "--config_file multi_gpus"))
    with pytest.raises(FileNotFoundError, match="no accelerate config named 'multi_gpus'.*multi_gpu, multi_node"):
        plan_study(load_grid(path), "full")


def test_study_command_line_grid_names_resources_and_executor_flags(tmp_path, capsys):
    from hf_mae.study.__main__ import main, parse_study_args

    args = parse_study_args(["--grid", "seed", "--resources", "partition=gpu", "gpus=2", "time=1:00:00"])
    assert args.grid == "seed" and args.resources == {"partition": "gpu", "gpus": 2, "time": 60}
    assert args.executor == "local"
    for argv, message in [
        (["seed", "--grid", "seed"], "a grid twice"),
        (["--grid", "seed", "--resources", "gpus"], "--resources takes KEY=VALUE, got 'gpus'"),
        (["--grid", "seed", "--resources", "gpu=1"], "unknown resources"),
        (["--grid", "seed", "--max_running", "2"], "--max_running applies to --executor submitit only"),
        (["--grid", "seed", "--executor", "submitit", "--timeout", "60"], "--timeout is for the local executor"),
        (["--grid", "seed", "--timeout", "0"], "--timeout takes the seconds a run may take, > 0; got 0"),
        (["--grid", "seed", "--timeout", "-5"], "--timeout takes the seconds a run may take, > 0; got -5"),
        (["--grid", "seed", "--dry-run", "--executor", "submitit", "--max_running", "0"],
         "--max_running takes the jobs to run at once, >= 1; got 0"),  # refused before any run is planned
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            parse_study_args(argv)
        assert message in capsys.readouterr().err, argv
    main(["--grid", "seed", "--scale", "full", "--dry-run", "--output_root", str(tmp_path / "s"), "--only",
          "mae_mask90", "--resources", "account=me"])  # fmt: skip
    text = capsys.readouterr().out
    assert "[1/1] mae_mask90  kind=pretrain" in text
    assert "resources=gpus=1,nodes=1,cpus=10,mem=64.0,time=480,account=me" in text  # the grid's, then --resources
    with pytest.raises(FileNotFoundError, match="no study grid named 'sed'.*study grids: seed"):
        main(["--grid", "sed", "--scale", "demo", "--dry-run"])
    with pytest.raises(ValueError, match="the launcher '' is empty"):  # not silently the grid's launcher
        main(["--grid", "seed", "--scale", "demo", "--dry-run", "--launcher", ""])


def test_a_users_grid_names_the_shipped_recipes(tmp_path):
    # a grid outside the package builds on the recipes shipped with hf_mae by name; a file next to the grid wins
    (tmp_path / "finetune_small.yaml").write_text("finetune_aug: small\nnum_train_epochs: 3\n")
    path = tmp_path / "grid.yaml"
    path.write_text(
        "evaluations: {small: {kind: finetune, config: finetune_small.yaml}}\n"
        "scales: {s: {output_root: out}}\n"
        "pretraining:\n"
        "  - {name: m90, config: pretrain_mask90.yaml, evaluate: [small]}\n"
        "  - {name: scratch, kind: none, evaluate: {small: scratch_small.yaml}}\n"
        "  - {name: typo, config: pretrain_mask99.yaml}\n"
    )
    study = plan_study(load_grid(path), "s")
    assert study.run("m90").problem is None and study.run("m90").args["mask_ratio"] == 0.9
    assert study.run("scratch-small").args["finetune_aug"] == "small" and study.run("scratch-small").problem is None
    assert study.run("m90-small").args["num_train_epochs"] == 3
    assert "pretrain_mask99.yaml not found (nor a recipe shipped with hf_mae: " in study.run("typo").problem
