"""ARM's activation statistics one decoder layer at a time (``merge.statistics: layerwise``).

Our formulation (``/work/shared/ARM.md``, "Cost and scale"; not the paper's): for models that do not
fit in memory, the statistics and the held-out calibration loss are computed without loading the
model. The calibration sequences are embedded once; their hidden states stay on the merge device.
Then, for every decoder layer in turn, that layer alone is built (transformers' ``Qwen3DecoderLayer``
from the checkpoint's config, rotary embeddings from ``Qwen3RotaryEmbedding``) with weights given
tensor by tensor by the caller — the reference c_m read from the safetensors folder, the current
iterate materialised as ``θ = g·a + c_m (+ E)`` by ``arm.method.iteration`` — the hidden states are run
through it with the same hooks as the whole-model mode (``arm.method.activations.InputRecorder``) on the same
token positions, and the layer is dropped. Device memory: one layer in float32 (plus the work copies
of the tensor being materialised), the hidden states of the calibration sequences, that layer's group
inputs, and, for the loss, the output head and one batch of logits.

The computation is the whole model's forward, reordered (layer-major instead of batch-major): the
same embedding lookup, rotary cos/sin, causal mask, layer and loss code, so both modes give the same
statistics up to float rounding (``tests/test_arm_layerwise.py``).

Only architectures whose decoder layer we can build are supported (``SUPPORTED``); any other model
folder fails with an error naming the folder and the reason, before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arm.merge.engine import MergeInputError
from arm.method.activations import IGNORE_INDEX, InputRecorder, find_linear_groups

if TYPE_CHECKING:
    import torch

    from arm.method.activations import Calibration, LinearGroup

SUPPORTED = {"qwen3": "Qwen3ForCausalLM"}  # model_type -> the causal-LM class whose layers we build
LAYERS = "model.layers"
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"


def unsupported_reason(config: Mapping[str, Any]) -> str | None:
    """Why a checkpoint's ``config.json`` cannot be run layer by layer here (None: it can)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        return (f"model_type {model_type!r} is not supported layer by layer (supported: "
                f"{', '.join(sorted(SUPPORTED))})")
    archs = config.get("architectures") or [SUPPORTED[model_type]]
    if list(archs) != [SUPPORTED[model_type]]:
        return f"architectures {archs} (layer by layer supports {SUPPORTED[model_type]} only)"
    if config.get("use_sliding_window"):
        return "sliding-window attention (use_sliding_window: true) is not supported layer by layer"
    types = set(config.get("layer_types") or ["full_attention"])
    if types != {"full_attention"}:
        return f"layer_types {sorted(types)} (layer by layer supports full_attention layers only)"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in config:
            return f"config.json has no {key!r}"
    return None


def causal_mask(config: Any, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> Any:
    """transformers' causal mask for one unpadded batch, no KV cache, as the whole model builds it.

    ``create_causal_mask`` changes its keywords between transformers releases: ``inputs_embeds`` +
    ``past_key_values`` in 5.19 (the vLLM extra's range, ``make test-compat``); ``cache`` from 5.24 on,
    with ``past_key_values`` deprecated (``make test``); ``input_embeds`` + a required
    ``cache_position`` in 5.0 and 4.x. The call is built from the installed signature, so each
    version gets the arguments it expects.
    """
    import inspect

    import torch
    from transformers.masking_utils import create_causal_mask

    params = inspect.signature(create_causal_mask).parameters
    kwargs: dict[str, Any] = {"config": config, "attention_mask": None, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = inputs_embeds
    for name in ("cache", "past_key_values"):
        if name in params:
            kwargs[name] = None
            break
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    return create_causal_mask(**kwargs)


class LayerwiseModel:
    """The decoder of a checkpoint folder, built one layer at a time on ``device``.

    ``names``: the float tensors the caller can give (state-dict names of the files); every weight
    of the forward must be among them. ``store``: where recorded statistics are kept between layers
    (CPU when the device is a GPU, so that the GPU holds one layer's statistics at a time).
    """

    def __init__(self, folder: Path | str, names: Sequence[str], device: torch.device):
        import json

        import torch


        self.folder = Path(folder)
        cfg_file = self.folder / "config.json"
        try:
            raw = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MergeInputError(f"{self.folder}: cannot collect ARM's statistics layer by layer "
                                  f"(merge.statistics): config.json unreadable ({err})") from None
        reason = unsupported_reason(raw)
        if reason is not None:
            raise MergeInputError(f"{self.folder}: cannot collect ARM's statistics layer by layer "
                                  f"(merge.statistics: layerwise): {reason}")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.folder)
        config._attn_implementation = "sdpa"  # what from_pretrained picks for the whole-model mode
        config.use_cache = False
        self.config = config
        self.device = torch.device(device)
        self.store = torch.device("cpu") if self.device.type != "cpu" else self.device
        self.n_layers = int(config.num_hidden_layers)
        self.tied = bool(config.tie_word_embeddings)
        self.head = EMBED if self.tied else HEAD
        layer_keys = list(self._meta_layer(0).state_dict())
        self.layer_names = [[f"{LAYERS}.{i}.{k}" for k in layer_keys] for i in range(self.n_layers)]
        have = set(names)
        needed = [EMBED, NORM, self.head, *(n for layer in self.layer_names for n in layer)]
        missing = [n for n in needed if n not in have]
        if missing:
            raise MergeInputError(f"{self.folder}: cannot collect ARM's statistics layer by layer "
                                  f"(merge.statistics: layerwise): the files have no float tensor {missing[0]!r} "
                                  f"({len(missing)} of the {len(needed)} weights of a {SUPPORTED[raw['model_type']]} missing)")

    # --- modules ---------------------------------------------------------------------------

    def _meta_layer(self, index: int) -> Any:
        import torch
        from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

        with torch.device("meta"):
            return Qwen3DecoderLayer(self.config, index)

    def groups(self) -> list[LinearGroup]:
        """The input groups, named as ``find_linear_groups`` names them on the whole model."""
        import torch


        skeleton = torch.nn.Module()
        skeleton.model = torch.nn.Module()
        skeleton.model.layers = torch.nn.ModuleList(self._meta_layer(i) for i in range(self.n_layers))
        return find_linear_groups(skeleton)

    def _layer(self, index: int, weights: Callable[[str], torch.Tensor]) -> Any:
        layer = self._meta_layer(index)
        prefix = f"{LAYERS}.{index}."
        state = {n[len(prefix):]: weights(n) for n in self.layer_names[index]}
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()

    # --- one pass --------------------------------------------------------------------------

    def run(
        self,
        weights: Callable[[str], torch.Tensor],
        calib: Calibration | None,
        groups: Sequence[LinearGroup] | None,
        *,
        loss: bool,
    ) -> tuple[dict[str, torch.Tensor] | None, float | None]:
        """One layer-by-layer forward of the model whose float32 tensors ``weights(name)`` gives.

        Returns (per group the (tokens × in) inputs on the chosen positions, kept on ``store``;
        the mean next-token loss on the held-out sequences) — each None when not asked for or
        without such sequences. Every tensor is requested once per pass; without calibration data
        the weights are still requested (the caller's finiteness checks run).
        """
        import torch
        import torch.nn.functional as F
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding


        dev = self.device
        stats_batches = list(calib.stats_batches) if (calib is not None and groups is not None) else []
        loss_batches = list(calib.loss_batches) if (calib is not None and loss) else []
        with torch.no_grad():
            W = weights(EMBED)
            hidden = [F.embedding(ids.to(dev), W) for ids in stats_batches]
            hidden += [F.embedding(ids.to(dev), W) for ids, _ in loss_batches]
            del W
            rotary = Qwen3RotaryEmbedding(config=self.config).to(dev)
            extras = []
            for h in hidden:
                pos = torch.arange(h.shape[1], device=dev).unsqueeze(0)
                mask = causal_mask(self.config, h, pos)
                extras.append({"attention_mask": mask, "position_ids": pos, "position_embeddings": rotary(h, pos)})
            n_stats = len(stats_batches)
            X: dict[str, torch.Tensor] | None = {} if groups is not None else None
            for index in range(self.n_layers):
                layer = self._layer(index, weights)
                if X is not None:
                    prefix = f"{LAYERS}.{index}."
                    mine = [g for g in groups if g.key.startswith(prefix)]
                    modules = {prefix + n: m for n, m in layer.named_modules() if n}
                    with InputRecorder(modules, mine) as rec:
                        for b in range(n_stats):
                            rec.next_batch(calib.stats_positions[b].to(dev))
                            hidden[b] = layer(hidden[b], **extras[b])
                    for key, value in rec.result(dev).items():
                        X[key] = value.to(self.store)
                    del rec
                for b in range(n_stats, len(hidden)):
                    hidden[b] = layer(hidden[b], **extras[b])
                del layer
            norm = Qwen3RMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps).to(dev)
            final = weights(NORM)
            head = weights(self.head)
            norm.weight.data = final
            del hidden[:n_stats]  # the statistics sequences are done; the held-out ones remain
            value = None
            if loss_batches:
                total, count = 0.0, 0
                for h, (_, labels) in zip(hidden, loss_batches, strict=True):
                    logits = F.linear(norm(h), head)[:, :-1, :]
                    targets = labels.to(dev)[:, 1:]
                    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="sum")
                    total += float(loss_sum)
                    count += int((targets != IGNORE_INDEX).sum())
                    del logits
                value = total / max(count, 1)
        return X, value
