"""The synthetic domains' splits on disk: generated once per content key (generator code, knobs,
seed, prompt format) into the cache, and read back as records."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arm.core.cache import atomic_write_json, build_once, content_key, source_digest, to_plain
from arm.core.errors import ConfigError, InputError
from arm.data import chat_templates, domains
from arm.data.domains import formats, read_split

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class DomainData:
    name: str
    folder: Path
    key: str

    def split(self, name: str) -> list[dict]:
        try:
            return read_split(self.folder / f"{name}.jsonl")
        except ValueError as exc:
            raise InputError(str(exc)) from exc


def data_params(domain_cfg: Mapping) -> tuple[dict, int]:
    params = dict(to_plain(domain_cfg.get("data") or {}))
    seed = int(params.pop("seed", 0))
    return params, seed


def data_key(domain_cfg: Mapping, prompt_format: str = "plain", chat_template: str | None = None) -> str:
    """The content key of a synthetic domain's splits: generator code, knobs, seed and prompt format (and
    the model's chat template when the chat format is rendered through it: arm/data/chat_templates.py)."""
    generator = domain_cfg.get("generator")
    try:
        module = domains.get_generator(generator)
    except ValueError as exc:
        raise ConfigError("domain.generator", str(exc)) from exc
    if prompt_format not in formats.FORMATS:
        raise ConfigError("model.prompt_format", f"'{prompt_format}' is not one of: {', '.join(formats.FORMATS)}")
    params, seed = data_params(domain_cfg)
    parts: list[Any] = ["data", generator, params, seed, source_digest(module, domains)]
    if prompt_format != "plain":  # plain keeps the keys it always had
        parts.append({"format": prompt_format, "code": source_digest(formats)})
    if chat_template is not None:  # the markup format keeps the keys it always had
        parts.append({"chat_template": chat_templates.template_digest(chat_template), "code": source_digest(chat_templates)})
    return content_key(*parts)


def data_ref(domain_cfg: Mapping, cache_dir: Path, prompt_format: str = "plain",
             tokenizer_dir: Path | None = None) -> DomainData:
    """Where `ensure_data` keeps the splits (they may not exist yet). `tokenizer_dir`: the folder of the
    model's tokenizer, whose chat template renders the chat format (None: a model built here, the markup)."""
    template = chat_templates.chat_template_for(prompt_format, tokenizer_dir)
    key = data_key(domain_cfg, prompt_format, template)
    suffix = "" if prompt_format == "plain" else ("-template" if template is not None else f"-{prompt_format}")
    return DomainData(domain_cfg["name"], Path(cache_dir) / "data" / f"{domain_cfg['name']}{suffix}-{key}", key)


def ensure_data(domain_cfg: Mapping, cache_dir: Path, prompt_format: str = "plain",
                tokenizer_dir: Path | None = None) -> DomainData:
    """Generate the synthetic domain's splits once per (generator code, knobs, seed, prompt format, chat template)."""
    generator = domain_cfg.get("generator")
    ref = data_ref(domain_cfg, cache_dir, prompt_format, tokenizer_dir)
    templated = chat_templates.chat_template_for(prompt_format, tokenizer_dir) is not None
    params, seed = data_params(domain_cfg)
    folder = ref.folder

    def build(tmp: Path) -> None:
        try:
            splits = domains.generate_splits(generator, params, seed)
            splits = {name: formats.apply_format(generator, records, prompt_format) for name, records in splits.items()}
            if templated:
                splits = {name: chat_templates.render(records, tokenizer_dir) for name, records in splits.items()}
        except ValueError as exc:
            raise ConfigError("domain.data", str(exc)) from exc
        domains.write_splits(splits, tmp)
        atomic_write_json(tmp / "data.json", {"generator": generator, "params": params, "seed": seed, "format": prompt_format,
                                               **({"chat_template": str(tokenizer_dir)} if templated else {}),
                                               "sizes": {k: len(v) for k, v in splits.items()}})

    if build_once(folder, build):
        log.info("generated %s data (%s prompts) in %s", domain_cfg["name"], prompt_format, folder)
    return ref
