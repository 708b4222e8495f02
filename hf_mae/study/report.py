"""The report of a study, from what its runs left on disk: the Table-1 layout (`results.md`, `results.csv`), the
list of runs with their state (`runs.csv`), and the figures: fine-tuning curves (the paper's Fig. 1), mask-ratio
bars (Fig. 2), a bar panel per ablation, the pretraining curves (reconstruction loss, k-NN top-1) and the
reconstructions of every pretraining variant."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..visualize import BarPanel, Curve, bars_figure, curves_figure, history_series, image_tiles_figure, save_figure
from .execute import RESULTS_FILE, is_finished, read_status
from .plan import Run, Study, Variant

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


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
    results = _read_json(run.output_dir / RESULTS_FILE) if is_finished(run) else None
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
        "Top-1 (%) on the validation split after each evaluation, at the final epoch / the best epoch (the "
        "reproduction study reports the final one). `recon. loss` is the pretraining's validation reconstruction loss "
        "(masked patches, norm-pix target; for DMAE without the distillation term)"
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


def _history(run: Run) -> list[dict]:
    return _read_json(run.output_dir / "log_history.json") or []


def finetune_curves_figure(study: Study) -> Figure | None:
    """The paper's Fig. 1 for every fine-tuning run: per evaluation regime, train and validation loss on one panel
    and validation top-1 on the next, against the epoch; one colour per pretraining variant. None before any run
    logged two points."""
    colors = {v.name: f"C{i % 10}" for i, v in enumerate(study.variants)}
    panels: dict[str, list[Curve]] = {}
    for regime in study.evaluations:
        loss, top1 = [], []
        for variant in study.variants:
            if regime not in variant.evaluation_runs:
                continue
            history, color = _history(study.run(variant.evaluation_runs[regime])), colors[variant.name]
            loss.append(Curve(*history_series(history, "loss", "epoch"), variant.name, color))
            loss.append(Curve(*history_series(history, "eval_loss", "epoch"), variant.name, color, validation=True))
            top1.append(Curve(*history_series(history, "eval_top1", "epoch"), variant.name, color, validation=True))
        if loss:
            panels[f"{_title(study, regime)}: loss"] = loss
            panels[f"{_title(study, regime)}: validation top-1 (%)"] = top1
    return curves_figure(panels, f"Fine-tuning curves ({study.name}, {study.scale} scale)", xlabel="epoch")


def pretrain_curves_figure(study: Study) -> Figure | None:
    """Pretraining: train and validation reconstruction loss on one panel (a DMAE's pixel part: its loss adds the
    distillation term), k-NN top-1 when monitored, against the epoch; one colour per run."""
    loss, knn = [], []
    runs = [r for r in study.runs if r.kind in ("pretrain", "distill")]
    for i, run in enumerate(runs):
        history, color = _history(run), f"C{i % 10}"
        for key, pixel_key, validation in (
            ("loss", "reconstruction_loss", False),
            ("eval_loss", "eval_reconstruction_loss", True),
        ):
            xs, ys = history_series(history, pixel_key, "epoch")
            if not xs:
                xs, ys = history_series(history, key, "epoch")
            loss.append(Curve(xs, ys, run.name, color, validation))
        knn.append(Curve(*history_series(history, "knn_top1", "epoch"), run.name, color, validation=True))
    panels = {"reconstruction loss": loss, "k-NN top-1 (%)": knn}
    return curves_figure(panels, f"Pretraining ({study.name}, {study.scale} scale)", xlabel="epoch")


def _bar_value(row: dict, evaluation: str) -> float | str | None:
    """Top-1 of one evaluation of a table row; its state when it has none; None when the grid does not plan it."""
    if not row["variant"].evaluation_runs.get(evaluation):
        return None
    cell = row["evaluations"][evaluation]
    if cell.status != "done":
        return cell.status
    return cell.values.get("top1", "no top-1")


def ablation_bars_figure(study: Study, table: list[dict], groups: list[str] | None = None) -> Figure | None:
    """Top-1 bars per setting, one panel per ablation group (`groups`: those only, e.g. the mask ratio = the paper's
    Fig. 2), one colour per evaluation. None when no group has an evaluation."""
    names = [g for g in dict.fromkeys(row["group"] for row in table) if groups is None or g in groups]
    panels = {}
    for group in names:
        rows = [row for row in table if row["group"] == group]
        evaluations = [e for e in study.evaluations if any(row["variant"].evaluation_runs.get(e) for row in rows)]
        values = {_title(study, e): [_bar_value(row, e) for row in rows] for e in evaluations}
        panels[group] = BarPanel([row["setting"] for row in rows], values)
    what = names[0] if len(names) == 1 else "ablation"
    series = [_title(study, e) for e in study.evaluations]  # one colour per evaluation in every figure
    return bars_figure(panels, f"Top-1 by {what} ({study.name}, {study.scale} scale)", series=series)


def collect_reconstructions(study: Study, out: Path) -> Path | None:
    """Copy each pretraining run's reconstructions.png to `out/reconstructions/<run>.png` and tile them into
    `out/reconstructions.png` (each tile: original, masked, reconstruction, reconstruction + visible)."""
    found = {
        r.name: r.output_dir / "reconstructions.png"
        for r in study.runs
        if r.kind in ("pretrain", "distill") and (r.output_dir / "reconstructions.png").exists()
    }
    if not found:
        return None
    folder = out / "reconstructions"
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in found.items():
        shutil.copyfile(src, folder / f"{name}.png")
    title = f"Reconstructions on validation images ({study.name}, {study.scale} scale)"
    return save_figure(image_tiles_figure(found, title), out / "reconstructions.png", dpi=150)


def _save(figure: Figure | None, path: Path) -> Path | None:
    return None if figure is None else save_figure(figure, path)


def build_report(study: Study, status: dict[str, dict] | None = None, out: Path | None = None) -> Path:
    """Write the report folder (tables, figures, reconstructions) from what the runs left on disk; returns
    results.md. Safe on a partial study: missing runs show as `not run`, failed ones as `failed`."""
    status = read_status(study.output_root) if status is None else status
    out = study.output_root / "report" if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    table = collect_results(study, status)
    for name in FIGURES:
        (out / name).unlink(missing_ok=True)  # a figure with nothing left to draw must not survive from before
    _save(finetune_curves_figure(study), out / "finetune_curves.png")
    _save(ablation_bars_figure(study, table, groups=["mask ratio"]), out / "mask_ratio.png")
    _save(ablation_bars_figure(study, table), out / "ablations.png")
    _save(pretrain_curves_figure(study), out / "pretrain_curves.png")
    collect_reconstructions(study, out)
    md_path, _ = write_tables(study, table, status, out)
    logger.info("report: %s", md_path)
    return md_path
