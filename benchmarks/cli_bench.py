"""Start-up latency of the `arm` command: `--help` and a config typo, median of several runs (goal < 2 s).

    python -m benchmarks.cli_bench [--runs 5] [--results benchmarks/results/cli.json]

A performance goal belongs here, not in a test: on a loaded machine a wall-clock assert fails whatever
the code does (tests/test_config.py checks what keeps it fast: no heavy import on the --help path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL_S = 2.0
CASES = {"arm --help": ["--help"], "arm merge=nosuchmethod (typo)": ["merge=nosuchmethod"],
         "arm nosuchkey=1 (typo)": ["nosuchkey=1"]}


def time_case(args: list[str], runs: int) -> list[float]:
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "arm", *args, f"paths.root={tmp}"] if args[0] != "--help" else
                           [sys.executable, "-m", "arm", *args], capture_output=True, cwd=REPO, check=False)
            walls.append(time.perf_counter() - start)
    return walls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "cli.json")
    args = parser.parse_args(argv)
    rows = []
    for name, case in CASES.items():
        walls = time_case(case, args.runs)
        median = statistics.median(walls)
        rows.append({"case": name, "runs": args.runs, "median_s": round(median, 3), "min_s": round(min(walls), 3),
                     "max_s": round(max(walls), 3), "goal_s": GOAL_S, "holds": median < GOAL_S})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"python": sys.version.split()[0], "cases": rows}, indent=2) + "\n")
    print("| case | median s | min–max s | goal | holds |\n|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['case']} | {r['median_s']:.2f} | {r['min_s']:.2f}–{r['max_s']:.2f} | < {GOAL_S} | {'yes' if r['holds'] else 'NO'} |")
    print(f"wrote {args.results}")
    return 0 if all(r["holds"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
