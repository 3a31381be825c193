"""The one compiled part: arm.merge._kernels, TIES's fused CPU kernels (arm/merge/_kernels.c).

Everything else is configured in pyproject.toml. The extension is optional: where it cannot be
built (no C compiler), the install still succeeds and TIES runs its torch path, whose output is
the same bytes (baselines/ties.py, tests/test_ties_kernels.py)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "arm.merge._kernels",
            ["arm/merge/_kernels.c"],
            # no fused multiply-adds and no fast-math: the kernels must round like torch does
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c99"],
            optional=True,
        )
    ]
)
