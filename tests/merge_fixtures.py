"""Small random Qwen3 model folders for the merge tests (real transformers ``save_pretrained``)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Trajectory:
    base: Path
    checkpoints: list[Path]


def make_tokenizer():
    """The offline character-level tokenizer (see NOTES.md)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def qwen3_config(hidden: int = 32, layers: int = 2, vocab: int = 104, tie: bool = True):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )


def make_trajectory(
    root: Path,
    *,
    n_checkpoints: int = 3,
    hidden: int = 32,
    layers: int = 2,
    tie: bool = True,
    dtype: str = "float32",
    seed: int = 0,
    shard_size: str | None = None,
    tokenizer_in_base: bool = True,
) -> Trajectory:
    """A base model and ``n_checkpoints`` perturbed copies (a random-walk 'trajectory')."""
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(hidden, layers, tie=tie)).to(getattr(torch, dtype))
    tok = make_tokenizer()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    base = root / "base"
    model.save_pretrained(base, **kwargs)
    if tokenizer_in_base:
        tok.save_pretrained(base)
    checkpoints = []
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i in range(n_checkpoints):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.02)
            path = root / f"checkpoint-{(i + 1) * 10}"
            model.save_pretrained(path, **kwargs)
            tok.save_pretrained(path)
            checkpoints.append(path)
    return Trajectory(base, checkpoints)
