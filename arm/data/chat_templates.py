"""A real model's own chat template for the synthetic domains' chat format.

The synthetic domains' `chat` format (arm/data/domains/formats.py) is written in the tiny model's markup,
`<|user|>{question}\\n<|assistant|>` -> `{answer}`: role tokens that the tiny base has never seen and SFT
teaches it. A real model has its own template (SmolLM2: ChatML, `<|im_start|>user\\n...<|im_end|>`), and
prompting it in another model's markup says nothing about it. So for any model whose tokenizer defines
a chat template, the same records are rendered through that template:

    prompt   = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
    response = answer (leading spaces dropped); SFT appends the tokenizer's EOS (ChatML: <|im_end|>)

The question and the answer are the markup record's, so problems, answers and hidden tests (and
therefore the scorers) are unchanged. Which prompts a job uses is decided once, by
`chat_template_for` (arm/run and the plan call it with the model's tokenizer folder):

- `model.prompt_format: plain`: the domain's plain records, no template.
- `chat`, and the tokenizer has a chat template: that template (this module).
- `chat`, no template, and the tokenizer knows the markup's role tokens (the tiny model): the markup.
- `chat`, no template otherwise: an error that names the folder and says `model.prompt_format=plain`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from arm.core.errors import ConfigError, InputError
from arm.data.domains import formats


def read_template(tokenizer_dir: Path) -> str | None:
    """The chat template a tokenizer folder defines (chat_template.jinja, or tokenizer_config.json's
    `chat_template`), or None."""
    folder = Path(tokenizer_dir)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text()).get("chat_template")
        except (OSError, ValueError) as exc:
            raise InputError(f"{config}: unreadable ({exc})") from exc
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template:
            return str(template)
    return None


def knows_markup(tokenizer_dir: Path) -> bool:
    """Whether the folder's tokenizer has the markup's role tokens as tokens (the tiny model's char_chat)."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        return False
    try:
        text = path.read_text()
    except OSError:
        return False
    return json.dumps(formats.USER) in text and json.dumps(formats.ASSISTANT) in text


def template_digest(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def chat_template_for(prompt_format: str, tokenizer_dir: Path | None) -> str | None:
    """The chat template a job renders its chat-format prompts with, or None for the markup/plain format.

    `tokenizer_dir` None: a model this project builds (the tiny model), whose chat format is the markup."""
    if prompt_format != "chat" or tokenizer_dir is None:
        return None
    template = read_template(tokenizer_dir)
    if template is not None:
        return template
    if knows_markup(tokenizer_dir):
        return None
    raise ConfigError(
        "model.prompt_format",
        f"the domain is in chat format but the tokenizer in {tokenizer_dir} defines no chat template "
        "(no chat_template.jinja, no chat_template in tokenizer_config.json): set model.prompt_format=plain "
        "to prompt it with the domain's plain format, or add the model's template to that folder")


def split_markup(record: Mapping[str, Any]) -> tuple[str, str]:
    """(question, answer) of a markup chat record."""
    prompt = str(record["prompt"])
    head, tail = formats.USER, f"\n{formats.ASSISTANT}"
    if not (prompt.startswith(head) and prompt.endswith(tail)):
        raise ValueError(f"not a chat-format prompt: {prompt[:60]!r}")
    return prompt[len(head): -len(tail)], str(record["response"]).lstrip(" ")


def render(records: Sequence[Mapping[str, Any]], tokenizer_dir: Path) -> list[dict[str, Any]]:
    """Markup chat records rendered through the tokenizer's own chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("model.prompt_format", f"the tokenizer in {tokenizer_dir} defines no chat template")
    out = []
    for record in records:
        question, answer = split_markup(record)
        rendered = dict(record)
        rendered["prompt"] = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                           add_generation_prompt=True, tokenize=False)
        rendered["response"] = answer
        out.append(rendered)
    return out
