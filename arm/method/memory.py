"""GPU memory each stage needs per model size, derived from the model shapes (conf/model/*.yaml `shapes:`).

    python -m arm.method.memory                    # the table for every model config with `shapes:` (markdown)
    python -m arm.method.memory --gpu-gb 80 --json

Estimates, not measurements (no GPU was used to write them): bytes of the tensors each stage must hold
at its peak, plus the stated activation terms; the CUDA context and allocator slack are not counted
(keep ~5 GB per GPU spare). Every formula is written next to its term below.

Stages:
- `sft` (per GPU): FSDP full shard over `sft.num_gpus` GPUs of fp32 master weights, fp32 gradients
  and AdamW's two fp32 moments (16 bytes per parameter / N), two gathered fp32 decoder layers
  (the current FSDP unit and the prefetched one), the checkpointed layer inputs (bf16), one layer's
  recomputed activations and the fp32 logits (+ their gradient) of one micro-batch.
- `eval_vllm` (per GPU): bf16 weights / tensor_parallel_size + the KV cache of one `max_model_len`
  sequence (vLLM fills what `gpu_memory_utilization` leaves with more of it: the figure is the floor).
- `merge_stream` (baselines, one GPU): the per-tensor engine holds a few float32 copies of the largest
  tensor (the embedding): the early checkpoints, the base, the accumulator, the output and one work copy.
- `arm_in_memory` (`merge.statistics: model`): θ (the loaded model), c_m and g in float32 (12 bytes per
  parameter), E for the rotated weights (4 bytes each), one stored activation matrix per input group for
  the reference and the current model, and the float32 logits of one calibration batch.
- `arm_layerwise` (`merge.statistics: layerwise`, arm/method/layerwise.py; docs/method.md "Statistics layer by
  layer"), on the GPU: one decoder layer of θ in float32; the work copies of the one tensor being
  materialised (θ0 and c_m as read, g, E, θ, and the cached (c_m, g) pair), the largest being the
  embedding; the hidden states of all calibration sequences (float32); one batch's activations inside a
  layer; that layer's group inputs (before they move to host memory) and one group's reference and
  current inputs for its rotation; one batch of float32 logits for the held-out loss (with the
  reshape and log-softmax copies). c_m and g are re-read from the files per tensor, never held.
- `arm_layerwise_host` (host RAM of the same run): E (4 bytes per rotated weight; twice with
  `select: best_loss`) and the group inputs of every layer for the reference and the current model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from arm.core.paths import CONF_DIR, read_config

GB = 1e9
# merge.statistics=auto goes layer by layer when the ARM-in-memory estimate exceeds this share of the GPU
AUTO_DEVICE_SHARE = 0.9
CONF_MODEL = CONF_DIR / "model"


@dataclass(frozen=True)
class Shapes:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_cfg(cls, shapes: Mapping[str, Any]) -> Shapes:
        return cls(**{k: shapes[k] for k in cls.__dataclass_fields__})

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Shapes:
        """From a checkpoint's config.json (head_dim defaults to hidden / heads, as transformers does)."""
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return cls(hidden_size=int(config["hidden_size"]), intermediate_size=int(config["intermediate_size"]),
                   num_hidden_layers=int(config["num_hidden_layers"]),
                   num_attention_heads=int(config["num_attention_heads"]),
                   num_key_value_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                   head_dim=int(head_dim), vocab_size=int(config["vocab_size"]),
                   tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))

    @property
    def layer_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h + 2 * d  # q, k, v, o projections + q/k RMSNorm (Qwen3, no bias)
        mlp = 3 * h * i  # gate, up, down
        return attn + mlp + 2 * h  # + the two RMSNorms

    @property
    def rotated_params(self) -> int:
        """Parameters of the linear weights ARM rotates (attention and MLP), all layers."""
        return self.num_hidden_layers * (self.layer_params - 2 * self.head_dim - 2 * self.hidden_size)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_hidden_layers * self.layer_params + heads * self.embedding_params + self.hidden_size

    def group_inputs(self) -> list[int]:
        """Input width of each input group of one layer: qkv (h), o (q heads·d), gate/up (h), down (I)."""
        return [self.hidden_size, self.num_attention_heads * self.head_dim, self.hidden_size, self.intermediate_size]

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes


def stage_memory(shapes: Shapes, model_cfg: Mapping[str, Any], arm_cfg: Mapping[str, Any] | None = None,
                 n_early: int = 2) -> dict[str, dict[str, float]]:
    """{stage: {term: GB, ..., "total": GB}} for one model."""
    arm_cfg = dict(arm_cfg or {})
    calib = dict(arm_cfg.get("calibration") or {})
    n_seq = int(calib.get("n_sequences", 128))
    max_len = int(calib.get("max_length", 256))
    max_tokens = int(calib.get("max_tokens", 4096))
    stats_batch = 16  # calibration sequences per forward (arm.method.activations.prepare_calibration's batch_size)
    sft = dict(model_cfg.get("sft") or {})
    vllm = dict(model_cfg.get("vllm") or {})
    P, L, h, V = shapes.params, shapes.num_hidden_layers, shapes.hidden_size, shapes.vocab_size
    layer = shapes.layer_params

    n_gpu = int(sft.get("num_gpus", 1))
    b, s = int(sft.get("per_device_batch_size", 1)), int(sft.get("max_length", 2048))
    out: dict[str, dict[str, float]] = {}
    out["sft"] = {
        "weights+grads+adam (16 B/param / GPUs)": 16 * P / n_gpu / GB,
        "2 gathered fp32 layers": 2 * 4 * layer / GB,
        "checkpointed layer inputs (bf16)": L * b * s * h * 2 / GB,
        "one layer recomputed (bf16, ~16h+3I per token)": b * s * (16 * h + 3 * shapes.intermediate_size) * 2 / GB,
        "logits + grad (fp32)": 2 * b * s * V * 4 / GB,
    }
    tp = int(vllm.get("tensor_parallel_size", 1))
    out["eval_vllm"] = {
        "bf16 weights / tensor_parallel_size": 2 * P / tp / GB,
        "KV cache, one max_model_len sequence": shapes.kv_bytes_per_token() * int(vllm.get("max_model_len", 4096)) / tp / GB,
    }
    largest = max(shapes.embedding_params, shapes.hidden_size * shapes.intermediate_size)
    out["merge_stream"] = {
        f"float32 copies of the largest tensor ({n_early} early + base + acc + out + work)": (n_early + 4) * largest * 4 / GB,
    }
    groups = shapes.group_inputs()
    stats_layer = sum(max_tokens * w * 4 for w in groups)
    out["arm_in_memory"] = {
        "θ, c_m, g in float32 (12 B/param)": 12 * P / GB,
        "E for rotated weights (4 B each)": 4 * shapes.rotated_params / GB,
        "group inputs, reference + current (float32)": 2 * L * stats_layer / GB,
        "forward of one calibration batch (fp32 logits)": stats_batch * max_len * (V + 4 * h) * 4 / GB,
    }
    inter, heads = shapes.intermediate_size, shapes.num_attention_heads
    largest = max(shapes.embedding_params, h * inter)
    out["arm_layerwise"] = {
        "one decoder layer of θ (float32)": 4 * layer / GB,
        "materialising one tensor: θ0, c_m, g, θ, E, cached (c_m, g) (float32, the largest: the embedding)":
            7 * largest * 4 / GB,
        "hidden states of all calibration sequences (float32)": n_seq * max_len * h * 4 / GB,
        "one batch inside a layer (q/k/v/o, scores, gate/up/act/product)":
            stats_batch * max_len * (4 * h + heads * max_len + 4 * inter) * 4 / GB,
        "that layer's group inputs + one group's reference and current": (stats_layer + 2 * max_tokens * max(groups) * 4) / GB,
        "one batch of logits (float32, + reshape and log-softmax copies)": 3 * stats_batch * max_len * V * 4 / GB,
    }
    if arm_cfg.get("formulation") == "proximal":  # one group's C = XᵀX/N and its Cholesky factor at a time
        for stage in ("arm_in_memory", "arm_layerwise"):
            out[stage]["proximal: C and its Cholesky factor, widest group input (float32)"] = 2 * max(groups) ** 2 * 4 / GB
    best_copies = 2 if arm_cfg.get("select") == "best_loss" else 1
    out["arm_layerwise_host"] = {
        f"E for rotated weights (4 B each{', + the best iterate' if best_copies == 2 else ''})":
            best_copies * 4 * shapes.rotated_params / GB,
        "group inputs of every layer, reference + current (float32)": 2 * L * stats_layer / GB,
    }
    for terms in out.values():
        terms["total"] = sum(terms.values())
    return out


def load_models(conf_dir: Path = CONF_MODEL) -> dict[str, dict[str, Any]]:
    """Model configs with a `shapes:` block, by name (read as YAML: no Hydra needed)."""
    models = {}
    for path in sorted(conf_dir.glob("*.yaml")):
        cfg = read_config(path)
        if isinstance(cfg, dict) and cfg.get("shapes"):
            models[cfg["name"]] = cfg
    return dict(sorted(models.items(), key=lambda kv: Shapes.from_cfg(kv[1]["shapes"]).params))


def arm_defaults() -> dict[str, Any]:
    return read_config(CONF_MODEL.parent / "merge" / "arm.yaml")


def table(gpu_gb: float = 80.0) -> list[dict[str, Any]]:
    rows = []
    arm = arm_defaults()
    for name, cfg in load_models().items():
        shapes = Shapes.from_cfg(cfg["shapes"])
        stages = stage_memory(shapes, cfg, arm)
        # the choice of merge.statistics=auto (arm.method.iteration.statistics_mode) on a GPU of gpu_gb
        arm_mode = "in_memory" if stages["arm_in_memory"]["total"] <= AUTO_DEVICE_SHARE * gpu_gb else "layerwise"
        rows.append({"model": name, "params_b": shapes.params / 1e9, "sft_gpus": int(cfg["sft"].get("num_gpus", 1)),
                     "tp": int(cfg.get("vllm", {}).get("tensor_parallel_size", 1)), "stages": stages,
                     "arm_mode": arm_mode, "arm_gb": stages[f"arm_{arm_mode}"]["total"],
                     "arm_fits": stages[f"arm_{arm_mode}"]["total"] <= gpu_gb, "shapes": asdict(shapes)})
    return rows


def sft_hours(params: float, n_gpu: int, tokens: float, mfu: float = 0.4, peak_tflops: float = 989.0) -> float:
    """ESTIMATE (not measured): 8·P·tokens FLOPs (forward, backward, recompute) at `mfu` of `peak_tflops` per GPU."""
    return 8 * params * tokens / (n_gpu * mfu * peak_tflops * 1e12) / 3600


# Assumptions of the SFT time estimate (not measurements): tokens per formatted example with the Qwen3
# tokenizer, 3 epochs of model.sft.max_examples, 40% model FLOPs utilisation of an H100's 989 dense bf16 TFLOP/s.
TOKENS_PER_EXAMPLE = {"math": 250, "code": 600}


def sft_time_markdown(mfu: float = 0.4, peak_tflops: float = 989.0) -> str:
    lines = ["| model | GPUs | math SFT (est.) | code SFT (est.) |", "|---|---|---|---|"]
    for name, cfg in load_models().items():
        params = Shapes.from_cfg(cfg["shapes"]).params
        sft = cfg["sft"]
        n_gpu, examples, epochs = int(sft.get("num_gpus", 1)), int(sft.get("max_examples") or 100_000), float(sft.get("epochs", 3))
        cells = [f"{sft_hours(params, n_gpu, examples * epochs * tpe, mfu, peak_tflops):.1f} h" for tpe in TOKENS_PER_EXAMPLE.values()]
        lines.append(f"| {name} | {n_gpu} | {cells[0]} | {cells[1]} |")
    lines.append(f"\nESTIMATES, not measured: 8·P·tokens FLOPs at {mfu:.0%} of {peak_tflops:g} TFLOP/s per GPU; tokens = "
                 f"max_examples × epochs × {TOKENS_PER_EXAMPLE} tokens per example (assumed).")
    return "\n".join(lines)


def to_markdown(rows: list[dict[str, Any]], gpu_gb: float) -> str:
    lines = [
        f"| model | params | SFT per GPU (GPUs) | vLLM eval per GPU (TP) | baseline merge | ARM in memory | ARM layer by layer (host RAM) | ARM mode on {gpu_gb:g} GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["stages"]
        lines.append(
            f"| {r['model']} | {r['params_b']:.2f} B | {st['sft']['total']:.1f} GB ({r['sft_gpus']}) | "
            f"{st['eval_vllm']['total']:.1f} GB ({r['tp']}) | {st['merge_stream']['total']:.1f} GB | "
            f"{st['arm_in_memory']['total']:.1f} GB | {st['arm_layerwise']['total']:.1f} GB "
            f"({st['arm_layerwise_host']['total']:.1f} GB) | "
            f"{r['arm_mode']}: {r['arm_gb']:.1f} GB {'fits' if r['arm_fits'] else 'DOES NOT FIT'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arm.method.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory to check ARM against (default 80)")
    parser.add_argument("--json", action="store_true", help="every term of every stage as JSON")
    parser.add_argument("--detail", metavar="MODEL", help="every term of one model's stages")
    parser.add_argument("--sft-time", action="store_true",
                        help="ESTIMATED SFT hours per model and domain (stated token counts and throughput; not measured)")
    args = parser.parse_args(argv)
    rows = table(args.gpu_gb)
    if args.sft_time:
        print(sft_time_markdown())
    elif args.json:
        print(json.dumps(rows, indent=2))
    elif args.detail:
        match = [r for r in rows if r["model"] == args.detail]
        if not match:
            print(f"unknown model '{args.detail}' (known: {', '.join(r['model'] for r in rows)})", file=sys.stderr)
            return 2
        for stage, terms in match[0]["stages"].items():
            print(f"{stage}:")
            for term, gb in terms.items():
                print(f"  {gb:8.2f} GB  {term}")
    else:
        print(to_markdown(rows, args.gpu_gb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
