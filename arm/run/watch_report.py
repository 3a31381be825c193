"""arm-watch's report: the summary of a stream (how much of the run the streamed merge could have saved), its
markdown, and the plot of the raw and merged scores against the SFT step (arm/run/watch.py writes them after every
record)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def summarize(records: Sequence[Mapping[str, Any]], finished: bool, end_reason: str | None = None) -> dict[str, Any]:
    """Per step the raw and merged scores; per task the final checkpoint's score, the first step whose merged
    model reaches it, and the share of the SFT's steps (up to the final checkpoint) that it saves."""
    ok = sorted((r for r in records if r.get("status") == "ok"), key=lambda r: r["step"])
    skipped = [{"step": r["step"], "status": r["status"], "reason": r.get("reason")}
               for r in sorted(records, key=lambda r: r["step"]) if r.get("status") != "ok"]
    rows = [{"step": r["step"], "inputs": r.get("inputs"), "raw": r["raw"], "merged": r.get("merged")} for r in ok]
    tasks: dict[str, Any] = {}
    if ok:
        final = ok[-1]
        for task, final_score in final["raw"].items():
            reached = [r["step"] for r in ok if (r.get("merged") or {}).get(task) is not None and r["merged"][task] >= final_score]
            first = reached[0] if reached else None
            raw_first = next(r["step"] for r in ok if r["raw"][task] >= final_score)  # the final one at the latest
            tasks[task] = {
                "metric": final.get("metric", {}).get(task),
                "final_step": final["step"],
                "final_score": final_score,
                "final_merged": (final.get("merged") or {}).get(task),
                "best_raw": max(r["raw"][task] for r in ok),
                "first_step_merged_reaches_final": first,
                "share_of_steps_saved": (final["step"] - first) / final["step"] if first is not None and final["step"] else None,
                # the same for the raw checkpoints: what stopping the SFT early would have saved without a merge
                "first_step_raw_reaches_final": raw_first,
                "share_of_steps_saved_raw": (final["step"] - raw_first) / final["step"] if final["step"] else None,
            }
    return {"finished": finished, "end_reason": end_reason, "checkpoints": len(ok), "rows": rows, "tasks": tasks,
            "skipped": skipped}


def _steps_text(steps: Sequence[int]) -> str:
    """A merge's input steps: all of them when few, else the first, the last and how many."""
    if len(steps) <= 4:
        return ", ".join(map(str, steps))
    return f"{steps[0]} … {steps[-1]} ({len(steps)})"


def summary_markdown(summary: Mapping[str, Any], title: str) -> str:
    lines = [f"# {title}", ""]
    tasks = list(summary["tasks"])
    header = "| step | inputs |" + "".join(f" raw {t} | merged {t} |" for t in tasks)
    lines += [header, "|---:|---|" + "---:|---:|" * len(tasks)]
    for row in summary["rows"]:
        cells = "".join(f" {100 * row['raw'][t]:.1f} | "
                        f"{'' if (row.get('merged') or {}).get(t) is None else format(100 * row['merged'][t], '.1f')} |"
                        for t in tasks)
        lines.append(f"| {row['step']} | {_steps_text(row.get('inputs') or [])} |{cells}")
    lines.append("")
    for task, t in summary["tasks"].items():
        first = t["first_step_merged_reaches_final"]
        saved = t["share_of_steps_saved"]
        lines.append(f"- {task}: final checkpoint (step {t['final_step']}) {100 * t['final_score']:.1f}; the merge first "
                     f"reaches it at step {first if first is not None else 'never'}"
                     + (f", saving {100 * saved:.1f}% of the SFT steps" if saved is not None else "")
                     + f"; the raw checkpoint itself first reaches it at step {t['first_step_raw_reaches_final']} "
                       f"({100 * t['share_of_steps_saved_raw']:.1f}%).")
    for s in summary["skipped"]:
        lines.append(f"- step {s['step']}: {s['status']} ({s['reason']})")
    lines.append(f"- finished: {summary['finished']} ({summary['end_reason'] or 'still running'})")
    return "\n".join(lines) + "\n"


def plot_watch(records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], out: Path, title: str) -> Path | None:
    """Raw checkpoint and merged model score vs SFT step (one panel per task), the final score dashed."""
    ok = sorted((r for r in records if r.get("status") == "ok"), key=lambda r: r["step"])
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(ok[-1]["raw"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        steps = [r["step"] for r in ok]
        ax.plot(steps, [100 * r["raw"][task] for r in ok], "o-", label="raw checkpoint")
        merged = [(r["step"], 100 * r["merged"][task]) for r in ok if (r.get("merged") or {}).get(task) is not None]
        if merged:
            ax.plot(*zip(*merged, strict=True), "s-", label=f"streamed merge ({ok[-1].get('method')})")
        t = summary["tasks"].get(task)
        if t and summary.get("finished"):
            ax.axhline(100 * t["final_score"], color="gray", ls="--", lw=1, label=f"final checkpoint (step {t['final_step']})")
            if t["first_step_merged_reaches_final"] is not None:
                ax.axvline(t["first_step_merged_reaches_final"], color="gray", ls=":", lw=1,
                           label=f"merge reaches it: step {t['first_step_merged_reaches_final']} "
                                 f"({100 * t['share_of_steps_saved']:.0f}% of steps saved; "
                                 f"raw: step {t['first_step_raw_reaches_final']})")
        metric = (ok[-1].get("metric") or {}).get(task, "score").split(",")[0]
        ax.set_xlabel("SFT step")
        ax.set_ylabel(f"{task} {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
