"""arm-watch (arm/run/watch.py, arm/run/follow.py): streaming merges of a running SFT.

The slow tests drive the real pieces: the tiny SFT loop as a background process (`python -m arm.run.sft`), the
`arm-watch` console script as a process that is killed (SIGKILL) and started again, lm-eval's hf backend on the
tiny model, real safetensors files written slowly, deleted or corrupted under the watcher, W&B offline.
Times in the docstrings: `pytest tests/test_watch.py --durations=0` on the project's 2-core machine, 2026-12-06 (the
whole file: 12 passed in 98 s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arm.core.errors import ConfigError
from arm.run.follow import FolderFollower, incomplete_reason
from arm.run.watch import WatchSettings, merge_inputs, read_stream
from arm.run.watch_report import summarize

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# A short math_synth SFT: 160 steps of batch 16 over 320 records, checkpoints at 40, 80, 120 and the final 160
# (about 0.04 s a step here: a few seconds in all, so the concurrent test pauses it with SIGSTOP to kill the
# watcher while the run is unfinished).
SFT_SETS = ["max_steps=160", "save_steps=[40,80,120]", "early_steps=[40,80]", "eval_every=40", "max_val_examples=32",
            "warmup_steps=4", "max_train_examples=320", "lr=1e-3"]
STEPS = [40, 80, 120, 160]
# The watcher's settings for the tests: frequent polls, 20 validation documents, one thread, W&B offline.
WATCH = ["domain=math_synth", "watch.poll_s=0.2", "watch.settle_s=1", "watch.limit=20", "watch.idle_timeout_s=300",
         "watch.nice=0", "eval.batch_size=20"]
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "trainer_state.json"}


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "PYTHONPATH": str(REPO)}


def sft_command(out: Path, cache: Path) -> list[str]:
    cmd = [sys.executable, "-m", "arm.run.sft", "--domain", "math_synth", "--out", str(out), "--threads", "1",
           "--cache", str(cache)]
    for item in SFT_SETS:
        cmd += ["--set", item]
    return cmd


def watch_command(folder: Path, root: Path, watch_dir: Path, *extra: str) -> list[str]:
    return [str(BIN / "arm-watch"), f"trajectory.path={folder}", f"paths.root={root}", f"watch.dir={watch_dir}",
            f"hydra.run.dir={root}/hydra", *WATCH, *extra]


def wait_for(condition, what: str, timeout: float = 300.0, procs: tuple = ()) -> None:
    """Poll `condition` until true; fail naming `what` on timeout, or when one of `procs` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None and not condition():
                raise AssertionError(f"process {proc.args[:3]} exited ({proc.returncode}) before: {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.01)


def stream_steps(watch_dir: Path) -> list[int]:
    return [r["step"] for r in read_stream(watch_dir / "stream.jsonl")] if (watch_dir / "stream.jsonl").is_file() else []


def comparable(summary: dict) -> dict:
    """What the summary says about the run: rows (step, inputs, raw and merged scores), per-task verdicts, skips."""
    return {k: summary[k] for k in ("rows", "tasks", "skipped", "checkpoints")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The same short SFT run to its end once (no watcher): the source of the slowly written folders."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "sft"
    subprocess.run(sft_command(out, tmp / "cache"), check=True, cwd=tmp, env=env(), capture_output=True, timeout=600)
    assert (out / "manifest.json").is_file()
    return out


# ------------------------------------------------------------------------------------------- pure parts


def test_merge_inputs_follow_each_methods_rule():
    seen = [40, 80, 120]
    assert merge_inputs({"name": "arm", "formulation": "iterate_rotation"}, seen, 2)[0] == [80, 120]  # latest pair
    assert merge_inputs({"name": "arm", "formulation": "iterate_rotation"}, [40], 2)[0] == [40]
    assert merge_inputs({"name": "arm", "direction": "delta"}, [40], 2) is None  # needs c_m − c_{m−1}
    assert merge_inputs({"name": "arm", "formulation": "stream"}, seen, 2)[0] == seen  # the stream's iterate
    assert merge_inputs({"name": "lawa", "window": None}, seen, 2) == (seen, {"name": "lawa", "window": None})
    assert merge_inputs({"name": "ema", "window": 2, "beta": 0.5}, seen, 2) == ([80, 120], {"name": "ema", "window": 2, "beta": 0.5})
    assert merge_inputs({"name": "wsm", "window": 5}, seen, 2) == (seen, {"name": "wsm", "window": 3})  # window shortened
    assert merge_inputs({"name": "ties", "density": 0.5}, seen, 2)[0] == [80, 120]  # the configured k
    assert merge_inputs({"name": "linear", "weights": [1, 2, 3]}, [40, 80], 3) is None  # one weight per input: waits
    assert merge_inputs({"name": "linear", "weights": [1, 2, 3]}, seen, 3)[0] == seen
    assert merge_inputs({"name": "ties", "density": [0.3, 0.5]}, [40], 2) is None  # one density per input
    assert merge_inputs({"name": "dare", "drop_rate": 0.5}, [40], 2)[0] == [40]


def test_summary_first_step_and_share_saved():
    records = [
        {"step": 100, "status": "ok", "raw": {"t": 0.2}, "merged": {"t": 0.3}, "inputs": [100]},
        {"step": 200, "status": "ok", "raw": {"t": 0.5}, "merged": {"t": 0.6}, "inputs": [100, 200]},
        {"step": 300, "status": "deleted", "reason": "gone"},
        {"step": 400, "status": "ok", "raw": {"t": 0.6}, "merged": {"t": 0.55}, "inputs": [100, 200, 400]},
    ]
    s = summarize(records, finished=True, end_reason="test")
    t = s["tasks"]["t"]
    assert t["final_step"] == 400 and t["final_score"] == 0.6
    assert t["first_step_merged_reaches_final"] == 200  # 0.6 >= 0.6 at step 200, not at 100
    assert t["share_of_steps_saved"] == pytest.approx(0.5)
    assert t["first_step_raw_reaches_final"] == 400 and t["share_of_steps_saved_raw"] == 0.0  # raw: only at the end
    assert s["skipped"] == [{"step": 300, "status": "deleted", "reason": "gone"}]
    records[1]["merged"]["t"] = 0.59
    assert summarize(records, True)["tasks"]["t"]["first_step_merged_reaches_final"] is None


def test_settings_errors_name_the_key():
    good = {"dir": None, "poll_s": 1, "settle_s": 1, "idle_timeout_s": 10, "limit": 20, "split": "validation",
            "num_threads": 1, "nice": 0, "follow": True, "inputs": None}
    assert WatchSettings.from_cfg(good).limit == 20
    for key, bad in [("limit", 0), ("poll_s", -1), ("split", "train"), ("nice", -3), ("follow", "yes"), ("inputs", 0)]:
        with pytest.raises(ConfigError, match=f"watch.{key}"):
            WatchSettings.from_cfg({**good, key: bad})


def test_stream_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "stream.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2})[:7])
    assert read_stream(path) == [{"step": 1}]
    assert path.read_text() == json.dumps({"step": 1}) + "\n"


@pytest.mark.slow  # trains the short SFT (finished_run)
def test_completeness_on_real_checkpoint_files(finished_run, tmp_path):
    """A checkpoint copied file by file is complete only once every file is whole, whatever the order."""
    src = finished_run / "checkpoint-40"
    dst = tmp_path / "sft" / "checkpoint-40"
    dst.mkdir(parents=True)
    follower = FolderFollower(tmp_path / "sft", settle_s=0.0)
    shutil.copy(src / "trainer_state.json", dst)
    shutil.copy(src / "config.json", dst)
    assert "model.safetensors" in incomplete_reason(dst, 40)
    data = (src / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])  # a half-written weight file, however long it stays
    assert "truncated" in incomplete_reason(dst, 40)
    assert follower.poll() == [] and follower.poll() == []
    (dst / "model.safetensors").write_bytes(data)
    assert incomplete_reason(dst, 40) is None
    (dst / ".rewrite.tmp").mkdir()  # the project's Trainer SFT rewriting its shards
    assert "being written" in incomplete_reason(dst, 40)
    (dst / ".rewrite.tmp").rmdir()
    assert incomplete_reason(dst, 80) == "trainer_state.json says global_step 40, not 80"
    [ckpt] = follower.poll()
    assert (ckpt.step, ckpt.status) == (40, "complete") and ckpt.files["model.safetensors"] == len(data)


@pytest.mark.slow  # trains the short SFT (finished_run)
def test_trainer_layout_sharded_with_training_state(finished_run, tmp_path):
    """A Trainer checkpoint: hub-style shards + index (as the project's Trainer SFT rewrites them) and the optimizer,
    scheduler and RNG state beside the model. Complete only with every shard the index lists; the snapshot takes
    the model files, not the training state."""
    from arm.run.follow import model_files
    from arm.run.watch import snapshot
    from arm.trajectory.trainer_sft import rewrite_checkpoint

    ckpt = tmp_path / "sft" / "checkpoint-40"
    shutil.copytree(finished_run / "checkpoint-40", ckpt)
    rewrite_checkpoint(ckpt, None, 400_000)  # float32 kept, shards of 400 kB
    shards = sorted(p.name for p in ckpt.glob("model-*.safetensors"))
    assert len(shards) > 1 and (ckpt / "model.safetensors.index.json").is_file()
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (ckpt / name).write_bytes(b"state")
    assert incomplete_reason(ckpt, 40) is None
    # As the project's Trainer SFT: final once config.json names model.sft.save_dtype (the rewrite's last write).
    assert "not yet bfloat16" in incomplete_reason(ckpt, 40, dtype="bfloat16")
    assert incomplete_reason(ckpt, 40, dtype="float32") is None
    moved = tmp_path / shards[-1]
    (ckpt / shards[-1]).rename(moved)
    assert f"lists shard {shards[-1]}" in incomplete_reason(ckpt, 40)
    moved.rename(ckpt / shards[-1])
    [taken] = FolderFollower(tmp_path / "sft", settle_s=0.0).poll()
    assert set(taken.files) == set(model_files(ckpt)) and "optimizer.pt" not in taken.files
    shot = snapshot(ckpt, "k", taken.files, tmp_path / "cache")
    assert sorted(p.name for p in shot.iterdir()) == sorted(taken.files)
    assert (shot / shards[0]).stat().st_ino == (ckpt / shards[0]).stat().st_ino  # a hard link, no copy


def test_without_trajectory_path_it_names_the_key(tmp_path):
    proc = subprocess.run([str(BIN / "arm-watch"), "merge=lawa", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/h"],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 2 and "trajectory.path" in proc.stderr
    help_text = subprocess.run([str(BIN / "arm-watch"), "--help"], capture_output=True, text=True, env=env(), timeout=120)
    assert help_text.returncode == 0 and help_text.stdout.startswith("arm-watch: follow an SFT output folder")


# ------------------------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_concurrent_run_killed_and_resumed_equals_offline(tmp_path):
    """A tiny SFT writes checkpoints in the background while arm-watch follows it; the watcher is killed (SIGKILL)
    mid-run and started again; its final summary equals an offline pass over the same checkpoints with a fresh
    cache. (35 s here.) The SFT is paused (SIGSTOP) from its first checkpoint until the restart, so that the
    kill lands before the run has finished however fast it trains."""
    sft_dir, root, watch_dir = tmp_path / "sft", tmp_path / "root", tmp_path / "watch"
    logs = tmp_path / "logs"
    logs.mkdir()
    sft = subprocess.Popen(sft_command(sft_dir, tmp_path / "cache"), cwd=tmp_path, env=env(),
                           stdout=open(logs / "sft.log", "w"), stderr=subprocess.STDOUT)
    first = subprocess.Popen(watch_command(sft_dir, root, watch_dir, "merge=lawa", "logger=wandb"), cwd=tmp_path,
                             env=env(), stdout=open(logs / "watch1.log", "w"), stderr=subprocess.STDOUT)
    second = None
    try:
        wait_for(lambda: (sft_dir / "checkpoint-40").is_dir() and incomplete_reason(sft_dir / "checkpoint-40", 40) is None,
                 "the SFT's first checkpoint, whole", procs=(sft,))
        sft.send_signal(signal.SIGSTOP)
        wait_for(lambda: 40 in stream_steps(watch_dir), "the watcher's first record", procs=(first,))
        first.kill()
        first.wait()
        assert not (sft_dir / "manifest.json").exists(), "the run must still be unfinished when the watcher is killed"
        done_before = stream_steps(watch_dir)
        second = subprocess.Popen(watch_command(sft_dir, root, watch_dir, "merge=lawa", "logger=wandb"), cwd=tmp_path,
                                  env=env(), stdout=open(logs / "watch2.log", "w"), stderr=subprocess.STDOUT)
        wait_for(lambda: "arm-watch: following" in (logs / "watch2.log").read_text(), "the restarted watcher",
                 procs=(second,))
        sft.send_signal(signal.SIGCONT)  # the rest of the run is written while the restarted watcher follows it
        assert sft.wait(timeout=600) == 0, (logs / "sft.log").read_text()[-2000:]
        assert second.wait(timeout=600) == 0, (logs / "watch2.log").read_text()[-3000:]
    finally:
        for proc in (sft, first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()

    records = read_stream(watch_dir / "stream.jsonl")
    assert [r["step"] for r in records] == STEPS  # every checkpoint once: nothing evaluated twice after the restart
    assert all(r["status"] == "ok" for r in records)
    assert [r["inputs"] for r in records] == [STEPS[: i + 1] for i in range(len(STEPS))]  # LAWA over all seen
    second_log = (logs / "watch2.log").read_text()
    assert "resuming from" in second_log
    for step in done_before:  # the restarted watcher neither merged nor evaluated what the stream already held
        assert f"evaluating sft@{step} " not in second_log
    summary = json.loads((watch_dir / "summary.json").read_text())
    assert summary["finished"] and summary["checkpoints"] == len(STEPS)

    # The offline computation: one pass over the finished folder, in a fresh cache (every merge and evaluation redone).
    offline_dir = tmp_path / "offline"
    subprocess.run(watch_command(sft_dir, tmp_path / "root2", offline_dir, "merge=lawa", "logger=none",
                                 "watch.follow=false"), cwd=tmp_path, env=env(), check=True, capture_output=True,
                   timeout=600)
    offline = json.loads((offline_dir / "summary.json").read_text())
    assert comparable(summary) == comparable(offline)
    assert not any(Path(r["snapshot"]).is_relative_to(tmp_path / "root") for r in read_stream(offline_dir / "stream.jsonl"))

    # The verdict, recomputed here from the stream's scores.
    final = records[-1]["raw"]["math_synth"]
    reached = [r["step"] for r in records if r["merged"]["math_synth"] >= final]
    task = summary["tasks"]["math_synth"]
    assert task["final_score"] == final and task["first_step_merged_reaches_final"] == (reached[0] if reached else None)
    if reached:
        assert task["share_of_steps_saved"] == pytest.approx((STEPS[-1] - reached[0]) / STEPS[-1])
    assert task["first_step_raw_reaches_final"] == next(r["step"] for r in records if r["raw"]["math_synth"] >= final)

    # Nothing was written into the training folder: exactly what the SFT loop writes.
    written = {str(p.relative_to(sft_dir)) for p in sft_dir.rglob("*")}
    expected = {"base", "manifest.json", *(f"checkpoint-{s}" for s in STEPS),
                *(f"checkpoint-{s}/{f}" for s in STEPS for f in MODEL_FILES),
                *(f"base/{f}" for f in MODEL_FILES - {"trainer_state.json"})}
    assert written == expected

    # arm-table reads the watch's results: one raw and one merged row per step, the final checkpoint as converged SFT.
    from evals.results import load_results
    from evals.table import build_table

    table = build_table(load_results([watch_dir / "results"]))
    assert "sft_converged" in table.rows and {f"lawa@{s:03d}" for s in STEPS} <= set(table.rows)
    assert {f"sft@{s}" for s in STEPS[:-1]} <= set(table.rows)

    # W&B (offline): one run per watcher process; the restarted one logged the curves and the summary (the keys are
    # in its run file).
    runs = sorted((watch_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    data = runs[-1].read_bytes()
    assert b"watch/merged/math_synth" in data and b"watch/raw/math_synth" in data
    assert b"watch/math_synth/share_of_steps_saved" in data
    assert (watch_dir / "watch.png").stat().st_size > 0


def write_slowly(src: Path, dst: Path, first: list[str], pause_s: float, events: list) -> None:
    """Copy a checkpoint's files into `dst` in the order `first` (then the rest, as they sort); the weight file in three
    parts with `pause_s` between them. Records (time.time() after the last byte, file sizes) in `events`."""
    dst.mkdir(parents=True)
    names = first + sorted(p.name for p in src.iterdir() if p.name not in first)
    for name in names:
        data = (src / name).read_bytes()
        if name.endswith(".safetensors"):
            with open(dst / name, "wb") as handle:
                for part in range(3):
                    if part:
                        time.sleep(pause_s)
                    handle.write(data[part * len(data) // 3:(part + 1) * len(data) // 3])
                    handle.flush()
        else:
            (dst / name).write_bytes(data)
    events.append((dst.name, time.time(), {p.name: p.stat().st_size for p in dst.iterdir()}))


@pytest.mark.slow
def test_a_checkpoint_written_slowly_is_not_read_early(finished_run, tmp_path):
    """trainer_state.json first, then the weights in three parts with pauses longer than settle_s: the watcher waits
    for the whole file (its header's length), then takes exactly the final files. (13 s here.)"""
    folder, watch_dir = tmp_path / "sft", tmp_path / "watch"
    folder.mkdir()
    shutil.copytree(finished_run / "base", folder / "base")
    log = tmp_path / "watch.log"
    proc = subprocess.Popen(watch_command(folder, tmp_path / "root", watch_dir, "merge=ema", "logger=none",
                                          "watch.nice=3", "watch.num_threads=1"),
                            cwd=tmp_path, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    events: list = []
    try:
        wait_for(lambda: "arm-watch: following" in log.read_text(), "the watcher to start", procs=(proc,))
        # Bounded: one torch thread, and a lower priority than its parent (watch.nice).
        nice = min(os.getpriority(os.PRIO_PROCESS, 0) + 3, 19)
        assert f"(torch threads 1, niceness {nice})" in log.read_text()
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == nice
        # trainer_state.json first (the Trainer writes it last), the weights last: taken only with their last byte.
        write_slowly(finished_run / "checkpoint-40", folder / "checkpoint-40",
                     ["trainer_state.json", "config.json", "generation_config.json", "tokenizer.json",
                      "tokenizer_config.json"], 2.5, events)
        write_slowly(finished_run / "checkpoint-80", folder / "checkpoint-80", [], 0.0, events)
        shutil.copy(finished_run / "manifest.json", folder / "manifest.json")
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "checkpoint-40: not complete yet (model.safetensors" in text  # it looked while the weights were partial
    records = {r["step"]: r for r in read_stream(watch_dir / "stream.jsonl")}
    assert sorted(records) == [40, 80] and all(r["status"] == "ok" for r in records.values())
    for name, finished_at, sizes in events:
        record = records[int(name.split("-")[1])]
        assert record["files"] == sizes  # the whole files, as they ended up
        assert record["accepted_at"] >= finished_at  # taken only after its last byte was written
    assert records[80]["inputs"] == [40, 80]


@pytest.mark.slow
def test_deleted_and_corrupt_checkpoints_are_skipped(finished_run, tmp_path):
    """One checkpoint deleted before it is complete (skipped with a warning), one deleted after it was taken (its
    snapshot still feeds the merge), one corrupt (named and skipped); the watcher ends normally. (8 s here.)"""
    folder, watch_dir = tmp_path / "sft", tmp_path / "watch"
    folder.mkdir()
    shutil.copytree(finished_run / "base", folder / "base")
    log = tmp_path / "watch.log"
    # settle_s: long, so that a checkpoint is taken only once a later one appears or the run has ended.
    proc = subprocess.Popen(watch_command(folder, tmp_path / "root", watch_dir, "merge=lawa", "logger=none",
                                          "watch.settle_s=120"),
                            cwd=tmp_path, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "arm-watch: following" in log.read_text(), "the watcher to start", procs=(proc,))
        partial = folder / "checkpoint-40"
        partial.mkdir()
        shutil.copy(finished_run / "checkpoint-40" / "config.json", partial)
        wait_for(lambda: "checkpoint-40: not complete yet" in log.read_text(), "the watcher to see checkpoint-40",
                 procs=(proc,))
        shutil.rmtree(partial)  # as save_total_limit would, before it was ever complete
        shutil.copytree(finished_run / "checkpoint-80", folder / "checkpoint-80")
        corrupt = folder / "checkpoint-120"
        shutil.copytree(finished_run / "checkpoint-120", corrupt)
        weights = bytearray((corrupt / "model.safetensors").read_bytes())
        weights[8:40] = b"#" * 32  # a header that is not JSON, at the file's full size
        (corrupt / "model.safetensors").write_bytes(bytes(weights))
        wait_for(lambda: 80 in stream_steps(watch_dir), "the record of checkpoint-80", procs=(proc,))
        shutil.rmtree(folder / "checkpoint-80")  # deleted after it was taken
        shutil.copytree(finished_run / "checkpoint-160", folder / "checkpoint-160")
        shutil.copy(finished_run / "manifest.json", folder / "manifest.json")
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = {r["step"]: r for r in read_stream(watch_dir / "stream.jsonl")}
    assert records[40]["status"] == "deleted"
    assert records[120]["status"] == "corrupt" and "model.safetensors" in records[120]["reason"]
    assert records[80]["status"] == records[160]["status"] == "ok"
    assert records[160]["inputs"] == [80, 160]  # checkpoint-80's snapshot outlived its folder
    text = log.read_text()
    assert "checkpoint-40: deleted, skipped" in text and "checkpoint-120: corrupt, skipped" in text
    summary = json.loads((watch_dir / "summary.json").read_text())
    assert [s["step"] for s in summary["skipped"]] == [40, 120] and summary["finished"]


@pytest.mark.slow
def test_offline_arm_pass_shares_the_jobs_caches(finished_run, tmp_path, compose):
    """ARM streamed from the latest pair (watch.follow=false: one pass over a finished run); an `arm` job on the same
    folder and settings then finds the watcher's merge and evaluations in the cache (the same content keys) and
    recomputes nothing. (14 s here.)"""
    from arm.run.job import run_job

    root, watch_dir = tmp_path / "root", tmp_path / "watch"
    subprocess.run(watch_command(finished_run, root, watch_dir, "merge=arm", "logger=none", "watch.follow=false"),
                   cwd=tmp_path, env=env(), check=True, capture_output=True, timeout=600)
    records = {r["step"]: r for r in read_stream(watch_dir / "stream.jsonl")}
    assert [records[s]["inputs"] for s in STEPS] == [[40], [40, 80], [80, 120], [120, 160]]  # ARM: the latest pair
    merged_dirs = {s: root / "cache" / "merged" / records[s]["merge"] for s in STEPS}
    assert all((d / "merge_summary.json").is_file() for d in merged_dirs.values())
    stamp = (merged_dirs[80] / "merge_summary.json").stat().st_mtime_ns

    cfg = compose("merge=arm", "domain=math_synth", f"paths.root={root}", f"trajectory.path={finished_run}",
                  "trajectory.early_steps=[40,80]", "eval.split=validation", "eval.limit=20", "eval.batch_size=20",
                  "references.base=false", "references.converged=false", "logger=none")
    out = run_job(cfg, run_dir=tmp_path / "job")
    job = {r["name"]: r for r in out["results"]}
    watched = {name: json.loads((watch_dir / "results" / name / "results.json").read_text())
               for name in ("sft@40", "sft@80", "arm@080")}
    for name, twin in (("sft@40", "sft@40"), ("sft@80", "sft@80"), ("arm", "arm@080")):
        assert job[name]["cache_key"] == watched[twin]["cache_key"]
        assert job[name]["created"] == watched[twin]["created"]  # the same evaluation, not a second one
        assert job[name]["primary"] == watched[twin]["primary"]
    assert (merged_dirs[80] / "merge_summary.json").stat().st_mtime_ns == stamp  # the merge was not redone


@pytest.mark.slow
def test_follows_a_transformers_trainer_run(compose, tmp_path):
    """The project's Trainer SFT (transformers' Trainer: checkpoints written in place with optimizer, scheduler and
    RNG state, then rewritten as bf16 shards through `.rewrite.tmp/`) on a small model in the hub's layout, followed
    by arm-watch as it runs; every checkpoint taken once, whole, in its final (sharded bf16) form. (18 s here.)"""
    from arm.core.specs import TrajectorySpec
    from arm.trajectory.trainer_sft import trajectory_folder
    from tests.test_real_scale import FIXTURES, SFT_SMALL, save_real_layout

    base = save_real_layout(tmp_path / "base", tied=False)
    sft_args = ["model=qwen3-1.7b", "domain=math", f"model.path={base}", f"domain.sft_data.path={FIXTURES / 'metamathqa.jsonl'}",
                f"paths.root={tmp_path / 'out'}", *SFT_SMALL]
    folder = trajectory_folder(TrajectorySpec.from_config(compose(*sft_args)), tmp_path / "out" / "cache")
    watch_dir, log = tmp_path / "watch", tmp_path / "watch.log"
    # Scored on math_synth (the real domains' benchmarks are not available offline); the model block is the SFT's.
    watcher = subprocess.Popen(
        [str(BIN / "arm-watch"), "model=qwen3-1.7b", f"model.path={base}", f"trajectory.path={folder}",
         f"trajectory.base={base}", f"paths.root={tmp_path / 'root'}", f"watch.dir={watch_dir}",
         f"hydra.run.dir={tmp_path}/hydra", "merge=ties", "logger=none", "watch.limit=4", "eval.batch_size=4",
         *[w for w in WATCH if not w.startswith(("watch.limit", "eval.batch_size"))]],
        cwd=tmp_path, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "arm-watch: following" in log.read_text(), "the watcher to start", procs=(watcher,))
        sft = subprocess.Popen([sys.executable, "-m", "arm.run.trainer_sft", *sft_args], cwd=tmp_path, env=env(),
                               stdout=open(tmp_path / "sft.log", "w"), stderr=subprocess.STDOUT)

        def rewritten(step: int) -> bool:  # the rewrite's last write: config.json's dtype
            try:
                return json.loads((folder / f"checkpoint-{step}" / "config.json").read_text()).get("dtype") == "bfloat16"
            except (OSError, ValueError):
                return False

        # Paused once its first checkpoint is final, until the watcher has taken it: followed while it runs.
        wait_for(lambda: rewritten(1), "the Trainer's first checkpoint", procs=(sft,))
        sft.send_signal(signal.SIGSTOP)
        wait_for(lambda: 1 in stream_steps(watch_dir), "the watcher's first record", procs=(watcher,))
        assert not (folder / "manifest.json").exists()
        sft.send_signal(signal.SIGCONT)
        assert sft.wait(timeout=600) == 0, (tmp_path / "sft.log").read_text()[-3000:]
        assert watcher.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        for proc in (watcher, locals().get("sft")):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
    records = read_stream(watch_dir / "stream.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["status"] == "ok" for r in records)
    assert [r["inputs"] for r in records] == [[1], [1, 2], [2, 3], [3, 4]]  # TIES on the latest k = 2
    for r in records:
        ckpt = folder / r["checkpoint"]
        assert "optimizer.pt" not in r["files"] and "model.safetensors.index.json" in r["files"]
        assert r["files"] == {name: (ckpt / name).stat().st_size for name in r["files"]}  # the final, rewritten files
        assert json.loads((Path(r["snapshot"]) / "config.json").read_text())["dtype"] == "bfloat16"
    assert records[-1]["final"] and json.loads((watch_dir / "summary.json").read_text())["finished"]
