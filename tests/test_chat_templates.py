"""A model is prompted as itself: chat-format domains go through the tokenizer's own chat template; a
tokenizer without one gets a clear error (or the plain format, by config); the user's model is named after
itself. The real SmolLM2 (ChatML) path is in tests/test_smollm2.py; these use tokenizer folders made here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from arm.core.errors import ConfigError
from arm.core.specs import TrajectorySpec
from arm.data import chat_templates
from arm.data.splits import data_key, ensure_data
from arm.trajectory.build import own_model_name, tokenizer_folder
from tests.helpers import TINY_BASE

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

MATH = {"name": "math_synth", "synthetic": True, "generator": "math_synth",
        "data": {"seed": 5, "n_train": 20, "n_validation": 8, "n_test": 8}}
CODE = {"name": "code_synth", "synthetic": True, "generator": "code_synth",
        "data": {"seed": 5, "n_train": 20, "n_validation": 8, "n_test": 8}}


def tokenizer_with_template(tmp_path: Path, template: str | None) -> Path:
    """The tiny base's tokenizer files (a real HF tokenizer) with `template` as chat_template.jinja."""
    folder = tmp_path / "tok"
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_BASE / name, folder / name)
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def plain_tokenizer(tmp_path: Path) -> Path:
    """A word-level tokenizer with no chat template and no role tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate("what is the answer".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "plain-tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(str(folder))
    return folder


def test_markup_for_the_tiny_tokenizer_and_the_plain_format():
    assert chat_templates.chat_template_for("chat", None) is None            # a model built here
    assert chat_templates.chat_template_for("chat", TINY_BASE) is None       # its tokenizer knows <|user|>
    assert chat_templates.chat_template_for("plain", TINY_BASE) is None


def test_a_template_less_tokenizer_is_refused_with_the_fix(tmp_path):
    folder = plain_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="model.prompt_format") as err:
        chat_templates.chat_template_for("chat", folder)
    assert str(folder) in str(err.value) and "model.prompt_format=plain" in str(err.value)
    assert chat_templates.chat_template_for("plain", folder) is None  # the plain format, by config
    data = ensure_data(MATH, tmp_path / "cache", "plain", folder)
    assert data.split("test")[0]["prompt"].endswith("\nA:")  # the generator's own plain prompt


@pytest.mark.parametrize("domain", [MATH, CODE], ids=["math", "code"])
def test_chat_records_rendered_through_the_models_template(tmp_path, domain):
    folder = tokenizer_with_template(tmp_path, CHATML)
    markup = ensure_data(domain, tmp_path / "cache", "chat")
    templated = ensure_data(domain, tmp_path / "cache", "chat", folder)
    assert templated.folder != markup.folder and templated.folder.name.startswith(f"{domain['name']}-template-")
    assert templated.key != markup.key
    for split in ("train", "validation", "test"):
        for old, new in zip(markup.split(split), templated.split(split), strict=True):
            question = old["prompt"][len("<|user|>"):-len("\n<|assistant|>")]
            assert new["prompt"] == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            assert new["response"] == old["response"].lstrip(" ")
            # the problem, the answer and the hidden tests are unchanged: the scorers read them
            assert {k: v for k, v in new.items() if k not in ("prompt", "response")} == \
                   {k: v for k, v in old.items() if k not in ("prompt", "response")}
    # another template is another data key
    other = tokenizer_with_template(tmp_path / "b", CHATML.replace("assistant\n{% endif %}", "assistant\n\n{% endif %}"))
    assert data_key(domain, "chat", chat_templates.read_template(other)) != templated.key


def test_template_from_tokenizer_config(tmp_path):
    folder = tokenizer_with_template(tmp_path, None)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_templates.read_template(folder) == CHATML


def _user_trajectory(tmp_path: Path, hidden_size: int) -> Path:
    folder = tmp_path / "my-run"
    (folder / "checkpoint-5").mkdir(parents=True)
    base = tmp_path / "SmolLM2-135M-Instruct"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"hidden_size": hidden_size, "num_hidden_layers": 30}))
    return folder


def test_the_users_model_is_named_after_itself(tmp_path, compose):
    folder = _user_trajectory(tmp_path, 576)
    base = tmp_path / "SmolLM2-135M-Instruct"
    cfg = compose(f"trajectory.path={folder}", f"trajectory.base={base}")  # model=tiny, the default
    name, why = own_model_name(TrajectorySpec.from_config(cfg))
    assert name == "SmolLM2-135M-Instruct" and "hidden_size" in why
    cfg = compose(f"trajectory.path={folder}", f"trajectory.base={base}", "model.name=smol")
    # an explicit name for a model=tiny config is still not believed when the shapes differ: the folder's name
    assert own_model_name(TrajectorySpec.from_config(cfg))[0] == "SmolLM2-135M-Instruct"
    cfg = compose("model=smollm2-135m", f"trajectory.path={folder}", f"trajectory.base={base}")
    assert own_model_name(TrajectorySpec.from_config(cfg)) == ("smollm2-135m", None)  # a config without arch: its name
    cfg = compose("model=smollm2-135m", f"trajectory.path={folder}", f"trajectory.base={base}", "model.name=null")
    assert own_model_name(TrajectorySpec.from_config(cfg))[0] == "SmolLM2-135M-Instruct"


def test_a_tiny_trajectory_keeps_its_name(tmp_path, compose):
    folder = _user_trajectory(tmp_path, 128)  # the tiny arch's hidden_size and ... 30 layers differ
    base = tmp_path / "SmolLM2-135M-Instruct"
    (base / "config.json").write_text((TINY_BASE / "config.json").read_text())
    cfg = compose(f"trajectory.path={folder}", f"trajectory.base={base}")
    assert own_model_name(TrajectorySpec.from_config(cfg)) == ("tiny", None)
    # its tokenizer: the base's (the tiny's own markup tokenizer there: None template)
    shutil.copy(TINY_BASE / "tokenizer.json", base / "tokenizer.json")
    assert tokenizer_folder(TrajectorySpec.from_config(cfg), tmp_path) == base
