"""Trajectories: the pretrained tiny base, SFT (the tiny loop and transformers' Trainer), and reading
SFT output folders into base + early checkpoints + converged SFT. Builds on ``arm.core``, ``arm.data``."""
