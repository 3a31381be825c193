"""The tiny model's character tokenizer and Qwen3 builder (arm/trajectory/tiny.py)."""

from __future__ import annotations

import string

import pytest

from arm.trajectory.tiny import EOS_TOKEN, PAD_TOKEN, build_char_tokenizer, build_model
from tests.helpers import TEST_ARCH

ARCH = dict(TEST_ARCH)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_tokenizer_round_trip(tokenizer):
    texts = [
        string.printable,
        "Tom has 34 pens, gets 25.\nA: 59",
        "x plus 4\ndef f(x):\n    return x+4 if x%2==0 else x*3",
        "  leading and trailing spaces  ",
        "",
    ]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    # default encoding adds no BOS or EOS
    assert tokenizer("ab")["input_ids"] == tokenizer("ab", add_special_tokens=False)["input_ids"]
    ids = tokenizer("59")["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "59"


def test_tokenizer_specials(tokenizer):
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token_id is None
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == 3 + len(string.printable)


def test_tokenizer_reloads_offline(tokenizer, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Ann has 3 bags of 12 figs.\nA: 36"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.padding_side == "left"
    assert (again.pad_token_id, again.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    batch = again(["ab", "abcd"], padding=True)["input_ids"]
    assert batch[0][:2] == [again.pad_token_id] * 2  # left padding


def test_build_model(tokenizer):
    model = build_model(ARCH, tokenizer, seed=0)
    cfg = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert cfg.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 32)
    assert cfg.eos_token_id == tokenizer.eos_token_id and cfg.pad_token_id == tokenizer.pad_token_id
    assert cfg.num_hidden_layers == 2 and cfg.head_dim == 8 and cfg.tie_word_embeddings
    gen = model.generation_config
    assert gen.do_sample is False
    assert gen.eos_token_id == tokenizer.eos_token_id and gen.pad_token_id == tokenizer.pad_token_id


def test_build_model_seeded(tokenizer):
    a = build_model(ARCH, tokenizer, seed=3).state_dict()
    b = build_model(ARCH, tokenizer, seed=3).state_dict()
    c = build_model(ARCH, tokenizer, seed=4).state_dict()
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


def test_build_model_bad_arch(tokenizer):
    with pytest.raises(ValueError, match="hidden_size"):
        build_model({k: v for k, v in ARCH.items() if k != "hidden_size"}, tokenizer, seed=0)
    with pytest.raises(ValueError, match="hidden_sise"):
        build_model({**ARCH, "hidden_sise": 3}, tokenizer, seed=0)
