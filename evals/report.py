"""arm-table: the comparison table of any results files (markdown, CSV, LaTeX), its plots, and the
W&B table of a sweep.

    arm-table outputs/runs/make-run                      # markdown on stdout
    arm-table outputs/runs/make-run --out-dir report/    # table.md, table.csv, table.tex and plots
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arm.core.cache import atomic_write_text
from arm.core.errors import ArmError
from evals.plots import write_plots
from evals.table import FORMATS, SUFFIXES, Table, build_table, load
from evals.wandb_table import log_sweep_table


def write_outputs(table: Table, results: Sequence[Mapping[str, Any]], out_dir: Path, plots: bool = True) -> list[Path]:
    """table.md, table.csv, table.tex (and the PNG plots) in `out_dir`."""

    written = []
    for fmt, render_fn in FORMATS.items():
        path = out_dir / f"table.{SUFFIXES[fmt]}"
        atomic_write_text(path, render_fn(table))
        written.append(path)
    if plots:

        written += write_plots(table, results, out_dir)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arm-table", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, help="results.json files or folders searched for them (a sweep folder)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="md")
    parser.add_argument("--out", type=Path, help="write here instead of stdout")
    parser.add_argument("--out-dir", type=Path, help="write table.md, table.csv, table.tex and the plots here")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write the PNG plots here (scores.png, arm_iterations.png)")
    parser.add_argument("--wandb", metavar="PROJECT", help="log the table (and plots) as a W&B Table in this project")
    parser.add_argument("--from-wandb", metavar="ENTITY/PROJECT", help="read the results from W&B runs instead of files (online)")
    parser.add_argument("--group", help="W&B group (sweep) to read with --from-wandb, or to log into with --wandb "
                                        "(default: the name of the single folder given)")
    args = parser.parse_args(argv)

    if not args.paths and not args.from_wandb:
        parser.error("give results.json files or folders, or --from-wandb ENTITY/PROJECT")
    try:
        results = load(args.paths, args.from_wandb, args.group)
        table = build_table(results)
        text = FORMATS[args.format](table)
    except ArmError as exc:
        print(f"arm-table: error: {exc}", file=sys.stderr)
        return 2

    images: dict[str, Path] = {}
    if args.out_dir:
        for path in write_outputs(table, results, args.out_dir):
            print(f"wrote {path}", file=sys.stderr)
            if path.suffix == ".png":
                images[path.stem] = path
    if args.plots:

        for path in write_plots(table, results, args.plots):
            print(f"wrote {path}", file=sys.stderr)
            images[path.stem] = path
    if args.wandb:

        group = args.group or (args.paths[0].resolve().name if len(args.paths) == 1 else None)
        run_dir = args.out_dir or args.plots or Path.cwd()
        location = log_sweep_table(table, project=args.wandb, group=group, run_dir=run_dir, images=images)
        print(f"W&B table run: {location} (group {group})", file=sys.stderr)
    if args.out:
        try:
            atomic_write_text(args.out, text)
        except OSError as err:
            print(f"arm-table: error: {args.out}: cannot write ({err.strerror or err})", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    elif not args.out_dir:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
