"""Trace replay on a simulated cloud, baselines and the oracle."""
