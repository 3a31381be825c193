"""`python -m arm.run.trainer_sft <hydra overrides>`: the Trainer SFT of a real model (arm/trajectory/trainer_sft.py),
under `accelerate launch` for several GPUs (slurm/accelerate_fsdp.yaml)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from arm.core.errors import ArmError
from arm.core.paths import CONF_DIR
from arm.core.specs import TrajectorySpec
from arm.run.stages import Paths
from arm.trajectory.trainer_sft import ensure_hf_trajectory


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m arm.run.trainer_sft <hydra overrides>` (under `accelerate launch` for several GPUs)."""
    from hydra import compose, initialize_config_dir


    overrides = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if cfg["model"].get("arch") is not None:
        print("arm.trajectory.trainer_sft: error: this model has an `arch:` block (trained from scratch by arm/trajectory/sft.py, `arm ...`)", file=sys.stderr)
        return 2
    try:
        folder = ensure_hf_trajectory(TrajectorySpec.from_config(cfg), Paths.from_cfg(cfg).cache)
    except ArmError as exc:
        print(f"arm.trajectory.trainer_sft: error: {exc}", file=sys.stderr)
        return 2
    print(f"trajectory: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
