"""The `arm` command (also `python -m arm`): a Hydra app, one job per config.

    arm                                   # tiny model, math_synth, reference rows
    arm -m domain=math_synth,code_synth   # a local sweep over both synthetic domains
    arm merge=ties merge.density=0.3      # a merge method's row next to the references
    arm --help                            # config groups and their options

Only Hydra is imported at start-up; torch, transformers, lm_eval and wandb are imported by the
stages that use them, so `--help` and config errors answer at once.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from arm.core.errors import ArmError
from arm.core.paths import CONF_DIR
from arm.run.job import run_job

CONFIG_DIR = str(CONF_DIR)
log = logging.getLogger("arm")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> dict | None:
    try:
        return run_job(cfg)
    except ArmError as exc:
        log.error("%s", exc)
        print(f"arm: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
