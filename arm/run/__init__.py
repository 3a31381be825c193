"""Running: the ``arm`` command (Hydra), one job (trajectory -> merge -> evaluate -> report), tuning,
tracking, the plan and the Slurm launcher. The only layer that sees a Hydra ``DictConfig``."""
