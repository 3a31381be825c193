"""A light command line for one merge, without Hydra or transformers (used by the benchmark).

    python -m arm.merge.cli --method ties --base BASE --checkpoints C1 C2 C3 --out OUT \\
        --set density=0.3 --set 'weights=[1, 1, 1]' --dtype bfloat16 --overwrite

``--set key=value`` sets one ``merge.<key>`` (values are read as JSON when they parse, else as
strings), exactly the keys of ``conf/merge/<method>.yaml``. Prints the run summary as JSON.

ARM with rotations (or ``select=best_loss``) needs calibration data: ``--calibration FILE.jsonl``, one
``{"prompt": ..., "response": ...}`` record per line (e.g. a synthetic domain's ``train.jsonl``);
``--converged DIR`` adds the diagnostics against a converged checkpoint (never used for the merge):

    python -m arm.merge.cli --method arm --base BASE --checkpoints C1 C2 --out OUT \
        --calibration train.jsonl --converged CONVERGED --set rotation=procrustes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from arm.data.domains import read_split
from arm.merge.engine import ENGINE_KEYS, MergeContext, merge_from_config
from arm.merge.registry import get_method, method_names
from arm.merge.tensor_io import parse_size


def _shard_size(text: str) -> int | str:
    """``--shard-size``: checked before any work (a positive number of bytes or a size like 500MB)."""

    value: int | str = int(text) if text.isdigit() else text
    try:
        parse_size(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"null": None, "true": True, "false": False}.get(text, text)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The calibration JSONL; errors name the file and the line."""

    return read_split(path, fields=("prompt", "response"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m arm.merge.cli", description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, help="merge method (baselines.METHODS)")
    p.add_argument("--base", required=True, type=Path, help="base model folder (θ0)")
    p.add_argument(
        "--checkpoints", required=True, nargs="+", type=Path, help="early checkpoints c1..cm, by step"
    )
    p.add_argument("--out", required=True, type=Path, help="output model folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method parameter")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--dtype", default=None, help="output dtype: float32 | bfloat16 | float16 (default: the base's)"
    )
    p.add_argument("--shard-size", default="5GB", type=_shard_size, help="output shard size, e.g. 5GB, 500MB or bytes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--calibration", type=Path, help="JSONL of {prompt, response} records (ARM's calibration set)")
    p.add_argument("--converged", type=Path, help="converged checkpoint, for ARM's diagnostics only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg: dict[str, Any] = {
        "name": args.method,
        "device": args.device,
        "dtype": args.dtype,
        "overwrite": args.overwrite,
        "shard_size": args.shard_size,
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"error: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        cfg[key.strip()] = _value(value)

    context = None
    if args.calibration is not None or args.converged is not None:

        records = None
        if args.calibration is not None:
            try:
                records = read_records(args.calibration)
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
        context = MergeContext(calibration=records, converged=args.converged)


    method = get_method(args.method) if args.method in method_names() else None
    if method is not None and args.out.exists() and not args.overwrite and method.report_pending(
            args.out, {k: v for k, v in cfg.items() if k not in ENGINE_KEYS}, args.base, args.checkpoints):
        # this very merge, published by a run stopped before its report: finish the report, keep the weights
        report = method.write_report(args.out)
        print(json.dumps({"out_dir": str(args.out), "resumed": "report", "report": [str(f) for f in report]}))
        return 0
    try:
        summary = merge_from_config(cfg, args.base, args.checkpoints, args.out, progress=not args.no_progress,
                                    context=context)
    except (ValueError, FileExistsError) as err:  # bad inputs, outputs or parameters: named in the message
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # anything else the file system refused, e.g. reading an input
        print(f"error: {err.filename or args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    report = get_method(args.method).write_report(args.out)   # figures from the written files, after the merge
    if report:
        summary = {**summary, "report": [str(f) for f in report]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
