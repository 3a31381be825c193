"""The pretrained-base miniature: corpus disjoint from the held-out splits, the recipe key, the shipped
base against its recipe, the chat template and SFT's response-only loss, and a small pretraining end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from arm.core.errors import ConfigError
from arm.data.domains import corpus, generate_splits
from arm.data.domains.formats import ASSISTANT, USER, apply_format
from arm.trajectory import pretrain

REPO = Path(__file__).resolve().parent.parent
TINY = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())


def _held_out_data():
    return pretrain.held_out_data(TINY["pretrain"]["held_out"])


def _split(generator: str, split: str):
    data = dict(_held_out_data()[generator])
    seed = data.pop("seed")
    return generate_splits(generator, data, seed)[split]


EQUATION = re.compile(r"^(\d+)([*+-]\d+(?:[+-]\d+)*)=(-?\d+)$")


def _corpus_lines(docs):
    """Every arithmetic line of the corpus in equation or verbal notation (each step of a step-by-step line
    and each of its prefixes counted as an equation of its own), and every code comment."""
    equations, verbal, comments = set(), set(), set()
    for doc in docs:
        for line in doc.split("\n"):
            if line.startswith("# "):
                comments.add(line[2:])
            elif EQUATION.match(line):
                equations.add(line)
            elif ", " in line and all(EQUATION.match(part) for part in line.split(", ")):
                parts = line.split(", ")
                equations.update(parts)
                for k in range(2, len(parts) + 1):  # the prefix "3*7=21, 21+5=26" shows 3*7+5=26
                    chain = parts[0].split("=")[0] + "".join(p.split("=")[0].lstrip("0123456789") for p in parts[1:k])
                    equations.add(f"{chain}={parts[k - 1].split('=')[1]}")
            elif line.endswith(".") and " is " in line and not line[0].isalpha():
                verbal.add(line)
    return equations, verbal, comments


def _held_out_lines(records_math, records_code):
    equations, verbal = set(), set()
    for r in records_math:
        prompt, answer = corpus.equation_form(r)
        equations.add(prompt + answer)
        ops, v = corpus.math_key(r)
        words = {"add": "plus", "sub": "minus"}
        if ops[0] == "mul":
            text = f"{v[0]} times {v[1]}" + "".join(f" {words[o]} {x}" for o, x in zip(ops[1:], v[2:], strict=True))
        else:
            text = f"{v[0]}" + "".join(f" {words[o]} {x}" for o, x in zip(ops, v[1:], strict=True))
        verbal.add(f"{text} is {answer}.")
    return equations, verbal, {corpus.code_key(r) for r in records_code}


@pytest.fixture(scope="module")
def held_out_records():
    return {split: (_split("math_synth", split), _split("code_synth", split)) for split in ("validation", "test")}


def test_corpus_holds_no_validation_or_test_problem(held_out_records, monkeypatch):
    keys = corpus.held_out_keys(_held_out_data())
    assert len(keys["math"]) == 700 and len(keys["code"]) == 700
    drawn: list = []
    original = corpus._draw_chain

    def recording(*args, **kwargs):
        problem = original(*args, **kwargs)
        drawn.append(problem)
        return problem

    monkeypatch.setattr(corpus, "_draw_chain", recording)
    docs = corpus.generate({"n_documents": 4000, "n_validation": 100}, 0, keys)
    assert drawn and not set(drawn) & keys["math"]
    equations, verbal, comments = _corpus_lines(docs["train"] + docs["validation"])
    assert equations and verbal and comments
    for split, (math_records, code_records) in held_out_records.items():
        eq, vb, specs = _held_out_lines(math_records, code_records)
        assert not eq & equations, f"{split}: held-out equations in the corpus: {sorted(eq & equations)[:5]}"
        assert not vb & verbal, f"{split}: held-out verbal problems in the corpus: {sorted(vb & verbal)[:5]}"
        assert not specs & comments, f"{split}: held-out code specs in the corpus: {sorted(specs & comments)[:5]}"


def test_the_disjointness_check_can_fail(held_out_records):
    """Without the exclusion the same corpus does contain held-out problems: the check above is not vacuous."""
    docs = corpus.generate({"n_documents": 4000, "n_validation": 100}, 0, None)
    equations, _, comments = _corpus_lines(docs["train"])
    math_records, code_records = held_out_records["test"]
    eq, _, specs = _held_out_lines(math_records, code_records)
    assert eq & equations and specs & comments


def test_corpus_is_deterministic_and_carries_every_kind():
    a = corpus.generate({"n_documents": 300, "n_validation": 10}, 3)
    b = corpus.generate({"n_documents": 300, "n_validation": 10}, 3)
    assert a == b
    text = "\n".join(a["train"])
    assert "def f(x):" in text and "assert f(" in text and " times " in text and "Now " in text and ", " in text
    assert max(len(d) for d in a["train"]) <= corpus.DEFAULT_PARAMS["max_chars"] + 120  # one long code item at most
    with pytest.raises(ValueError, match="mix"):
        corpus.generate({"mix": {"poetry": 1}}, 0)


def test_recipe_key_covers_corpus_architecture_and_code_not_merge_or_sft():
    base = pretrain.recipe_key(TINY)
    changed_corpus = {**TINY, "pretrain": {**TINY["pretrain"], "corpus": {**TINY["pretrain"]["corpus"], "n_documents": 123}}}
    changed_arch = {**TINY, "arch": {**TINY["arch"], "hidden_size": 64}}
    changed_schedule = {**TINY, "pretrain": {**TINY["pretrain"], "schedule": {**TINY["pretrain"]["schedule"], "lr": 1e-3}}}
    assert len({base, pretrain.recipe_key(changed_corpus), pretrain.recipe_key(changed_arch),
                pretrain.recipe_key(changed_schedule)}) == 4
    # what SFT does with the base, and which merge runs afterwards, are not part of the base
    assert pretrain.recipe_key({**TINY, "sft": {"lr": 1.0}}) == base
    assert pretrain.recipe_key({**TINY, "merge": {"name": "ties"}}) == base
    # build: auto|never is how to get the base, not what it is
    assert pretrain.recipe_key({**TINY, "pretrain": {**TINY["pretrain"], "build": "never"}}) == base


def test_recipe_key_covers_the_corpus_code(monkeypatch, tmp_path):
    base = pretrain.code_digest()
    source = Path(corpus.__file__).read_text()
    copy = tmp_path / "corpus.py"
    monkeypatch.setattr(corpus, "__file__", str(copy))
    # a comment, a blank line or a moved import (the modules it names are keyed on their own) keep the key
    copy.write_text(source.replace("from arm.data.domains", "from arm.domains") + "\n\n# an edit\n")
    assert pretrain.code_digest() == base
    copy.write_text(source + "\nEDITED = 1\n")  # code does not
    assert pretrain.code_digest() != base


def test_shipped_base_matches_its_recipe():
    folder = pretrain.shipped_base("tiny")
    manifest = pretrain.read_manifest(folder)
    assert manifest is not None, f"{folder} has no manifest.json: run `make pretrain`"
    assert manifest["recipe_key"] == pretrain.recipe_key(TINY), (
        "conf/model/tiny.yaml's pretraining recipe (or the code that produces the base) changed since the base was "
        "shipped: run `make pretrain` and commit arm/assets/tiny-base/")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 20e6
    for generator in TINY["pretrain"]["held_out"]:
        skill = manifest["skill"][generator]
        assert skill["n"] == 400 and 0 <= skill["sft_format"] <= skill["corpus_form"] <= 1
    assert manifest["steps"] == TINY["pretrain"]["schedule"]["max_steps"]
    assert manifest["held_out_data"] == _held_out_data()


def test_chat_template_and_response_only_loss():
    from arm.trajectory.sft import IGNORE_INDEX, encode_example
    from arm.trajectory.tiny import build_tokenizer

    tok = build_tokenizer("char_chat")
    math = apply_format("math_synth", _split("math_synth", "test")[:3], "chat")
    code = apply_format("code_synth", _split("code_synth", "test")[:3], "chat")
    for r in math:
        eq = corpus.equation_form(r)[0][:-1]
        assert r["prompt"] == f"{USER}What is {eq}?\n{ASSISTANT}" and r["words"] + "\nA:" in [x["prompt"] for x in _split("math_synth", "test")]
        assert r["response"] == f" {eq}={r['answer']}. The answer is {r['answer']}."
    for r in code:
        assert r["prompt"] == f"{USER}{r['words']}\n{ASSISTANT}" and r["response"].startswith("def f(x):\n    return ")
        assert r["code_prefix"] == ""
    record = math[0]
    ids, labels = encode_example(tok, record)
    prompt_ids = tok(record["prompt"], add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tok.convert_tokens_to_ids(USER) and tok.convert_tokens_to_ids(ASSISTANT) == prompt_ids[-1]
    assert len(prompt_ids) == len(record["prompt"]) - len(USER) - len(ASSISTANT) + 2  # one id per role token
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids):] == ids[len(prompt_ids):] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[len(prompt_ids):-1]) == record["response"]
    # the plain format leaves the generators' records as they are (the from-scratch regime)
    plain = _split("math_synth", "test")[:3]
    assert apply_format("math_synth", plain, "plain") == plain


@pytest.mark.slow
def test_small_pretraining_end_to_end(tmp_path):
    """The recipe's code path at a tiny size: corpus, pretraining, base folder, manifest, skill scores, cache reuse."""
    small = json.loads(json.dumps(TINY))
    small["pretrain"]["corpus"] = {"n_documents": 200, "n_validation": 20}
    small["pretrain"]["schedule"] = {**small["pretrain"]["schedule"], "max_steps": 12, "warmup_steps": 2,
                                     "eval_every": 6, "batch_size": 8, "num_threads": 1}
    small["pretrain"]["skill_eval_limit"] = 12
    folder, key = pretrain.ensure_base(small, tmp_path)
    assert folder == tmp_path / "bases" / f"tiny-{key}"
    manifest = pretrain.read_manifest(folder)
    assert manifest["recipe_key"] == key and manifest["steps"] == 12 and manifest["corpus"]["documents"] == 200
    losses = [h["val_loss"] for h in manifest["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert manifest["skill"]["math_synth"]["n"] == 12 and manifest["skill"]["code_synth"]["n"] == 12
    from arm.trajectory.sft import load_model

    model, tok = load_model(folder)
    assert len(tok) == 105 and model.config.num_hidden_layers == TINY["arch"]["num_hidden_layers"]
    assert pretrain.ensure_base(small, tmp_path) == (folder, key)  # cached
    never = json.loads(json.dumps(small))
    never["pretrain"]["build"] = "never"
    never["pretrain"]["seed"] = 5
    with pytest.raises(ConfigError, match="make pretrain"):
        pretrain.ensure_base(never, tmp_path)
    assert not any(p.name.endswith(".tmp") or ".tmp-" in p.name for p in (tmp_path / "bases").iterdir())
