"""Where the package's own files are: found once here, from the installed package, in a checkout
and after a non-editable ``pip install .`` alike (``conf/`` ships as the package data ``arm/conf``)."""

from __future__ import annotations

from pathlib import Path

from arm.core.errors import InputError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # arm/
SOURCE_ROOT = PACKAGE_DIR.parent  # the checkout, or site-packages: holds arm/, baselines/, evals/
ASSETS_DIR = PACKAGE_DIR / "assets"


def _conf_dir() -> Path:
    checkout = SOURCE_ROOT / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    shipped = PACKAGE_DIR / "conf"  # a wheel: pyproject.toml maps conf/ to arm/conf
    if (shipped / "config.yaml").is_file():
        return shipped
    raise FileNotFoundError(f"no conf/config.yaml next to {PACKAGE_DIR} nor in it: a broken installation")


CONF_DIR = _conf_dir()


def read_config(path: Path) -> dict:
    """One config file of conf/ as a plain dict (YAML, no Hydra composition: `defaults:` lists and
    interpolations are left as written). The one reader of single config files; whole job configs are
    composed by Hydra (arm/run). A missing or malformed file is an error naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def group_file(group: str, name: str) -> Path:
    """conf/<group>/<name>.yaml."""
    return CONF_DIR / group / f"{name}.yaml"
