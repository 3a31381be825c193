"""`arm-watch`: streaming merges of a running SFT, scored next to the raw checkpoints as they land.

    python -m arm.run.sft --domain code_synth --out runs/sft-code &          # an SFT that writes checkpoints
    arm-watch trajectory.path=runs/sft-code domain=code_synth merge=lawa     # beside it, same Hydra overrides as `arm`

It follows `trajectory.path` (arm/run/follow.py says when a checkpoint is complete). For each new complete
checkpoint it

1. takes a snapshot of its model files into the cache (hard links, or copies across file systems), so that
   Trainer's `save_total_limit` may delete it afterwards, and never writes into the training folder;
2. updates the streaming merge by the method's own rule over the checkpoints seen so far (`merge_inputs`):
   ARM iterates from the latest pair (its `stream` formulation folds in every checkpoint seen), the averaging
   methods (lawa, ema, wsm) average their window of the latest checkpoints, any other method merges the latest
   k checkpoints, k = watch.inputs or the number of configured early steps;
3. evaluates the merged model and the raw checkpoint on `watch.split` (validation) over `watch.limit` documents;
4. appends one record to `stream.jsonl` in its folder, logs it to W&B (one curve per row, against the SFT step),
   redraws `watch.png` and rewrites `summary.json`, `summary.md`, `results/` and `table.md` (arm-table reads them).

Merges and evaluations go through the job's content-keyed caches (arm/run/job.py merge_cached, evaluate_cached),
so a watcher that is killed and started again continues from its stream and recomputes nothing; a checkpoint's
key is the one `arm trajectory.path=...` gives it (arm/trajectory/build.py folder_key), so `arm` jobs on the
finished run reuse the watcher's evaluations where the settings agree.

It ends by itself when the run has finished (manifest.json, or the final checkpoint: trainer_state's global_step
reaching max_steps), after `watch.idle_timeout_s` without change, or at once with `watch.follow=false` (one pass
over the checkpoints already there: the offline computation). The summary gives, per step, the raw and merged
scores, the first step whose merge reaches the final checkpoint's score, and the share of the SFT's steps that
this saves.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from arm.core.cache import atomic_write_json, atomic_write_text, build_once, content_key, to_plain
from arm.core.errors import ArmError, ConfigError, InputError
from arm.core.paths import CONF_DIR
from arm.core.provenance import now_iso
from arm.core.refs import ModelRef, Trajectory
from arm.core.specs import TrajectorySpec, plain_config
from arm.data.splits import ensure_data
from arm.merge.engine import merge_identity
from arm.merge.tensor_io import ModelFolder, TensorIOError
from arm.run.follow import Checkpoint, FolderFollower, list_checkpoints, model_files, run_ended
from arm.run.job import evaluate_cached, merge_cached
from arm.run.stages import Paths, validate
from arm.run.tracking import start_tracker
from arm.run.watch_report import plot_watch, summarize, summary_markdown
from arm.trajectory import trainer_sft as sft_hf
from arm.trajectory.build import folder_key, own_model_name, tokenizer_folder
from evals.results import RESULTS_NAME, load_result, load_results, write_result
from evals.table import build_table, to_markdown

log = logging.getLogger("arm.watch")

STREAM = "stream.jsonl"
SUMMARY = "summary.json"
PLOT = "watch.png"
WINDOW_METHODS = ("lawa", "ema", "wsm")
PER_INPUT_KEYS = ("weights", "density", "drop_rate")  # merge.* keys that may hold one value per input (a list)


# ------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class WatchSettings:
    dir: str | None
    poll_s: float
    settle_s: float
    idle_timeout_s: float
    limit: int | float | None
    split: str
    num_threads: int | None
    nice: int
    follow: bool
    inputs: int | None

    @classmethod
    def from_cfg(cls, watch: Mapping[str, Any] | None) -> WatchSettings:
        if not watch:
            raise ConfigError("watch", "missing: conf/config.yaml's watch: block (poll_s, limit, ...)")
        w = dict(watch)

        def number(key: str, low: float, allow_none: bool = False) -> float | None:
            value = w.get(key)
            if value is None and allow_none:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
                raise ConfigError(f"watch.{key}", f"expected a number >= {low}{' or null' if allow_none else ''}, got {value!r}")
            return float(value)

        def integer(key: str, low: int, allow_none: bool = False) -> int | None:
            value = w.get(key)
            if value is None and allow_none:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"watch.{key}", f"expected an integer >= {low}{' or null' if allow_none else ''}, got {value!r}")
            return int(value)

        limit = w.get("limit")
        if limit is not None and not ((isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1)
                                      or (isinstance(limit, float) and 0 < limit < 1)):
            raise ConfigError("watch.limit", f"expected null, a number of documents >= 1 or a fraction in (0, 1), got {limit!r}")
        split = w.get("split", "validation")
        if split not in ("validation", "test"):
            raise ConfigError("watch.split", f"'{split}' is not one of: validation, test")
        nice = integer("nice", 0)
        if not isinstance(w.get("follow"), bool):
            raise ConfigError("watch.follow", f"expected true or false, got {w.get('follow')!r}")
        return cls(dir=w.get("dir"), poll_s=number("poll_s", 0.01), settle_s=number("settle_s", 0.0),
                   idle_timeout_s=number("idle_timeout_s", 0.0), limit=limit, split=split,
                   num_threads=integer("num_threads", 1, allow_none=True), nice=int(nice),
                   follow=bool(w["follow"]), inputs=integer("inputs", 1, allow_none=True))


def bound_resources(settings: WatchSettings) -> None:
    """The watcher's CPU share: lower priority (os.nice) and a bounded number of torch/OpenMP threads."""
    if settings.nice > 0 and hasattr(os, "nice"):
        os.nice(settings.nice)
    if settings.num_threads:
        n = str(settings.num_threads)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = n
        import torch

        torch.set_num_threads(settings.num_threads)
        try:
            torch.set_num_interop_threads(settings.num_threads)
        except RuntimeError:  # already set in this process
            pass


# ------------------------------------------------------------------------------------------- input rule


def configured_inputs(cfg: Mapping[str, Any], settings: WatchSettings) -> int:
    """k of the methods merged 'on their configured inputs': watch.inputs, else the number of early steps."""
    if settings.inputs:
        return settings.inputs
    early = (cfg.get("trajectory") or {}).get("early_steps") or (cfg["model"].get("sft") or {}).get("early_steps")
    return len(early) if early else 2


def merge_inputs(merge_cfg: Mapping[str, Any], steps: Sequence[int], k: int) -> tuple[list[int], dict[str, Any]] | None:
    """The checkpoints (steps, in order) the streaming merge takes at the latest of `steps`, and the merge.* config
    it runs with; None while the method cannot merge yet (too few checkpoints for its rule).

    - arm: the latest pair (one checkpoint at the first step, unless direction=delta needs two); its
      formulation=stream: every checkpoint seen (the stream's iterate).
    - lawa, ema, wsm: their window of the latest checkpoints (every one seen when merge.window is null);
      the window is shortened to the checkpoints seen so far.
    - any other method: the latest k; a method with one value per input (linear's weights) waits for k of them.
    """
    steps = sorted(steps)
    cfg = dict(merge_cfg)
    name = cfg["name"]
    n = len(steps)
    if n == 0:
        return None
    if name == "arm":
        if cfg.get("formulation") == "stream":
            return steps, cfg
        need = 2 if cfg.get("direction") == "delta" else 1
        return (steps[-2:], cfg) if n >= need else None
    if name in WINDOW_METHODS:
        window = cfg.get("window")
        if window is None:
            return steps, cfg
        take = min(int(window), n)
        return steps[-take:], {**cfg, "window": take}
    per_input = [key for key, value in cfg.items() if key in PER_INPUT_KEYS and isinstance(value, list)]
    if per_input:
        return (steps[-k:], cfg) if n >= k else None
    return steps[-k:], cfg


# ------------------------------------------------------------------------------------------- stream


def read_stream(path: Path) -> list[dict[str, Any]]:
    """The records of a stream; a last line cut short by a kill is dropped (and removed from the file)."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the last line, without its newline: a write cut short
                log.warning("%s: dropping its last line, cut short (%s)", path, exc)
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
                break
            raise InputError(f"{path}:{number}: not a JSON record ({exc}); move the file away to start over") from None
    return records


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ------------------------------------------------------------------------------------------- the watcher


def snapshot(path: Path, key: str, files: Mapping[str, int], cache: Path) -> Path:
    """A copy of a checkpoint's model files in the cache (hard links where the file system allows, else copies),
    which outlives the checkpoint (save_total_limit) and never changes under the merge or evaluation."""
    final = cache / "watch" / "checkpoints" / f"{path.name}-{key}"

    def build(tmp: Path) -> None:
        for name in files:
            try:
                os.link(path / name, tmp / name)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError):
                    raise
                shutil.copy2(path / name, tmp / name)

    build_once(final, build, is_complete=lambda p: p.is_dir())
    return final


class Watcher:
    """One watch: its folder, stream, caches, tracker and plot (see the module's docstring)."""

    def __init__(self, cfg: dict[str, Any], settings: WatchSettings, run_dir: Path | None = None):
        self.cfg = cfg
        self.settings = settings
        trajectory = cfg.get("trajectory") or {}
        if cfg["merge"]["name"] == "none":
            raise ConfigError("merge", "arm-watch streams a merge: pick a method, e.g. merge=lawa")
        self.paths = Paths.from_cfg(cfg, run_dir)
        self.dtype: str | None = None  # the dtype a checkpoint's config.json names once it is final (arm/run/follow.py)
        spec = TrajectorySpec.from_config(cfg)
        # the job's data: a synthetic domain in the model's own chat template where it has one (arm/data/chat_templates.py)
        self.data = (ensure_data(cfg["domain"], self.paths.cache, cfg["model"].get("prompt_format") or "plain",
                                 tokenizer_folder(spec, self.paths.cache))
                     if cfg["domain"].get("synthetic") else None)
        if trajectory.get("path"):
            self.folder = self._absolute(trajectory["path"])
        elif cfg["model"].get("arch") is None:
            # A real model: the folder the Trainer SFT writes in place for this config (slurm/sft.sbatch, arm.run.trainer_sft),
            # whose checkpoints are final once rewritten in model.sft.save_dtype
            self.folder = sft_hf.trajectory_folder(spec, self.paths.cache, self.data.key if self.data else None)
            self.dtype = sft_hf.resolve_sft_config(cfg["model"].get("sft"))["save_dtype"]
        else:
            raise ConfigError("trajectory.path", "arm-watch follows an SFT output folder: set trajectory.path=<folder> "
                                                 "(the tiny model's cached trajectory is built in a temporary folder and "
                                                 "appears whole at the end; train one to follow with "
                                                 "`python -m arm.run.sft --domain <domain> --out <folder>`)")
        self.eval_cfg = {**cfg, "eval": {**cfg["eval"], "split": settings.split, "limit": settings.limit}}
        self.k = configured_inputs(cfg, settings)
        self.method = cfg["merge"]["name"]
        key = content_key("watch", str(self.folder.resolve()), merge_identity(cfg["merge"]),
                          to_plain(self.eval_cfg["eval"]), cfg["model"]["name"], cfg["domain"]["name"],
                          trajectory.get("base"), self.k, self.data.key if self.data else None)
        self.dir = (self._absolute(settings.dir) if settings.dir else
                    self.paths.root / "runs" / "watch" / f"{cfg['model']['name']}-{cfg['domain']['name']}-{self.method}-{key}")
        if self.dir.resolve() == self.folder.resolve() or self.folder.resolve() in self.dir.resolve().parents:
            raise ConfigError("watch.dir", f"{self.dir} lies inside the training folder {self.folder}; the watcher never writes there")
        self.title = f"arm-watch: {cfg['model']['name']} · {cfg['domain']['name']} · merge={self.method} · " \
                     f"{settings.split} (limit {settings.limit})"
        self.records: list[dict[str, Any]] = []
        self.base: ModelRef | None = None
        self.tracker: Any = None

    def _absolute(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        if p.is_absolute():
            return p
        try:
            from hydra.core.hydra_config import HydraConfig

            return Path(HydraConfig.get().runtime.cwd) / p
        except (ImportError, ValueError):
            return Path.cwd() / p

    # ---- the base model
    def resolve_base(self) -> ModelRef:
        given = (self.cfg.get("trajectory") or {}).get("base")
        path = self._absolute(given) if given else self.folder / "base"
        if not given and not path.is_dir() and self.cfg["model"].get("arch") is None:
            # the Trainer SFT's base: model.path, the model's converted wheel, or the hub snapshot
            path = sft_hf.resolve_model_source(self.cfg["model"], self.paths.cache)
        if not path.is_dir():
            raise ConfigError("trajectory.base", f"{path}: base model folder not found (the run's folder has no base/: "
                                                 "set trajectory.base)")
        reason = incomplete_reason_base(path)
        if reason:
            raise InputError(f"{path}: base model folder is not complete ({reason})")
        if path.parent == self.folder:  # written by the run: snapshot it like a checkpoint
            files = {name: (path / name).stat().st_size for name in model_files(path)}
            key = folder_key(path)
            return ModelRef("base", snapshot(path, key, files, self.paths.cache), key)
        return ModelRef("base", path, folder_key(path))

    # ---- one checkpoint
    def take(self, ckpt: Checkpoint) -> ModelRef | None:
        """Snapshot a complete checkpoint; None when its files changed meanwhile (looked at again later)."""
        key = folder_key(ckpt.path)
        shot = snapshot(ckpt.path, key, ckpt.files, self.paths.cache)
        whole = all((shot / n).stat().st_size == s for n, s in ckpt.files.items())
        # Deleted right after it was taken: the copy is whole and stays; changed in place: look at it again.
        if not whole or (ckpt.path.is_dir() and folder_key(ckpt.path) != key):
            log.warning("%s changed while it was taken; looking at it again", ckpt.path)
            shutil.rmtree(shot, ignore_errors=True)
            return None
        return ModelRef(f"sft@{ckpt.step}", shot, key, ckpt.step)

    def process(self, ckpt: Checkpoint, ref: ModelRef, seen: list[dict[str, Any]]) -> dict[str, Any]:
        """Merge (the method's rule over the checkpoints seen so far) and evaluate; the stream's record."""
        by_step = {r["step"]: r for r in seen}
        by_step[ckpt.step] = {"step": ckpt.step, "key": ref.key, "snapshot": str(ref.path)}
        chosen = merge_inputs(self.cfg["merge"], list(by_step), self.k)
        accepted_at = time.time()
        t0 = time.perf_counter()
        raw, raw_folder = evaluate_cached(ref, role="reference", cfg=self.eval_cfg, data=self.data, paths=self.paths)
        raw_s = time.perf_counter() - t0
        record: dict[str, Any] = {
            "step": ckpt.step, "status": "ok", "checkpoint": ckpt.path.name, "key": ref.key, "snapshot": str(ref.path),
            "files": ckpt.files, "max_steps": ckpt.max_steps, "final": ckpt.final, "method": self.method,
            "split": self.settings.split, "limit": self.settings.limit,
            "raw": {t: c["value"] for t, c in raw["primary"].items()},
            "metric": {t: c["metric"] for t, c in raw["primary"].items()},
            "n": {t: c["n"] for t, c in raw["primary"].items()},
            "raw_eval": raw_folder.name, "accepted_at": accepted_at, "inputs": None, "merged": None,
        }
        wall = {"raw_eval": round(raw_s, 3)}
        if chosen is not None:
            steps, merge_cfg = chosen
            early = [ModelRef(f"sft@{s}", Path(by_step[s]["snapshot"]), by_step[s]["key"], s) for s in steps]
            trajectory = Trajectory(base=self.base, early=early, converged=None, folder=self.folder)
            cfg = {**self.eval_cfg, "merge": merge_cfg}
            t0 = time.perf_counter()
            merged, summary = merge_cached(trajectory, cfg, self.paths, self.data, None)
            wall["merge"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            result, merged_folder = evaluate_cached(merged, role="merge", cfg=cfg, data=self.data, paths=self.paths,
                                                    method=merged.name, params=summary.get("params"),
                                                    merge_wall_s=summary.get("wall_s"))
            wall["merged_eval"] = round(time.perf_counter() - t0, 3)
            record.update(inputs=steps, merged={t: c["value"] for t, c in result["primary"].items()},
                          merge=Path(summary["out_dir"]).name, merged_eval=merged_folder.name)
            self._copy_result(result, merged_folder, f"{self.method}@{self._padded(ckpt)}", label=True)
        self._copy_result(raw, raw_folder, f"sft@{ckpt.step}")
        record["wall_s"] = wall
        record["written_at"] = now_iso()
        return record

    def _padded(self, ckpt: Checkpoint) -> str:
        width = len(str(ckpt.max_steps or ckpt.step))
        return f"{ckpt.step:0{width}d}"

    def _copy_result(self, result: Mapping[str, Any], folder: Path, name: str, label: bool = False) -> None:
        out = self.dir / "results" / name
        out.mkdir(parents=True, exist_ok=True)
        write_result(out / RESULTS_NAME, {**result, "label": name} if label else dict(result))
        if (folder / "samples.jsonl").is_file():
            shutil.copy(folder / "samples.jsonl", out / "samples.jsonl")

    # ---- outputs after each record
    def publish(self, record: Mapping[str, Any] | None, finished: bool, end_reason: str | None) -> dict[str, Any]:
        summary = summarize(self.records, finished, end_reason)
        summary.update(folder=str(self.folder), method=self.method, model=self.cfg["model"]["name"],
                       domain=self.cfg["domain"]["name"], split=self.settings.split, limit=self.settings.limit)
        if finished:
            self._final_results(summary)
        atomic_write_json(self.dir / SUMMARY, summary)
        atomic_write_text(self.dir / "summary.md", summary_markdown(summary, self.title))
        plot = plot_watch(self.records, summary, self.dir / PLOT, self.title)
        if record is not None and record.get("status") == "ok":
            metrics = {"sft_step": record["step"]}
            metrics.update({f"watch/raw/{t}": v for t, v in record["raw"].items()})
            metrics.update({f"watch/merged/{t}": v for t, v in (record.get("merged") or {}).items()})
            self.tracker.log_metrics(metrics)
        if finished:
            self._finish_tracker(summary, plot)
        return summary

    def _final_results(self, summary: Mapping[str, Any]) -> None:
        """The final checkpoint's row becomes `sft_converged` (arm-table's Δ SFT column is then merged − final)."""
        ok = [r for r in self.records if r.get("status") == "ok"]
        if not ok:
            return
        final = max(ok, key=lambda r: r["step"])
        src = self.dir / "results" / f"sft@{final['step']}"
        dst = self.dir / "results" / "sft_converged"
        if src.is_dir():
            result = load_result(src / RESULTS_NAME)
            dst.mkdir(parents=True, exist_ok=True)
            write_result(dst / RESULTS_NAME, {**result, "name": "sft_converged"})
            if (src / "samples.jsonl").is_file():
                shutil.copy(src / "samples.jsonl", dst / "samples.jsonl")
            shutil.rmtree(src)
        results = load_results([self.dir / "results"])
        atomic_write_text(self.dir / "table.md", to_markdown(build_table(results)))

    def _finish_tracker(self, summary: Mapping[str, Any], plot: Path | None) -> None:
        run = getattr(self.tracker, "run", None)
        if run is not None:
            run.summary["watch/summary"] = {k: v for k, v in summary.items() if k != "rows"}
            for task, t in summary["tasks"].items():
                run.summary[f"watch/{task}/first_step_merged_reaches_final"] = t["first_step_merged_reaches_final"]
                run.summary[f"watch/{task}/share_of_steps_saved"] = t["share_of_steps_saved"]
        if plot is not None:
            self.tracker.log_image("watch", plot)

    # ---- the loop
    def run(self) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.dir / ".lock", "a+")  # noqa: SIM115 - held for the watcher's lifetime
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{self.dir}: another arm-watch is following this run (watch.dir)") from None
        atomic_write_json(self.dir / "config.json", to_plain(self.cfg))
        self.records = read_stream(self.dir / STREAM)
        for r in self.records:
            if r.get("status") == "ok" and not Path(r["snapshot"]).is_dir():
                raise InputError(f"{self.dir / STREAM}: step {r['step']}'s snapshot {r['snapshot']} is gone (the cache was "
                                 "cleaned?); move the stream away to start over")
        tracker_cfg = {**self.cfg, "logger": {**self.cfg["logger"], "group": self.cfg["logger"].get("group") or f"watch-{self.dir.name}"}}
        self.tracker = start_tracker(tracker_cfg, self.dir, to_plain(self.cfg))
        run = getattr(self.tracker, "run", None)
        if run is not None:
            run.define_metric("sft_step")
            run.define_metric("watch/*", step_metric="sft_step")
        for r in sorted(self.records, key=lambda r: r["step"]):  # a restarted watcher's W&B run holds the whole curve
            if r.get("status") == "ok":
                metrics = {"sft_step": r["step"], **{f"watch/raw/{t}": v for t, v in r["raw"].items()},
                           **{f"watch/merged/{t}": v for t, v in (r.get("merged") or {}).items()}}
                self.tracker.log_metrics(metrics)
        if self.records:
            log.info("resuming from %s: %d checkpoint(s) done (%s)", self.dir / STREAM, len(self.records),
                     ", ".join(str(r["step"]) for r in self.records))
        try:
            return self._loop()
        finally:
            self.tracker.finish()
            lock.close()

    def _loop(self) -> dict[str, Any]:
        s = self.settings
        done = {r["step"] for r in self.records}
        follower = FolderFollower(self.folder, s.settle_s, done, dtype=self.dtype,
                                  on_wait=lambda step, reason: log.info("checkpoint-%d: not complete yet (%s)", step, reason))
        import torch

        print(f"arm-watch: following {self.folder} -> {self.dir} (torch threads {torch.get_num_threads()}, "
              f"niceness {os.getpriority(os.PRIO_PROCESS, 0)})", file=sys.stderr, flush=True)
        final_seen = any(r.get("final") for r in self.records)
        end_reason = None
        while True:
            ended = run_ended(self.folder) or not s.follow
            for ckpt in follower.poll(ended=ended):
                self._handle(ckpt, follower)
                final_seen = final_seen or ckpt.final
                follower.last_change = time.monotonic()  # the time spent merging and evaluating is not idle
            pending = [step for step in _steps(self.folder) if step not in follower.done]
            if ended and not pending:
                end_reason = "the run wrote manifest.json" if s.follow else "offline pass (watch.follow=false)"
                break
            if final_seen and not pending:
                end_reason = "the final checkpoint (trainer_state: global_step = max_steps)"
                break
            if time.monotonic() - follower.last_change > s.idle_timeout_s:
                end_reason = f"idle for {s.idle_timeout_s:g} s (watch.idle_timeout_s)"
                log.warning("%s: nothing new for %g s; ending (pending: %s)", self.folder, s.idle_timeout_s, pending or "none")
                break
            time.sleep(s.poll_s)
        summary = self.publish(None, True, end_reason)
        print(f"arm-watch: done ({end_reason}): {len(summary['rows'])} checkpoint(s); summary {self.dir / SUMMARY}",
              file=sys.stderr, flush=True)
        return summary

    def _handle(self, ckpt: Checkpoint, follower: FolderFollower) -> None:
        record: dict[str, Any] | None
        if ckpt.status != "complete":
            log.warning("%s: %s, skipped (%s)", ckpt.path, ckpt.status, ckpt.reason)
            record = {"step": ckpt.step, "status": ckpt.status, "checkpoint": ckpt.path.name, "reason": ckpt.reason}
        else:
            try:
                ref = self.take(ckpt)
            except FileNotFoundError as exc:
                ref, record = None, {"step": ckpt.step, "status": "deleted", "checkpoint": ckpt.path.name,
                                     "reason": f"deleted while it was taken ({exc.filename})"}
                log.warning("%s: deleted while it was taken, skipped", ckpt.path)
            else:
                if ref is None:
                    follower.forget(ckpt.step)
                    return
                seen = [r for r in self.records if r.get("status") == "ok" and r["step"] < ckpt.step]
                if self.base is None:  # a missing or incomplete base stops the watcher with its error (not a skip)
                    self.base = self.resolve_base()
                try:
                    record = self.process(ckpt, ref, seen)
                except InputError as exc:  # unreadable weights, a diverging merge: named, skipped
                    log.warning("%s: corrupt, skipped (%s)", ckpt.path, exc)
                    record = {"step": ckpt.step, "status": "corrupt", "checkpoint": ckpt.path.name, "reason": str(exc)}
        follower.mark_done(ckpt.step)
        append_record(self.dir / STREAM, record)
        self.records.append(record)
        if record["status"] == "ok":
            merged = record.get("merged") or {}
            log.info("step %d: raw %s, merged %s (inputs %s)", record["step"], _fmt(record["raw"]), _fmt(merged), record["inputs"])
        self.publish(record, False, None)


def incomplete_reason_base(path: Path) -> str | None:
    if not (path / "config.json").is_file():
        return "no config.json"
    try:
        ModelFolder(path)
    except TensorIOError as exc:
        return str(exc)
    return None


def _steps(folder: Path) -> list[int]:
    return list(list_checkpoints(folder))


def _fmt(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{t} {100 * v:.1f}" for t, v in scores.items()) or "-"


def run_watch(cfg: Mapping[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """Follow `trajectory.path` until the run ends; returns the summary (also written to the watch's folder)."""
    cfg = plain_config(cfg)
    name, why = own_model_name(TrajectorySpec.from_config(cfg))
    if name != cfg["model"].get("name"):  # the user's own model, named after itself, as `arm` names it
        log.warning("%s", why)
        cfg["model"]["name"] = name
    settings = WatchSettings.from_cfg(cfg.get("watch"))
    # The job's checks, with the evaluation the watcher runs; a window average's window is not checked against the
    # configured early steps (the watcher shortens it to the checkpoints seen so far).
    checked = {**cfg, "eval": {**cfg["eval"], "split": settings.split, "limit": settings.limit}}
    if cfg["merge"]["name"] in WINDOW_METHODS:
        checked["merge"] = {**cfg["merge"], "window": None}
    validate(checked)
    bound_resources(settings)
    return Watcher(cfg, settings, run_dir).run()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> dict | None:
    try:
        return run_watch(cfg)
    except ArmError as exc:
        log.error("%s", exc)
        print(f"arm-watch: error: {exc}", file=sys.stderr)
        sys.exit(2)


HELP_HEADER = ("arm-watch: follow an SFT output folder while it is written (trajectory.path=...); at each complete "
               "checkpoint, update the streaming merge (merge=...), score it and the raw checkpoint on watch.split, and "
               "append a record to stream.jsonl in the watch folder. Same config groups and overrides as `arm`; its own keys: "
               "watch.* (conf/config.yaml).")
HELP_FOOTER = ("Examples:\n  python -m arm.run.sft --domain code_synth --out runs/sft &\n"
               "  arm-watch trajectory.path=runs/sft domain=code_synth merge=ema\n"
               "  arm-watch trajectory.path=runs/sft domain=code_synth merge=ema watch.follow=false   # one pass, offline")


def main() -> None:
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        sys.argv += ["hydra.help.app_name=arm-watch", f'hydra.help.header="{HELP_HEADER}"',
                     f'hydra.help.footer="{HELP_FOOTER}"']
    _app()


if __name__ == "__main__":
    main()
