"""ARM harness: streaming merges of early SFT checkpoints, compared with converged SFT.

Heavy libraries (torch, transformers, lm_eval, wandb) are imported inside the functions that need
them, so `arm --help` and configuration errors answer in well under a second.
"""

__version__ = "0.1.0"
