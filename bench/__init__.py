"""Benchmarks: bounded, 127.0.0.1-only measurements run as ``python -m bench.<name>``."""
