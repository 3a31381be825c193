"""arm-tune: choose every method's hyperparameters on the validation split, then test the choice.

    arm-tune                                     # conf/tuning/embedded.yaml -> outputs/runs/headline
    arm-tune --spec conf/tuning/embedded.yaml --out outputs/runs/headline [hydra overrides ...]
    arm-tune --stages select,test                # skip the ablations

Stages, each a list of ordinary `arm` jobs run one after the other in this process (every stage's
merges and evaluations are cached, so a rerun or a resumed run redoes nothing that finished):
  select     every row's grid on the validation split; the best point is kept (a tie keeps the first
             point in grid order). Writes <out>/validation.csv and <out>/selected.json.
  ablations  one factor at a time around each domain's chosen point of `ablations.base`, on the
             validation split. Writes <out>/ablations.csv and <out>/ablations.md.
  test       each row's chosen point, plus base, early and converged SFT, on the test split, each
             merge labelled with its row name, once per SFT seed of the spec's `seeds:` (the chosen
             point re-evaluated per seed; selection and ablations use the first seed only). Writes
             <out>/table/ (table.md, .csv, .tex, plots: the first seed), <out>/spread.md + spread.json
             (every cell as mean [min, max] over the seeds) and <out>/fidelity.json + fidelity.png
             (ARM rows, first seed: how θ − c_m lines up with c* − c_m).

The test split is read only by the `test` stage, after the choice is written down.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arm.core.errors import ArmError, InputError
from arm.core.paths import CONF_DIR, read_config
from arm.run.job import run_job, validate
from evals.report import write_outputs
from evals.results import load_results
from evals.spread import build_spread, to_json
from evals.spread import to_markdown as spread_markdown
from evals.table import build_table

log = logging.getLogger("arm.run.tune")
CONFIG_DIR = CONF_DIR
DEFAULT_SPEC = CONFIG_DIR / "tuning" / "embedded.yaml"
STAGES = ("select", "ablations", "test")


# ---------------------------------------------------------------------------------------------
# the spec


def load_spec(path: Path) -> dict[str, Any]:
    """Read and check a tuning spec (conf/tuning/*.yaml); errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: tuning spec not found")
    spec = read_config(path)  # errors name the file
    domains = spec.get("domains")
    if not isinstance(domains, list) or not domains or not all(isinstance(d, str) for d in domains):
        raise InputError(f"{path}: key 'domains' must be a non-empty list of domain names")
    seeds = spec.setdefault("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) \
            or len(set(seeds)) != len(seeds):
        raise InputError(f"{path}: key 'seeds' must be a non-empty list of distinct integers (SFT seeds)")
    overrides = spec.setdefault("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise InputError(f"{path}: key 'overrides' must be a list of Hydra override strings")
    rows = spec.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise InputError(f"{path}: key 'rows' must map row labels to {{merge, fixed, grid}}")
    for label, row in rows.items():
        if not isinstance(row, dict) or not isinstance(row.get("merge"), str):
            raise InputError(f"{path}: key 'rows.{label}.merge' must name a merge method")
        for part in ("fixed", "grid"):
            row[part] = row.get(part) or {}
            if not isinstance(row[part], dict):
                raise InputError(f"{path}: key 'rows.{label}.{part}' must be a mapping")
        for key, values in row["grid"].items():
            if not isinstance(values, list) or not values:
                raise InputError(f"{path}: key 'rows.{label}.grid.{key}' must be a non-empty list")
    ablations = spec.get("ablations")
    if ablations:
        if ablations.get("base") not in rows:
            raise InputError(f"{path}: key 'ablations.base' must be one of the rows ({', '.join(rows)})")
        variations = ablations.get("variations")
        if not isinstance(variations, list) or not all(isinstance(v, dict) and v for v in variations):
            raise InputError(f"{path}: key 'ablations.variations' must be a list of non-empty mappings")
    return spec


def grid_points(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The row's grid as a list of parameter dicts (fixed values included), in grid order."""
    keys = list(row["grid"])
    points = []
    for values in itertools.product(*(row["grid"][k] for k in keys)):
        points.append({**row["fixed"], **dict(zip(keys, values, strict=True))})
    return points


def merge_overrides(method: str, params: Mapping[str, Any]) -> list[str]:
    return [f"merge={method}"] + [f"merge.{k}={json.dumps(v)}" for k, v in params.items()]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")


def params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "(defaults)"


# ---------------------------------------------------------------------------------------------
# running jobs


class Runner:
    """Composes the `arm` config for each job and runs it in this process."""

    def __init__(self, out: Path, overrides: Sequence[str]):
        self.out = out
        self.overrides = list(overrides)

    def compose(self, overrides: Sequence[str]) -> Any:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=[*self.overrides, *overrides])

    def run(self, run_dir: Path, overrides: Sequence[str]) -> list[dict[str, Any]]:
        cfg = self.compose(overrides)
        log.info("job %s: %s", run_dir.relative_to(self.out), " ".join(overrides))
        return run_job(cfg, run_dir=run_dir)["results"]


def merged_score(results: Sequence[Mapping[str, Any]]) -> tuple[float, dict[str, Any]]:
    """The merge row's primary value (mean over the domain's tasks) and its result."""
    merged = [r for r in results if r["role"] == "merge"]
    if len(merged) != 1:
        raise InputError(f"expected one merge result in the job, found {len(merged)}")
    cells = list(merged[0]["primary"].values())
    return sum(float(c["value"]) for c in cells) / len(cells), merged[0]


def reference_scores(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    out = {}
    for r in results:
        if r["role"] == "reference":
            cells = list(r["primary"].values())
            out[r["name"]] = sum(float(c["value"]) for c in cells) / len(cells)
    return out


def stage_select(spec: Mapping[str, Any], runner: Runner) -> dict[str, Any]:
    selected: dict[str, Any] = {}
    rows_out: list[dict[str, Any]] = []
    for domain in spec["domains"]:
        selected[domain] = {}
        for label, row in spec["rows"].items():
            best: tuple[float, int, dict[str, Any]] | None = None
            points = grid_points(row)
            for i, params in enumerate(points):
                run_dir = runner.out / "select" / domain / slug(label) / f"{i:03d}"
                overrides = [f"domain={domain}", "eval.split=validation", "logger=none", f"label={json.dumps(label)}",
                             f"seed={spec['seeds'][0]}", *merge_overrides(row["merge"], params)]
                results = runner.run(run_dir, overrides)
                score, _ = merged_score(results)
                refs = reference_scores(results)
                selected[domain].setdefault("_references", refs)
                rows_out.append({"domain": domain, "row": label, "point": i, "params": json.dumps(params),
                                 "validation": round(score, 6)})
                if best is None or score > best[0]:
                    best = (score, i, params)
            assert best is not None
            selected[domain][label] = {"merge": row["merge"], "params": best[2], "validation": best[0],
                                       "point": best[1], "grid_size": len(points)}
    runner.out.mkdir(parents=True, exist_ok=True)
    _write_csv(runner.out / "validation.csv", rows_out)
    (runner.out / "selected.json").write_text(json.dumps(selected, indent=2) + "\n")
    log.info("wrote %s and %s", runner.out / "validation.csv", runner.out / "selected.json")
    return selected


def stage_ablations(spec: Mapping[str, Any], selected: Mapping[str, Any], runner: Runner) -> list[dict[str, Any]]:
    ablations = spec.get("ablations")
    if not ablations:
        return []
    base_label = ablations["base"]
    rows_out: list[dict[str, Any]] = []
    for domain in spec["domains"]:
        chosen = selected[domain][base_label]
        refs = selected[domain].get("_references", {})
        rows_out.append({"domain": domain, "variation": "(chosen)", "params": json.dumps(chosen["params"]),
                         "validation": round(chosen["validation"], 6), "delta": 0.0,
                         "converged": refs.get("sft_converged")})
        for j, variation in enumerate(ablations["variations"]):
            params = {**chosen["params"], **variation}  # flat keys, dotted for nested ones (calibration.n_sequences)
            run_dir = runner.out / "ablations" / domain / f"{j:03d}-{slug(params_text(variation))}"
            overrides = [f"domain={domain}", "eval.split=validation", "logger=none", f"seed={spec['seeds'][0]}",
                         f"label={json.dumps(params_text(variation))}", *merge_overrides(chosen["merge"], params)]
            if params == chosen["params"]:
                score = chosen["validation"]  # the variation is the chosen point itself
            else:
                score, _ = merged_score(runner.run(run_dir, overrides))
            rows_out.append({"domain": domain, "variation": params_text(variation), "params": json.dumps(params),
                             "validation": round(score, 6), "delta": round(score - chosen["validation"], 6),
                             "converged": refs.get("sft_converged")})
    _write_csv(runner.out / "ablations.csv", rows_out)
    (runner.out / "ablations.md").write_text(ablations_markdown(rows_out, spec["domains"], base_label))
    log.info("wrote %s", runner.out / "ablations.md")
    return rows_out


def ablations_markdown(rows: Sequence[Mapping[str, Any]], domains: Sequence[str], base_label: str) -> str:
    variations = list(dict.fromkeys(r["variation"] for r in rows))
    cell = {(r["domain"], r["variation"]): r for r in rows}
    header = "| variation | " + " | ".join(f"{d} (val, Δ)" for d in domains) + " |"
    lines = [f"One factor at a time from each domain's chosen `{base_label}` point; validation split, score in %.", "",
             header, "|---|" + "---:|" * len(domains)]
    for v in variations:
        cells = []
        for d in domains:
            r = cell.get((d, v))
            if r is None:
                cells.append("")
            elif v == "(chosen)":
                cells.append(f"{100 * r['validation']:.1f}")
            else:
                cells.append(f"{100 * r['validation']:.1f} ({100 * r['delta']:+.1f})")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    chosen = {d: cell[(d, '(chosen)')]["params"] for d in domains if (d, "(chosen)") in cell}
    lines += ["", "Chosen points: " + "; ".join(f"{d}: `{p}`" for d, p in chosen.items()), ""]
    return "\n".join(lines)


def stage_test(spec: Mapping[str, Any], selected: Mapping[str, Any], runner: Runner) -> Path:
    import shutil


    shutil.rmtree(runner.out / "test", ignore_errors=True)  # rows of an earlier spec must not reach the table
    fidelity: dict[str, Any] = {}
    seeds = list(spec.get("seeds") or [0])
    for seed in seeds:
        for domain in spec["domains"]:
            fidelity.setdefault(domain, {})
            for label in spec["rows"]:
                choice = selected[domain][label]
                run_dir = runner.out / "test" / f"seed-{seed}" / domain / slug(label)
                overrides = [f"domain={domain}", "eval.split=test", f"label={json.dumps(label)}", f"seed={seed}",
                             *merge_overrides(choice["merge"], choice["params"])]
                results = runner.run(run_dir, overrides)
                _, merged = merged_score(results)
                if seed != seeds[0]:
                    continue
                summary_file = Path(merged["model_path"]) / "merge_summary.json"
                summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
                diagnostics_file = Path(merged["model_path"]) / "diagnostics.json"
                if diagnostics_file.is_file():
                    diagnostics = json.loads(diagnostics_file.read_text())
                    fidelity[domain][label] = {
                        "params": choice["params"],
                        "history": [{k: h.get(k) for k in ("iteration", "eta", "cos_to_converged", "rel_dist_to_converged",
                                                           "cos_direction_to_converged", "mean_angle_deg",
                                                           "measured_angle_deg", "loss",
                                                           "rotation_effect")}
                                    for h in diagnostics.get("history", [])],
                        "selected_iteration": diagnostics.get("selected_iteration"),
                        "merge_wall_s": summary.get("wall_s"),
                    }
    (runner.out / "fidelity.json").write_text(json.dumps(fidelity, indent=2) + "\n")
    (runner.out / "fidelity.md").write_text(fidelity_markdown(fidelity))
    (runner.out / "selected.md").write_text(selected_markdown(selected, spec))
    plot_fidelity(fidelity, runner.out / "fidelity.png")

    first = load_results([runner.out / "test" / f"seed-{seeds[0]}" / domain for domain in spec["domains"]])  # columns in spec order
    table = build_table(first)
    write_outputs(table, first, runner.out / "table")
    everything = load_results([runner.out / "test" / f"seed-{s}" / domain for s in seeds for domain in spec["domains"]])
    spread = build_spread(everything)
    (runner.out / "spread.md").write_text(spread_markdown(spread))
    (runner.out / "spread.json").write_text(json.dumps(to_json(spread), indent=2) + "\n")
    log.info("wrote %s and %s", runner.out / "table", runner.out / "spread.md")
    return runner.out / "spread.md"


def selected_markdown(selected: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    """The chosen point of every row per domain, with its validation score and grid size."""
    domains = list(spec["domains"])
    lines = ["| row | " + " | ".join(f"{d}: chosen (validation %)" for d in domains) + " |",
             "|---|" + "---|" * len(domains)]
    for label in spec["rows"]:
        cells = []
        for d in domains:
            c = selected[d][label]
            fixed = spec["rows"][label]["fixed"]
            shown = {k: v for k, v in c["params"].items() if k not in fixed}
            cells.append(f"{params_text(shown)} ({100 * c['validation']:.1f}; {c['point'] + 1} of {c['grid_size']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    refs = [f"{d}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in selected[d].get("_references", {}).items()) for d in domains]
    lines += ["", "References on the validation split (%): " + "; ".join(refs), ""]
    return "\n".join(lines)


def fidelity_markdown(fidelity: Mapping[str, Any]) -> str:
    """ARM rows at their selected iteration: how the step θ − c_m lines up with where SFT went (c* − c_m)."""
    lines = ["| domain | row | chosen | cos(θ − c_m, c* − c_m) | ‖θ − c*‖ / ‖c* − c_m‖ | mean principal angle ° | "
             "rotation effect ‖θ − θ_ExPO‖ / ‖θ_ExPO − c_m‖ |",
             "|---|---|---|---:|---:|---:|---:|"]
    for domain, rows in fidelity.items():
        for label, entry in rows.items():
            hist = {h["iteration"]: h for h in entry["history"]}
            h = hist.get(entry.get("selected_iteration"), entry["history"][-1])
            angle, effect = h.get("mean_angle_deg"), h.get("rotation_effect")
            measured = h.get("measured_angle_deg")  # trajectory_rotation: the angle of c_{m−1} → c_m
            lines.append(f"| {domain} | {label} | {params_text(entry['params'])} | {_num(h.get('cos_to_converged')):.4f} | "
                         f"{h.get('rel_dist_to_converged', float('nan')):.4f} | "
                         f"{'' if angle is None else f'{angle:.2f}'}{'' if measured is None else f'{measured:.2f} (c_m−1 → c_m)'} | "
                         f"{'' if effect is None else f'{effect:.4f}'} |")
    lines += ["", "At iteration 0 (θ = c_m) the relative distance is 1 by definition; below 1 means closer to c* than c_m is.", ""]
    return "\n".join(lines)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def plot_fidelity(fidelity: Mapping[str, Any], out: Path) -> Path | None:
    """Per domain: cos(θ_t − c_m, c* − c_m) and ‖θ_t − c*‖/‖c* − c_m‖ over ARM iterations, one line per row."""
    domains = [d for d in fidelity if fidelity[d]]
    if not domains:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(domains), figsize=(5 * len(domains), 6.5), squeeze=False)
    for j, domain in enumerate(domains):
        bound = None
        for label, entry in fidelity[domain].items():
            hist = [h for h in entry["history"] if h.get("cos_to_converged") is not None]
            steps = [h for h in hist if h["iteration"] > 0]  # at iteration 0, θ − c_m = 0: no angle
            axes[0][j].plot([h["iteration"] for h in steps], [h["cos_to_converged"] for h in steps], marker="o", label=label)
            axes[1][j].plot([h["iteration"] for h in hist], [h["rel_dist_to_converged"] for h in hist], marker="o", label=label)
            cos_g = hist[0].get("cos_direction_to_converged") if hist else None
            if cos_g is not None:
                bound = (1.0 - min(1.0, cos_g**2)) ** 0.5
        axes[0][j].set_title(f"{domain}: cos(θ − c_m, c* − c_m)")
        axes[1][j].set_title(f"{domain}: ‖θ − c*‖ / ‖c* − c_m‖")
        axes[1][j].set_xlabel("ARM iteration")
        axes[1][j].axhline(1.0, color="grey", ls=":", lw=1)
        if bound is not None:  # the closest any point c_m + α·g gets to c*
            axes[1][j].axhline(bound, color="black", ls="--", lw=1, label=f"best on the line c_m + α·g: {bound:.3f}")
            axes[1][j].legend(fontsize=7)
        for ax in axes[:, j]:
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    path.write_text(buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# entry point


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arm-tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="tuning spec (default: conf/tuning/embedded.yaml)")
    parser.add_argument("--out", type=Path, default=Path("outputs/runs/headline"), help="output folder")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job (after the spec's own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise InputError(f"--stages: unknown stage(s) {unknown or stages} (known: {', '.join(STAGES)})")
        spec = load_spec(args.spec)
        out = args.out.resolve()
        runner = Runner(out, [*spec["overrides"], *args.overrides])
        for domain in spec["domains"]:  # bad configs fail before any job runs
            for label, row in spec["rows"].items():

                for params in grid_points(row):
                    try:
                        validate(runner.compose([f"domain={domain}", *merge_overrides(row["merge"], params)]))
                    except Exception as exc:  # noqa: BLE001 - Hydra's composition errors and ours
                        raise InputError(f"{args.spec}: rows.{label}: {exc}") from exc
        ablations = spec.get("ablations") or {}
        for variation in ablations.get("variations", []):
            base_row = spec["rows"][ablations["base"]]
            params = {**grid_points(base_row)[0], **variation}
            try:
                validate(runner.compose([f"domain={spec['domains'][0]}", *merge_overrides(base_row["merge"], params)]))
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"{args.spec}: ablations.variations: {params_text(variation)}: {exc}") from exc
        if "select" in stages:
            selected = stage_select(spec, runner)
        else:
            path = out / "selected.json"
            if not path.is_file():
                raise InputError(f"{path}: not found; run the 'select' stage first")
            selected = json.loads(path.read_text())
        if "ablations" in stages:
            stage_ablations(spec, selected, runner)
        if "test" in stages:
            table = stage_test(spec, selected, runner)
            print(table.read_text())
            print(f"table, plots: {table.parent}\nselected hyperparameters: {out / 'selected.json'}\n"
                  f"validation grid: {out / 'validation.csv'}\nfidelity: {out / 'fidelity.png'}")
    except ArmError as exc:
        print(f"arm-tune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
