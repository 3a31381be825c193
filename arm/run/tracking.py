"""Experiment tracking: one W&B run per Hydra job (logger=wandb), or nothing (logger=none).

W&B runs offline unless the environment says otherwise (WANDB_MODE), and every file it writes stays
inside the job's run folder: WANDB_DIR, WANDB_CACHE_DIR, WANDB_DATA_DIR, WANDB_CONFIG_DIR and
WANDB_ARTIFACT_DIR all point there unless the user has set them.

Runs of one sweep share a W&B group: `logger.group`, or by default the sweep folder's name when the
job runs under `arm -m` (e.g. `paper_table` for outputs/runs/sweeps/paper_table); every run is tagged
`model:<name>`, `domain:<name>` and `method:<name>`. Each run's summary keeps a compact copy of every
result it reported (`results/<name>`), from which `arm-table --from-wandb` rebuilds the table.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arm.core.errors import ConfigError
from evals.table import to_markdown
from evals.wandb_table import wandb_dirs

log = logging.getLogger(__name__)

SAMPLE_ROWS = 100  # per evaluated model, in the W&B samples table
# The keys of a result kept in the run summary: enough for the table (evals/table.py).
SUMMARY_KEYS = ("name", "role", "method", "params", "model", "domain", "step", "split", "primary", "cache_key", "created")


def sweep_group() -> str | None:
    """The W&B group of a job run by `arm -m`: the sweep folder's name (None outside a multirun).

    A timestamped folder (the default outputs/runs/multirun/<date>/<time>) is named by date and time.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN or not hydra_cfg.sweep.dir:
        return None
    folder = Path(str(hydra_cfg.sweep.dir))
    if re.fullmatch(r"[0-9_:.-]+", folder.name):
        return f"{folder.parent.name}_{folder.name}"
    return folder.name


def summary_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a results.json stored in the W&B run summary."""
    return {k: result.get(k) for k in SUMMARY_KEYS}


class NullTracker:
    """logger=none: nothing is tracked beyond results.json files."""

    location: str | None = None

    def log_result(self, result: Mapping[str, Any], samples: Sequence[Mapping[str, Any]]) -> None:
        pass

    def log_table(self, table: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        pass

    def log_image(self, name: str, path: Path) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, config: Mapping[str, Any]):
        logger_cfg = cfg["logger"]
        wandb_dirs(run_dir)
        import wandb

        model, domain, method = cfg["model"]["name"], cfg["domain"]["name"], cfg["merge"]["name"]
        tags = [f"model:{model}", f"domain:{domain}", f"method:{method}", *list(logger_cfg.get("tags") or [])]
        self.run = wandb.init(
            project=logger_cfg.get("project"),
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group") or sweep_group(),
            name=f"{model}-{domain}-{method}",
            tags=tags,
            config=dict(config),
            dir=str(run_dir),
            mode=logger_cfg.get("mode") or "offline",
        )
        self.wandb = wandb
        self.location = self.run.dir if self.run is not None else None
        self._rows: list[list[Any]] = []

    def log_result(self, result: Mapping[str, Any], samples: Sequence[Mapping[str, Any]]) -> None:
        name = result["name"]
        self.run.summary[f"results/{name}"] = summary_result(result)
        for task, cell in result["primary"].items():
            metric = cell["metric"].split(",")[0]
            self.run.summary[f"{task}/{metric}/{name}"] = cell["value"]
            self._rows.append([name, result["role"], result.get("step"), task, cell["metric"], cell["value"], cell["n"]])
        if samples:
            columns = ["task", "id", "prompt", "target", "prediction", "score"]
            data = [[s.get(c) if not isinstance(s.get(c), dict | list) else str(s.get(c)) for c in columns] for s in samples[:SAMPLE_ROWS]]
            self.run.log({f"samples/{name}": self.wandb.Table(columns=columns, data=data)})

    def log_table(self, table: Any) -> None:
        self.run.log({"results": self.wandb.Table(columns=["name", "role", "step", "task", "metric", "value", "n"], data=self._rows)})
        if table is not None:

            self.run.summary["table_markdown"] = to_markdown(table)

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        self.run.log(dict(metrics))

    def log_image(self, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))})

    def finish(self) -> None:
        self.run.finish()


def start_tracker(cfg: Mapping[str, Any], run_dir: Path, config: Mapping[str, Any]) -> NullTracker:
    name = cfg["logger"]["name"]
    if name == "none":
        return NullTracker()
    if name == "wandb":
        return WandbTracker(cfg, run_dir, config)

    raise ConfigError("logger.name", f"unknown logger '{name}' (known: wandb, none)")
