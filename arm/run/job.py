"""One job: trajectory -> merge -> evaluate -> report.

Each stage's output is cached under a content key (the stage's config and its inputs' keys), so a
sweep trains a trajectory once and evaluates each reference model once.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arm.core.cache import (
    atomic_write_json,
    atomic_write_text,
    build_once,
    file_lock,
    read_json,
    to_plain,
)
from arm.core.errors import InputError
from arm.core.refs import ModelRef, Trajectory
from arm.core.specs import TrajectorySpec, plain_config
from arm.core.timing import StageClock, built_since
from arm.data.sft_data import ensure_calibration_data
from arm.data.splits import DomainData, ensure_data
from arm.merge.engine import MergeContext, merge_from_config
from arm.merge.registry import get_method
from arm.run.plan import check_devices, run_plan
from arm.run.stages import Paths, calibration_size, eval_folder, merge_folder, takes_calibration, validate
from arm.run.tracking import start_tracker
from arm.trajectory.build import ensure_trajectory, own_model_name, tokenizer_folder
from evals import runner
from evals.results import RESULTS_NAME, build_result, load_result, write_result
from evals.runner import check_model_folder, read_samples, task_specs
from evals.table import build_table, to_markdown
from evals.task_index import check_real_tasks
from evals.trajectory_report import plot_trajectory

log = logging.getLogger(__name__)



def evaluate_cached(
    model: ModelRef,
    *,
    role: str,
    cfg: Mapping[str, Any],
    data: DomainData | None,
    paths: Paths,
    method: str | None = None,
    params: Mapping[str, Any] | None = None,
    merge_wall_s: float | None = None,
    clock: StageClock | None = None,
) -> tuple[dict[str, Any], Path]:
    """Evaluate `model` once per evaluation key; returns the result and its folder (timed on `clock`)."""

    folder = eval_folder(model, cfg, data, paths)
    key = folder.name.rsplit("-", 1)[1]
    specs = runner.task_specs(cfg["domain"])
    split = cfg["eval"].get("split", "test")
    unsafe = bool(cfg["domain"].get("unsafe_code", False))

    def build(tmp: Path) -> None:
        include = None
        if cfg["domain"].get("synthetic"):
            include = runner.write_synthetic_tasks(specs, data.folder, split, tmp / "tasks")
        log.info("evaluating %s (%s) on %s/%s", model.name, model.path, cfg["domain"]["name"], split)
        evaluation = runner.evaluate(model.path, specs, runner.effective_eval_cfg(cfg["eval"], cfg["domain"]), tmp, include_path=include,
                                     model_cfg=cfg["model"], unsafe_code=unsafe, seed=int(cfg.get("seed", 0)))
        result = build_result(
            name=model.name, role=role, model=cfg["model"]["name"], domain=cfg["domain"]["name"], split=split,
            model_path=model.path, evaluation=evaluation, config=to_plain(cfg), cache_key=key, step=model.step,
            method=method, params=params, merge_wall_s=merge_wall_s,
        )
        write_result(tmp / RESULTS_NAME, result)

    with (clock or StageClock()).stage("eval", model.name) as stage:
        stage["cached"] = not build_once(folder, build, is_complete=lambda p: (p / RESULTS_NAME).is_file())
    if stage["cached"]:
        log.info("reusing evaluation of %s (%s)", model.name, folder.name)
    return load_result(folder / RESULTS_NAME), folder


def merge_cached(
    trajectory: Trajectory,
    cfg: Mapping[str, Any],
    paths: Paths,
    data: DomainData | None = None,
    tracker: Any = None,
    clock: StageClock | None = None,
) -> tuple[ModelRef, dict[str, Any]]:
    """Run the configured merge method on the trajectory's early checkpoints, once per key.

    Every method gets the same inputs (trajectory.base, trajectory.inputs). Whole-model methods
    (ARM) also get a MergeContext: calibration = the domain's train records, converged = the
    converged SFT checkpoint (diagnostics only: not part of the key), log = the tracker's metrics.
    The calibration data's key joins the merge key when the method's weights depend on it.
    """

    merge_cfg = to_plain(cfg["merge"])
    method = merge_cfg["name"]
    key, folder = merge_folder(trajectory, cfg, paths, data)
    summary_file = folder / "merge_summary.json"
    with (clock or StageClock()).stage("merge", method) as stage:
        stage["cached"] = summary_file.is_file()
        if not stage["cached"]:
            _merge_once(trajectory, merge_cfg, folder, summary_file, data, tracker)
    summary = read_json(summary_file)
    get_method(method).write_report(folder)   # e.g. ARM's diagnostics.png: drawn after the merge, not timed with it
    return ModelRef(method, folder, key), summary


def _merge_once(trajectory: Trajectory, merge_cfg: dict[str, Any], folder: Path, summary_file: Path,
                data: DomainData | None, tracker: Any) -> None:
    """The merge itself, under the folder's lock; the stage is built once across concurrent jobs."""
    method = merge_cfg["name"]
    with file_lock(folder.with_name(folder.name + ".lock")):
        if not summary_file.is_file():
            if folder.exists():
                shutil.rmtree(folder)
            context = MergeContext(
                calibration=data.split("train") if data is not None else None,
                converged=trajectory.converged.path if trajectory.converged is not None else None,
                log=tracker.log_metrics if tracker is not None else None,
            )
            start = time.perf_counter()
            try:
                summary = merge_from_config({**merge_cfg, "overwrite": False}, trajectory.base.path, trajectory.inputs,
                                            folder, progress=False, context=context)
            except ValueError as exc:  # bad inputs or parameters: the message names the file, tensor or key
                raise InputError(f"merge '{method}': {exc}") from exc
            summary = {**to_plain(summary), "wall_s": round(time.perf_counter() - start, 3), "out_dir": str(folder)}
            atomic_write_json(summary_file, summary)


def plot_job(trajectory: Trajectory, results: list[dict[str, Any]], cfg: Mapping[str, Any], out: Path) -> Path | None:
    """Validation loss along the trajectory and the evaluated references' scores vs step (PNG)."""
    if not trajectory.manifest.get("history"):
        return None  # a trajectory read from elsewhere may have no loss history

    task = next(iter(results[0]["primary"])) if results else None
    models = [
        {"step": r["step"] or 0, "score": r["primary"][task]["value"]}
        for r in results
        if r["role"] == "reference" and task in r["primary"]
    ]
    split = cfg["eval"].get("split", "test")
    plot_trajectory(trajectory.manifest, {"models": sorted(models, key=lambda m: m["step"]), "split": split,
                                          "domain": cfg["domain"]["name"]}, out)
    return out


def run_job(cfg: Mapping[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """Run one job and return {"results": [...], "table": markdown, "run_dir": ...}.

    The config is resolved once, here, into plain mappings and specs (arm/core/specs.py): nothing below
    this layer sees a Hydra DictConfig."""
    cfg = plain_config(cfg)
    validate(cfg)
    name, why = own_model_name(TrajectorySpec.from_config(cfg))
    if name != cfg["model"].get("name"):  # the user's own model, named after itself (rows, tables, cache folders)
        log.warning("%s", why)
        cfg["model"]["name"] = name
    if not cfg["domain"].get("synthetic"):  # real tasks against the installed lm-eval, before SFT or any model loading
        check_real_tasks(task_specs(cfg["domain"]), unsafe_code=bool(cfg["domain"].get("unsafe_code", False)))
    if cfg.get("plan"):  # print every stage, cached or not, with its GPUs and memory; run nothing (arm/run/plan.py)

        return run_plan(cfg)

    check_devices(cfg)  # a stage that cannot fit the visible GPUs stops the job here, before loading anything
    paths = Paths.from_cfg(cfg, run_dir)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    config = to_plain(cfg)
    tracker = start_tracker(cfg, paths.run_dir, config)
    results: list[dict[str, Any]] = []
    clock = StageClock()  # each stage's wall time, built or cached: <run dir>/stages.json (python -m evals.stage_times)
    try:
        spec = TrajectorySpec.from_config(cfg)
        data = None
        if cfg["domain"].get("synthetic"):  # in the model's own chat template where it has one (arm/data/chat_templates.py)
            with clock.stage("data", cfg["domain"]["name"]) as stage:
                data = ensure_data(cfg["domain"], paths.cache, cfg["model"].get("prompt_format") or "plain",
                                   tokenizer_folder(spec, paths.cache))
                stage["cached"] = not built_since(data.folder, stage["start"])
        with clock.stage("sft", cfg["domain"]["name"]) as stage:
            trajectory = ensure_trajectory(spec, data, paths.cache)
            stage["cached"] = not built_since(trajectory.folder / "manifest.json", stage["start"])
        ref_cfg = cfg.get("references") or {}
        todo: list[tuple[ModelRef, dict[str, Any]]] = [
            (ref, {"role": "reference"})
            for ref in trajectory.references(ref_cfg.get("base", True), ref_cfg.get("early", True), ref_cfg.get("converged", True))
        ]

        for ref, _ in todo:  # a missing or corrupt reference checkpoint is named before any merge or evaluation
            check_model_folder(ref.path)
        if cfg["merge"]["name"] != "none":
            calibration = data
            if calibration is None and cfg["domain"].get("sft_data") and takes_calibration(cfg["merge"]):

                calibration = ensure_calibration_data(cfg["domain"], paths.cache, calibration_size(cfg), seed=int(cfg.get("seed", 0)))
            merged, summary = merge_cached(trajectory, cfg, paths, calibration, tracker, clock)
            todo.append((merged, {"role": "merge", "method": merged.name, "params": summary.get("params"),
                                  "merge_wall_s": summary.get("wall_s")}))
        for model, extra in todo:
            result, folder = evaluate_cached(model, cfg=cfg, data=data, paths=paths, clock=clock, **extra)
            if extra["role"] == "merge" and cfg.get("label"):
                result = {**result, "label": str(cfg["label"])}
            job_copy = paths.run_dir / "results" / model.name
            job_copy.mkdir(parents=True, exist_ok=True)
            write_result(job_copy / RESULTS_NAME, result)
            if (folder / "samples.jsonl").is_file():
                shutil.copy(folder / "samples.jsonl", job_copy / "samples.jsonl")

            tracker.log_result(result, read_samples(folder / "samples.jsonl"))
            results.append(result)
        table = build_table(results)
        markdown = to_markdown(table)
        atomic_write_text(paths.run_dir / "table.md", markdown)
        tracker.log_table(table)
        plot = plot_job(trajectory, results, cfg, paths.run_dir / "trajectory.png")
        if plot is not None:
            tracker.log_image("trajectory", plot)
    finally:
        tracker.finish()
        clock.write(paths.run_dir, model=cfg["model"]["name"], domain=cfg["domain"]["name"], merge=cfg["merge"]["name"])
    print(f"\n== {cfg['model']['name']} / {cfg['domain']['name']} / merge={cfg['merge']['name']} ==\n{markdown}")
    print(f"results: {paths.run_dir / 'results'}\ntrajectory: {trajectory.folder}")
    if plot is not None:
        print(f"plot: {plot}")
    if tracker.location:
        print(f"W&B run files: {tracker.location}")
    return {"results": results, "table": markdown, "run_dir": str(paths.run_dir), "trajectory": str(trajectory.folder)}
