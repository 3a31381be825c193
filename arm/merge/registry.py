"""The one registry of merge methods: name -> rule class, imported lazily.

Every method of ``conf/merge/<name>.yaml`` is listed here exactly once; ``arm.merge.engine``
looks methods up by ``merge.name``. A per-tensor rule subclasses ``arm.merge.contract.TensorRule``.
"""

from __future__ import annotations

from importlib import import_module

from arm.merge.contract import MergeConfigError, MergeMethod

METHODS: dict[str, str] = {
    "linear": "baselines.linear:Linear",
    "task_arithmetic": "baselines.task_arithmetic:TaskArithmetic",
    "ties": "baselines.ties:Ties",
    "expo": "baselines.expo:Expo",
    "dare": "baselines.dare:Dare",
    "lawa": "baselines.averaging:Lawa",
    "ema": "baselines.averaging:Ema",
    "wsm": "baselines.averaging:Wsm",
    "arm": "arm.method.iteration:ARM",
}


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[MergeMethod]:
    """The class registered under ``name`` (a :class:`MergeMethod`); a clear error naming the known ones otherwise."""

    if name not in METHODS:
        raise MergeConfigError(
            f"merge.name: unknown merge method {name!r} (known: {', '.join(method_names())})"
        )
    module, attr = METHODS[name].split(":")
    cls = getattr(import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, MergeMethod)):
        raise MergeConfigError(f"merge.name: {METHODS[name]} is not a MergeMethod (arm/merge/contract.py)")
    return cls
