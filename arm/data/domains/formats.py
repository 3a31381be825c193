"""Prompt formats of the synthetic domains: what a record's prompt and response look like to the model.

- `plain` (the from-scratch regime, `model=tiny_scratch`): the generators' own records, e.g.
  "Tom has 3 bags of 7 pens, gets 5.\\nA:" -> " 26" and "x times 3 plus 2\\ndef f(x):\\n" -> "    return x*3+2".
- `chat` (the pretrained-base miniature, `model=tiny`): an instruction template with role tokens the
  base has never seen and, for math, a fixed answer phrase:
  "<|user|>What is 3*7+5?\\n<|assistant|>"  -> " 3*7+5=26. The answer is 26."   (Tom has 3 bags of 7 pens, gets 5.)
  "<|user|>x times 3 plus 2\\n<|assistant|>"                -> "def f(x):\\n    return x*3+2"
  SFT's loss is on the response (and EOS) only; learning this format is what SFT of a pretrained model
  does first (docs/trajectory.md).

The underlying problem, the answer and the hidden tests are unchanged, so both formats are scored by the
same scorers (the math scorer reads the last number; code runs `code_prefix` + the completion, cut where
the function ends; in the chat format `code_prefix` is empty and the model writes the header itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from arm.data.domains import code_synth, get_generator, math_synth
from arm.data.domains.corpus import equation_form

FORMATS = ("plain", "chat")
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
MATH_ANSWER = " {expr}={answer}. The answer is {answer}."


def _chat(generator: str, record: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(record)
    if generator == "math_synth":

        problem = str(record["prompt"])
        if problem.endswith(math_synth.CUE):
            problem = problem[: -len(math_synth.CUE)]
        out["words"] = problem
        # the problem in the notation whose arithmetic the base knows (docs/trajectory.md: the tiny base does
        # not read quantities out of sentences, so a word problem would make SFT teach reading, not a format)
        expr = equation_form(record)[0][:-1]
        out["prompt"] = f"{USER}What is {expr}?\n{ASSISTANT}"
        # a worked line, then the fixed answer phrase: the scorer reads the last number
        out["response"] = MATH_ANSWER.format(expr=expr, answer=record["answer"])
    elif generator == "code_synth":
        words = str(record["prompt"]).split("\n", 1)[0]
        out["words"] = words
        # the header is the model's to write: the base continues "def f(x):\n" by habit, the template it has to learn
        out["prompt"] = f"{USER}{words}\n{ASSISTANT}"
        out["response"] = code_synth.CODE_PREFIX + str(record["response"])
        out["code_prefix"] = ""
    else:

        module = get_generator(generator)
        if not hasattr(module, "chat_format"):
            raise ValueError(f"prompt format 'chat' has no template for domain {generator!r} "
                             f"(arm/data/domains/{generator}.py defines no chat_format)")
        return dict(module.chat_format(dict(record)))
    return out


def apply_format(generator: str, records: Sequence[Mapping[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """The records of a synthetic domain in prompt format `fmt` (`plain` returns them unchanged)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "plain":
        return [dict(r) for r in records]
    return [_chat(generator, r) for r in records]
