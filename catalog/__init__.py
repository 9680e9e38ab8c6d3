"""GPU models and the offers that rent them.

The bottom layer: it imports nothing of ours. It knows every GPU by its NVIDIA display
name, which CUDA versions each can run, what a GPU can serve for a model (``perf``), and
which offers fit a request, cheapest first (``query``). ``sync`` refreshes the bundled
snapshot from AWS and GCP.
"""
