"""The comparison table over SFT seeds: every cell is the mean with its range (min-max) over seeds.

    python -m evals.spread outputs/runs/spread --out outputs/runs/spread/table.md --json outputs/runs/spread/spread.json

Results are grouped by the job's `seed` (each results.json records its config); one ordinary table
(evals.table.build_table) is built per seed, and each (row, column) cell collects its values over the
seeds. Δ SFT is computed within each seed (a row minus that seed's converged SFT) and then summarised,
so the range of a difference is the range of paired differences, not the difference of two ranges.
A cell present for fewer seeds than its column shows how many it has. A headline number is a mean
with its range: bit-for-bit equality across machines is not expected (docs/trajectory.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arm.core.errors import ArmError
from evals.table import CONVERGED, Column, Table, build_table, load


@dataclass
class Spread:
    """Per (row, column): the values over seeds (in seed order), and the paired Δ SFT values."""

    seeds: list[int]
    columns: list[Column]
    rows: list[str]
    values: dict[tuple[str, Column], dict[int, float]] = field(default_factory=dict)
    deltas: dict[tuple[str, Column], dict[int, float]] = field(default_factory=dict)
    n: dict[Column, Any] = field(default_factory=dict)

    def summary(self, row: str, column: Column, which: str = "values") -> dict[str, float] | None:
        by_seed = (self.values if which == "values" else self.deltas).get((row, column))
        if not by_seed:
            return None
        xs = list(by_seed.values())
        return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "n_seeds": len(xs),
                "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0}


def seed_of(result: Mapping[str, Any]) -> int:
    config = result.get("config") or {}
    seed = config.get("seed", 0)
    try:
        return int(seed)
    except (TypeError, ValueError):
        raise ValueError(f"result {result.get('name')!r} has a non-integer seed {seed!r}") from None


def build_spread(results: Sequence[Mapping[str, Any]]) -> Spread:
    by_seed: dict[int, list[Mapping[str, Any]]] = {}
    for r in results:
        by_seed.setdefault(seed_of(r), []).append(r)
    seeds = sorted(by_seed)
    tables: dict[int, Table] = {s: build_table(by_seed[s]) for s in seeds}
    columns: list[Column] = []
    spread = Spread(seeds=seeds, columns=columns, rows=[])
    for s in seeds:
        table = tables[s]
        for c in table.columns:
            if c not in columns:
                columns.append(c)
            spread.n.setdefault(c, table.n.get(c))
        for row in table.rows:
            for c in table.columns:
                value = table.value(row, c)
                if value is not None:
                    spread.values.setdefault((row, c), {})[s] = value
                delta = table.delta(row, c)
                if delta is not None:
                    spread.deltas.setdefault((row, c), {})[s] = delta
    # rows in table order (base, early, converged, methods): each seed's table is ordered; a row that only
    # a later seed has keeps its place after the rows it follows there
    order: list[str] = []
    for s in seeds:
        for i, row in enumerate(tables[s].rows):
            if row not in order:
                before = tables[s].rows[:i]
                at = max((order.index(r) + 1 for r in before if r in order), default=0)
                order.insert(at, row)
    spread.rows[:] = order
    return spread


def _cell(summary: dict[str, float] | None, n_expected: int, signed: bool = False) -> str:
    if summary is None:
        return ""
    fmt = "{:+.1f}" if signed else "{:.1f}"
    text = fmt.format(summary["mean"])
    if summary["n_seeds"] > 1:
        text += f" [{fmt.format(summary['min'])}, {fmt.format(summary['max'])}]"
    if summary["n_seeds"] != n_expected:
        text += f" ({summary['n_seeds']} seeds)"
    return text


def to_markdown(spread: Spread) -> str:
    header = ["method"]
    for c in spread.columns:
        header += [f"{c.model} · {c.task} ({c.metric.split(',')[0]})", "Δ SFT"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    k = len(spread.seeds)
    best = {c: max((spread.summary(r, c)["mean"] for r in spread.rows if spread.summary(r, c)), default=None)
            for c in spread.columns}
    for row in spread.rows:
        cells = [row]
        for c in spread.columns:
            s = spread.summary(row, c)
            text = _cell(s, k)
            if s is not None and best[c] is not None and s["mean"] == best[c]:
                text = f"**{text}**"
            cells += [text, "" if row == CONVERGED else _cell(spread.summary(row, c, "deltas"), k, signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    splits = sorted({c.split for c in spread.columns})
    lines += [
        "",
        f"Mean [min, max] over {k} SFT seed(s) {spread.seeds} (the pretrained base is shared); scores in percent on the "
        + "/".join(splits) + " split; Δ SFT: percentage points vs the same seed's converged SFT; best mean per column in bold.",
        "n per column: " + ", ".join(f"{c.model}·{c.task}={spread.n.get(c)}" for c in spread.columns),
    ]
    return "\n".join(lines) + "\n"


def to_json(spread: Spread) -> dict[str, Any]:
    cells = []
    for row in spread.rows:
        for c in spread.columns:
            s = spread.summary(row, c)
            if s is None:
                continue
            cells.append({"row": row, "model": c.model, "domain": c.domain, "split": c.split, "task": c.task,
                          "metric": c.metric, **{k: round(v, 4) for k, v in s.items() if k != "n_seeds"},
                          "n_seeds": s["n_seeds"], "by_seed": {str(k): round(v, 4) for k, v in spread.values[(row, c)].items()},
                          "delta_vs_sft": spread.summary(row, c, "deltas")})
    return {"seeds": spread.seeds, "cells": cells}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.spread", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="folders (searched recursively) or results.json files")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (default: stdout only)")
    parser.add_argument("--json", type=Path, default=None, help="also write mean/min/max per cell as JSON")
    args = parser.parse_args(argv)
    try:
        spread = build_spread(load(args.paths))
    except (ArmError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = to_markdown(spread)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(spread), indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
