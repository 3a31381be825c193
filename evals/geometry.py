"""The geometry of an SFT trajectory: where each saved checkpoint stands between the base and converged SFT.

    python -m evals.geometry <trajectory folder> [--base DIR] [--json out.json]

For every saved checkpoint c_m (θ0 the base, c* the converged checkpoint, c_{m-1} the checkpoint saved
before c_m, θ0 for the first), over every floating-point tensor of the model (tied weights once, as stored),
in float64, one tensor at a time (memory: four copies of the largest tensor):

- cos(c_m − θ0, c* − θ0)       does the update so far point where SFT ends up?
- cos(c* − c_m, c_m − θ0)      does the rest of SFT continue the update so far (1: a straight line)?
- cos(c* − c_m, c_m − c_{m−1}) does the rest continue the *latest* step (what ExPO/ARM extrapolate)?
- ‖c_m − c_{m−1}‖ / Σ lr        displacement per unit of learning rate spent between the two checkpoints:
                                constant for coherent steps, falling as the steps start to cancel (a noisy walk);
                                also as a share of √N (N weights): Adam moves each weight by about lr per step, so
                                steps that all point the same way would give √N per unit of learning rate.

The learning rates: the tiny loop's schedule from its manifest (arm/trajectory/schedules.py, exact per step);
for a Trainer folder, the `learning_rate` that Trainer logged (trainer_state.json of the last checkpoint,
every logging_steps), summed by the trapezoid rule between logged steps (from 0 at step 0).
Works on the tiny trajectories (arm/trajectory/sft.py) and on any Trainer output folder (SmolLM2's, yours).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arm.merge.tensor_io import ModelFolder, TensorReader
from arm.trajectory.build import find_checkpoints
from arm.trajectory.schedules import lr_at


def _base(folder: Path, manifest: dict, given: Path | None) -> Path:
    if given is not None:
        return Path(given)
    base = folder / str(manifest.get("base", "base"))
    if not base.is_dir():
        raise SystemExit(f"{folder}: no base model folder (manifest 'base' or base/): pass --base")
    return base


def lr_points(folder: Path, manifest: dict, last_checkpoint: Path) -> list[tuple[int, float]]:
    """(step, learning rate) pairs of the run, sorted, starting at (0, 0)."""
    sft = manifest.get("sft") or {}
    if {"lr", "total_steps", "schedule"} <= set(sft):  # the tiny loop: its schedule, every step
        return [(0, 0.0)] + [(s, lr_at(s, sft)) for s in range(1, int(sft["total_steps"]) + 1)]
    state = last_checkpoint / "trainer_state.json"
    if not state.is_file():
        raise SystemExit(f"{folder}: neither the tiny loop's manifest nor {state}: no learning rates to sum")
    logged = {int(h["step"]): float(h["learning_rate"]) for h in json.loads(state.read_text()).get("log_history", [])
              if "learning_rate" in h}
    return [(0, 0.0)] + sorted(logged.items())


def lr_spent(points: Sequence[tuple[int, float]], start: int, end: int) -> float:
    """Σ lr over the steps start+1..end: the trapezoid integral of the piecewise-linear curve through `points`."""
    def at(step: float) -> float:
        for (s0, l0), (s1, l1) in zip(points, points[1:], strict=False):
            if s0 <= step <= s1:
                return l0 + (l1 - l0) * (step - s0) / (s1 - s0) if s1 > s0 else l1
        return points[-1][1]

    return math.fsum(at(s) for s in range(start + 1, end + 1))


def geometry(folder: Path, base: Path | None = None) -> dict[str, Any]:
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    checkpoints = find_checkpoints(folder)
    steps = list(checkpoints)
    converged_step = int(manifest.get("converged_step", steps[-1]))
    theta0 = ModelFolder(_base(folder, manifest, base))
    conv = ModelFolder(checkpoints[converged_step])
    models = {s: ModelFolder(p) for s, p in checkpoints.items()}
    names = [n for n in conv.storage_order() if conv.tensors[n].is_float and n in theta0.tensors]
    rows_steps = [s for s in steps if s < converged_step]
    # accumulators per checkpoint: ⟨a,b⟩ for the vectors above
    acc = {s: {"uu": 0.0, "cc": 0.0, "uc": 0.0, "rr": 0.0, "ru": 0.0, "dd": 0.0, "rd": 0.0} for s in rows_steps}
    total_conv = 0.0
    n_weights = sum(conv.tensors[n].numel for n in names)
    with TensorReader() as reader:
        for name in names:
            t0 = reader.read(theta0.tensors[name]).double()
            tc = reader.read(conv.tensors[name]).double()
            d_conv = tc - t0
            total_conv += float((d_conv * d_conv).sum())
            prev = t0
            for s in steps:
                if s >= converged_step:
                    break
                tm = reader.read(models[s].tensors[name]).double()
                u, r, d = tm - t0, tc - tm, tm - prev
                a = acc[s]
                a["uu"] += float((u * u).sum())
                a["cc"] += float((d_conv * d_conv).sum())
                a["uc"] += float((u * d_conv).sum())
                a["rr"] += float((r * r).sum())
                a["ru"] += float((r * u).sum())
                a["dd"] += float((d * d).sum())
                a["rd"] += float((r * d).sum())
                prev = tm
    points = lr_points(folder, manifest, checkpoints[steps[-1]])

    def cos(ab: float, aa: float, bb: float) -> float | None:
        return ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else None

    rows = []
    prev_step = 0
    for s in rows_steps:
        a = acc[s]
        spent = lr_spent(points, prev_step, s)
        rows.append({
            "step": s, "share_of_steps": s / converged_step,
            "cos_update_converged": cos(a["uc"], a["uu"], a["cc"]),
            "cos_rest_update": cos(a["ru"], a["rr"], a["uu"]),
            "cos_rest_last_step": cos(a["rd"], a["rr"], a["dd"]),
            "rel_update": math.sqrt(a["uu"] / a["cc"]) if a["cc"] else None,
            "step_norm": math.sqrt(a["dd"]), "lr_spent": spent,
            "displacement_per_lr": math.sqrt(a["dd"]) / spent if spent > 0 else None,
            "coherence": math.sqrt(a["dd"]) / spent / math.sqrt(n_weights) if spent > 0 else None,
            "from_step": prev_step,
        })
        prev_step = s
    return {"trajectory": str(folder), "converged_step": converged_step, "n_tensors": len(names), "n_weights": n_weights,
            "converged_update_norm": math.sqrt(total_conv), "rows": rows}


def to_markdown(result: dict[str, Any]) -> str:
    def f(v: float | None, fmt: str = ".3f") -> str:
        return "–" if v is None else format(v, fmt)

    lines = ["| step (share) | cos(c_m−θ0, c*−θ0) | cos(c*−c_m, c_m−θ0) | cos(c*−c_m, c_m−c_{m−1}) | ‖c_m−θ0‖/‖c*−θ0‖ | ‖c_m−c_{m−1}‖ / Σlr | ÷ √N |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['step']} ({r['share_of_steps']:.0%}) | {f(r['cos_update_converged'])} | {f(r['cos_rest_update'])} | "
                     f"{f(r['cos_rest_last_step'])} | {f(r['rel_update'])} | {f(r['displacement_per_lr'], '.0f')} (steps {r['from_step']}–{r['step']}) | {f(r['coherence'], '.2f')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.geometry", description=__doc__.split("\n\n")[0])
    parser.add_argument("trajectory", type=Path, help="an SFT output folder (checkpoint-<step>/ folders)")
    parser.add_argument("--base", type=Path, default=None, help="the base model folder (default: the manifest's, or base/)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    result = geometry(args.trajectory, args.base)
    print(f"{result['trajectory']}: converged step {result['converged_step']}, {result['n_tensors']} tensors, "
          f"N = {result['n_weights']:,} weights, "
          f"‖c* − θ0‖ = {result['converged_update_norm']:.4g}")
    print(to_markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
