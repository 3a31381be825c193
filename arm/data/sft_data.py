"""SFT data of the real domains: load a hub dataset (or a local copy) and format its rows.

Each supported dataset schema has one formatter (`FORMATTERS`) that turns a raw row into
`{"question": ..., "solution": ...}`; the domain's `prompt_template` / `response_template` then give
the `{"prompt", "response"}` records the SFT stage and ARM's calibration set read (the same record
shape as the synthetic domains). The templates are in conf/domain/{math,code}.yaml.

| format | dataset (hub id) | columns |
|---|---|---|
| `gsm8k` | openai/gsm8k (config `main`) | question, answer ("... #### 42") |
| `metamathqa` | meta-math/MetaMathQA | query, response ("... The answer is: 42"), type, original_question |
| `magicoder_evol` | ise-uiuc/Magicoder-Evol-Instruct-110K | instruction, response |
| `magicoder_oss` | ise-uiuc/Magicoder-OSS-Instruct-75K | problem, solution, lang, ... |
| `evol_instruct_code` | nickrosh/Evol-Instruct-Code-80k-v1 | instruction, output |
| `prompt_response` | any local JSONL already formatted | prompt, response |

Fields a template may use: `{question}`, `{solution}` (the row's answer as it is), and for the code
schemas `{code}` (the Python program of the answer: its first ```python block, or the whole answer when
it is a program; rows without one are skipped) and `{docstring}` (the question, safe inside a
triple-quoted docstring). The code domain trains completion-style on them (conf/domain/code.yaml,
docs/reproduce.md "Formats"): a docstring stating the task, then the program, as HumanEval and MBPP are
prompted (plain code after a prompt, no markdown, no chat template).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from arm.core.cache import atomic_write_json, build_once, content_key, source_digest
from arm.core.errors import ConfigError, InputError
from arm.data.splits import DomainData

Row = Mapping[str, Any]


def _need(row: Row, *keys: str, schema: str) -> list[str]:
    missing = [k for k in keys if k not in row]
    if missing:
        raise InputError(f"a row of the '{schema}' schema lacks column(s) {missing} (it has {sorted(row)})")
    return [str(row[k]) for k in keys]


def format_gsm8k(row: Row) -> dict[str, str]:
    """openai/gsm8k: the answer's calculator annotations `<<48/2=24>>` are removed and the final
    `#### 72` becomes `The answer is 72.` (the sentence gsm8k_cot's strict-match filter reads)."""
    question, answer = _need(row, "question", "answer", schema="gsm8k")
    reasoning, _, final = answer.rpartition("####")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    final = final.strip()
    solution = f"{reasoning}\nThe answer is {final}." if reasoning else f"The answer is {final}."
    return {"question": question.strip(), "solution": solution}


def format_metamathqa(row: Row) -> dict[str, str]:
    """meta-math/MetaMathQA: `query` and `response` as they are (responses end "The answer is: X")."""
    query, response = _need(row, "query", "response", schema="metamathqa")
    return {"question": query.strip(), "solution": response.strip()}


FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)
PYTHON_FENCES = ("python", "py", "python3")


def _parses(code: str) -> bool:
    import ast

    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def python_code(answer: str) -> str | None:
    """The Python program of a code answer: the first ```python (py, python3) block, else the first
    unlabelled block that parses as Python, else the whole answer when it parses (answers given as bare
    code). None: no Python program in it (another language, prose only)."""
    blocks = FENCE_RE.findall(answer)
    for lang, body in blocks:
        if lang.lower() in PYTHON_FENCES and body.strip():
            return body.strip("\n").rstrip()
    for lang, body in blocks:
        if not lang and body.strip() and _parses(body):
            return body.strip("\n").rstrip()
    if not blocks and answer.strip() and _parses(answer):
        return answer.strip("\n").rstrip()
    return None


def _code_fields(question: str, answer: str) -> dict[str, Any]:
    question, answer = question.strip(), answer.strip()
    return {"question": question, "solution": answer, "code": python_code(answer),
            "docstring": question.replace('"""', '\\"\\"\\"')}


def format_magicoder_evol(row: Row) -> dict[str, Any]:
    question, solution = _need(row, "instruction", "response", schema="magicoder_evol")
    return _code_fields(question, solution)


def format_magicoder_oss(row: Row) -> dict[str, Any]:
    question, solution = _need(row, "problem", "solution", schema="magicoder_oss")
    return _code_fields(question, solution)


def format_evol_instruct_code(row: Row) -> dict[str, Any]:
    question, solution = _need(row, "instruction", "output", schema="evol_instruct_code")
    return _code_fields(question, solution)


FORMATTERS: dict[str, Callable[[Row], dict[str, Any]]] = {
    "gsm8k": format_gsm8k,
    "metamathqa": format_metamathqa,
    "magicoder_evol": format_magicoder_evol,
    "magicoder_oss": format_magicoder_oss,
    "evol_instruct_code": format_evol_instruct_code,
}


def format_record(row: Row, fmt: str, prompt_template: str, response_template: str) -> dict[str, str] | None:
    """One raw row -> {"prompt", "response"} (the SFT and calibration record); None when the templates
    use a field the row does not have (`{code}` of an answer without a Python program)."""
    if fmt == "prompt_response":
        prompt, response = _need(row, "prompt", "response", schema="prompt_response")
        return {"prompt": prompt, "response": response}
    if fmt not in FORMATTERS:
        raise ConfigError("domain.sft_data.format", f"unknown format '{fmt}' (known: {', '.join([*FORMATTERS, 'prompt_response'])})")
    fields = FORMATTERS[fmt](row)
    try:
        prompt, response = prompt_template.format(**fields), response_template.format(**fields)
    except KeyError as exc:
        raise ConfigError("domain.prompt_template", f"field {exc} is not one of the '{fmt}' format's: {sorted(fields)}") from None
    if "{code}" in prompt_template + response_template and fields.get("code") is None:
        return None
    return {"prompt": prompt, "response": response}


def format_rows(rows: Iterable[Row], domain_cfg: Mapping[str, Any]) -> list[dict[str, str]]:
    """The SFT records of `rows`; rows the templates cannot use (a code answer without Python) are skipped."""
    import logging

    data = domain_cfg.get("sft_data") or {}
    fmt = data.get("format")
    if not fmt:
        raise ConfigError("domain.sft_data.format", "missing")
    prompt_t = domain_cfg.get("prompt_template") or "{question}"
    response_t = domain_cfg.get("response_template") or "{solution}"
    rows = list(rows)
    records = [r for r in (format_record(row, fmt, prompt_t, response_t) for row in rows) if r is not None]
    if len(records) < len(rows):
        logging.getLogger(__name__).info("%s: %d of %d rows have no Python program in the answer; skipped",
                                         fmt, len(rows) - len(records), len(rows))
    return records


# --------------------------------------------------------------------------- loading


def offline_dataset_message(dataset: str) -> str:
    return (f"cannot load dataset {dataset} offline: set domain.sft_data.path=/local/copy (a JSONL or Parquet "
            "file, or a folder from datasets' save_to_disk), or HF_HOME with the dataset cached")


def load_raw_rows(data_cfg: Mapping[str, Any], max_examples: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of the configured SFT dataset: `path` (local file or save_to_disk folder) or the hub id.

    With `max_examples` below the dataset's size, a seeded random subset (datasets' shuffle)."""
    import datasets

    path = data_cfg.get("path")
    split = data_cfg.get("split") or "train"
    if path:
        path = Path(path).expanduser()
        if not path.exists():
            raise InputError(f"{path}: SFT data not found (domain.sft_data.path)")
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
            if kind is None:
                raise InputError(f"{path}: expected a .jsonl, .json, .parquet or .csv file (domain.sft_data.path)")
            ds = datasets.load_dataset(kind, data_files={split: str(path)}, split=split)
    else:
        dataset = data_cfg.get("dataset")
        if not dataset:
            raise ConfigError("domain.sft_data.dataset", "set a hub dataset id or domain.sft_data.path")
        try:
            ds = datasets.load_dataset(dataset, data_cfg.get("config"), split=split)
        except Exception as exc:  # offline, unknown id, no cache: one message saying what to do
            raise InputError(f"{offline_dataset_message(dataset)} ({type(exc).__name__}: {exc})") from exc
    if max_examples is not None and int(max_examples) < len(ds):
        ds = ds.shuffle(seed=seed).select(range(int(max_examples)))
    return [dict(row) for row in ds]


def load_sft_records(domain_cfg: Mapping[str, Any], max_examples: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """The domain's SFT records ({"prompt", "response"}): all rows, or a seeded subset of `max_examples`."""
    return format_rows(load_raw_rows(domain_cfg.get("sft_data") or {}, max_examples, seed), domain_cfg)


def calibration_folder(domain_cfg: Mapping[str, Any], cache_dir: Path, n_records: int, seed: int = 0) -> tuple[str, Path]:
    """Content key and cache folder of a real domain's calibration records (complete: train.jsonl)."""
    import sys


    source = (domain_cfg.get("calibration") or {}).get("source") or "sft_data"
    data = {k: domain_cfg.get(k) for k in ("sft_data", "prompt_template", "response_template")}
    key = content_key("calibration", source, data, int(n_records), int(seed), source_digest(sys.modules[__name__]))
    return key, Path(cache_dir) / "data" / f"{domain_cfg['name']}-calibration-{key}"


def ensure_calibration_data(domain_cfg: Mapping[str, Any], cache_dir: Path, n_records: int, seed: int = 0):
    """ARM's calibration records for a real domain, written once as `train.jsonl` in the data cache.

    `domain.calibration.source`: `sft_data` (a seeded sample of `n_records` rows of the SFT dataset,
    formatted like the SFT records) or a path to a JSONL of {prompt, response} records.
    Returns an `arm.data.splits.DomainData` whose `split("train")` is what the merge reads.
    """

    source = (domain_cfg.get("calibration") or {}).get("source") or "sft_data"
    key, folder = calibration_folder(domain_cfg, cache_dir, n_records, seed)

    def build(tmp: Path) -> None:
        if source == "sft_data":
            records = load_sft_records(domain_cfg, n_records, seed=seed)
        else:
            rows = load_raw_rows({"path": source, "split": "train"}, n_records, seed)
            records = [format_record(r, "prompt_response", "", "") for r in rows]
        lines = [json.dumps({"id": f"{domain_cfg['name']}-calibration-{i}", **r}) + "\n" for i, r in enumerate(records)]
        (tmp / "train.jsonl").write_text("".join(lines))
        atomic_write_json(tmp / "data.json", {"source": source, "n": len(records), "seed": seed})

    build_once(folder, build)
    return DomainData(f"{domain_cfg['name']}-calibration", folder, key)
