"""The bundled data files: GPU table, CUDA table, offer snapshot."""
