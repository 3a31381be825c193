"""A sweep's table as a W&B Table, and where W&B keeps its files (inside the run folder)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evals.table import to_csv, to_markdown


def wandb_dirs(run_dir: Path) -> None:
    """Keep every file W&B writes inside `run_dir`."""
    wandb_dir = Path(run_dir) / "wandb"
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", ".cache"), ("WANDB_DATA_DIR", ".data"),
                     ("WANDB_CONFIG_DIR", ".config"), ("WANDB_ARTIFACT_DIR", ".artifacts")):
        path = wandb_dir / sub if sub else Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)
    os.environ.setdefault("WANDB_SILENT", "true")


def log_sweep_table(
    table: Any,
    *,
    project: str,
    run_dir: Path,
    group: str | None = None,
    entity: str | None = None,
    images: Mapping[str, Path] | None = None,
) -> str | None:
    """Log a sweep's aggregated table as a W&B Table (one row per cell, as in the CSV) in a run of
    job_type `table`, in the sweep's group, with the markdown and the plots. Offline unless
    WANDB_MODE says otherwise; returns the run's folder."""
    import csv
    import io

    wandb_dirs(run_dir)
    import wandb

    rows = list(csv.reader(io.StringIO(to_csv(table))))
    run = wandb.init(project=project, entity=entity, group=group, job_type="table", name=f"table-{group or 'sweep'}",
                     tags=["table"], dir=str(run_dir), mode=os.environ.get("WANDB_MODE") or "offline")
    try:
        run.log({"table": wandb.Table(columns=rows[0], data=rows[1:])})
        run.summary["table_markdown"] = to_markdown(table)
        for name, path in (images or {}).items():
            run.log({name: wandb.Image(str(path))})
        return run.dir
    finally:
        run.finish()
