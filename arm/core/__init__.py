"""The harness's foundation: one error tree, content-keyed caching, references to models and
trajectories, typed specs, provenance, and where the package's own files are.

Imports nothing else of the project (tests/test_layering.py).
"""
