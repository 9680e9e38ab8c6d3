"""The data plane: an OpenAI-compatible router in front of ready replicas.

Reads routes and keys from the store, measures time-to-first-token per workload, holds
requests through a cold start. Never imports ``providers``.
"""
