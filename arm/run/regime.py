"""arm-regime: where does a merge beat the final SFT model? Schedule × checkpoint position × method.

    arm-regime                                          # conf/tuning/regime.yaml -> outputs/runs/regime
    arm-regime --schedules constant --positions late --rows lawa,ema,wsm   # the positive control alone
    arm-regime --spec conf/tuning/regime.yaml --out DIR [hydra overrides ...]

For every cell (domain, SFT schedule, position of the merge inputs on that run, method):
  select  the method's grid on the validation split of SFT seed `seeds[0]`; the best point is kept (a tie
          keeps the first point in grid order) and written to selected.json. Window sizes larger than the
          position's inputs are skipped.
  test    then the chosen point on the test split for every seed of `seeds`, next to the same run's last checkpoint
          (`last`: the SFT model that the schedule ends at) and the last checkpoint of the same seed's
          `reference_schedule` run (`converged`: cosine-decayed SFT, the paper's bar).
Cells run one after the other (per domain: each position, in the spec's order, for every schedule), and the tables are rewritten after each: a run stopped
part-way leaves its finished cells summarised. Every job is an ordinary `arm` job, cached by content: a rerun,
or a wider run after a narrower one, redoes nothing that finished. A cell's test split is read only after its
choice is written down (selected.json).

Writes to --out: validation.csv, selected.json, cells.csv (one row per cell and seed: scores and paired Δ),
regime.json, regime.md (Δ vs last and Δ vs converged, mean [min, max] over the seeds, and how many seeds
are above 0) and regime.png (heatmaps of the mean Δs).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arm.core.errors import ArmError, InputError
from arm.core.paths import CONF_DIR
from arm.run.job import validate
from arm.run.tune import (
    Runner,
    _write_csv,
    grid_points,
    load_spec,
    merge_overrides,
    merged_score,
    params_text,
    slug,
)

log = logging.getLogger("arm.run.regime")
DEFAULT_SPEC = CONF_DIR / "tuning" / "regime.yaml"
SCHEDULES = ("cosine", "constant", "wsd", "linear")


# ---------------------------------------------------------------------------------------------
# the spec


def load_regime_spec(path: Path) -> dict[str, Any]:
    """A tuning spec (arm/run/tune.py: domains, seeds, overrides, rows) plus `schedules`,
    `reference_schedule` and `positions` (per domain: name -> list of checkpoint steps)."""
    spec = load_spec(path)
    schedules = spec.get("schedules")
    if not isinstance(schedules, list) or not schedules or any(s not in SCHEDULES for s in schedules):
        raise InputError(f"{path}: key 'schedules' must be a non-empty list of {', '.join(SCHEDULES)}")
    ref = spec.setdefault("reference_schedule", "cosine")
    if ref not in SCHEDULES:
        raise InputError(f"{path}: key 'reference_schedule' must be one of {', '.join(SCHEDULES)}")
    positions = spec.get("positions")
    if not isinstance(positions, dict):
        raise InputError(f"{path}: key 'positions' must map each domain to {{position: [steps]}}")
    names = None
    for domain in spec["domains"]:
        block = positions.get(domain)
        if not isinstance(block, dict) or not block:
            raise InputError(f"{path}: key 'positions.{domain}' must map position names to lists of checkpoint steps")
        for name, steps in block.items():
            if (not isinstance(steps, list) or not steps or any(isinstance(s, bool) or not isinstance(s, int) for s in steps)
                    or steps != sorted(set(steps))):
                raise InputError(f"{path}: key 'positions.{domain}.{name}' must be increasing checkpoint steps")
        if names is not None and list(block) != names:
            raise InputError(f"{path}: key 'positions.{domain}' must name the same positions as the other domains ({names})")
        names = list(block)
    return spec


def filter_spec(spec: dict[str, Any], *, schedules: str | None, positions: str | None, rows: str | None,
                domains: str | None) -> dict[str, Any]:
    """The spec restricted to the named schedules, positions, rows and domains (comma-separated)."""

    def pick(given: str | None, known: Sequence[str], what: str) -> list[str]:
        if not given:
            return list(known)
        chosen = [x.strip() for x in given.split(",") if x.strip()]
        unknown = [x for x in chosen if x not in known]
        if unknown or not chosen:
            raise InputError(f"--{what}: unknown {what} {unknown or chosen} (the spec has: {', '.join(known)})")
        return [x for x in known if x in chosen]

    out = dict(spec)
    out["schedules"] = pick(schedules, spec["schedules"], "schedules")
    out["domains"] = pick(domains, spec["domains"], "domains")
    first = spec["positions"][spec["domains"][0]]
    keep = pick(positions, list(first), "positions")
    out["positions"] = {d: {p: spec["positions"][d][p] for p in keep} for d in out["domains"]}
    keep_rows = pick(rows, list(spec["rows"]), "rows")
    out["rows"] = {r: spec["rows"][r] for r in keep_rows}
    return out


def cell_points(row: Mapping[str, Any], n_inputs: int) -> list[dict[str, Any]]:
    """The row's grid points that fit a position of `n_inputs` checkpoints (window ≤ n_inputs)."""
    return [p for p in grid_points(row) if not isinstance(p.get("window"), int) or p["window"] <= n_inputs]


def job_overrides(domain: str, schedule: str, steps: Sequence[int], seed: int, split: str) -> list[str]:
    return [f"domain={domain}", f"seed={seed}", f"model.sft.schedule={schedule}", f"trajectory.early_steps={json.dumps(list(steps))}",
            f"eval.split={split}", "references.base=false", "references.early=false"]


def converged_score(results: Sequence[Mapping[str, Any]]) -> float:
    for r in results:
        if r["role"] == "reference" and r["name"] == "sft_converged":
            cells = list(r["primary"].values())
            return sum(float(c["value"]) for c in cells) / len(cells)
    raise InputError("the job reported no sft_converged row (references.converged must stay true)")


# ---------------------------------------------------------------------------------------------
# stages


def select_cell(spec: Mapping[str, Any], runner: Runner, domain: str, schedule: str, position: str, label: str,
                rows_out: list[dict[str, Any]]) -> dict[str, Any]:
    """The row's grid on the validation split of the first seed; the best point (a tie keeps the first)."""
    steps, row = spec["positions"][domain][position], spec["rows"][label]
    points = cell_points(row, len(steps))
    if not points:
        raise InputError(f"rows.{label}: no grid point fits the {len(steps)} inputs of position {position!r}")
    best: tuple[float, int, dict[str, Any]] | None = None
    for i, params in enumerate(points):
        run_dir = runner.out / "select" / domain / schedule / position / slug(label) / f"{i:03d}"
        overrides = [*job_overrides(domain, schedule, steps, spec["seeds"][0], "validation"), "logger=none",
                     f"label={json.dumps(label)}", *merge_overrides(row["merge"], params)]
        score, _ = merged_score(runner.run(run_dir, overrides))
        rows_out.append({"domain": domain, "schedule": schedule, "position": position, "row": label,
                         "point": i, "params": json.dumps(params), "validation": round(score, 6)})
        if best is None or score > best[0]:
            best = (score, i, params)
    assert best is not None
    return {"merge": row["merge"], "params": best[2], "validation": best[0], "point": best[1], "grid_size": len(points)}


def test_cell(spec: Mapping[str, Any], runner: Runner, domain: str, schedule: str, position: str, label: str,
              choice: Mapping[str, Any], converged: Mapping[int, float]) -> list[dict[str, Any]]:
    """The chosen point on the test split of every seed, paired with the run's last checkpoint."""
    steps = spec["positions"][domain][position]
    cells = []
    for seed in spec["seeds"]:
        run_dir = runner.out / "test" / f"seed-{seed}" / domain / schedule / position / slug(label)
        overrides = [*job_overrides(domain, schedule, steps, seed, "test"), "logger=none",
                     f"label={json.dumps(label)}", *merge_overrides(choice["merge"], choice["params"])]
        results = runner.run(run_dir, overrides)
        score, merged = merged_score(results)
        last = converged_score(results)
        effect = rotation_effect(Path(merged["model_path"]))
        cells.append({"seed": seed, "domain": domain, "schedule": schedule, "position": position,
                      "steps": json.dumps(list(steps)), "row": label, "params": json.dumps(choice["params"]),
                      "score": round(score, 6), "last": round(last, 6), "converged": round(converged[seed], 6),
                      "delta_last": round(score - last, 6), "delta_converged": round(score - converged[seed], 6),
                      "rotation_effect": effect})
    return cells


def rotation_effect(model_path: Path) -> float | None:
    """ARM's rotation effect at its selected iterate (diagnostics.json; docs/method.md §8, §10), else None."""
    path = model_path / "diagnostics.json"
    if not path.is_file():
        return None
    diagnostics = json.loads(path.read_text())
    history = {h.get("iteration"): h for h in diagnostics.get("history", [])}
    entry = history.get(diagnostics.get("selected_iteration")) or (diagnostics.get("history") or [{}])[-1]
    value = entry.get("rotation_effect")
    return None if value is None else round(float(value), 6)


def run_map(spec: Mapping[str, Any], runner: Runner, stages: Sequence[str]) -> list[dict[str, Any]]:
    """Cell by cell (domain, position, schedule, row, in the spec's order): select on validation, write the choice
    down (selected.json), then test it on every seed; the tables are rewritten after every cell, so a run stopped
    part-way leaves every finished cell summarised (and a rerun redoes none of it: every job is cached)."""
    out = runner.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / "selected.json"
    selected: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    rows_out: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    for domain in spec["domains"]:
        converged: dict[int, float] = {}
        if "test" in stages:
            first_steps = next(iter(spec["positions"][domain].values()))
            for seed in spec["seeds"]:
                ref_dir = out / "test" / f"seed-{seed}" / domain / f"reference-{spec['reference_schedule']}"
                converged[seed] = converged_score(runner.run(ref_dir, [*job_overrides(
                    domain, spec["reference_schedule"], first_steps, seed, "test"), "logger=none", "merge=none"]))
        for position in spec["positions"][domain]:  # position-major: the late window of every schedule first
            for schedule in spec["schedules"]:
                for label in spec["rows"]:
                    cell = selected.setdefault(domain, {}).setdefault(schedule, {}).setdefault(position, {})
                    if "select" in stages:
                        cell[label] = select_cell(spec, runner, domain, schedule, position, label, rows_out)
                        _write_csv(out / "validation.csv", rows_out)
                        path.write_text(json.dumps(selected, indent=2) + "\n")  # the choice, before any test
                    elif label not in cell:
                        raise InputError(f"{path}: no choice for {domain}/{schedule}/{position}/{label}; run 'select'")
                    if "test" in stages:
                        cells += test_cell(spec, runner, domain, schedule, position, label, cell[label], converged)
                        write_summary(spec, cells, out)
    return cells


# ---------------------------------------------------------------------------------------------
# summary


def summarize(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (domain, schedule, position, row): mean [min, max] over seeds of the score and both Δs."""
    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["domain"], c["schedule"], c["position"], c["row"]), []).append(c)
    out = []
    for (domain, schedule, position, row), items in groups.items():
        entry: dict[str, Any] = {"domain": domain, "schedule": schedule, "position": position, "row": row,
                                 "seeds": [c["seed"] for c in items], "params": items[0]["params"], "steps": items[0]["steps"]}
        for key in ("score", "last", "converged", "delta_last", "delta_converged"):
            values = [100 * float(c[key]) for c in items]
            entry[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        effects = [float(c["rotation_effect"]) for c in items if c.get("rotation_effect") not in (None, "")]
        if effects:  # ARM rows: ‖θ − θ_straight‖ / ‖θ_straight − c‖ (θ_straight: ExPO, or the average for stream)
            entry["rotation_effect"] = {"mean": statistics.fmean(effects), "min": min(effects), "max": max(effects)}
        entry["above_last"] = sum(float(c["delta_last"]) > 0 for c in items)
        entry["above_converged"] = sum(float(c["delta_converged"]) > 0 for c in items)
        out.append(entry)
    return out


def write_summary(spec: Mapping[str, Any], cells: Sequence[Mapping[str, Any]], out: Path) -> list[dict[str, Any]]:
    """cells.csv, regime.json, regime.md and regime.png from the cells tested so far."""
    summary = summarize(cells)
    _write_csv(out / "cells.csv", cells)
    keep = ("domains", "seeds", "schedules", "positions", "reference_schedule")
    (out / "regime.json").write_text(json.dumps({"spec": {k: spec[k] for k in keep}, "summary": summary}, indent=2) + "\n")
    (out / "regime.md").write_text(to_markdown(summary, spec))
    plot(summary, spec, out / "regime.png")
    return summary


def spread(v: Mapping[str, float], signed: bool = True) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(v['mean'])} [{f.format(v['min'])}, {f.format(v['max'])}]"


def to_markdown(summary: Sequence[Mapping[str, Any]], spec: Mapping[str, Any]) -> str:
    n = len(spec["seeds"])
    lines = [f"Test split, %, mean [min, max] over SFT seeds {', '.join(map(str, spec['seeds']))}; each method at the point "
             f"chosen on the validation split of seed {spec['seeds'][0]}. Δ last: the merge minus the same run's last "
             f"checkpoint (paired per seed); Δ converged: minus the same seed's {spec['reference_schedule']}-schedule "
             f"converged SFT. ↑k: seeds (of {n}) above 0.", ""]
    for domain in spec["domains"]:
        lines += [f"### {domain}", "", "| schedule | position (steps) | method | chosen | score | last | Δ last | ↑ | Δ converged | ↑ |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for e in summary:
            if e["domain"] != domain:
                continue
            params = json.loads(e["params"])
            fixed = spec["rows"].get(e["row"], {}).get("fixed", {})
            shown = params_text({k: v for k, v in params.items() if k not in fixed})
            steps = json.loads(e["steps"])
            where = f"{e['position']} ({steps[0]}–{steps[-1]}, {len(steps)})"
            lines.append(f"| {e['schedule']} | {where} | {e['row']} | {shown} | {spread(e['score'], False)} | "
                         f"{spread(e['last'], False)} | {spread(e['delta_last'])} | {e['above_last']} | "
                         f"{spread(e['delta_converged'])} | {e['above_converged']} |")
        effects = [e for e in summary if e["domain"] == domain and e.get("rotation_effect")]
        if effects:
            lines += ["", "Rotation effect of the ARM rows at the chosen point, mean [min, max] over the seeds (‖θ − θ_s‖ / "
                      "‖θ_s − c‖, θ_s the same step unrotated: ExPO's, or the average for `formulation: stream`): "
                      + "; ".join(f"{e['schedule']}/{e['position']} {e['row']} {e['rotation_effect']['mean']:.3f} "
                                  f"[{e['rotation_effect']['min']:.3f}, {e['rotation_effect']['max']:.3f}]" for e in effects) + "."]
        conv = next((e["converged"] for e in summary if e["domain"] == domain), None)
        if conv:
            lines += ["", f"{spec['reference_schedule']}-converged SFT: {spread(conv, False)}."]
        lines.append("")
    return "\n".join(lines)


def plot(summary: Sequence[Mapping[str, Any]], spec: Mapping[str, Any], out: Path) -> Path | None:
    """Heatmaps of the mean Δ: one row of panels per domain, Δ last and Δ converged; method × (schedule, position)."""
    if not summary:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains = [d for d in spec["domains"] if any(e["domain"] == d for e in summary)]
    methods = list(spec["rows"])
    columns = [(s, p) for s in spec["schedules"] for p in next(iter(spec["positions"].values()))]
    fig, axes = plt.subplots(2 * len(domains), 1, figsize=(0.9 * len(columns) + 3.2, (0.42 * len(methods) + 1.3) * 2 * len(domains)),
                             squeeze=False)
    for i, domain in enumerate(domains):
        for j, (key, title) in enumerate((("delta_last", "Δ vs the run's last checkpoint"),
                                          ("delta_converged", f"Δ vs {spec['reference_schedule']}-converged SFT"))):
            grid = np.full((len(methods), len(columns)), np.nan)
            marks = {}
            for e in summary:
                if e["domain"] == domain and e["row"] in methods and (e["schedule"], e["position"]) in columns:
                    r, c = methods.index(e["row"]), columns.index((e["schedule"], e["position"]))
                    grid[r, c] = e[key]["mean"]
                    marks[(r, c)] = e[key]
            ax = axes[2 * i + j][0]
            bound = max(1.0, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
            ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
            for (r, c), v in marks.items():
                robust = v["min"] > 0 or v["max"] < 0  # every seed on one side of 0
                ax.text(c, r, f"{v['mean']:+.1f}" + ("" if robust else "?"), ha="center", va="center", fontsize=8,
                        fontweight="bold" if robust else "normal",
                        color="white" if abs(v["mean"]) > 0.6 * bound else "black")
            ax.set_xticks(range(len(columns)), [f"{s}\n{p}" for s, p in columns], fontsize=7)
            ax.set_yticks(range(len(methods)), methods, fontsize=7)
            ax.set_title(f"{domain}: {title}", fontsize=9)
    fig.text(0.01, 0.005, "mean over seeds, points; bold: every seed on the same side of 0; '?': the seeds disagree in sign",
             fontsize=7)
    fig.tight_layout(rect=(0, 0.015, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# entry point


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arm-regime", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="regime spec (default: conf/tuning/regime.yaml)")
    parser.add_argument("--out", type=Path, default=Path("outputs/runs/regime"), help="output folder")
    parser.add_argument("--schedules", default=None, help="comma-separated subset of the spec's schedules")
    parser.add_argument("--positions", default=None, help="comma-separated subset of the spec's positions")
    parser.add_argument("--rows", default=None, help="comma-separated subset of the spec's rows (methods)")
    parser.add_argument("--domains", default=None, help="comma-separated subset of the spec's domains")
    parser.add_argument("--stages", default="select,test", help="select,test (test alone reads <out>/selected.json)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job (after the spec's own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        if not stages or any(s not in ("select", "test") for s in stages):
            raise InputError(f"--stages: expected select and/or test, got {args.stages!r}")
        spec = filter_spec(load_regime_spec(args.spec), schedules=args.schedules, positions=args.positions,
                           rows=args.rows, domains=args.domains)
        out = args.out.resolve()
        runner = Runner(out, [*spec["overrides"], *args.overrides])
        for domain in spec["domains"]:  # every job's config is checked before the first one runs
            for schedule in spec["schedules"]:
                for position, steps in spec["positions"][domain].items():
                    for label, row in spec["rows"].items():
                        for params in cell_points(row, len(steps)):
                            try:
                                validate(runner.compose([*job_overrides(domain, schedule, steps, spec["seeds"][0], "validation"),
                                                         *merge_overrides(row["merge"], params)]))
                            except Exception as exc:  # noqa: BLE001 - Hydra's composition errors and ours
                                raise InputError(f"{args.spec}: rows.{label} at {schedule}/{position}: {exc}") from exc
        run_map(spec, runner, stages)
        if "test" in stages:
            print((out / "regime.md").read_text())
            print(f"cells: {out / 'cells.csv'}\nheatmap: {out / 'regime.png'}\nselected: {out / 'selected.json'}")
    except ArmError as exc:
        print(f"arm-regime: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
