"""The seed's study as one grid: pretraining variants, the evaluations of each encoder, and a Table-1 report.

A grid (YAML, `examples/configs/study_seed.yaml`) lists **pretraining variants** and, for each, the **evaluations**
(fine-tuning regimes, linear probe) of its encoder; `scales` say how the same grid runs at the seed's size (`full`)
or as a CPU demo (`demo`). Every run is one subprocess of the same code as a single experiment
(`run_pretraining`, `run_finetuning`, `run_distillation` through `python -m hf_mae.study KIND --flags`, which is
`examples/run_<kind>.py --flags` plus the k-NN monitor's flags), so one crash, OOM or NaN stop cannot take the study
down, memory is returned between runs, and each run can be launched with `accelerate launch` on its own.

Grid schema::

    name: seed
    evaluations:                    # columns of the table; `kind` finetune or linear_probe
      small: {kind: finetune, config: finetune_small.yaml, title: small aug}
    scales:
      full:
        output_root: outputs/study_seed
        launcher: accelerate launch --config_file accelerate_configs/single_gpu.yaml   # `python` = this interpreter
        env: {}                     # extra environment of every run
        add_evaluations: []         # evaluations added to every pretrained variant that has evaluations
        args:                       # flags over each run's config file: for all kinds, then by kind
          all: {}
          pretrain: {knn_eval_steps: 3905}
    pretraining:
      - name: mae_default
        kind: pretrain              # pretrain | distill | none (`none`: evaluations of a fresh ViT, the scratch rows)
        config: pretrain_mask75_dec8x512.yaml   # relative to the grid file
        args: {}                    # flags over the config
        rows: {decoder depth: "8", mask ratio: "0.75"}   # table rows it fills: group -> setting
        paper: {small: 66.76, full: 72.58}               # the seed's numbers, shown next to ours
        evaluate: [small, full]     # evaluation names, or {name: config file} to swap a config (scratch)
        teacher: null               # distill: the variant whose pretrained output is the teacher (teacher_path)
        scales: [demo, full]        # where it runs (default: every scale)
        demo: {args: {...}, rows: {...}}   # per-scale overrides of any key above (`args` are merged)

Runs are named `<variant>` (pretraining) and `<variant>-<evaluation>`; each writes into `<output_root>/<name>`. A run
whose `results.json` exists is finished and skipped; one with a `checkpoint-*` folder resumes from the latest. A
failed run is recorded in `study_status.json` (with the tail of its log) and the runs that need it are `blocked`;
the study goes on. The report (`<output_root>/report/`) has `results.md` / `results.csv` laid out like the seed's
Table 1, `runs.csv`, fine-tuning curves (seed Fig. 1), mask-ratio bars (Fig. 2), a bar panel per ablation, the
pretraining curves (reconstruction loss, k-NN top-1) and the reconstructions of every pretraining variant.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

RUN_KINDS = ("pretrain", "distill", "finetune", "linear_probe")
PRETRAIN_KINDS = ("pretrain", "distill", "none")
STATUS_FILE = "study_status.json"
_VARIANT_KEYS = {"name", "kind", "config", "args", "rows", "paper", "evaluate", "teacher", "scales"}


# ----------------------------------------------------------------------------------------------------------------------
# Planning: grid -> runs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run: `kind` with `args` (flags) into `output_dir`, after the runs in `depends_on`."""

    name: str
    kind: str
    output_dir: Path
    args: dict[str, Any]
    depends_on: tuple[str, ...] = ()
    variant: str = ""
    evaluation: str | None = None
    problem: str | None = None  # known before running (e.g. a config file missing): the run fails without starting

    def command(self, launcher: list[str]) -> list[str]:
        return [*launcher, "-m", "hf_mae.study", self.kind, *to_flags(self.args)]


@dataclass
class Variant:
    """A pretraining variant as the report sees it: its table rows and the runs that fill them."""

    name: str
    kind: str
    rows: dict[str, str]
    paper: dict[str, float]
    pretrain_run: str | None
    evaluation_runs: dict[str, str]


@dataclass
class Study:
    name: str
    scale: str
    output_root: Path
    launcher: list[str]
    env: dict[str, str]
    runs: list[Run]
    variants: list[Variant]
    evaluations: dict[str, dict[str, Any]]

    def run(self, name: str) -> Run:
        return next(r for r in self.runs if r.name == name)


def to_flags(args: dict[str, Any]) -> list[str]:
    """{"a": 1, "b": True, "c": None, "d": [x, y]} -> ["--a", "1", "--b", "true", "--d", "x", "y"] (None = the
    field's default)."""
    flags: list[str] = []
    for key, value in args.items():
        if value is None:
            continue
        if isinstance(value, bool):
            values = ["true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            values = [str(v) for v in value]
        elif isinstance(value, dict):
            values = [json.dumps(value)]
        else:
            values = [str(value)]
        flags += [f"--{key}", *values]
    return flags


def load_grid(path: str | Path) -> dict[str, Any]:
    grid = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(grid, dict) or "pretraining" not in grid or "scales" not in grid:
        raise ValueError(f"{path}: a study grid needs `scales` and `pretraining`")
    grid["_dir"] = str(Path(path).resolve().parent)
    return grid


def _read_config(grid: dict, name: str | None) -> tuple[dict[str, Any], str | None]:
    """A run's base config file (relative to the grid) as a dict, or ({}, problem) when it is missing."""
    if not name:
        return {}, None
    path = Path(grid["_dir"]) / name
    if not path.exists():
        return {}, f"config file {path} not found"
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}, None


def plan_study(grid: dict[str, Any], scale: str, output_root: str | Path | None = None) -> Study:
    """The runs of `grid` at `scale`, in an order that puts every run after the runs it needs."""
    if scale not in grid["scales"]:
        raise ValueError(f"scale {scale!r} is not in the grid; it has {', '.join(grid['scales'])}")
    spec = grid["scales"][scale] or {}
    root = Path(output_root or spec.get("output_root") or f"outputs/study_{grid.get('name', 'study')}_{scale}")
    launcher = shlex.split(spec.get("launcher", "python"))
    if launcher and launcher[0] == "python":
        launcher[0] = sys.executable
    scale_args = spec.get("args") or {}
    evaluations = grid.get("evaluations") or {}
    runs: list[Run] = []
    variants: list[Variant] = []
    names: set[str] = set()

    def merged(kind: str, config: dict, *extra: dict) -> dict:
        args = {**config, **(scale_args.get("all") or {}), **(scale_args.get(kind) or {})}
        for more in extra:
            args.update(more or {})
        return args

    for raw in grid["pretraining"]:
        unknown = set(raw) - _VARIANT_KEYS - set(grid["scales"])
        if unknown:
            raise ValueError(f"variant {raw.get('name')!r}: unknown keys {sorted(unknown)}")
        if scale not in raw.get("scales", grid["scales"]):
            continue
        local = raw.get(scale) or {}
        v = {**raw, **local, "args": {**(raw.get("args") or {}), **(local.get("args") or {})}}
        name, kind = v["name"], v.get("kind", "pretrain")
        if kind not in PRETRAIN_KINDS:
            raise ValueError(f"variant {name!r}: kind must be one of {PRETRAIN_KINDS}, got {kind!r}")
        if name in names:
            raise ValueError(f"variant name {name!r} is used twice")
        names.add(name)
        pretrain_run = None
        if kind != "none":
            config, problem = _read_config(grid, v.get("config"))
            args = merged(kind, config, v["args"], {"output_dir": str(root / name)})
            depends: tuple[str, ...] = ()
            if kind == "distill" and v.get("teacher"):
                teacher = next((r for r in runs if r.name == v["teacher"]), None)
                if teacher is None:
                    raise ValueError(f"variant {name!r}: teacher {v['teacher']!r} is not an earlier variant")
                args["teacher_path"] = str(teacher.output_dir)
                depends = (teacher.name,)
            runs.append(Run(name, kind, root / name, args, depends, name, None, problem))
            pretrain_run = name
        evaluate = v.get("evaluate") or []
        evaluate = dict.fromkeys(evaluate) if isinstance(evaluate, list) else dict(evaluate)
        if pretrain_run and evaluate:
            for extra in spec.get("add_evaluations") or []:
                evaluate.setdefault(extra, None)
        evaluation_runs = {}
        for evaluation, config_name in evaluate.items():
            if evaluation not in evaluations:
                raise ValueError(f"variant {name!r}: evaluation {evaluation!r} is not in `evaluations`")
            eval_spec = evaluations[evaluation]
            eval_kind = eval_spec.get("kind", "finetune")
            config, problem = _read_config(grid, config_name or eval_spec.get("config"))
            run_name = f"{name}-{evaluation}"
            args = merged(
                eval_kind,
                config,
                eval_spec.get("args"),
                {"output_dir": str(root / run_name), "model_name_or_path": str(root / name) if pretrain_run else None},
            )
            runs.append(
                Run(
                    run_name,
                    eval_kind,
                    root / run_name,
                    args,
                    (pretrain_run,) if pretrain_run else (),
                    name,
                    evaluation,
                    problem,
                )
            )
            evaluation_runs[evaluation] = run_name
        variants.append(
            Variant(
                name,
                kind,
                {str(k): str(s) for k, s in (v.get("rows") or {}).items()},
                v.get("paper") or {},
                pretrain_run,
                evaluation_runs,
            )
        )
    return Study(
        grid.get("name", "study"),
        scale,
        root,
        launcher,
        {str(k): str(s) for k, s in (spec.get("env") or {}).items()},
        runs,
        variants,
        evaluations,
    )


def select_runs(study: Study, patterns: list[str] | None) -> list[Run]:
    """The runs matching any of the glob `patterns` (all when None), with the runs they need."""
    if not patterns:
        return list(study.runs)
    wanted = {r.name for r in study.runs if any(fnmatch.fnmatch(r.name, p) for p in patterns)}
    if not wanted:
        raise ValueError(f"no run matches {patterns}; runs: {', '.join(r.name for r in study.runs)}")
    changed = True
    while changed:
        needed = {d for r in study.runs if r.name in wanted for d in r.depends_on} - wanted
        wanted |= needed
        changed = bool(needed)
    return [r for r in study.runs if r.name in wanted]


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------
def is_finished(run: Run) -> bool:
    return (run.output_dir / "results.json").exists()


def last_checkpoint(run: Run) -> str | None:
    """The newest complete `checkpoint-<step>` folder of an interrupted run (half-written ones are skipped and
    named in the log), or None."""
    from .training.trainer import newest_complete_checkpoint

    if not run.output_dir.is_dir():
        return None
    checkpoint = newest_complete_checkpoint(run.output_dir)
    return None if checkpoint is None else str(checkpoint)


def prepared_command(study: Study, run: Run) -> tuple[list[str], str]:
    """The command that runs (or resumes) `run` now, and what it will do: `done`, `resume from ...` or `run`."""
    if is_finished(run):
        return run.command(study.launcher), "done"
    checkpoint = last_checkpoint(run)
    if checkpoint:
        resumed = Run(**{**run.__dict__, "args": {**run.args, "resume_from_checkpoint": checkpoint}})
        return resumed.command(study.launcher), f"resume from {Path(checkpoint).name}"
    from .training.trainer import RUN_FILES

    if any((run.output_dir / name).exists() for name in RUN_FILES):
        # an unfinished run that left a model but nothing to resume from starts again: the study says so explicitly
        restarted = Run(**{**run.__dict__, "args": {**run.args, "overwrite_output_dir": True}})
        return restarted.command(study.launcher), "restart"
    return run.command(study.launcher), "run"


def format_plan(study: Study, runs: list[Run] | None = None) -> str:
    """The dry-run listing: name, kind, depends-on, output dir, state and the exact command of every run."""
    runs = study.runs if runs is None else runs
    lines = [f"study {study.name!r}, scale {study.scale}: {len(runs)} runs into {study.output_root}"]
    if study.env:
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in study.env.items()))
    for i, run in enumerate(runs, 1):
        command, state = prepared_command(study, run)
        state = f"will fail: {run.problem}" if run.problem and state != "done" else state
        lines += [
            f"[{i}/{len(runs)}] {run.name}  kind={run.kind}  depends_on={','.join(run.depends_on) or '-'}  "
            f"output_dir={run.output_dir}  state={state}",
            "    " + shlex.join(command),
        ]
    return "\n".join(lines)


def read_status(root: Path) -> dict[str, dict[str, Any]]:
    path = root / STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_status(root: Path, status: dict[str, dict[str, Any]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(status, indent=1))
    tmp.replace(root / STATUS_FILE)


def execute_subprocess(command: list[str], log_path: Path, env: dict[str, str], timeout: float | None) -> int:
    """Run `command`, stdout and stderr appended to `log_path`; the return code (124 on timeout)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        try:
            return subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n=== timed out after {timeout} s\n")
            return 124


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


Executor = Callable[[list[str], Path, dict[str, str], float | None], int]


def run_study(
    study: Study,
    runs: list[Run] | None = None,
    executor: Executor = execute_subprocess,
    timeout: float | None = None,
    keep_checkpoints: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run `runs` (default: all) in order; finished runs are skipped, interrupted ones resumed, failures recorded.

    Returns the status of every run of the study (also in `<output_root>/study_status.json`): `done`, `failed`,
    `blocked` (a run it needs did not finish) or `interrupted`, with the command, seconds and, on failure, the log's
    tail. The `checkpoint-*` folders of a run that finished are deleted unless `keep_checkpoints` (its final model
    is saved next to them; at the seed's scale they hold ~1.3 GB of optimizer state each).
    """
    runs = study.runs if runs is None else runs
    status = read_status(study.output_root)
    for i, run in enumerate(runs, 1):
        command, state = prepared_command(study, run)
        entry: dict[str, Any] = {"kind": run.kind, "output_dir": str(run.output_dir), "command": shlex.join(command)}
        missing = [d for d in run.depends_on if not is_finished(study.run(d))]
        if state == "done":
            status[run.name] = {**status.get(run.name, {}), **entry, "status": "done"}
            logger.info("[%d/%d] %s: finished earlier, skipped", i, len(runs), run.name)
        elif missing:
            status[run.name] = {**entry, "status": "blocked", "error": f"needs {', '.join(missing)} (not finished)"}
            logger.warning("[%d/%d] %s: blocked, %s not finished", i, len(runs), run.name, ", ".join(missing))
        elif run.problem:
            status[run.name] = {**entry, "status": "failed", "error": run.problem}
            logger.error("[%d/%d] %s: %s", i, len(runs), run.name, run.problem)
        else:
            logger.info("[%d/%d] %s (%s): %s", i, len(runs), run.name, state, entry["command"])
            log_path = run.output_dir / "study.log"
            start = time.time()
            try:
                code = executor(command, log_path, study.env, timeout)
            except KeyboardInterrupt:
                status[run.name] = {**entry, "status": "interrupted", "seconds": time.time() - start}
                _write_status(study.output_root, status)
                raise
            seconds = time.time() - start
            if code == 0 and is_finished(run):
                status[run.name] = {**entry, "status": "done", "seconds": seconds}
                logger.info("[%d/%d] %s: done in %.0f s", i, len(runs), run.name, seconds)
                if not keep_checkpoints:
                    for checkpoint in run.output_dir.glob("checkpoint-*"):
                        shutil.rmtree(checkpoint, ignore_errors=True)
            else:
                error = f"exit code {code}" + ("" if code else " but no results.json") + f"\n{_tail(log_path)}"
                status[run.name] = {**entry, "status": "failed", "seconds": seconds, "error": error}
                logger.error("[%d/%d] %s failed (%s); log: %s", i, len(runs), run.name, error, log_path)
        _write_status(study.output_root, status)
    return status


# ----------------------------------------------------------------------------------------------------------------------
# The worker: one run, in this process (what every study subprocess executes)
# ----------------------------------------------------------------------------------------------------------------------
def run_one(kind: str, argv: list[str]) -> dict[str, float]:
    """Run one study run of `kind` in this process: the same code as the example script of `kind`."""
    from .cli import run_command

    if kind not in RUN_KINDS:
        raise ValueError(f"run kind must be one of {RUN_KINDS}, got {kind!r}")
    return run_command(kind, argv)


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass
class _Cell:
    status: str  # done | failed | blocked | interrupted | not run
    values: dict[str, float] = field(default_factory=dict)

    def text(self, *keys: str, digits: int = 2) -> str:
        if self.status != "done":  # failed, blocked, interrupted, not run, or – (not planned)
            return self.status
        numbers = [self.values.get(k) for k in keys]
        if all(v is None for v in numbers):
            return "–"
        return " / ".join("–" if v is None else f"{v:.{digits}f}" for v in numbers)


def _run_cell(study: Study, status: dict[str, dict], name: str | None) -> _Cell:
    if name is None:  # the grid does not evaluate this variant this way
        return _Cell("–")
    run = study.run(name)
    results = _read_json(run.output_dir / "results.json") if is_finished(run) else None
    if results is None:
        return _Cell(status.get(name, {}).get("status", "not run") if name in status else "not run")
    values = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    # a DMAE's eval_loss adds the distillation term: compare pixel losses only
    if "eval_loss" in values:
        values["recon_loss"] = values.get("eval_reconstruction_loss", values["eval_loss"])
    history = _read_json(run.output_dir / "log_history.json") or []
    knn = [e["knn_top1"] for e in history if "knn_top1" in e]
    if knn:
        values["knn_top1"] = knn[-1]
    return _Cell("done", values)


def collect_results(study: Study, status: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """Rows of the Table-1 layout: one per (group, setting) of the variants' `rows`, numeric settings in order."""
    status = read_status(study.output_root) if status is None else status
    groups: dict[str, list[tuple[str, Variant]]] = {}
    for variant in study.variants:
        for group, setting in variant.rows.items():
            groups.setdefault(group, []).append((setting, variant))
    table = []
    for group, entries in groups.items():
        if all(_number(s) is not None for s, _ in entries):
            entries = sorted(entries, key=lambda e: _number(e[0]))
        for setting, variant in entries:
            table.append(
                {
                    "group": group,
                    "setting": setting,
                    "variant": variant,
                    "pretrain": _run_cell(study, status, variant.pretrain_run) if variant.pretrain_run else None,
                    "evaluations": {
                        e: _run_cell(study, status, variant.evaluation_runs.get(e)) for e in study.evaluations
                    },
                }
            )
    return table


def _title(study: Study, evaluation: str) -> str:
    return study.evaluations[evaluation].get("title", evaluation)


def write_tables(study: Study, table: list[dict], status: dict[str, dict], out: Path) -> tuple[Path, Path]:
    """results.md (Table 1 layout, runs list, figures) and results.csv (the same table, one number per column)."""
    evaluations = [e for e in study.evaluations if any(row["variant"].evaluation_runs.get(e) for row in table)]
    has_knn = any(row["pretrain"] and "knn_top1" in row["pretrain"].values for row in table)
    paper = [e for e in evaluations if any(e in row["variant"].paper for row in table)]
    header = ["ablation", "setting", "pretraining", "recon. loss"] + (["k-NN top-1"] if has_knn else [])
    header += [f"{_title(study, e)} top-1 (final / best)" for e in evaluations]
    header += [f"seed paper ({' / '.join(_title(study, e) for e in paper)})"] if paper else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = []
    for row in table:
        variant, pre = row["variant"], row["pretrain"]
        cells = [row["group"], row["setting"], variant.name if pre else f"{variant.name} (none)"]
        cells.append(pre.text("recon_loss", digits=4) if pre else "–")
        if has_knn:
            cells.append(pre.text("knn_top1") if pre else "–")
        cells += [row["evaluations"][e].text("top1", "best_top1") for e in evaluations]
        if paper:
            cells.append(" / ".join(str(variant.paper.get(e, "–")) for e in paper))
        lines.append("| " + " | ".join(cells) + " |")
        record = {"ablation": row["group"], "setting": row["setting"], "variant": variant.name}
        record["pretrain_status"] = pre.status if pre else "none"
        record["recon_loss"] = pre.values.get("recon_loss") if pre else None
        record["knn_top1"] = pre.values.get("knn_top1") if pre else None
        for e in evaluations:
            cell = row["evaluations"][e]
            record.update({f"{e}_status": cell.status, f"{e}_top1": cell.values.get("top1")})
            record[f"{e}_best_top1"] = cell.values.get("best_top1")
            if e in paper:
                record[f"paper_{e}"] = variant.paper.get(e)
        csv_rows.append(record)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]) if csv_rows else ["ablation"])
        writer.writeheader()
        writer.writerows(csv_rows)
    with open(out / "runs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "kind", "status", "seconds", "output_dir", "error"])
        for run in study.runs:
            s = status.get(run.name, {})
            state = "done" if is_finished(run) else s.get("status", "not run")
            error = (s.get("error") or "").splitlines()[0] if state != "done" and s.get("error") else ""
            writer.writerow(
                [run.name, run.kind, state, f"{s['seconds']:.0f}" if "seconds" in s else "", run.output_dir, error]
            )
    runs_md = ["| run | kind | status | minutes | note |", "|---|---|---|---|---|"]
    for run in study.runs:
        s = status.get(run.name, {})
        state = "done" if is_finished(run) else s.get("status", "not run")
        note = (s.get("error") or "").splitlines()[0] if state != "done" and s.get("error") else ""
        minutes = f"{s['seconds'] / 60:.1f}" if "seconds" in s else ""
        runs_md.append(f"| {run.name} | {run.kind} | {state} | {minutes} | {note} |")
    figures = [p for p in FIGURES if (out / p).exists()]
    md = [
        f"# Study `{study.name}`, scale `{study.scale}`",
        "",
        "Top-1 (%) on the validation split after each evaluation, at the final epoch / the best epoch (the seed "
        "reports the final one). `recon. loss` is the pretraining's validation reconstruction loss (masked patches, "
        "norm-pix target; for DMAE without the distillation term)"
        + (
            ", `k-NN top-1` the last k-NN monitor value of the pretraining (cls token, k=20, T=0.07)"
            if has_knn
            else ""
        )
        + ". `failed`: the run failed (see runs below); `blocked`: a run it needs did not finish.",
        "",
        *lines,
        "",
        "## Runs",
        "",
        *runs_md,
        "",
        "## Figures",
        "",
        *[f"![{p}]({p})" for p in figures],
        "",
    ]
    md_path = out / "results.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    return md_path, csv_path


FIGURES = ("finetune_curves.png", "mask_ratio.png", "ablations.png", "pretrain_curves.png", "reconstructions.png")


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(e["epoch"], e[key]) for e in history if key in e and "epoch" in e and isinstance(e[key], (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_finetune_curves(study: Study, path: Path) -> Path | None:
    """Seed Fig. 1 for every fine-tuning run: train loss, validation loss and validation top-1 against the epoch, one
    row per evaluation regime, one line per pretraining variant."""
    plt = _pyplot()
    regimes = [e for e, spec in study.evaluations.items() if any(v.evaluation_runs.get(e) for v in study.variants)]
    histories = {
        (v.name, e): _read_json(study.run(v.evaluation_runs[e]).output_dir / "log_history.json") or []
        for v in study.variants
        for e in regimes
        if e in v.evaluation_runs
    }
    if not any(histories.values()):
        return None
    panels = [("loss", "train loss"), ("eval_loss", "validation loss"), ("eval_top1", "validation top-1 (%)")]
    fig, axes = plt.subplots(len(regimes), 3, figsize=(13, 3.2 * len(regimes)), squeeze=False)
    colors = {v.name: plt.cm.tab10(i % 10) for i, v in enumerate(study.variants)}
    for r, regime in enumerate(regimes):
        for c, (key, label) in enumerate(panels):
            ax = axes[r][c]
            for v in study.variants:
                xs, ys = _series(histories.get((v.name, regime), []), key)
                if xs:
                    ax.plot(xs, ys, color=colors[v.name], label=v.name, linewidth=1.2)
            ax.set_title(f"{_title(study, regime)}: {label}", fontsize=10)
            ax.set_xlabel("epoch", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
            labels[lab] = lab
    fig.legend(handles.values(), labels.values(), loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"Fine-tuning curves ({study.name}, {study.scale} scale)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.86, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bars(ax, study: Study, rows: list[dict], title: str) -> bool:
    """Grouped bars of top-1 per setting, one colour per evaluation (the same colour in every panel)."""
    evaluations = [e for e in study.evaluations if any(row["variant"].evaluation_runs.get(e) for row in rows)]
    if not evaluations:
        return False
    width = 0.8 / len(evaluations)
    top = 1.0
    for j, e in enumerate(evaluations):
        color = f"C{list(study.evaluations).index(e)}"
        for i, row in enumerate(rows):
            if not row["variant"].evaluation_runs.get(e):
                continue
            cell = row["evaluations"][e]
            x = i + (j - (len(evaluations) - 1) / 2) * width
            value = cell.values.get("top1") if cell.status == "done" else None
            if value is None:  # failed / blocked / not run: say so where the bar would be
                label = cell.status if cell.status != "done" else "no top-1"
                ax.text(x, 1, label, rotation=90, ha="center", va="bottom", fontsize=8, color=color)
                continue
            bar = ax.bar(x, value, width, color=color)
            ax.bar_label(bar, fmt="%.1f", fontsize=7)
            top = max(top, value)
    ax.set_xticks(range(len(rows)), [row["setting"] for row in rows], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("top-1 (%)", fontsize=9)
    ax.set_ylim(0, top * 1.15)
    ax.tick_params(labelsize=8)
    return True


def plot_ablation_bars(study: Study, table: list[dict], path: Path, groups: list[str] | None = None) -> Path | None:
    """Top-1 bars per setting, one panel per ablation group (`groups`: those only, e.g. the mask ratio = seed Fig. 2)."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    names = [g for g in dict.fromkeys(row["group"] for row in table) if groups is None or g in groups]
    if not names:
        return None
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 0.4, 3.3 * rows + 0.6), squeeze=False)
    drawn = False
    for ax, group in zip(axes.flat, names):
        drawn |= _bars(ax, study, [row for row in table if row["group"] == group], group)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if not drawn:
        plt.close(fig)
        return None
    top = max(ax.get_ylim()[1] for ax in list(axes.flat)[: len(names)])
    for ax in list(axes.flat)[: len(names)]:
        ax.set_ylim(0, top)  # one scale for every panel, so bars compare across ablations
    used = [e for e in study.evaluations if any(row["variant"].evaluation_runs.get(e) for row in table)]
    handles = [Patch(color=f"C{list(study.evaluations).index(e)}", label=_title(study, e)) for e in used]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    what = names[0] if len(names) == 1 else "ablation"
    fig.suptitle(f"Top-1 by {what} ({study.name}, {study.scale} scale)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07 if rows == 1 else 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pretrain_curves(study: Study, path: Path) -> Path | None:
    """Pretraining: validation reconstruction loss (and k-NN top-1 when monitored) against the epoch."""
    plt = _pyplot()
    histories = {
        r.name: _read_json(r.output_dir / "log_history.json") or []
        for r in study.runs
        if r.kind in ("pretrain", "distill")
    }
    # (key, DMAE's pixel-only key, title): a DMAE's loss adds the distillation term, its reconstruction part compares
    keys = [("loss", "reconstruction_loss", "train reconstruction loss")]
    keys.append(("eval_loss", "eval_reconstruction_loss", "validation reconstruction loss"))
    if any(_series(h, "knn_top1")[0] for h in histories.values()):
        keys.append(("knn_top1", "knn_top1", "k-NN top-1 (%)"))
    if not any(_series(h, k)[0] for h in histories.values() for k, _, _ in keys):
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.3 * len(keys) + 1.6, 3.4), squeeze=False)
    for ax, (key, pixel_key, label) in zip(axes[0], keys):
        for i, (name, history) in enumerate(histories.items()):
            xs, ys = _series(history, pixel_key)
            if not xs:
                xs, ys = _series(history, key)
            if xs:
                ax.plot(
                    xs,
                    ys,
                    color=plt.cm.tab10(i % 10),
                    label=name,
                    linewidth=1.2,
                    marker="o" if len(xs) < 12 else None,
                    markersize=3,
                )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"Pretraining ({study.name}, {study.scale} scale)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.82, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def collect_reconstructions(study: Study, out: Path) -> Path | None:
    """Copy each pretraining run's reconstructions.png to `out/reconstructions/<run>.png` and tile them side by side
    into `out/reconstructions.png` (columns per run: original, masked, reconstruction, reconstruction + visible)."""
    found = [
        (r.name, r.output_dir / "reconstructions.png")
        for r in study.runs
        if r.kind in ("pretrain", "distill") and (r.output_dir / "reconstructions.png").exists()
    ]
    if not found:
        return None
    folder = out / "reconstructions"
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in found:
        shutil.copyfile(src, folder / f"{name}.png")
    plt = _pyplot()
    images = [plt.imread(src) for _, src in found]
    cols = min(len(images), 5)
    rows = math.ceil(len(images) / cols)
    aspect = images[0].shape[0] / images[0].shape[1]
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, (3.6 * aspect + 0.4) * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, _), image in zip(axes.flat, found, images):
        ax.imshow(image)
        ax.set_title(name, fontsize=10)
    fig.suptitle(f"Reconstructions on validation images ({study.name}, {study.scale} scale)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = out / "reconstructions.png"
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def build_report(study: Study, status: dict[str, dict] | None = None, out: Path | None = None) -> Path:
    """Write the report folder (tables, figures, reconstructions) from what the runs left on disk; returns
    results.md. Safe on a partial study: missing runs show as `not run`, failed ones as `failed`."""
    status = read_status(study.output_root) if status is None else status
    out = study.output_root / "report" if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    table = collect_results(study, status)
    for name in FIGURES:
        (out / name).unlink(missing_ok=True)  # a figure with nothing left to draw must not survive from before
    plot_finetune_curves(study, out / "finetune_curves.png")
    plot_ablation_bars(study, table, out / "mask_ratio.png", groups=["mask ratio"])
    plot_ablation_bars(study, table, out / "ablations.png")
    plot_pretrain_curves(study, out / "pretrain_curves.png")
    collect_reconstructions(study, out)
    md_path, _ = write_tables(study, table, status, out)
    logger.info("report: %s", md_path)
    return md_path


__all__ = [
    "Run",
    "Study",
    "Variant",
    "build_report",
    "collect_results",
    "format_plan",
    "load_grid",
    "plan_study",
    "run_one",
    "run_study",
    "select_runs",
    "to_flags",
]


if __name__ == "__main__":  # python -m hf_mae.study KIND --flags: one run of a study
    if len(sys.argv) < 2 or sys.argv[1] not in RUN_KINDS:
        sys.exit(
            f"usage: python -m hf_mae.study {{{','.join(RUN_KINDS)}}} --flags ... (a whole study: examples/run_study.py)"
        )
    run_one(sys.argv[1], sys.argv[2:])
