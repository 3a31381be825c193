"""The project's Hydra plugins (a launcher); Hydra finds them in the hydra_plugins namespace."""
