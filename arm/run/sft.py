"""`python -m arm.run.sft`: train one tiny trajectory from the configs, as a job does (arm/trajectory/sft.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from arm.core.errors import ArmError
from arm.core.paths import CONF_DIR as root
from arm.core.paths import read_config
from arm.core.specs import deep_merge
from arm.data.domains import generate_splits
from arm.data.domains.formats import apply_format
from arm.trajectory.pretrain import ensure_base
from arm.trajectory.sft import train_trajectory


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m arm.run.sft --domain math_synth --out DIR`: train the default tiny trajectory of a domain
    from conf/model/<model>.yaml (arch or pretrained base, prompt format, sft) and conf/domain/<domain>.yaml
    (data, sft), as the pipeline does."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m arm.run.sft", description=main.__doc__.split("\n")[0])
    parser.add_argument("--domain", required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="trajectory folder to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: sft.num_threads)")
    parser.add_argument("--cache", type=Path, default=Path("outputs/cache"), help="where a pretrained base is cached")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an sft key, e.g. --set lr=3e-4 --set max_train_examples=400")
    args = parser.parse_args(argv)
    try:
        import yaml

        model_cfg = read_config(root / "model" / f"{args.model}.yaml")
        domain_cfg = read_config(root / "domain" / f"{args.domain}.yaml")
        special = root / "model_domain" / f"{args.model}_{args.domain}.yaml"   # as conf/config.yaml composes it
        if special.is_file():
            extra = read_config(special)
            model_cfg = deep_merge(model_cfg, extra.get("model") or {})
            domain_cfg = deep_merge(domain_cfg, extra.get("domain") or {})
        sft = {**(model_cfg.pop("sft", None) or {}), **(domain_cfg.get("sft") or {})}
        for item in args.set:
            key, _, value = item.partition("=")
            sft[key] = yaml.safe_load(value)
        if args.threads:
            sft["num_threads"] = args.threads
        data = dict(domain_cfg.get("data") or {})
        data_seed = int(data.pop("seed", 0))
        if args.out.exists():
            raise ValueError(f"{args.out} exists; pass a new folder")
        generator = domain_cfg.get("generator", args.domain)
        splits = generate_splits(generator, data, data_seed)
        fmt = model_cfg.get("prompt_format") or "plain"
        splits = {name: apply_format(generator, records, fmt) for name, records in splits.items()}
        init_from = None
        if model_cfg.get("pretrain") is not None:

            init_from, _ = ensure_base(model_cfg, args.cache)

        def log(entry: dict) -> None:
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()), flush=True)

        manifest = train_trajectory(model_cfg, sft, splits, args.out, seed=args.seed, log_fn=log, init_from=init_from)
    except Exception as error:  # noqa: BLE001 - ValueError and the pipeline's ConfigError

        if not isinstance(error, (ValueError, ArmError)):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"trained {manifest['total_steps']} steps ({manifest['epochs']} epochs of {manifest['n_train']}) "
        f"in {manifest['train_wall_s']:.1f} s; checkpoints {[c['step'] for c in manifest['checkpoints']]}, "
        f"early {manifest['early_steps']} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
