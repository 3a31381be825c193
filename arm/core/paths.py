"""Where the package's own files are: found once here, from the installed package, in a checkout
and after a non-editable ``pip install .`` alike (``conf/`` ships as the package data ``arm/conf``)."""

from __future__ import annotations

from pathlib import Path

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
