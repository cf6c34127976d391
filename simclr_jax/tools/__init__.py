"""Benchmarks, the PyTorch peer and scaling tables: programs around the library."""
