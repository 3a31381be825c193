"""Where a run's wall time went: set-up, start-up, each domain's data and SFT, every evaluation by row,
every merge by method, and what is left (W&B, tables, plots, job overhead).

    python -m evals.stage_times outputs/runs/make-run            # print, and write timing.md / timing.json there

Reads each job's ``stages.json`` (arm/core/timing.py) under the run folder and, when present, the run's
``clock.txt``: lines ``<event> <epoch seconds>`` that ``make run`` writes (``start`` before the venv and
install, ``arm`` when the sweep starts, ``table`` when it ends, ``end`` after the table). A stage that
a job found in the cache (built by an earlier job of the sweep, or an earlier run) costs only its lookup
and is counted apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from arm.core.cache import atomic_write_json, atomic_write_text
from arm.core.timing import STAGES_NAME

CLOCK_NAME = "clock.txt"
KIND_LABEL = {"data": "data", "sft": "SFT", "merge": "merge", "eval": "evaluation"}


def read_clock(run_dir: Path) -> dict[str, float]:
    path = Path(run_dir) / CLOCK_NAME
    if not path.is_file():
        return {}
    events: dict[str, float] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            event, value = line.split()
            events[event] = float(value)
        except ValueError:
            raise ValueError(f"{path}:{number}: expected '<event> <epoch seconds>', got {line!r}") from None
    return events


def read_jobs(run_dir: Path) -> list[dict[str, Any]]:
    jobs = []
    for path in sorted(Path(run_dir).rglob(STAGES_NAME)):
        try:
            data = json.loads(path.read_text())
            stages = data["stages"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: not a stages file ({exc})") from None
        jobs.append({"path": path, "job": data.get("job") or {}, "stages": stages})
    return jobs


def breakdown(run_dir: Path) -> dict[str, Any]:
    """{"rows": [{"stage", "wall_s", "built", "cached"}...], "total_s", "clock": {...}, "jobs": n}."""
    run_dir = Path(run_dir)
    clock = read_clock(run_dir)
    jobs = read_jobs(run_dir)
    if not jobs:
        raise ValueError(f"{run_dir}: no {STAGES_NAME} under it (a run of this harness writes one per job)")
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    starts, stage_sum = [], 0.0
    order = {"data": 0, "sft": 1, "eval": 2, "merge": 3}
    for job in jobs:
        domain = str(job["job"].get("domain", "?"))
        for stage in job["stages"]:
            starts.append(float(stage["start"]))
            stage_sum += float(stage["wall_s"])
            key = (domain, stage["kind"], stage["name"])
            row = rows.setdefault(key, {"domain": domain, "kind": stage["kind"], "name": stage["name"],
                                        "wall_s": 0.0, "built": 0, "cached": 0, "cached_s": 0.0, "first": float(stage["start"])})
            if stage.get("cached"):
                row["cached"] += 1
                row["cached_s"] += float(stage["wall_s"])
            else:
                row["built"] += 1
                row["wall_s"] += float(stage["wall_s"])
            row["first"] = min(row["first"], float(stage["start"]))
    domains = sorted({r["domain"] for r in rows.values()}, key=lambda d: min(r["first"] for r in rows.values() if r["domain"] == d))
    out: list[dict[str, Any]] = []

    def add(stage: str, wall: float | None, built: int | str = "", cached: int | str = "") -> None:
        out.append({"stage": stage, "wall_s": None if wall is None else round(wall, 1), "built": built, "cached": cached})

    if "start" in clock and "arm" in clock:
        add("set-up (venv, install, sandbox check)", clock["arm"] - clock["start"])
    if "arm" in clock:
        add("start-up (imports, config, until the first stage)", min(starts) - clock["arm"])
    for domain in domains:
        for row in sorted((r for r in rows.values() if r["domain"] == domain), key=lambda r: (order.get(r["kind"], 9), r["first"])):
            name = KIND_LABEL.get(row["kind"], row["kind"])
            label = f"{domain} · {name}" + (f" · {row['name']}" if row["kind"] in ("eval", "merge") else "")
            add(label, row["wall_s"] + row["cached_s"], row["built"], row["cached"])
    if "arm" in clock and "table" in clock:
        add("other (W&B, per-job tables and plots, job overhead)", clock["table"] - min(starts) - stage_sum)
    if "table" in clock and "end" in clock:
        add("the table (arm-table)", clock["end"] - clock["table"])
    total = clock["end"] - clock["start"] if "start" in clock and "end" in clock else None
    by_kind = {k: round(sum(r["wall_s"] + r["cached_s"] for r in rows.values() if r["kind"] == k), 1) for k in order}
    return {"run_dir": str(run_dir), "rows": out, "total_s": None if total is None else round(total, 1),
            "stage_sum_s": round(stage_sum, 1), "by_kind_s": by_kind, "clock": clock, "jobs": len(jobs)}


def to_markdown(report: dict[str, Any]) -> str:
    total = report["total_s"]
    lines = ["| stage | wall s | share | built | cached |", "|---|---:|---:|---:|---:|"]
    for row in report["rows"]:
        wall = row["wall_s"]
        share = f"{100 * wall / total:.0f}%" if total and wall is not None else ""
        lines.append(f"| {row['stage']} | {'' if wall is None else f'{wall:.1f}'} | {share} | {row['built']} | {row['cached']} |")
    if total is not None:
        minutes, seconds = divmod(int(round(total)), 60)
        lines.append(f"| **total** | **{total:.1f}** ({minutes} min {seconds:02d} s) | 100% | | |")
    kinds = ", ".join(f"{KIND_LABEL[k]} {v:.1f} s" for k, v in report["by_kind_s"].items())
    lines += ["", f"By kind: {kinds}; {report['jobs']} jobs. `built`: stages run now; `cached`: found in the cache "
                  "(an earlier job of the sweep or an earlier run built it), their lookups included in the time."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.stage_times", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write timing.md/json")
    args = parser.parse_args(argv)
    try:
        report = breakdown(args.run_dir)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    markdown = to_markdown(report)
    if not args.no_write:
        atomic_write_text(args.run_dir / "timing.md", markdown)
        atomic_write_json(args.run_dir / "timing.json", report)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
