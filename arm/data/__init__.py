"""Data: the synthetic domains (generators, scorers, chat format, the pretraining corpus) and the
real domains' SFT data and calibration sets. Builds on ``arm.core`` only."""
