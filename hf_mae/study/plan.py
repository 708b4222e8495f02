"""Planning: a study grid (YAML) becomes the list of runs, each after the runs it needs.

A grid (`hf_mae/recipes/study_seed.yaml`, `--grid seed`, is the reproduction study's) lists **pretraining
variants** and, for each, the **evaluations** (fine-tuning regimes, linear probe) of its encoder; `scales` say how
the same grid runs at the paper's size (`full`) or as a CPU demo (`demo`). Every run becomes one command,
`<launcher> -m hf_mae.study KIND --flags`, the same code as `examples/run_<kind>.py --flags` (plus the k-NN
monitor's flags).

Grid schema::

    name: seed
    resources: {}                   # defaults of every run's `resources` (below); each level adds to the one above
    evaluations:                    # columns of the table; `kind` finetune or linear_probe
      small: {kind: finetune, config: finetune_small.yaml, title: small aug}   # + resources: {...} of its runs
    scales:
      full:
        output_root: outputs/study_seed
        launcher: accelerate launch --config_file single_gpu   # `python` = this interpreter; --config_file takes
                                    # a path or the name of an accelerate config shipped with hf_mae
        env: {}                     # extra environment of every run
        resources: {gpus: 1, time: "24:00:00"}   # over the grid's
        add_evaluations: []         # evaluations added to every pretrained variant that has evaluations
        args:                       # flags over each run's config file: for all kinds, then by kind
          all: {}
          pretrain: {knn_eval_steps: 3905}
    pretraining:
      - name: mae_default
        kind: pretrain              # pretrain | distill | none (`none`: evaluations of a fresh ViT, the scratch rows)
        config: pretrain_mask75_dec8x512.yaml   # relative to the grid file, or a recipe shipped with hf_mae
        args: {}                    # flags over the config
        rows: {decoder depth: "8", mask ratio: "0.75"}   # table rows it fills: group -> setting
        paper: {small: 66.76, full: 72.58}               # the reproduction study's numbers, shown next to ours
        evaluate: [small, full]     # evaluation names, or {name: config file} to swap a config (scratch)
        teacher: null               # distill: the variant whose pretrained output is the teacher (teacher_path)
        resources: {}               # of its pretraining run, over the scale's
        scales: [demo, full]        # where it runs (default: every scale)
        demo: {args: {...}, rows: {...}}   # per-scale overrides of any key above (`args` are merged)

Runs are named `<variant>` (pretraining) and `<variant>-<evaluation>`; each writes into `<output_root>/<name>`.

`resources` are what a run asks a cluster scheduler for (the submitit executor; the local executor runs every job on
this machine): `gpus` (per node), `nodes`, `time` (minutes, or "[D-]HH:MM:SS"), `partition`, `account`, `qos`,
`constraint`, `cpus` (per task), `mem` (GB per node, or "64G" / "512M"). Each level adds to the one above: the grid,
the scale, then the variant's `resources` and its per-scale block's (its pretraining run) or the evaluation's (the
runs of that evaluation).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..named_configs import accelerate_config_path, grid_path, recipe_names, recipe_path

RUN_KINDS = ("pretrain", "distill", "finetune", "linear_probe")
PRETRAIN_KINDS = ("pretrain", "distill", "none")
_VARIANT_KEYS = {"name", "kind", "config", "args", "rows", "paper", "evaluate", "teacher", "scales", "resources"}
RESOURCE_KEYS = ("gpus", "nodes", "time", "partition", "account", "qos", "constraint", "cpus", "mem")


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
    resources: dict[str, Any] = field(default_factory=dict)  # for a cluster scheduler (see the module docstring)

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
    """A planned study: its runs in dependency order, the variants (table rows) and the evaluations (columns)."""

    name: str
    scale: str
    output_root: Path
    launcher: list[str]
    env: dict[str, str]
    runs: list[Run]
    variants: list[Variant]
    evaluations: dict[str, dict[str, Any]]

    def run(self, name: str) -> Run:
        """The run called `name` (`ValueError` naming the known runs when there is none)."""
        found = next((r for r in self.runs if r.name == name), None)
        if found is None:
            raise ValueError(f"study {self.name!r} has no run {name!r}; runs: {', '.join(r.name for r in self.runs)}")
        return found


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


def parse_minutes(value: Any, where: str) -> int:
    """A time limit in whole minutes: a number of minutes, or Slurm's "[D-]HH:MM[:SS]" / "MM:SS" text."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where} must be minutes or '[D-]HH:MM:SS', got {value!r}")
    if isinstance(value, str):
        match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d+)(?::(\d+))?", value.strip())
        if not match:
            raise ValueError(f"{where} must be minutes or '[D-]HH:MM:SS', got {value!r}")
        days, a, b, c = (int(x) if x else 0 for x in match.groups())
        # HH:MM:SS, D-HH:MM or MM:SS (Slurm reads a bare two-part value as minutes:seconds)
        hours, minutes, seconds = (a, b, c) if match.group(4) or match.group(1) else (0, a, b)
        value = days * 1440 + hours * 60 + minutes + seconds / 60
    minutes = int(-(-value // 1))  # whole minutes, rounded up: a limit is never shortened
    if minutes <= 0:
        raise ValueError(f"{where} must be positive, got {value!r}")
    return minutes


def _parse_mem(value: Any, where: str) -> float:
    """Memory in GB: a number of GB, or "64G" / "64GB" / "512M" / "1T"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([MGT])B?", str(value).strip(), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{where} must be GB (a positive number) or like '64G' / '512M', got {value!r}")
    return float(match.group(1)) * {"M": 1 / 1024, "G": 1.0, "T": 1024.0}[match.group(2).upper()]


def check_resources(resources: Any, where: str) -> dict[str, Any]:
    """A `resources` mapping of the grid, checked and normalised (`time` in minutes, `mem` in GB); `ValueError`
    naming `where` and the key for an unknown key or a bad value."""
    if resources is None:
        return {}
    if not isinstance(resources, dict):
        raise ValueError(f"{where}: resources must be a mapping of {', '.join(RESOURCE_KEYS)}, got {resources!r}")
    unknown = sorted(set(resources) - set(RESOURCE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown resources {unknown}; known: {', '.join(RESOURCE_KEYS)}")
    checked: dict[str, Any] = {}
    for key, value in resources.items():
        if value is None:
            continue
        if key in ("gpus", "nodes", "cpus"):
            low = 0 if key == "gpus" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}: resources.{key} must be an integer >= {low}, got {value!r}")
            checked[key] = value
        elif key == "time":
            checked[key] = parse_minutes(value, f"{where}: resources.time")
        elif key == "mem":
            checked[key] = _parse_mem(value, f"{where}: resources.mem")
        else:
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: resources.{key} must be a non-empty string, got {value!r}")
            checked[key] = value.strip()
    return checked


def parse_launcher(text: str) -> list[str]:
    """A launcher command line as a list; `python` becomes this interpreter and an accelerate `--config_file` takes
    the name of a shipped config (`single_gpu`) as well as a path (`FileNotFoundError` listing the names)."""
    launcher = shlex.split(text)
    if not launcher:
        raise ValueError(
            f"the launcher {text!r} is empty: give the command that starts a run, e.g. 'python' or "
            "'accelerate launch --config_file multi_gpu'"
        )
    if launcher[0] == "python":
        launcher[0] = sys.executable
    for i, arg in enumerate(launcher):
        if arg == "--config_file" and i + 1 < len(launcher):
            launcher[i + 1] = str(accelerate_config_path(launcher[i + 1]))
        elif arg.startswith("--config_file="):
            launcher[i] = f"--config_file={accelerate_config_path(arg.split('=', 1)[1])}"
    return launcher


def load_grid(path: str | Path) -> dict[str, Any]:
    """Read a grid YAML (a path, or the name of a grid shipped with hf_mae: `seed`); config paths in it are resolved
    relative to its folder later (kept under `_dir`)."""
    path = grid_path(path)
    grid = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(grid, dict) or "pretraining" not in grid or "scales" not in grid:
        raise ValueError(f"{path}: a study grid needs `scales` and `pretraining`")
    grid["_dir"] = str(Path(path).resolve().parent)
    return grid


def _read_config(grid: dict, name: str | None) -> tuple[dict[str, Any], str | None]:
    """A run's base config file as a dict, or ({}, problem) when it is missing: a path relative to the grid, or the
    name of a recipe shipped with hf_mae (`pretrain_mask90.yaml`, as `--config` takes it) that the grid's folder
    does not have, so that a user's own grid can build on the shipped recipes."""
    if not name:
        return {}, None
    path = Path(grid["_dir"]) / name
    if not path.exists():
        if Path(name).name != name or Path(name).stem not in recipe_names():
            return {}, f"config file {path} not found (nor a recipe shipped with hf_mae: {', '.join(recipe_names())})"
        path = recipe_path(Path(name).stem)
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}, None


def plan_study(grid: dict[str, Any], scale: str, output_root: str | Path | None = None) -> Study:
    """The runs of `grid` at `scale`, in an order that puts every run after the runs it needs."""
    if scale not in grid["scales"]:
        raise ValueError(f"scale {scale!r} is not in the grid; it has {', '.join(grid['scales'])}")
    spec = grid["scales"][scale] or {}
    root = Path(output_root or spec.get("output_root") or f"outputs/study_{grid.get('name', 'study')}_{scale}")
    launcher = parse_launcher(spec.get("launcher", "python"))
    scale_args = spec.get("args") or {}
    scale_resources = {
        **check_resources(grid.get("resources"), "grid"),
        **check_resources(spec.get("resources"), f"scale {scale!r}"),
    }
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
        resources = {
            **scale_resources,
            **check_resources(raw.get("resources"), f"variant {name!r}"),
            **check_resources(local.get("resources"), f"variant {name!r}, scale {scale!r}"),
        }
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
            runs.append(Run(name, kind, root / name, args, depends, name, None, problem, resources))
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
                    {**scale_resources, **check_resources(eval_spec.get("resources"), f"evaluation {evaluation!r}")},
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
