"""`python -m arm.run.pretrain` (`make pretrain`): pretrain the tiny base from its recipe, ship it, rescore or plot it
(arm/trajectory/pretrain.py)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from arm.core.cache import atomic_write_json
from arm.core.errors import ConfigError
from arm.core.paths import CONF_DIR, read_config
from arm.trajectory.pretrain import (
    MANIFEST_NAME,
    ensure_base,
    held_out_data,
    plot_curve,
    read_manifest,
    recipe,
    shipped_base,
    skill_scores,
)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog="python -m arm.run.pretrain", description="Pretrain (or reuse) the tiny base of a model config.")
    parser.add_argument("--model", default="tiny", help="conf/model/<model>.yaml")
    parser.add_argument("--cache", type=Path, default=Path("outputs/cache"), help="cache folder (default outputs/cache)")
    parser.add_argument("--ship", action="store_true", help="copy the base to arm/assets/<model>-base/ (what make pretrain does)")
    parser.add_argument("--plot", type=Path, default=None, help="also plot the base's pretraining loss curve (PNG)")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute the manifest's skill scores of an existing base (they do not enter the recipe key)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the pretrain block, e.g. --set schedule.max_steps=200 (not with --ship)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = CONF_DIR / "model" / f"{args.model}.yaml"
    try:
        if not path.is_file():
            raise ConfigError("--model", f"no model config {path}")
        model_cfg = read_config(path)
        if args.set:
            if args.ship:
                raise ConfigError("--set", "a base pretrained with overrides is not the recipe of the config: do not ship it")
            from omegaconf import OmegaConf

            block = OmegaConf.create(model_cfg.get("pretrain") or {})
            for item in args.set:
                k, _, v = item.partition("=")
                OmegaConf.update(block, k, yaml.safe_load(v), merge=True)
            model_cfg["pretrain"] = OmegaConf.to_container(block)
        model_cfg["pretrain"] = {**(model_cfg.get("pretrain") or {}), "build": "auto"}
        folder, key = ensure_base(model_cfg, args.cache)
        manifest = read_manifest(folder) or {}
        if args.rescore:
            rec = recipe(model_cfg)
            manifest["skill"] = skill_scores(folder, held_out_data(rec["held_out"]), limit=rec["skill_eval_limit"])
            atomic_write_json(folder / MANIFEST_NAME, manifest)
        if args.ship:
            target = shipped_base(model_cfg["name"])
            if folder.resolve() != target.resolve():
                tmp = target.with_name(target.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(folder, tmp)
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
            folder = target
        if args.plot:
            plot_curve(read_manifest(folder) or manifest, args.plot)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"base": str(folder), "recipe_key": key, "steps": manifest.get("steps"),
                      "train_wall_s": manifest.get("train_wall_s"), "skill": manifest.get("skill")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
