"""The comparison table: methods and references (rows) x benchmarks (columns), with the difference
to converged SFT.

    arm-table outputs/runs/make-run                # markdown to stdout
    arm-table outputs/runs/make-run --format csv --out table.csv
    arm-table outputs/runs/sweeps/paper_table --out-dir outputs/runs/sweeps/paper_table/table
        # table.md, table.csv, table.tex and the plots (scores.png, arm_iterations.png)
    arm-table outputs/runs/sweeps/paper_table --wandb arm-harness   # also log it as a W&B Table
    arm-table --from-wandb <entity>/arm-harness --group paper_table # rows from W&B runs (online)

Rows: base, the early SFT checkpoints, converged SFT, then each merge method. Columns: one per
(model, domain, task) with the task's headline metric in percent, grouped by model (smallest first)
and domain, each followed by "Δ SFT", the difference to converged SFT in percentage points (LaTeX:
in parentheses in the same cell). The best value of each column is in bold.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arm.core.errors import InputError
from evals.results import load_results

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
    merge_rows: set[str] = field(default_factory=set)

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
    """Merge rows are labelled by method; runs of one method with different params get the params
    that differ between them (e.g. `arm (iterations=4, schedule=cosine)`)."""
    labels: dict[int, str] = {}
    flat: dict[int, dict[str, Any]] = {i: flatten(r.get("params") or {}) for i, r in enumerate(results) if r["role"] == "merge"}
    variants: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for i, params in flat.items():
        for key in set().union(*(flat[j] for j in flat if results[j]["name"] == results[i]["name"])):
            variants[results[i]["name"]][key].add(repr(params.get(key)))
    for i in flat:
        name = results[i]["name"]
        differing = sorted(k for k, values in variants[name].items() if len(values) > 1)
        text = ", ".join(f"{k}={flat[i].get(k)}" for k in differing)
        labels[i] = f"{name} ({text})" if text else name
    return labels


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _params_text(params: Mapping[str, Any] | None) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={v}" for k, v in sorted(flatten(params).items()))


def model_size(name: str) -> float:
    """Parameters in a model name ('qwen3-1.7b' -> 1.7e9, 'tiny' -> 0) for ordering columns."""
    match = re.search(r"(\d+(?:\.\d+)?)\s*([kmbt])\b", name.lower())
    if not match:
        return 0.0
    return float(match.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2)]


def _order_columns(columns: list[Column]) -> list[Column]:
    """Grouped by model (smallest first), then domain, then task, each in order of appearance."""
    first: dict[tuple, int] = {}
    for i, c in enumerate(columns):
        first.setdefault(("model", c.model), i)
        first.setdefault(("domain", c.model, c.domain), i)
    return sorted(columns, key=lambda c: (model_size(c.model), first[("model", c.model)],
                                          first[("domain", c.model, c.domain)], columns.index(c)))


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
    sources: dict[tuple[str, Column], str] = {}  # the file each cell came from (errors name both of a conflict)
    for i, r in enumerate(results):
        if r["role"] == "merge":
            label = r.get("label") or merge_labels[i]
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
            value = 100.0 * float(cell["value"])
            if (label, column) in table.cells and table.cells[(label, column)] != value:

                first = sources.get((label, column), "<a result>")
                raise InputError(f"{first} and {r.get('_file', '<a result>')}: two different results for the same cell "
                                 f"(row '{label}', {column.model}/{column.domain}/{column.split} {task}): "
                                 f"{table.cells[(label, column)]:.4g} vs {value:.4g}; keep one of them")
            table.cells[(label, column)] = value
            sources.setdefault((label, column), r.get("_file", "<a result>"))
            table.n[column] = cell.get("n")
    table.rows = sorted(rows, key=lambda label: rows[label])
    table.columns[:] = _order_columns(columns)
    table.merge_rows = {label for label, rank in rows.items() if rank[0] == 3}
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


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _tex(text: str) -> str:
    return re.sub(r"[\\&%$#_{}~^]", lambda m: _TEX[m.group(0)], text)


def _spans(keys: list) -> list[tuple[Any, int, int]]:
    """Runs of equal consecutive keys: (key, first index, length)."""
    spans: list[tuple[Any, int, int]] = []
    for i, key in enumerate(keys):
        if spans and spans[-1][0] == key:
            spans[-1] = (key, spans[-1][1], spans[-1][2] + 1)
        else:
            spans.append((key, i, 1))
    return spans


def to_latex(table: Table) -> str:
    """A booktabs tabular: header rows model / domain / benchmark, cells `score (Δ SFT)`, best in bold."""
    show_split = len({c.split for c in table.columns}) > 1
    cols = table.columns
    lines = [
        "% arm-table: scores in percent on the " + "/".join(sorted({c.split for c in cols}))
        + " split; in parentheses: percentage points vs converged SFT; best per column in bold.",
        "% needs \\usepackage{booktabs}",
        r"\begin{tabular}{l" + "r" * len(cols) + "}",
        r"\toprule",
    ]
    for level in (lambda c: c.model, lambda c: (c.model, c.domain)):
        spans = _spans([level(c) for c in cols])
        cells = [rf"\multicolumn{{{n}}}{{c}}{{{_tex(key if isinstance(key, str) else key[1])}}}" for key, _, n in spans]
        lines.append(" & " + " & ".join(cells) + r" \\")
        lines.append(" ".join(rf"\cmidrule(lr){{{start + 2}-{start + n + 1}}}" for _, start, n in spans))
    titles = [f"{c.task} ({c.metric.split(',')[0]})" + (f" [{c.split}]" if show_split else "") for c in cols]
    lines.append("method & " + " & ".join(_tex(t) for t in titles) + r" \\")
    lines.append(r"\midrule")
    for i, row in enumerate(table.rows):
        if row in table.merge_rows and (i == 0 or table.rows[i - 1] not in table.merge_rows):
            lines.append(r"\midrule")
        cells = [_tex(row)]
        for column in cols:
            value = table.value(row, column)
            if value is None:
                cells.append("--")
                continue
            text = _fmt(value)
            if value == table.best(column):
                text = rf"\textbf{{{text}}}"
            delta = table.delta(row, column)
            if delta is not None:
                text += rf" {{\scriptsize ({_fmt(delta, signed=True)})}}"
            cells.append(text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


FORMATS = {"md": to_markdown, "csv": to_csv, "latex": to_latex}
SUFFIXES = {"md": "md", "csv": "csv", "latex": "tex"}


def load(paths: Sequence[Path], from_wandb: str | None = None, group: str | None = None) -> list[dict[str, Any]]:
    if from_wandb:
        results = load_wandb_results(from_wandb, group)
        if not results:
            raise InputError(f"no results in the W&B runs of {from_wandb}" + (f" (group {group})" if group else ""))
        return results

    results = load_results(paths)
    if not results:
        raise InputError(f"no results.json found under {', '.join(map(str, paths))}")
    return results


def render(paths: Iterable[Path], fmt: str = "md") -> str:
    return FORMATS[fmt](build_table(load(list(paths))))


def results_from_summary(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The results a run's W&B summary holds (`results/<name>`, written by arm.run.tracking)."""
    out = []
    for key, value in summary.items():
        if key.startswith("results/") and isinstance(_plain(value), dict):
            result = _plain(value)
            if {"name", "role", "model", "domain", "split", "primary"} <= set(result):
                out.append(result)
    return out


def _plain(value: Any) -> Any:
    """Plain dicts and lists from W&B's summary objects (looked up on the type: their attribute
    access raises KeyError)."""
    if callable(getattr(type(value), "keys", None)) and callable(getattr(type(value), "__getitem__", None)):
        return {k: _plain(value[k]) for k in value.keys()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def load_wandb_results(project: str, group: str | None = None) -> list[dict[str, Any]]:
    """Results of every run in a W&B project (`entity/project`), optionally one group (sweep); needs
    network access and a W&B login. Copies of one evaluation count once."""
    import wandb

    api = wandb.Api()
    runs = api.runs(project, filters={"group": group} if group else None)
    seen: set[str] = set()
    results: list[dict[str, Any]] = []
    for run in runs:
        for result in results_from_summary(run.summary):
            key = result.get("cache_key") or f"{run.id}/{result['name']}"
            if key not in seen:
                seen.add(key)
                result["_file"] = f"wandb:{run.path}"
                results.append(result)
    return results
