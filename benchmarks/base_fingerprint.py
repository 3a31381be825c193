"""Fingerprint of the code that pretrains the tiny base: pretrain a reduced variant of the recipe in
conf/model/tiny.yaml (20000 documents, 150 steps, same seed) and print its key, the sha256 of its
weights and its skill scores.

Run it on two revisions (e.g. before and after a refactor, each in its own checkout) to show that the
shipped base's weights do not depend on the change; then the shipped manifest may be re-keyed
(arm/assets/tiny-base/manifest.json "rekeyed" says when and why it was). About 3 minutes on 2 cores.

    python -m benchmarks.base_fingerprint /tmp/fingerprint
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

from arm.core.paths import CONF_DIR
from arm.trajectory import pretrain


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "outputs/fingerprint")
    cfg = yaml.safe_load((CONF_DIR / "model" / "tiny.yaml").read_text())
    cfg["pretrain"]["corpus"] = {**cfg["pretrain"]["corpus"], "n_documents": 20000}
    cfg["pretrain"]["schedule"] = {**cfg["pretrain"]["schedule"], "max_steps": 150, "warmup_steps": 10, "eval_every": 50}
    cfg["pretrain"]["skill_eval_limit"] = 50
    folder, key = pretrain.ensure_base(cfg, out)
    manifest = json.loads((folder / "manifest.json").read_text())
    print(json.dumps({"key": key, "sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
                      "history": manifest["history"][-1], "skill": manifest["skill"],
                      "characters": manifest["corpus"]["characters"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
