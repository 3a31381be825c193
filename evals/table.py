"""The comparison table: methods and references (rows) x benchmarks (columns), with the difference
to converged SFT.

    arm-table outputs/runs/make-run                # markdown to stdout
    arm-table outputs/runs/make-run --format csv --out table.csv

Rows: base, the early SFT checkpoints, converged SFT, then each merge method. Columns: one per
(model, domain, task) with the task's headline metric in percent, each followed by "Δ SFT", the
difference to converged SFT in percentage points. The best value of each column is in bold.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE = "base"
CONVERGED = "sft_converged"
METHOD_ORDER = ["linear", "task_arithmetic", "ties", "expo", "dare"]


@dataclass(frozen=True)
class Column:
    model: str
    domain: str
    split: str
    task: str
    metric: str

    def title(self, show_split: bool) -> str:
        metric = self.metric.split(",")[0]
        text = f"{self.model} · {self.task} ({metric})"
        return f"{text} [{self.split}]" if show_split else text


@dataclass
class Table:
    columns: list[Column]
    rows: list[str]
    cells: dict[tuple[str, Column], float] = field(default_factory=dict)
    n: dict[Column, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def value(self, row: str, column: Column) -> float | None:
        return self.cells.get((row, column))

    def delta(self, row: str, column: Column) -> float | None:
        value, ref = self.value(row, column), self.value(CONVERGED, column)
        if value is None or ref is None or row == CONVERGED:
            return None
        return value - ref

    def best(self, column: Column) -> float | None:
        values = [v for (r, c), v in self.cells.items() if c == column]
        return max(values) if values else None


def _row_rank(label: str, role: str, step: int | None) -> tuple:
    if label == BASE:
        return (0, 0, "")
    if role == "reference" and label != CONVERGED:
        return (1, step or 0, label)
    if label == CONVERGED:
        return (2, 0, "")
    method = label.split(" ")[0]
    order = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (3, order, label)


def _merge_labels(results: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Merge rows are labelled by method; runs of one method with different params get the params."""
    labels: dict[int, str] = {}
    by_group: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        if r["role"] == "merge":
            by_group[(r["model"], r["domain"], r["split"], r["name"])].append(i)
    variants: dict[str, set] = defaultdict(set)
    for (_, _, _, name), idx in by_group.items():
        for i in idx:
            variants[name].add(_params_text(results[i].get("params")))
    for i, r in enumerate(results):
        if r["role"] != "merge":
            continue
        name = r["name"]
        labels[i] = name if len(variants[name]) <= 1 else f"{name} ({_params_text(r.get('params'))})"
    return labels


def _params_text(params: Mapping[str, Any] | None) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()))


def build_table(results: Sequence[Mapping[str, Any]]) -> Table:
    """Pivot results into a Table (no I/O)."""
    merge_labels = _merge_labels(results)
    # Early checkpoints: label by step when every column group uses the same steps, else by rank.
    early_steps: dict[tuple, list[int]] = defaultdict(list)
    for r in results:
        if r["role"] == "reference" and r["name"] not in (BASE, CONVERGED):
            early_steps[(r["model"], r["domain"], r["split"])].append(int(r["step"]))
    step_sets = {tuple(sorted(set(v))) for v in early_steps.values()}
    by_rank = len(step_sets) > 1
    notes = []
    if by_rank:
        for (model, domain, _split), steps in sorted(early_steps.items()):
            notes.append(f"{model}/{domain}: early checkpoints at steps {sorted(set(steps))}")

    columns: list[Column] = []
    rows: dict[str, tuple] = {}
    table = Table(columns=columns, rows=[], notes=notes)
    for i, r in enumerate(results):
        if r["role"] == "merge":
            label = merge_labels[i]
        elif r["name"] in (BASE, CONVERGED) or not by_rank:
            label = r["name"]
        else:
            steps = sorted(set(early_steps[(r["model"], r["domain"], r["split"])]))
            label = f"sft early {steps.index(int(r['step'])) + 1}"
        rows.setdefault(label, _row_rank(label, r["role"], r.get("step")))
        for task, cell in r["primary"].items():
            column = Column(r["model"], r["domain"], r["split"], task, cell["metric"])
            if column not in columns:
                columns.append(column)
            table.cells[(label, column)] = 100.0 * float(cell["value"])
            table.n[column] = cell.get("n")
    table.rows = sorted(rows, key=lambda label: rows[label])
    return table


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def to_markdown(table: Table) -> str:
    show_split = len({c.split for c in table.columns}) > 1
    header = ["method"]
    for column in table.columns:
        header += [column.title(show_split), "Δ SFT"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in table.rows:
        cells = [row]
        for column in table.columns:
            value = table.value(row, column)
            text = _fmt(value)
            if value is not None and value == table.best(column):
                text = f"**{text}**"
            cells += [text, _fmt(table.delta(row, column), signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    splits = sorted({c.split for c in table.columns})
    footer = [
        "",
        "Scores in percent on the " + "/".join(splits) + " split; Δ SFT: percentage points vs converged SFT; best per column in bold.",
        "n per column: " + ", ".join(f"{c.model}·{c.task}={table.n.get(c)}" for c in table.columns),
    ]
    footer += table.notes
    return "\n".join(lines + footer) + "\n"


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "model", "domain", "split", "task", "metric", "value", "delta_vs_sft", "n"])
    for row in table.rows:
        for column in table.columns:
            value = table.value(row, column)
            if value is None:
                continue
            delta = table.delta(row, column)
            writer.writerow(
                [row, column.model, column.domain, column.split, column.task, column.metric, f"{value:.4f}",
                 "" if delta is None else f"{delta:.4f}", table.n.get(column)]
            )
    return buffer.getvalue()


FORMATS = {"md": to_markdown, "csv": to_csv}


def render(paths: Iterable[Path], fmt: str = "md") -> str:
    from evals.results import load_results

    results = load_results(paths)
    if not results:
        from arm.errors import InputError

        raise InputError(f"no results.json found under {', '.join(map(str, paths))}")
    return FORMATS[fmt](build_table(results))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arm-table", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="results.json files or folders searched for them")
    parser.add_argument("--format", choices=sorted(FORMATS), default="md")
    parser.add_argument("--out", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    from arm.errors import ArmError

    try:
        text = render(args.paths, args.format)
    except ArmError as exc:
        print(f"arm-table: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        from arm.cache import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
