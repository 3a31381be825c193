"""Following an SFT output folder while it is written: which `checkpoint-<step>/` folders are complete.

transformers' Trainer writes `checkpoint-<step>/` in place, file by file (weights, then optimizer, scheduler and
RNG state, then trainer_state.json), and deletes old ones under `save_total_limit`; the project's Trainer SFT
then rewrites the weights as shards (arm/trajectory/trainer_sft.py, through a `.rewrite.tmp/` folder inside the
checkpoint). The tiny SFT loop (arm/trajectory/sft.py) writes the model folder and then trainer_state.json, last.
Both write manifest.json into the output folder when training has ended.

A checkpoint is **complete** when
  - config.json and trainer_state.json parse, and trainer_state's global_step is the folder's step;
  - every weight file is whole: model.safetensors, or every shard that model.safetensors.index.json lists, each
    as long as its safetensors header says (arm/merge/tensor_io.py ModelFolder), so a half-written file is never
    taken for a whole one, however long its writer pauses;
  - nothing in it is still being written (no hidden or `*.tmp` entry, e.g. the shard rewrite's `.rewrite.tmp/`);
  - and either its files have kept their names, sizes and modification times for `settle_s` seconds, or a later
    checkpoint has appeared, or the run has ended (manifest.json).
A checkpoint that is still incomplete once a later one has appeared and its files have settled, or once the run
has ended, is **corrupt** (named with the reason, skipped); one that disappears before it is complete (Trainer's
`save_total_limit`) is **deleted** (skipped). Following the project's own Trainer SFT (the folder arm-watch finds from
the model and domain), a checkpoint is final only once its config.json names `model.sft.save_dtype`: the rewrite
reads the Trainer's weights (seconds to minutes for a large model) before it changes anything. Nothing here writes
into the folder.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arm.merge.tensor_io import ModelFolder, TensorIOError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"

# Training state that a Trainer checkpoint holds beside the model: never needed to merge or evaluate it.
TRAINING_STATE_FILES = re.compile(r"^(optimizer|scheduler|scaler|rng_state|training_args)([._-].*)?$")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder seen complete (or named corrupt/deleted) by `FolderFollower.poll`."""

    step: int
    path: Path
    status: str  # complete | corrupt | deleted
    reason: str | None = None
    files: dict[str, int] = field(default_factory=dict)  # model files and their sizes when it was taken complete
    max_steps: int | None = None  # trainer_state's max_steps: the run's last step, when it says

    @property
    def final(self) -> bool:
        return self.status == "complete" and self.max_steps is not None and self.step >= self.max_steps


def list_checkpoints(folder: Path) -> dict[int, Path]:
    """`checkpoint-<step>/` folders of `folder` by step ({} while the folder does not exist yet)."""
    found: dict[int, Path] = {}
    try:
        children = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return found
    for child in children:
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def folder_stats(path: Path) -> tuple | None:
    """(name, size, mtime_ns) of every entry of `path`, sorted; None once it has disappeared."""
    try:
        entries = []
        for child in Path(path).iterdir():
            st = child.stat()
            entries.append((child.name, st.st_size, st.st_mtime_ns))
        return tuple(sorted(entries))
    except FileNotFoundError:
        return None


def model_files(path: Path) -> list[str]:
    """The files of a checkpoint that make its model folder (not the optimizer, scheduler or RNG state)."""
    return sorted(p.name for p in Path(path).iterdir()
                  if p.is_file() and not TRAINING_STATE_FILES.match(p.name) and not p.name.startswith("."))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def incomplete_reason(path: Path, step: int, dtype: str | None = None) -> str | None:
    """Why the checkpoint at `path` is not (yet) a complete model folder, or None when it is.

    `dtype`: the dtype its config.json must name (the project's Trainer SFT rewrites each checkpoint's weights in
    `model.sft.save_dtype` after the Trainer has saved it, config.json last: until then it is not final)."""
    path = Path(path)
    try:
        busy = sorted(p.name for p in path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))
    except FileNotFoundError:
        return "the folder has disappeared"
    if busy:
        return f"{busy[0]} is being written"
    for name in ("config.json", TRAINER_STATE):
        try:
            content = _read_json(path / name)
        except FileNotFoundError:
            return f"no {name} yet"
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{name} is not (yet) valid JSON"
        except OSError as exc:
            return f"{name}: {exc.strerror or exc}"
        if name == "config.json" and dtype is not None and isinstance(content, dict):
            found = content.get("dtype", content.get("torch_dtype"))
            if found != dtype:
                return f"config.json names dtype {found}, not yet {dtype} (the SFT rewrites its checkpoints in {dtype})"
        if name == TRAINER_STATE:
            if not isinstance(content, dict):
                return f"{name} holds no JSON object"
            global_step = content.get("global_step")
            if global_step is not None and int(global_step) != int(step):
                return f"{name} says global_step {global_step}, not {step}"
    try:
        ModelFolder(path)  # the index's shards all there, each safetensors header against its file's size
    except TensorIOError as exc:
        return str(exc).replace(f"{path}/", "").replace(f"{path}: ", "")
    except (FileNotFoundError, OSError) as exc:
        return f"weights: {exc}"
    return None


def trainer_max_steps(path: Path) -> int | None:
    try:
        value = _read_json(Path(path) / TRAINER_STATE).get("max_steps")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def run_ended(folder: Path) -> bool:
    """True once the SFT has written manifest.json (the tiny loop and the project's Trainer SFT write it last)."""
    try:
        return isinstance(_read_json(Path(folder) / MANIFEST), dict)
    except (OSError, ValueError):
        return False


@dataclass
class _Seen:
    stats: tuple | None
    since: float
    reason: str | None = None


class FolderFollower:
    """Polls an SFT output folder; `poll()` returns each checkpoint once, when it is complete, corrupt or deleted.

    `done`: steps already handled (a resumed watcher's stream); they are never returned again.
    `on_wait(step, reason)`: called when a checkpoint is seen incomplete, once per distinct reason.
    """

    def __init__(self, folder: Path, settle_s: float, done: set[int] | None = None,
                 on_wait: Callable[[int, str], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 dtype: str | None = None):
        self.folder = Path(folder)
        self.dtype = dtype
        self.settle_s = float(settle_s)
        self.done = set(done or ())
        self.on_wait = on_wait
        self.clock = clock
        self._seen: dict[int, _Seen] = {}
        self.last_change = clock()

    def poll(self, ended: bool = False) -> list[Checkpoint]:
        """The checkpoints that became complete, corrupt or deleted since the last poll, by step.

        `ended`: the run has finished writing (manifest.json, or an offline pass): no checkpoint is waited for."""
        now = self.clock()
        present = list_checkpoints(self.folder)
        out: list[Checkpoint] = []
        for step in sorted(set(self._seen) - set(present)):  # seen, never complete, now gone
            if step not in self.done:
                out.append(Checkpoint(step, self.folder / f"checkpoint-{step}", "deleted",
                                      "deleted before it was complete (save_total_limit?)"))
                self.done.add(step)
            del self._seen[step]
            self.last_change = now
        for step, path in present.items():
            if step in self.done:
                continue
            stats = folder_stats(path)
            seen = self._seen.get(step)
            if seen is None or seen.stats != stats:
                seen = self._seen[step] = _Seen(stats, now, seen.reason if seen else None)
                self.last_change = now
            if stats is None:
                continue  # gone between the listing and now: reported as deleted at the next poll
            settled = now - seen.since >= self.settle_s
            later = any(s > step for s in present)
            reason = incomplete_reason(path, step, self.dtype)
            if reason is None:
                if settled or later or ended:
                    out.append(self._complete(step, path))
                continue
            if ended or (later and settled):
                out.append(Checkpoint(step, path, "corrupt", reason))
                self.done.add(step)
                self._seen.pop(step, None)
                continue
            if reason != seen.reason:
                seen.reason = reason
                if self.on_wait is not None:
                    self.on_wait(step, reason)
        return out

    def _complete(self, step: int, path: Path) -> Checkpoint:
        files = {}
        for name in model_files(path):
            try:
                files[name] = (path / name).stat().st_size
            except FileNotFoundError:
                pass
        return Checkpoint(step, path, "complete", None, files, trainer_max_steps(path))

    def mark_done(self, step: int) -> None:
        self.done.add(step)
        self._seen.pop(step, None)

    def forget(self, step: int) -> None:
        """Look at `step` again from scratch (its files changed while it was being taken): it must settle anew,
        and is reported deleted if it disappears."""
        self._seen[step] = _Seen(("changed",), self.clock())
