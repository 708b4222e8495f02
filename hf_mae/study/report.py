"""The report of a study, from what its runs left on disk: the Table-1 layout (`results.md`, `results.csv`), the
list of runs with their state (`runs.csv`), and the figures: fine-tuning curves (the paper's Fig. 1), mask-ratio
bars (Fig. 2), a bar panel per ablation, the pretraining curves (reconstruction loss, k-NN top-1) and the
reconstructions of every pretraining variant."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .execute import is_finished, read_status
from .plan import Study, Variant

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
