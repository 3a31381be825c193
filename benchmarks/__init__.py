"""Benchmarks (``make bench``): our merge engine against mergekit and the streaming I/O floor."""
