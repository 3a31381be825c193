"""The I/O floor of `make bench` (benchmarks/io_floor.py, merge_bench.floor_section) on two small model
sizes: the floor reads every byte ours-linear reads and writes one output, as a whole process and in one
process beside our engine; the marginal per-byte ratio comes from the two sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import merge_bench
from benchmarks.io_floor import MARK, floor_copy, input_files
from tests.conftest import REPO


def small_models(root: Path, hidden: int) -> tuple[Path, list[Path]]:
    args = merge_bench.argparse.Namespace(hidden=hidden, intermediate=2 * hidden, layers=2, vocab=512)
    return merge_bench.build_models(merge_bench.model_spec(args), root)


def test_the_floor_reads_every_input_byte_and_writes_one_output(tmp_path: Path) -> None:
    base, cks = small_models(tmp_path / "models", 64)
    sizes = floor_copy(cks, tmp_path / "floor")
    assert sizes["read_bytes"] == sum(f.stat().st_size for f in input_files(cks))
    assert sizes["written_bytes"] == sum(f.stat().st_size for f in input_files(cks[-1:]))
    for f in input_files(cks[-1:]):  # the output is the last input's bytes
        assert (tmp_path / "floor" / f.name).read_bytes() == f.read_bytes()
    for threads, block in ((1, 1 << 20), (3, 4096)):  # shares of every file, blocks smaller than a file
        again = floor_copy(cks, tmp_path / f"floor-{threads}", block=block, threads=threads)
        assert again == {**sizes, "threads": threads}
        for f in input_files(cks[-1:]):
            assert (tmp_path / f"floor-{threads}" / f.name).read_bytes() == f.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.io_floor", "--process", "--imports", "numpy",
                           "--inputs", *map(str, cks), "--out", str(tmp_path / "floor2")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith(MARK))[len(MARK):])
    assert out["read_bytes"] == sizes["read_bytes"] and out["io_s"] > 0 and out["import_s"] >= 0


def test_the_floor_section_pairs_ours_with_the_floor_on_two_sizes(tmp_path: Path) -> None:
    small = small_models(tmp_path / "small", 64)
    large = small_models(tmp_path / "large", 192)
    spec = {h: merge_bench.model_spec(merge_bench.argparse.Namespace(hidden=h, intermediate=2 * h, layers=2, vocab=512))
            for h in (64, 192)}
    out = merge_bench.floor_section({"small": (spec[64], *small), "large": (spec[192], *large)}, 2, tmp_path / "work")
    for label in ("small", "large"):
        x = out["sizes"][label]
        assert len(x["raw"]["whole"]["ours_s"]) == 2 and len(x["raw"]["inproc"]["floor_s"]) == 2
        assert "numpy" in x["imports"].split(",")  # what our merge command had loaded, imported by the floor too
        assert x["whole_ratio"] > 0 and x["inproc_ratio"] > 0
    assert out["sizes"]["large"]["read_bytes"] > out["sizes"]["small"]["read_bytes"]
    assert out["inproc_marginal"]["bytes"] > 0
    assert not (tmp_path / "work" / "out-ours").exists() and not (tmp_path / "work" / "floor").exists()
    table = merge_bench.render_table({"io_floor": out})
    assert "| small (" in table and "| large (" in table
    # models this small are timing noise: a size pair where the larger was not slower renders, it does not crash
    out["whole_marginal"].update(ours_bytes_per_s=None, ours_over_floor_per_byte=None)
    assert "Marginal, whole process: not measurable" in merge_bench.render_table({"io_floor": out})


def test_the_table_says_whether_ties_kept_its_bytes():
    raw = {"ties_output_sha256": "ab" * 32,
           "ties_torch_path": {"wall_s": 9.5, "peak_rss_mib": 800.0, "sha256": "cd" * 32, "same_bytes": False}}
    table = merge_bench.render_table({"meta": {"raw": raw}})
    assert "✗ DIFFERENT BYTES as its torch path (ARM_MERGE_BACKEND=torch, no C kernels: 9.50 s" in table
    raw["ties_torch_path"].update(sha256=raw["ties_output_sha256"], same_bytes=True)
    assert "✓ the same bytes" in merge_bench.render_table({"meta": {"raw": raw}})
