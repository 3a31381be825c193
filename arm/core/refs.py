"""References to what the stages pass each other: a model folder with its content key, and a
trajectory (base + early SFT checkpoints + converged SFT)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelRef:
    """One model of the trajectory: its folder, its step, and a key naming its content."""

    name: str
    path: Path
    key: str
    step: int | None = None


@dataclass
class Trajectory:
    base: ModelRef
    early: list[ModelRef]
    converged: ModelRef | None
    folder: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def inputs(self) -> list[Path]:
        """The early checkpoints, ordered by step: the inputs of every merge method."""
        return [ref.path for ref in self.early]

    def references(self, base: bool = True, early: bool = True, converged: bool = True) -> list[ModelRef]:
        refs = ([self.base] if base else []) + (list(self.early) if early else [])
        if converged and self.converged is not None:
            refs.append(self.converged)
        return refs
