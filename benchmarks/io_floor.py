"""The I/O floor of a merge, measured like for like with our engine (``make bench``, benchmarks/merge_bench.py).

The floor reads every byte of the input files that the merge reads and writes one output of the same size
(the last input's bytes): no merge arithmetic, nothing a merge could skip. It moves them as fast as plain
reads and writes do here, with the resources our merge has: as many threads as our merge's workers
(``ARM_MERGE_THREADS``, default the CPU count, at most 4), each a contiguous share of every file, in 1 MiB
blocks that stay in the CPU's cache (``os.preadv`` into one buffer, ``os.pwrite`` of it into an output
file sized up front). The first version of this floor (until 2026-12-06) streamed 64 MiB blocks in one
thread: on the 1.5B bench model it took 6.45–17.83 s where this one takes 1.46–1.73 s (three rounds each,
one process: the command in docs/merging.md), i.e. it was no floor — our merge ran faster than it.

Two forms, each paired with ours:

- **whole process**: ``python -m benchmarks.io_floor --process --imports torch,numpy --inputs A B C --out O``
  starts the same interpreter, imports the same libraries that our merge command has loaded when it ends
  (the bench finds them by running our command once), then reads and writes; timed from outside like
  ``python -m arm.merge.cli``.
- **in process**: ``python -m benchmarks.io_floor --inprocess ...`` imports our engine, runs one merge and
  one floor untimed (imports, page cache), then alternates, round by round, the floor and our merge
  (``arm.merge.cli.main`` called in this process): no interpreter start-up or imports in either.

Both print one JSON line prefixed ``@@floor@@``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCK = 1 << 20
MARK = "@@floor@@"


def merge_threads() -> int:
    """Our CPU merge's worker threads (arm.merge.engine._cpu_workers, without importing the engine)."""
    return max(1, int(os.environ.get("ARM_MERGE_THREADS", "0") or 0) or min(4, os.cpu_count() or 1))


def input_files(folders: list[Path]) -> list[Path]:
    files = [f for folder in folders for f in sorted(Path(folder).glob("*.safetensors"))]
    if not files:
        raise SystemExit(f"no *.safetensors files in {', '.join(map(str, folders))}")
    return files


def floor_copy(folders: list[Path], out_dir: Path, block: int = BLOCK, threads: int | None = None) -> dict[str, int]:
    """Read every safetensors byte of ``folders``; write the last folder's files into ``out_dir`` (new), in
    ``threads`` threads (default :func:`merge_threads`), each a contiguous share of every file."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    threads = threads or merge_threads()
    last = Path(folders[-1])
    jobs: list[tuple[Path, int, int | None]] = []
    try:
        for f in input_files(folders):
            size = f.stat().st_size
            dst = None
            if f.parent == last:
                dst = os.open(out_dir / f.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(dst, size)
            jobs.append((f, size, dst))
        counts = [[0, 0] for _ in range(threads)]

        def work(t: int) -> None:
            view = memoryview(bytearray(block))
            for f, size, dst in jobs:
                lo, hi = size * t // threads, size * (t + 1) // threads
                fd = os.open(f, os.O_RDONLY)
                try:
                    pos = lo
                    while pos < hi:
                        n = os.preadv(fd, [view[: min(block, hi - pos)]], pos)
                        if n <= 0:
                            raise OSError(f"{f}: short read at byte {pos}")
                        counts[t][0] += n
                        if dst is not None:
                            counts[t][1] += os.pwrite(dst, view[:n], pos)
                        pos += n
                finally:
                    os.close(fd)

        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(work, t) for t in range(threads)]:
                future.result()
    finally:
        for _, _, dst in jobs:
            if dst is not None:
                os.close(dst)
    return {"read_bytes": sum(c[0] for c in counts), "written_bytes": sum(c[1] for c in counts), "threads": threads}


def _process(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    for name in filter(None, args.imports.split(",")):
        importlib.import_module(name)
    t1 = time.perf_counter()
    sizes = floor_copy(args.inputs, args.out)
    return {"import_s": t1 - t0, "io_s": time.perf_counter() - t1, **sizes}


def _inprocess(args: argparse.Namespace) -> dict:
    from arm.merge import cli

    merge_argv = json.loads(args.merge_argv)

    def ours() -> float:
        shutil.rmtree(args.ours_out, ignore_errors=True)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main([*merge_argv, "--out", str(args.ours_out)])
        wall = time.perf_counter() - start
        if code:
            raise SystemExit(f"our merge failed in process (exit {code}): {merge_argv}")
        shutil.rmtree(args.ours_out, ignore_errors=True)
        return wall

    def floor() -> float:
        start = time.perf_counter()
        floor_copy(args.inputs, args.out)
        wall = time.perf_counter() - start
        shutil.rmtree(args.out, ignore_errors=True)
        return wall

    ours()  # untimed: imports inside the engine, page cache
    floor()
    rounds = []
    for _ in range(args.rounds):
        rounds.append({"floor_s": floor(), "ours_s": ours()})
    return {"rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.io_floor", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--process", action="store_true", help="one floor, in this process after --imports")
    mode.add_argument("--inprocess", action="store_true", help="rounds of floor and our merge, both in this process")
    parser.add_argument("--inputs", type=Path, nargs="+", required=True, help="the model folders the merge reads")
    parser.add_argument("--out", type=Path, required=True, help="the floor's output folder (replaced)")
    parser.add_argument("--imports", default="", help="--process: modules to import first (comma-separated)")
    parser.add_argument("--merge-argv", default="[]", help="--inprocess: arm.merge.cli's arguments, JSON, without --out")
    parser.add_argument("--ours-out", type=Path, default=None, help="--inprocess: our merge's output folder")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.inprocess and args.ours_out is None:
        parser.error("--inprocess needs --ours-out")
    out = _process(args) if args.process else _inprocess(args)
    print(MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
