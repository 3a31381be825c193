"""One job: trajectory -> merge -> evaluate -> report.

Each stage's output is cached under a content key (the stage's config and its inputs' keys), so a
sweep trains a trajectory once and evaluates each reference model once.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import evals
from arm.core.cache import build_once, content_key, source_digest, to_plain
from arm.core.errors import ConfigError, InputError
from arm.core.refs import ModelRef, Trajectory
from arm.data.splits import DomainData, ensure_data
from arm.trajectory.build import ensure_trajectory

log = logging.getLogger(__name__)

EVALS_DIR = Path(evals.__file__).resolve().parent
EVAL_CODE = [EVALS_DIR / f for f in ("runner.py", "scoring.py", "sandbox.py", "tasks/utils.py")]
EVAL_SETTINGS = ("backend", "dtype", "batch_size", "limit", "num_fewshot", "gen_kwargs", "apply_chat_template", "vllm")


@dataclass(frozen=True)
class Paths:
    root: Path
    cache: Path
    run_dir: Path

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any], run_dir: Path | None = None) -> Paths:
        base = Path.cwd()
        try:
            from hydra.core.hydra_config import HydraConfig

            hydra_cfg = HydraConfig.get()
            base = Path(hydra_cfg.runtime.cwd)
            run_dir = run_dir or Path(hydra_cfg.runtime.output_dir)
        except (ImportError, ValueError):
            pass

        def absolute(p: str | Path) -> Path:
            p = Path(p).expanduser()
            return p if p.is_absolute() else base / p

        root = absolute(cfg["paths"]["root"])
        run_dir = absolute(run_dir) if run_dir else root / "runs" / "adhoc"
        return cls(root=root, cache=absolute(cfg["paths"]["cache"]), run_dir=run_dir)


def validate(cfg: Mapping[str, Any]) -> None:
    """Cheap checks of the composed config, before any work."""
    from arm.run.checks import check_values
    from evals.runner import synthetic_templates, task_specs

    check_values(cfg)  # value types and ranges (eval.limit, seed, ...), and the code sandbox where tasks run code

    domain = cfg["domain"]
    specs = task_specs(domain)
    if domain.get("synthetic"):
        known = synthetic_templates()
        for spec in specs:
            if spec.name not in known:
                raise ConfigError("domain.tasks", f"unknown synthetic task '{spec.name}' (known: {', '.join(known)})")
    elif not (cfg.get("trajectory") or {}).get("path") and cfg["model"].get("arch") is not None:
        raise ConfigError("trajectory.path", f"the tiny model trains only on synthetic domains; '{domain['name']}' needs trajectory.path")
    split = cfg["eval"].get("split", "test")
    if split not in ("test", "validation"):
        raise ConfigError("eval.split", f"'{split}' is not one of: test, validation")
    if split == "validation" and not domain.get("synthetic"):
        # lm-eval's benchmark tasks (gsm8k, MATH-500, HumanEval, MBPP) are the test sets: selecting
        # hyperparameters on them would be tuning on test.
        raise ConfigError("eval.split", f"domain '{domain['name']}' has no validation split (its lm-eval tasks are the "
                                        "benchmarks' test sets); select hyperparameters on a synthetic domain or on a "
                                        "held-out task of your own")
    if cfg["logger"]["name"] not in ("wandb", "none"):
        raise ConfigError("logger.name", f"unknown logger '{cfg['logger']['name']}'")
    if cfg["merge"]["name"] != "none":
        from arm.merge.engine import validate_merge_config

        try:
            validate_merge_config(cfg["merge"])
        except ValueError as exc:  # the engine's errors name the merge.* key
            raise ConfigError("merge", str(exc)) from exc


def eval_key(model: ModelRef, cfg: Mapping[str, Any], data: DomainData | None) -> str:
    from evals.runner import effective_eval_cfg

    eval_cfg = effective_eval_cfg(cfg["eval"], cfg["domain"])  # = eval.* for domains without `generation:`
    settings = {k: eval_cfg.get(k) for k in EVAL_SETTINGS}
    return content_key(
        "eval", model.key, settings, eval_cfg.get("split", "test"), to_plain(cfg["domain"].get("tasks")),
        data.key if data else None, source_digest(*[f for f in EVAL_CODE if f.exists()]),
        *[source_digest(f) for f in sorted((EVALS_DIR / "tasks").glob("*.yaml"))],
    )


def eval_folder(model: ModelRef, cfg: Mapping[str, Any], data: DomainData | None, paths: Paths) -> Path:
    """Where the evaluation of `model` under this job's settings is cached (complete: results.json)."""
    key = eval_key(model, cfg, data)
    return paths.cache / "evals" / f"{cfg['model']['name']}-{cfg['domain']['name']}-{model.name}-{key}"


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
) -> tuple[dict[str, Any], Path]:
    """Evaluate `model` once per evaluation key; returns the result and its folder."""
    from evals import runner
    from evals.results import RESULTS_NAME, build_result, load_result, write_result

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

    if not build_once(folder, build, is_complete=lambda p: (p / RESULTS_NAME).is_file()):
        log.info("reusing evaluation of %s (%s)", model.name, folder.name)
    return load_result(folder / RESULTS_NAME), folder


def merge_folder(trajectory: Trajectory, cfg: Mapping[str, Any], paths: Paths,
                 data: DomainData | None = None) -> tuple[str, Path]:
    """The merge's content key and cache folder (complete: merge_summary.json): the method's identity,
    the inputs' keys, the calibration data's key when the method's weights depend on it, and the code
    of whole-model methods."""
    from arm.merge.engine import merge_identity, split_config
    from arm.merge.registry import get_method

    merge_cfg = to_plain(cfg["merge"])
    name, params, _ = split_config(merge_cfg)
    uses_calibration = getattr(get_method(name), "uses_calibration", None)
    calibration_key = data.key if (data is not None and uses_calibration is not None and uses_calibration(params)) else None
    key_parts: list[Any] = [merge_identity(merge_cfg), trajectory.base.key, [r.key for r in trajectory.early]]
    if calibration_key is not None:
        key_parts.append({"calibration": calibration_key})
    code_files = getattr(get_method(name), "code_files", None)
    if code_files is not None:  # whole-model methods: their code is part of the merged weights' identity
        key_parts.append({"code": source_digest(*code_files())})
    key = content_key("merge", *key_parts)
    return key, paths.cache / "merged" / f"{cfg['model']['name']}-{cfg['domain']['name']}-{merge_cfg['name']}-{key}"


def merge_cached(
    trajectory: Trajectory,
    cfg: Mapping[str, Any],
    paths: Paths,
    data: DomainData | None = None,
    tracker: Any = None,
) -> tuple[ModelRef, dict[str, Any]]:
    """Run the configured merge method on the trajectory's early checkpoints, once per key.

    Every method gets the same inputs (trajectory.base, trajectory.inputs). Whole-model methods
    (ARM) also get a MergeContext: calibration = the domain's train records, converged = the
    converged SFT checkpoint (diagnostics only: not part of the key), log = the tracker's metrics.
    The calibration data's key joins the merge key when the method's weights depend on it.
    """
    from arm.merge.engine import MergeContext, merge_from_config

    merge_cfg = to_plain(cfg["merge"])
    method = merge_cfg["name"]
    key, folder = merge_folder(trajectory, cfg, paths, data)
    summary_file = folder / "merge_summary.json"
    if not summary_file.is_file():
        from arm.core.cache import atomic_write_json, file_lock

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
    from arm.core.cache import read_json

    summary = read_json(summary_file)
    return ModelRef(method, folder, key), summary


def plot_job(trajectory: Trajectory, results: list[dict[str, Any]], cfg: Mapping[str, Any], out: Path) -> Path | None:
    """Validation loss along the trajectory and the evaluated references' scores vs step (PNG)."""
    if not trajectory.manifest.get("history"):
        return None  # a trajectory read from elsewhere may have no loss history
    from evals.trajectory_report import plot_trajectory

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


def calibration_size(cfg: Mapping[str, Any]) -> int:
    """Records of a real domain's calibration set: 4 × merge.calibration.n_sequences (ARM samples from them)."""
    return int((cfg["merge"].get("calibration") or {}).get("n_sequences") or 128) * 4


def _takes_calibration(method: str) -> bool:
    from arm.merge.registry import get_method

    return getattr(get_method(method), "uses_calibration", None) is not None


def run_job(cfg: Mapping[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """Run one job and return {"results": [...], "table": markdown, "run_dir": ...}."""
    from arm.core.cache import atomic_write_text
    from arm.run.tracking import start_tracker
    from evals.results import RESULTS_NAME, write_result
    from evals.table import build_table, to_markdown

    validate(cfg)
    if cfg.get("plan"):  # print every stage, cached or not, with its GPUs and memory; run nothing (arm/run/plan.py)
        from arm.run.plan import run_plan

        return run_plan(cfg)
    from arm.run.plan import check_devices

    check_devices(cfg)  # a stage that cannot fit the visible GPUs stops the job here, before loading anything
    paths = Paths.from_cfg(cfg, run_dir)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    config = to_plain(cfg)
    tracker = start_tracker(cfg, paths.run_dir, config)
    results: list[dict[str, Any]] = []
    try:
        data = (ensure_data(cfg["domain"], paths.cache, cfg["model"].get("prompt_format") or "plain")
                if cfg["domain"].get("synthetic") else None)
        trajectory = ensure_trajectory(cfg, data, paths.cache)
        ref_cfg = cfg.get("references") or {}
        todo: list[tuple[ModelRef, dict[str, Any]]] = [
            (ref, {"role": "reference"})
            for ref in trajectory.references(ref_cfg.get("base", True), ref_cfg.get("early", True), ref_cfg.get("converged", True))
        ]
        from evals.runner import check_model_folder

        for ref, _ in todo:  # a missing or corrupt reference checkpoint is named before any merge or evaluation
            check_model_folder(ref.path)
        if cfg["merge"]["name"] != "none":
            calibration = data
            if calibration is None and cfg["domain"].get("sft_data") and _takes_calibration(cfg["merge"]["name"]):
                from arm.data.sft_data import (
                    ensure_calibration_data,  # real domains: a sample of the SFT data
                )

                calibration = ensure_calibration_data(cfg["domain"], paths.cache, calibration_size(cfg), seed=int(cfg.get("seed", 0)))
            merged, summary = merge_cached(trajectory, cfg, paths, calibration, tracker)
            todo.append((merged, {"role": "merge", "method": merged.name, "params": summary.get("params"),
                                  "merge_wall_s": summary.get("wall_s")}))
        for model, extra in todo:
            result, folder = evaluate_cached(model, cfg=cfg, data=data, paths=paths, **extra)
            if extra["role"] == "merge" and cfg.get("label"):
                result = {**result, "label": str(cfg["label"])}
            job_copy = paths.run_dir / "results" / model.name
            job_copy.mkdir(parents=True, exist_ok=True)
            write_result(job_copy / RESULTS_NAME, result)
            if (folder / "samples.jsonl").is_file():
                shutil.copy(folder / "samples.jsonl", job_copy / "samples.jsonl")
            from evals.runner import read_samples

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
    print(f"\n== {cfg['model']['name']} / {cfg['domain']['name']} / merge={cfg['merge']['name']} ==\n{markdown}")
    print(f"results: {paths.run_dir / 'results'}\ntrajectory: {trajectory.folder}")
    if plot is not None:
        print(f"plot: {plot}")
    if tracker.location:
        print(f"W&B run files: {tracker.location}")
    return {"results": results, "table": markdown, "run_dir": str(paths.run_dir), "trajectory": str(trajectory.folder)}
