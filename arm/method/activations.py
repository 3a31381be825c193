"""Input-activation statistics of the linear layers of attention and MLP blocks (for ARM).

Our formulation (``/work/shared/ARM.md``; the paper's abstract says only that rotations are
derived from activation subspaces): for every linear layer inside the decoder layers, record its
*input* on a fixed set of calibration tokens. Layers that read the same input form one group and
share one rotation: in Qwen3/Llama-style blocks q/k/v_proj read the normed hidden states and
gate/up_proj read the normed MLP input; o_proj and down_proj are groups of their own.

Memory is bounded: per group one (tokens × in) float32 matrix, with at most ``max_tokens`` tokens,
chosen once (seeded) from the non-padding positions of the statistics sequences. The reference and
the current model are recorded on exactly the same tokens, which ``procrustes`` needs (it matches
token i of one with token i of the other).

Collecting statistics (``collect_inputs``, or ``arm.method.layerwise`` one decoder layer at a time for
models that do not fit in memory) and applying updates (``arm.method.iteration``) are separate; both
collections record with the same hooks (``InputRecorder``) on the same positions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from arm.trajectory.sft import _loss_sums, collate, encode_example

if TYPE_CHECKING:
    import torch

# members of one input group, by module name (the rest is a group of its own)
SHARED_INPUTS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
IGNORE_INDEX = -100


@dataclass
class LinearGroup:
    """Linear layers that read one input; ``params`` are their weight names (state-dict names)."""

    key: str  # e.g. "model.layers.0.self_attn.qkv"
    modules: list[str]
    params: list[str]
    in_features: int


def find_linear_groups(model: Any) -> list[LinearGroup]:
    """Every ``nn.Linear`` inside the decoder layers (attention and MLP blocks), grouped by input."""
    import torch

    layers_name = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers"):
            layers_name = name
            break
    if layers_name is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list (…layers) found for ARM's statistics")
    groups: dict[str, LinearGroup] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.startswith(layers_name + "."):
            continue
        parent, _, leaf = name.rpartition(".")
        key = f"{parent}.{SHARED_INPUTS.get(leaf, leaf)}"
        group = groups.setdefault(key, LinearGroup(key, [], [], module.in_features))
        if group.in_features != module.in_features:
            raise ValueError(f"{name}: input width {module.in_features} differs from its group {key}")
        group.modules.append(name)
        group.params.append(f"{name}.weight")
    if not groups:
        raise ValueError(f"{type(model).__name__}: no linear layers inside {layers_name}")
    return list(groups.values())


@dataclass
class Calibration:
    """Tokenized calibration data: statistics batches (with the chosen token positions) and the
    held-out loss batches (labels −100 on prompt and padding)."""

    stats_batches: list[torch.Tensor] = field(default_factory=list)  # input_ids (B × L), right-padded
    stats_positions: list[torch.Tensor] = field(default_factory=list)  # bool (B × L): tokens recorded
    loss_batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    n_stats_sequences: int = 0
    n_loss_sequences: int = 0
    n_tokens: int = 0


def prepare_calibration(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    n_sequences: int,
    max_length: int,
    holdout_fraction: float,
    seed: int,
    max_tokens: int,
    batch_size: int = 16,
) -> Calibration:
    """Sample ``n_sequences`` records (seeded), tokenize prompt + response + EOS (as SFT does),
    truncate to ``max_length``, hold out ``holdout_fraction`` of them for the calibration loss
    and choose at most ``max_tokens`` token positions of the others for the statistics."""
    import torch


    if not records:
        raise ValueError("the calibration set is empty (ARM needs the domain's training records)")
    for i, r in enumerate(records[:1]):
        if not isinstance(r, Mapping) or "prompt" not in r or "response" not in r:
            raise ValueError(f"calibration record {i} has no 'prompt' and 'response' fields")
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    chosen = [records[i] for i in order[: min(n_sequences, len(records))]]
    encoded = []
    for rec in chosen:
        ids, labels = encode_example(tokenizer, rec)
        encoded.append((ids[:max_length], labels[:max_length]))
    n_hold = int(math.floor(holdout_fraction * len(encoded) + 0.5)) if holdout_fraction > 0 else 0
    if holdout_fraction > 0:
        n_hold = max(1, n_hold)
    if n_hold >= len(encoded) and len(encoded) > 0 and holdout_fraction < 1:
        n_hold = len(encoded) - 1
    held, stats = encoded[:n_hold], encoded[n_hold:]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    calib = Calibration(n_stats_sequences=len(stats), n_loss_sequences=len(held))
    for s in range(0, len(held), batch_size):
        calib.loss_batches.append(collate(held[s : s + batch_size], pad))
    total = sum(len(ids) for ids, _ in stats)
    keep: set[int] = set(range(total))
    if total > max_tokens:
        keep = set(random.Random(seed + 1).sample(range(total), max_tokens))
    offset = 0
    for s in range(0, len(stats), batch_size):
        part = stats[s : s + batch_size]
        ids, _ = collate(part, pad)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for row, (seq, _) in enumerate(part):
            for j in range(len(seq)):
                if offset + j in keep:
                    mask[row, j] = True
            offset += len(seq)
        calib.stats_batches.append(ids)
        calib.stats_positions.append(mask)
    calib.n_tokens = min(total, max_tokens)
    return calib


def collect_inputs(
    model: Any, groups: Sequence[LinearGroup], calib: Calibration, device: torch.device
) -> dict[str, torch.Tensor]:
    """Per group, the (tokens × in) float32 inputs of its layers on the calibration tokens.

    One forward pass per statistics batch (no gradients); forward pre-hooks on the first member of
    each group record the chosen positions. On the first batch the other members' inputs are
    checked to be the very same tensor (so the grouping by name is right for this architecture).
    ``arm.method.layerwise`` records with the same hooks, one decoder layer at a time.
    """
    import torch

    recorder = InputRecorder(dict(model.named_modules()), groups)
    with recorder, torch.no_grad():
        for ids, mask in zip(calib.stats_batches, calib.stats_positions, strict=True):
            recorder.next_batch(mask.to(device))
            model(input_ids=ids.to(device))
    return recorder.result(device)


class InputRecorder:
    """Forward pre-hooks on ``modules`` (by the names the groups use): the first member of each
    group records its input at the positions of the current batch's mask; on the first batch the
    other members' inputs are checked to be the same tensor. A context manager (hooks removed on exit)."""

    def __init__(self, modules: Mapping[str, Any], groups: Sequence[LinearGroup]):
        self.modules = modules
        self.groups = list(groups)
        self.out: dict[str, list[torch.Tensor]] = {g.key: [] for g in self.groups}
        self.state: dict[str, Any] = {"mask": None, "first": True, "seen": {}, "started": False}
        self.handles: list[Any] = []

    def _recorder(self, key: str):
        out, state = self.out, self.state

        def hook(_module, args):
            import torch

            x = args[0]
            state["seen"][key] = x
            out[key].append(x.detach()[state["mask"]].to(torch.float32))

        return hook

    def _checker(self, key: str, member: str):
        state = self.state

        def hook(_module, args):
            import torch

            if state["first"] and args[0] is not state["seen"].get(key):
                if not torch.equal(args[0], state["seen"][key]):
                    raise ValueError(f"{member}: its input differs from the input of its group {key}")

        return hook

    def next_batch(self, mask: torch.Tensor) -> None:
        """Positions (bool, B × L) of the batch about to run through the hooked modules."""
        if self.state["started"]:
            self.state["first"] = False
            self.state["seen"] = {}
        self.state["started"] = True
        self.state["mask"] = mask

    def __enter__(self) -> InputRecorder:
        try:
            for g in self.groups:
                self.handles.append(self.modules[g.modules[0]].register_forward_pre_hook(self._recorder(g.key)))
                for member in g.modules[1:]:
                    self.handles.append(self.modules[member].register_forward_pre_hook(self._checker(g.key, member)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def result(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per group the recorded rows, concatenated in batch order; non-finite values are an error."""
        import torch

        result = {}
        for g in self.groups:
            parts = self.out[g.key]
            X = torch.cat(parts) if parts else torch.empty(0, g.in_features, device=device)
            if not bool(torch.isfinite(X).all()):
                raise FloatingPointError(f"non-finite input activations of {g.key}")
            result[g.key] = X
        return result


def calibration_loss(model: Any, calib: Calibration, device: torch.device) -> float | None:
    """Mean next-token loss on the response tokens of the held-out sequences (None without any)."""
    import torch


    if not calib.loss_batches:
        return None
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in calib.loss_batches:
            loss_sum, n = _loss_sums(model, ids.to(device), labels.to(device))
            total += float(loss_sum)
            count += n
    return total / max(count, 1)
