"""Mesh and shardings, jax.distributed, paths, checkpoints, metric writer, optimisers."""
