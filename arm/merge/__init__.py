"""Merging: the streaming engine, safetensors I/O, the method contracts (per-tensor rules and
whole-model methods), the registry of methods by name, and a light command line."""
