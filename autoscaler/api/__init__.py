"""The management HTTP API (FastAPI): workloads by slug, keys, workers."""
