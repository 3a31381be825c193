"""Where one ARM merge spends its time: cProfile of merge_from_config on the default trajectory (trained
and cached by the pipeline, like `make run`), libraries imported first, top functions by cumulative time.

    python -m benchmarks.arm_profile [--formulation iterate_rotation] [--domain math_synth] [--top 35] [OVERRIDES...]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from arm.core.paths import CONF_DIR
from arm.core.specs import TrajectorySpec, plain_config
from arm.data.splits import ensure_data
from arm.merge.engine import MergeContext, merge_from_config
from arm.run.stages import Paths
from arm.trajectory.build import ensure_trajectory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.arm_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--formulation", default="iterate_rotation")
    parser.add_argument("--domain", default="math_synth")
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    import matplotlib  # the libraries, so that their imports are not in the profile
    import torch
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = plain_config(compose("config", overrides=[f"domain={args.domain}", "merge=arm",
                                                        f"merge.formulation={args.formulation}", *args.overrides]))
    paths = Paths.from_cfg(cfg)
    data = ensure_data(cfg["domain"], paths.cache, cfg["model"].get("prompt_format") or "plain")
    trajectory = ensure_trajectory(TrajectorySpec.from_config(cfg), data, paths.cache)
    context = MergeContext(calibration=data.split("train"), converged=trajectory.converged.path, log=None)
    with tempfile.TemporaryDirectory(prefix="arm-profile-") as tmp:
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        merge_from_config({**cfg["merge"], "overwrite": True}, trajectory.base.path, trajectory.inputs, Path(tmp) / "merged",
                          progress=False, context=context)
        profile.disable()
        print(f"merge: {time.perf_counter() - start:.2f} s (under cProfile)")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
