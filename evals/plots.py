"""PNG plots of a sweep's table (written by `arm-table ... --plots DIR` or `--out-dir DIR`).

- scores.png: every row (references and methods) side by side, one group of bars per benchmark
  column (grouped by model and domain as in the table), the converged SFT score as a dashed line.
- arm_iterations.png: ARM's score against its number of iterations T (from runs that differ in
  `merge.iterations`, e.g. `experiment=ablation_schedule`), one line per other differing setting,
  with converged SFT (dashed) and the best early checkpoint (dotted) for reference. Written only when
  the results hold ARM rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evals.table import CONVERGED, Column, Table, flatten

ARM = "arm"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _column_label(column: Column) -> str:
    text = f"{column.model}\n{column.task}"
    return text if column.task == column.domain else f"{column.model} · {column.domain}\n{column.task}"


def plot_scores(table: Table, out: Path) -> Path:
    """Methods side by side: grouped bars per benchmark column."""
    plt = _pyplot()
    rows, columns = table.rows, table.columns
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(columns) * (0.5 + 0.22 * len(rows))), 4.2))
    colors = plt.get_cmap("tab20")
    for r, row in enumerate(rows):
        xs = [c + (r - (len(rows) - 1) / 2) * width for c in range(len(columns))]
        values = [table.value(row, column) for column in columns]
        ax.bar([x for x, v in zip(xs, values, strict=True) if v is not None], [v for v in values if v is not None],
               width=width, label=row, color=colors(r % 20), edgecolor="black" if row in table.merge_rows else None,
               linewidth=0.6)
    for c, column in enumerate(columns):
        ref = table.value(CONVERGED, column)
        if ref is not None:
            ax.hlines(ref, c - 0.45, c + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(columns)), [_column_label(c) for c in columns], fontsize=8)
    metrics = sorted({c.metric.split(",")[0] for c in columns})
    ax.set_ylabel(f"score (%, {'/'.join(metrics)})")
    ax.set_title("Methods vs references (dashed: converged SFT)")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def arm_iteration_series(results: Sequence[Mapping[str, Any]]) -> dict[tuple, dict[str, list[tuple[int, float]]]]:
    """{(model, domain, split, task): {variant label: [(iterations, score %), ...]}} for ARM rows."""
    arm = [r for r in results if r.get("role") == "merge" and r.get("name") == ARM and (r.get("params") or {}).get("iterations")]
    flat = [flatten(r["params"]) for r in arm]
    keys = set().union(*flat) if flat else set()
    differing = sorted(k for k in keys if k != "iterations" and len({repr(f.get(k)) for f in flat}) > 1)
    series: dict[tuple, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for result, params in zip(arm, flat, strict=True):
        label = ", ".join(f"{k}={params.get(k)}" for k in differing) or ARM
        for task, cell in result["primary"].items():
            key = (result["model"], result["domain"], result["split"], task)
            series[key][label].append((int(params["iterations"]), 100.0 * float(cell["value"])))
    return {k: {label: sorted(set(points)) for label, points in v.items()} for k, v in series.items()}


def plot_arm_iterations(table: Table, results: Sequence[Mapping[str, Any]], out: Path) -> Path | None:
    """ARM's score against iteration T, one panel per benchmark column; None without ARM rows."""
    series = arm_iteration_series(results)
    if not series:
        return None
    plt = _pyplot()
    panels = sorted(series)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        model, domain, split, task = key
        for label, points in series[key].items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        column = next((c for c in table.columns if (c.model, c.domain, c.split, c.task) == key), None)
        if column is not None:
            ref = table.value(CONVERGED, column)
            if ref is not None:
                ax.axhline(ref, color="black", ls="--", lw=1, label="converged SFT")
            early = [table.value(r, column) for r in table.rows
                     if r not in table.merge_rows and r not in ("base", CONVERGED) and table.value(r, column) is not None]
            if early:
                ax.axhline(max(early), color="grey", ls=":", lw=1, label="best early SFT")
        ax.set_xlabel("ARM iterations T")
        ax.set_ylabel(f"{task} (%, {split})")
        ax.set_title(f"{model} · {domain}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_plots(table: Table, results: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    written = [plot_scores(table, out_dir / "scores.png")]
    arm_plot = plot_arm_iterations(table, results, out_dir / "arm_iterations.png")
    if arm_plot is not None:
        written.append(arm_plot)
    return written
