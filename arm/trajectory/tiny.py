"""The tiny model of the embedded default: a character-level tokenizer and a small Qwen3.

Both are built offline, in seconds, from `conf/model/tiny.yaml` (`arch:` block). The tokenizer is a
`tokenizers` WordLevel model over the special tokens and `string.printable`, one token per character,
so any printable string round-trips exactly and `AutoTokenizer.from_pretrained` reloads it offline.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
# The chat template of the pretrained-base miniature (conf/model/tiny.yaml, `tokenizer: char_chat`): two
# role tokens that pretraining never sees, so SFT has a format of its own to teach.
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
CHAT_TOKENS = (USER_TOKEN, ASSISTANT_TOKEN)
TOKENIZERS = ("char", "char_chat")

# Keys of the `arch:` block that map one-to-one onto Qwen3Config arguments.
ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "hidden_act",
    "initializer_range",
    "attention_dropout",
    "attention_bias",
)
REQUIRED_ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


def build_tokenizer(kind: str = "char"):
    """The tokenizer named by a model config's `tokenizer:` key (`char` or `char_chat`)."""
    if kind not in TOKENIZERS:
        raise ValueError(f"model.tokenizer: unknown tokenizer {kind!r}; known: {', '.join(TOKENIZERS)}")
    return build_char_tokenizer(chat=kind == "char_chat")


def build_char_tokenizer(chat: bool = False):
    """A character-level `PreTrainedTokenizerFast`: pad/eos/unk specials, then `string.printable`.

    With `chat`, the role tokens `<|user|>` and `<|assistant|>` follow (ids 103, 104), as special tokens
    that are matched before the text is split into characters. No BOS is added; padding is on the left
    (for batched generation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *string.printable, *(CHAT_TOKENS if chat else ())):
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
        **({"additional_special_tokens": list(CHAT_TOKENS)} if chat else {}),
    )
    return tokenizer


def qwen3_config(arch: Mapping[str, Any], tokenizer):
    """`Qwen3Config` from the `arch:` block; vocabulary and special ids from the tokenizer."""
    from transformers import Qwen3Config

    missing = [k for k in REQUIRED_ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"model arch: missing key(s) {missing} (conf/model/tiny.yaml `arch:`)")
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise ValueError(f"model arch: unknown key(s) {unknown}; known: {list(ARCH_KEYS)}")
    kwargs = {k: arch[k] for k in ARCH_KEYS if k in arch}
    if "head_dim" not in kwargs:
        kwargs["head_dim"] = int(arch["hidden_size"]) // int(arch["num_attention_heads"])
    return Qwen3Config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        use_cache=True,
        **kwargs,
    )


def build_model(arch: Mapping[str, Any], tokenizer, seed: int):
    """A freshly initialised `Qwen3ForCausalLM` (float32) with greedy generation defaults."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    config = qwen3_config(arch, tokenizer)
    torch.manual_seed(int(seed))
    model = Qwen3ForCausalLM(config)
    model.generation_config = greedy_generation_config(tokenizer, GenerationConfig)
    model.eval()
    return model


def greedy_generation_config(tokenizer, generation_config_cls=None):
    if generation_config_cls is None:
        from transformers import GenerationConfig as generation_config_cls
    return generation_config_cls(
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
