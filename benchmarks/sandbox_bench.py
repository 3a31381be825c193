"""Time of one sandboxed program (a two-test code_synth-like program) from a process that imported torch, as an
evaluation's is; optionally against another version of arm/core/sandbox.py, interleaved round by round.

    python -m benchmarks.sandbox_bench                               # this checkout
    git show 7ae2475:arm/core/sandbox.py > /tmp/old.py && python -m benchmarks.sandbox_bench --against /tmp/old.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

PROGRAM = "def f(x):\n    return x*3+2\n"
TESTS = ["assert f(3) == 11", "assert f(0) == 2"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sandbox_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--against", default=None, help="another sandbox.py to time beside this checkout's")
    parser.add_argument("--runs", type=int, default=40, help="programs per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    import torch  # noqa: F401 - the harness's size during an evaluation

    from arm.core import sandbox

    versions = [("this checkout", sandbox)]
    if args.against:
        spec = importlib.util.spec_from_file_location("sandbox_against", args.against)
        other = importlib.util.module_from_spec(spec)
        sys.modules["sandbox_against"] = other
        spec.loader.exec_module(other)
        versions.insert(0, (args.against, other))
    for rnd in range(args.rounds):
        for name, module in versions:
            start = time.perf_counter()
            for _ in range(args.runs):
                result = module.run_program(PROGRAM, TESTS)
            assert result.passed, result
            print(f"round {rnd}: {name}: {(time.perf_counter() - start) / args.runs * 1000:.1f} ms per program")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
