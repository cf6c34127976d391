"""Mesh and shardings, jax.distributed, paths, checkpoints, metric writer, optimisers,
results.json and its provenance, and how the command-line programs start."""
